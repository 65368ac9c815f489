from splicegate.cli import main

raise SystemExit(main())
