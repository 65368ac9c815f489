"""One proxy process run as a daemon: signals, reload, log reopening, systemd readiness.

Signal handlers only record what was asked and wake the loop; the loop acts, one thing at
a time, in a greenlet (gunicorn's arbiter works the same way): SIGTERM or SIGINT stops
accepting and drains, a second one or SIGQUIT ends the drain at once (SIGQUIT alone stops
without one, as gunicorn's does), SIGHUP reloads the settings, SIGUSR1 reopens the access
log. The CLI runs this for a single process, and each ``--workers`` process runs it too.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import signal
from collections.abc import Callable, Sequence

import gevent
from gevent.event import Event

from splicegate import _early
from splicegate.auth import Authenticator
from splicegate.config import Config, parse_address
from splicegate.notify import notify, reloading
from splicegate.server import ProxyServer

log = logging.getLogger("splicegate")

#: set in a worker's environment by the supervisor (workers.py): the supervisor's pid
WORKER_ENV = "SPLICEGATE_WORKER"
#: set in a worker's environment by the supervisor when it serves --admin: that endpoint's
#: address (HOST:PORT), which the worker refuses to tunnel to, as its own listeners
ADMIN_ENV = "SPLICEGATE_SUPERVISOR_ADMIN"


class Signals:
    """Signals received and not yet acted on; the handlers only add to it and wake."""

    NAMES = {
        signal.SIGTERM: "stop",
        signal.SIGINT: "stop",
        signal.SIGQUIT: "quit",
        signal.SIGHUP: "reload",
        signal.SIGUSR1: "reopen",
    }

    #: counted: two SIGTERMs before the loop looks are a stop and a second stop; the others
    #: coalesce, as one reload (or reopen) covers any number asked for before it runs
    COUNTED = ("stop", "quit")

    def __init__(self) -> None:
        self.pending: collections.Counter[str] = collections.Counter()
        self.wake = Event()
        for signum, name in self.NAMES.items():
            gevent.signal_handler(signum, self._flag, name)
        for signum in _early.take():  # came while the command was still importing
            self._flag(self.NAMES[signum])

    def _flag(self, name: str) -> None:
        self.pending[name] = self.pending[name] + 1 if name in self.COUNTED else 1
        self.wake.set()

    def take(self, name: str) -> bool:
        if self.pending[name] > 0:
            self.pending[name] -= 1
            return True
        return False

    def wait(self, timeout: float | None = None) -> None:
        self.wake.wait(timeout)
        self.wake.clear()

    def stopping(self) -> bool:
        """A stop asked for: SIGTERM or SIGINT (drain), or SIGQUIT (no drain)."""
        return self.pending["stop"] > 0 or self.pending["quit"] > 0

    def quitting(self) -> bool:
        """The stop came as SIGQUIT: no drain."""
        return self.pending["quit"] > 0

    def announce_stop(self, what: str, drain: float) -> None:
        """The stop's log line: SIGQUIT closes the open tunnels at once, SIGTERM or SIGINT
        gives them ``drain`` seconds first."""
        if self.quitting():
            log.info("stopping: %s; SIGQUIT: closing the open tunnels now", what)
        else:
            log.info(
                "stopping: %s; open tunnels get %g s (stop again to close them now)", what, drain
            )

    def on_second_stop(self, act: Callable[..., None], *args: object) -> None:
        """While a drain runs (in another greenlet): SIGQUIT, or a second SIGTERM or SIGINT,
        means the operator will not wait, so ``act`` ends it now; a stop that came as
        SIGQUIT has no drain to wait for, and was announced as such."""
        if not self.take("quit"):
            self.take("stop")  # the one that started the drain
            while not (self.take("quit") or self.take("stop")):
                self.wait()
            log.warning("stop signal while draining: closing the open tunnels now")
        act(*args)


def serve(config: Config, load: Callable[[], Config], source: str = "") -> int:
    """Run a proxy until SIGTERM/SIGINT, then drain for ``config.drain_timeout`` and
    return 0. ``load`` reads the settings anew for SIGHUP (the config file under the same
    flags); ``source`` names the file for the log."""
    supervisor = int(os.environ.get(WORKER_ENV) or 0)
    worker = supervisor != 0
    if worker:
        # A process group of its own makes a worker a background job at a terminal: its
        # log lines must not stop it (SIGTTOU under `stty tostop`).
        signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        # The supervisor serves --admin for all workers.
        config = dataclasses.replace(config, admin=None)
        source = "the supervisor's settings"  # its copy of the file it accepted, not the file
        Authenticator.warn_when_empty = False  # the supervisor's to say, of the operator's file
        read = load

        def load() -> Config:
            return dataclasses.replace(read(), admin=None)

    signals = Signals()  # before start: a signal during start-up waits for the loop
    try:
        admin = os.environ.get(ADMIN_ENV) if worker else None
        own = [parse_address(admin)] if admin else []
        server = ProxyServer(config, own_addresses=own)
        server.start()
    except (OSError, RuntimeError, ValueError) as exc:
        log.error("%s", exc)
        return 1
    notify("READY=1")
    while not signals.stopping():
        signals.wait(1.0 if worker else None)
        if worker and os.getppid() != supervisor:  # it was killed: no one would stop us
            log.warning("the supervisor (pid %d) is gone; stopping", supervisor)
            break
        if signals.take("reload"):
            reload(server, load, source)
        if signals.take("reopen") and server.access_log is not None:
            server.access_log.reopen()
    notify("STOPPING=1")
    signals.announce_stop("no new connections", server.config.drain_timeout)
    impatient = gevent.spawn(signals.on_second_stop, server.hurry)
    try:
        server.stop()
    finally:
        impatient.kill()
    log.info("stopped")
    return 0


def reload(server: ProxyServer, load: Callable[[], Config], source: str) -> None:
    """SIGHUP: the new settings, or the old ones kept and the reason logged."""
    reloading()
    try:
        config = load()
        ignored = server.reload(config)
    except (ValueError, OSError) as exc:
        log.error("reload refused, the running settings stay: %s", exc)
    else:
        log.setLevel(server.config.log_level_number)
        warn_needs_restart(ignored)
        log.info("reloaded%s", f" {source}" if source else "")
    notify("READY=1")


def warn_needs_restart(names: Sequence[str]) -> None:
    """Said by whichever process judges a reload: a single process, or a supervisor for
    all its workers (which are never handed such a change)."""
    for name in names:
        log.warning(
            "reload: --%s changed, which needs a restart; ignored until then",
            name.replace("_", "-"),
        )
