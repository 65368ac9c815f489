"""The ``splicegate`` command (the console script, ``python -m splicegate``, and each
``--workers`` process). It catches SIGHUP and SIGUSR1 before importing anything else (see
_early.py), then runs the CLI."""

from splicegate import _early


def main() -> int:
    _early.catch()
    try:
        from splicegate.cli import main as cli_main

        return cli_main()
    finally:
        _early.release()  # --help, a usage error: what the daemon did not take


if __name__ == "__main__":
    raise SystemExit(main())
