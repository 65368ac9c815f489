"""The ``splicegate`` command: flags generated from the settings table in config.py."""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import queue
import sys
from collections.abc import Callable, Sequence
from typing import Any

from splicegate import _early, configfile, daemon
from splicegate._version import __version__
from splicegate.config import Config, cli_fields
from splicegate.files import private_directory
from splicegate.limits import raise_open_file_limit
from splicegate.metrics import MULTIPROC_ENV
from splicegate.relay import native_engine_error

log = logging.getLogger("splicegate")

EXAMPLES = """\
examples:
  splicegate
      listen on 127.0.0.1:3128 and tunnel to port 443 of public addresses
  splicegate --listen 0.0.0.0:3128 --allow-client 192.168.1.0/24
      serve a home network
  splicegate --allow-port 443 --allow-port 8000-8100 --nameserver 9.9.9.9:53
      more ports; names resolved by a chosen DNS server
  curl -p -x http://127.0.0.1:3128 https://example.com/
      use it
  splicegate passwd users.txt alice && splicegate --auth-file users.txt
      require a user name and password (curl --proxy-user alice:PASSWORD ...)
  splicegate check-config /etc/splicegate.toml
      check a settings file (keys: the flags' names with _ for -) and print the result
  splicegate --config /etc/splicegate.toml --workers 4 --admin 127.0.0.1:9128
      run from it in 4 processes, with Prometheus /metrics; SIGHUP reloads the file
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splicegate",
        description="An HTTP CONNECT forward proxy with a zero-copy relay.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="store_true", help="print version and engine")
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="read settings from this TOML file, each key a flag's name with _ for -; flags "
        "given here override it; re-read on SIGHUP (check one: splicegate check-config FILE)",
    )
    for f in cli_fields():
        meta = f.metadata
        default = meta["shown_default"]
        if default is None:
            default = ", ".join(map(str, f.default_factory())) if meta["multiple"] else f.default
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            metavar=meta["metavar"] or None,
            action="append" if meta["multiple"] else "store",
            default=None,
            help=f"{meta['help']} (default: {default})",
        )
    return parser


def config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Config:
    """Defaults, then ``--config FILE``, then the flags given."""
    try:
        return load_settings(args)
    except configfile.ConfigError as exc:
        parser.error(str(exc))
        raise  # parser.error exits; this keeps type checkers informed


def load_settings(args: argparse.Namespace) -> Config:
    """The settings, at start and on each reload. A --workers worker's file is its
    supervisor's private copy: read only from a directory that still is private, as the
    supervisor checked just before (a cleaner may have removed it since, and another user
    made one at its path)."""
    if args.config and os.environ.get(daemon.WORKER_ENV):
        directory = os.path.dirname(os.path.abspath(args.config))
        if not private_directory(directory):
            raise configfile.ConfigError(
                f"{directory} is no longer the supervisor's private directory"
            )
    return configfile.load(args.config, flag_values(args))


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags (None: not given, so the file or the default holds)."""
    return {f.name: getattr(args, f.name) for f in cli_fields()}


class _DroppingQueueHandler(logging.handlers.QueueHandler):
    """Never blocks the hub: a full queue (stderr stuck) drops the line and counts it."""

    def __init__(self, lines: queue.Queue[logging.LogRecord]) -> None:
        super().__init__(lines)
        self.dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1


class _PatientQueueListener(logging.handlers.QueueListener):
    """QueueListener's stop() puts its sentinel with put_nowait, which raises queue.Full
    when stderr fell behind, and then joins its thread for as long as stderr stays stuck.
    This one waits for room and for the thread, for a while each, then gives up on them
    (the thread is a daemon), so that the stop returns; what Python itself flushes to
    stderr at exit may still wait on it. Returns whether the queue was written out."""

    stop_timeout = 5.0

    def stop(self) -> bool:  # type: ignore[override]
        try:
            self.queue.put(self._sentinel, timeout=self.stop_timeout)  # type: ignore[attr-defined]
        except queue.Full:
            return False
        thread = self._thread  # type: ignore[attr-defined]
        if thread is not None:
            thread.join(self.stop_timeout)
            if thread.is_alive():
                return False
        self._thread = None
        return True


def setup_logging(level: int, *, with_pid: bool = False) -> Callable[[], None]:
    """Log lines go through a queue to a native thread that writes them to stderr. With
    ``with_pid`` (--workers) each line says which process wrote it: splicegate[PID].
    Returns what stops it: the queue is written out, then the count of lines dropped
    while stderr did not keep up, if any, so that a gap in the log is never silent."""
    lines: queue.Queue[logging.LogRecord] = queue.Queue(maxsize=10_000)
    writer = logging.StreamHandler(sys.stderr)
    name = "splicegate[%(process)d]" if with_pid else "splicegate"
    writer.setFormatter(logging.Formatter(f"%(asctime)s {name} %(levelname)s %(message)s"))
    listener = _PatientQueueListener(lines, writer)
    listener.start()
    handler = _DroppingQueueHandler(lines)
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False

    def stop() -> None:
        log.removeHandler(handler)
        if not listener.stop():  # stderr stuck for good: nothing more can be written to it
            return
        if handler.dropped:
            writer.handle(
                log.makeRecord(
                    log.name,
                    logging.WARNING,
                    __file__,
                    0,
                    "%d log lines were dropped while stderr did not keep up",
                    (handler.dropped,),
                    None,
                )
            )

    return stop


def print_version(config: Config) -> int:
    log.addHandler(logging.NullHandler())  # the reason is printed below, not warned about
    try:
        engine = config.create_engine()
    except RuntimeError as exc:
        print(f"splicegate: error: {exc}", file=sys.stderr)
        return 1
    mode = "splice(2), zero-copy" if engine.splices else "recv/send copying"
    print(f"splicegate {__version__}")
    print(f"engine: {engine.name} ({mode})")
    why = native_engine_error()
    if engine.name != "native" and why:
        print(f"native engine unavailable: {why}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["passwd"]:  # splicegate passwd FILE USER: writes an --auth-file
        from splicegate.auth import passwd_main

        _early.release()  # not a daemon: SIGHUP and SIGUSR1 do what they would
        return passwd_main(argv[1:])
    if argv[:1] == ["check-config"]:  # splicegate check-config FILE [FLAGS]: print settings
        _early.release()
        return configfile.check_config_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    config = config_from_args(parser, args)
    if args.version:
        _early.release()
        return print_version(config)
    stop_logging = setup_logging(config.log_level_number, with_pid=config.workers > 1)
    try:
        return run(config, lambda: load_settings(args), args.config)
    finally:
        stop_logging()


def run(config: Config, load: Callable[[], Config] | None = None, source: str | None = None) -> int:
    """Serve until SIGTERM/SIGINT (daemon.py), or supervise ``--workers`` processes that
    do. ``load`` reads the settings anew on SIGHUP."""
    worker = bool(os.environ.get(daemon.WORKER_ENV))
    if not worker and config.workers == 1:
        # One process keeps its metrics in memory: an inherited PROMETHEUS_MULTIPROC_DIR
        # (before prometheus_client is imported) would have them summed with whatever an
        # earlier run left in that directory.
        os.environ.pop(MULTIPROC_ENV, None)
    if not worker:  # workers inherit the raised limit, and do not warn again
        raise_open_file_limit(config.max_connections, config.pipes_per_process())
    load = load or (lambda: config)
    if config.workers > 1 and not worker:
        from splicegate.workers import Supervisor

        return Supervisor(config, load).run()
    return daemon.serve(config, load, source or "")
