"""The ``splicegate`` command (the console script, and ``python -m splicegate``). It catches
SIGHUP and SIGUSR1 before importing anything else (see _early.py), then runs the CLI."""

from splicegate import _early


def main() -> int:
    _early.catch()
    from splicegate.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    raise SystemExit(main())
