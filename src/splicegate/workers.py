"""``--workers N``: N proxy processes on the same ports, under a supervisor.

Each worker is the supervisor's splicegate (``_WORKER``) started fresh (fork and exec, not a
bare fork) on the supervisor's settings: it imports, builds its engine and binds its
listeners itself, with SO_REUSEPORT, so the kernel spreads new connections over the workers and a
dead worker's share goes to the others at once. A fresh process carries no copy of the
supervisor's greenlets or admin socket, and prometheus_client sees
``PROMETHEUS_MULTIPROC_DIR`` when it is first imported.

The settings a worker gets are the supervisor's running ones, never the config file as it is
on disk now: the supervisor writes them to a private file (``--config`` for every worker it
starts) when it starts and on each reload it accepts. So a worker restarted after a refused
reload, or after a change that needs a restart (``--listen``), runs what the others run.

The supervisor serves ``--admin`` for the whole daemon (the workers' metrics added up from
that directory), restarts a worker that dies (waiting longer each time one dies young),
and passes SIGHUP and SIGUSR1 on; SIGTERM and SIGINT go on to the workers as SIGTERM, and they
drain; a second one, or SIGQUIT, goes on as SIGQUIT and ends their drain at once; the
supervisor exits 0 once they have stopped. The workers run in a process group of their own,
so a Ctrl-C at a terminal reaches the supervisor alone. Workers tell it they are ready the
way it tells systemd: ``READY=1`` datagrams, to a socket of its own in their
``NOTIFY_SOCKET``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import shutil
import signal
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gevent
from gevent import socket
from gevent.subprocess import DEVNULL, Popen, TimeoutExpired

from splicegate import auth
from splicegate.admin import AdminServer
from splicegate.config import Config, component_fields
from splicegate.configfile import ConfigError, check_files, render, restart_only_changes
from splicegate.daemon import ADMIN_ENV, WORKER_ENV, Signals, warn_needs_restart
from splicegate.files import private_directory, read_regular
from splicegate.notify import ENV as NOTIFY_ENV
from splicegate.notify import notify, reloading
from splicegate.relay import native_engine_error, usable_pipe_size
from splicegate.request import show_address

log = logging.getLogger("splicegate")


#: A worker's program: the splicegate this supervisor runs, wherever it was imported from.
#: -P keeps the working directory off sys.path, where "-m splicegate" would put it first (a
#: dns.py or gevent.py there would then run in every worker). The directory the supervisor's
#: splicegate came from is put first instead, unless it is on sys.path already (an installed
#: package's site-packages, which must not go before the standard library): a checkout run
#: from its src/ starts workers on that same code, not on another copy installed elsewhere.
_WORKER = (
    "import sys; home = sys.argv.pop(1); home in sys.path or sys.path.insert(0, home); "
    "from splicegate.__main__ import main; sys.exit(main())"
)
_HOME = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Worker:
    slot: int
    proc: Popen | None = None
    started: float = 0.0
    ready: bool = False
    #: READY=1 came since it was started: its signal handlers are in place
    up: bool = False
    #: SIGHUP or SIGUSR1 that came while it was starting, passed on once it is up
    held: list[int] = dataclasses.field(default_factory=list)
    #: seconds to wait before the next restart; doubles while the worker keeps dying young
    backoff: float = 0.0
    restart_at: float = 0.0


class Supervisor:
    """Starts, watches and stops the workers; acts on signals in its loop only."""

    #: a worker that dies sooner than this after its start counts as dying young
    young = 10.0
    #: the first and the longest wait before restarting a worker that died young
    backoff_min = 0.5
    backoff_max = 30.0
    #: how long the workers get to say READY=1 at start
    start_timeout = 60.0
    #: how often the loop looks at the workers when no signal wakes it
    tick = 0.2

    def __init__(self, config: Config, load: Callable[[], Config]) -> None:
        """Raises ConfigError for settings with objects only an application gives (hooks, a
        resolver): a worker is a fresh process, and its settings are a file."""
        hooks = [f.name for f in component_fields() if getattr(config, f.name) is not None]
        if hooks:
            raise ConfigError(
                f"workers: a worker is a fresh process, which cannot be handed the objects "
                f"in {', '.join(hooks)}; run a ProxyServer in each process instead"
            )
        self.config = config
        self.load = load
        self._settings: WorkerSettings | None = None
        self.workers = [Worker(slot) for slot in range(config.workers)]
        self.admin: AdminServer | None = None
        self.draining = False
        self._metrics_dir: str | None = None
        self._own_metrics_dir = False
        self._notify_sock: socket.socket | None = None
        self._notify_name = f"splicegate-{os.getpid()}-{secrets.token_hex(4)}"
        self._worker_env: dict[str, str] = {}

    # --- running --------------------------------------------------------------------------

    def run(self) -> int:
        signals = Signals()
        try:
            self._prepare()
            for worker in self.workers:
                self._spawn(worker)
            if self._wait_ready(time.monotonic() + self.start_timeout, signals):
                log.info("all %d workers ready", len(self.workers))
                notify("READY=1", f"MAINPID={os.getpid()}")
            elif not signals.stopping():  # else asked to stop while they started: a stop
                log.error("the workers did not all start; stopping")
                self._stop_workers(signal.SIGTERM, time.monotonic() + 5)
                return 1
            while not signals.stopping():
                signals.wait(self.tick)
                if signals.take("reload"):
                    self._reload(signals)
                if signals.take("reopen"):
                    self._signal_all(signal.SIGUSR1)
                self._watch()
            self.draining = True
            notify("STOPPING=1")
            drain = self.config.drain_timeout
            # SIGQUIT goes on as itself: a SIGTERM first would have each worker announce,
            # and start, a drain.
            stop = signal.SIGQUIT if signals.quitting() else signal.SIGTERM
            signals.announce_stop("the workers stop accepting", drain)
            # "Now" goes on as SIGQUIT: a second SIGTERM could merge with the first in a
            # worker that has not taken it yet.
            impatient = None
            if stop == signal.SIGTERM:
                impatient = gevent.spawn(signals.on_second_stop, self._signal_all, signal.SIGQUIT)
            try:
                ok = self._stop_workers(stop, time.monotonic() + drain + 10)
            finally:
                if impatient is not None:
                    impatient.kill()
            log.info("stopped")
            return 0 if ok else 1
        except (OSError, ConfigError) as exc:
            log.error("%s", exc)
            self._stop_workers(signal.SIGTERM, time.monotonic() + 5)
            return 1
        finally:
            self._cleanup()

    def _prepare(self) -> None:
        """The workers' environment: their settings (the access log checked once, here), a
        readiness socket, and a metrics directory if there is an admin endpoint to serve
        (before prometheus_client is imported here)."""
        check_files(self.config)  # said once here, not once by every worker
        if self.config.admin is not None:
            from splicegate.metrics import MULTIPROC_ENV, collect_multiprocess, wipe_multiprocess

            self._metrics_dir = os.environ.get(MULTIPROC_ENV)
            if self._metrics_dir:
                wipe_multiprocess(self._metrics_dir)
            else:
                self._metrics_dir = tempfile.mkdtemp(prefix="splicegate-metrics-")
                self._own_metrics_dir = True
                os.environ[MULTIPROC_ENV] = self._metrics_dir
            directory = self._metrics_dir
            hub = gevent.get_hub()

            def scrape() -> bytes:  # reads every worker's file: off the hub, in a thread
                return hub.threadpool.apply(collect_multiprocess, (directory,))

            self.admin = AdminServer(self.config.admin, scrape, lambda: not self.draining)
            self.admin.start()
        # A --pipe-size past what this user may have is found, and warned of, once here;
        # the workers are given the size they will get, or each would say it again.
        pinned: dict[str, Any] = {}
        if self.config.engine != "python" and native_engine_error() is None:
            size = usable_pipe_size(self.config.pipe_size)
            if size != self.config.pipe_size:
                pinned["pipe_size"] = size
        self._settings = WorkerSettings(pinned)
        self._settings.accept(self.config)
        self._notify_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify_sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._notify_sock.bind("\0" + self._notify_name)
        self._worker_env = {
            **os.environ,
            WORKER_ENV: str(os.getpid()),
            NOTIFY_ENV: "@" + self._notify_name,
        }
        if self.admin is not None:
            self._worker_env[ADMIN_ENV] = show_address(self.admin.address)

    def _spawn(self, worker: Worker) -> None:
        """Start the worker. Raises OSError when no process could be made, or the settings
        not written again."""
        assert self._settings is not None
        self._settings.restore()
        worker.proc = Popen(
            [sys.executable, "-P", "-c", _WORKER, _HOME, "--config", self._settings.path],
            env=self._worker_env,
            stdin=DEVNULL,
            # Their own process group: a Ctrl-C at the terminal reaches the supervisor
            # alone, which passes one stop on; two would cut the drain short.
            process_group=0,
        )
        worker.started = time.monotonic()
        worker.ready = worker.up = False
        worker.held.clear()  # it reads the settings, and opens its log, as it starts
        log.info("worker %d started (pid %d)", worker.slot + 1, worker.proc.pid)

    def _readiness(self, timeout: float) -> None:
        """Read the workers' datagrams for up to ``timeout`` seconds (cooperatively).

        The socket is in the abstract namespace, which has no permissions: any local
        process can send to it. So a datagram counts only from a worker's own pid, as the
        kernel vouches for it (SCM_CREDENTIALS, as systemd checks a service's), never from
        what the datagram says; anything else is ignored."""
        assert self._notify_sock is not None
        self._notify_sock.settimeout(timeout)
        with contextlib.suppress(TimeoutError, OSError):
            while True:
                data, ancillary, _, _ = self._notify_sock.recvmsg(4096, _CREDENTIALS_SPACE)
                self._notify_sock.settimeout(0)
                pid = _sender_pid(ancillary)
                ready = "READY=1" in data.decode("ascii", "replace").splitlines()
                for worker in self.workers:
                    if worker.proc is not None and worker.proc.pid == pid:
                        worker.ready = ready
                        if ready and not worker.up:
                            worker.up = True
                            for signum in worker.held:
                                self._send(worker, signum)
                            worker.held.clear()

    def _wait_ready(self, deadline: float, signals: Signals) -> bool:
        while time.monotonic() < deadline:
            self._readiness(self.tick)
            if all(w.ready for w in self.workers):
                return True
            if any(w.proc is None or w.proc.poll() is not None for w in self.workers):
                return False  # a worker could not start: its error is on stderr
            if signals.stopping():
                return False
        return False

    def _watch(self) -> None:
        """Restart a worker that has died, after its backoff."""
        self._readiness(0)
        now = time.monotonic()
        for worker in self.workers:
            proc = worker.proc
            if proc is not None and proc.poll() is not None:
                self._forget(proc.pid)
                lived = now - worker.started
                self._back_off(worker, now, young=lived < self.young)
                log.warning(
                    "worker %d (pid %d) exited with %s after %.1f s; restarting in %g s",
                    worker.slot + 1,
                    proc.pid,
                    _exit_text(proc.returncode),
                    lived,
                    worker.backoff,
                )
                worker.proc = None
            if worker.proc is None and now >= worker.restart_at:
                try:
                    self._spawn(worker)
                except OSError as exc:
                    self._back_off(worker, now, young=True)
                    log.error(
                        "worker %d could not be started (%s); trying again in %g s",
                        worker.slot + 1,
                        exc,
                        worker.backoff,
                    )

    def _back_off(self, worker: Worker, now: float, *, young: bool) -> None:
        """When to start it again: the wait doubles while it keeps dying young."""
        if young:
            worker.backoff = min(max(worker.backoff * 2, self.backoff_min), self.backoff_max)
        else:
            worker.backoff = self.backoff_min
        worker.restart_at = now + worker.backoff

    def _reload(self, signals: Signals) -> None:
        """Check the new settings here once, so a bad file is reported once, not by every
        worker; when they are good, pass them on (settings that need a restart keep their
        running values) and wait, bounded, for the workers to take them."""
        reloading()
        assert self._settings is not None
        try:
            config = self.load()
            check_files(config, self.config)
            ignored = restart_only_changes(self.config, config)
            if ignored:  # a Config made anew reads its password file again
                config = dataclasses.replace(
                    config, **{name: getattr(self.config, name) for name in ignored}
                )
            self._settings.accept(config)
        except (ValueError, OSError) as exc:
            log.error("reload refused, the running settings stay: %s", exc)
        else:
            # The supervisor goes by them too: how long it waits for a drain, above all.
            self.config = config
            log.setLevel(config.log_level_number)
            warn_needs_restart(ignored)
            for worker in self.workers:
                worker.ready = False
            self._signal_all(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while not all(w.ready or w.proc is None or w.proc.poll() is not None
                          for w in self.workers):  # fmt: skip
                if time.monotonic() > deadline or signals.stopping():
                    break
                self._readiness(self.tick)
        notify("READY=1")

    # --- stopping -------------------------------------------------------------------------

    def _signal_all(self, signum: int) -> None:
        """Send ``signum`` to every worker. A reload or reopen for a worker still starting
        is held until it is up: before its handlers are in place either would kill it (the
        default action), and the settings it read or the log it opened may be older."""
        for worker in self.workers:
            if signum in (signal.SIGHUP, signal.SIGUSR1) and not worker.up:
                if signum not in worker.held:
                    worker.held.append(signum)
            elif signum == signal.SIGQUIT and not worker.up:
                self._send(worker, signal.SIGTERM)  # no tunnels yet; SIGQUIT's default dumps core
            else:
                self._send(worker, signum)

    @staticmethod
    def _send(worker: Worker, signum: int) -> None:
        if worker.proc is not None and worker.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                worker.proc.send_signal(signum)

    def _stop_workers(self, signum: int, deadline: float) -> bool:
        """Signal every worker, wait until ``deadline``, then kill what is left."""
        self._signal_all(signum)
        clean = True
        for worker in self.workers:
            proc = worker.proc
            if proc is None:
                continue
            killed = False
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutExpired:
                log.error("worker %d (pid %d) did not stop; killing it", worker.slot + 1, proc.pid)
                proc.kill()
                killed = True
                try:
                    proc.wait(timeout=5)
                except TimeoutExpired:  # SIGKILL waits for a task in uninterruptible sleep
                    log.error(
                        "worker %d (pid %d) outlived SIGKILL for 5 s; leaving it",
                        worker.slot + 1,
                        proc.pid,
                    )
                    continue
            # One still starting has no handlers yet: the stop's default action ends it, and
            # that is its clean stop (it held no tunnel).
            stopped = proc.returncode in (-signum, -signal.SIGTERM) and not worker.up
            if proc.returncode not in (0, None) and not stopped:
                clean = False
                if not killed:  # else said above
                    log.error(
                        "worker %d (pid %d) ended its stop with %s",
                        worker.slot + 1,
                        proc.pid,
                        _exit_text(proc.returncode),
                    )
            self._forget(proc.pid)
        return clean

    def _forget(self, pid: int) -> None:
        if self._metrics_dir:
            from splicegate.metrics import forget_process

            forget_process(pid, self._metrics_dir)

    def _cleanup(self) -> None:
        if self.admin is not None:
            self.admin.stop()
        if self._notify_sock is not None:
            self._notify_sock.close()
        if self._own_metrics_dir and self._metrics_dir:
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
        if self._settings is not None:
            self._settings.remove()


class WorkerSettings:
    """What the workers run on: the settings the supervisor last accepted, and a copy of
    the password file they name, in a private directory (0700, files 0600: they hold what
    the operator's files held). Never the operator's files as they are on disk now: a
    worker restarted after a refused reload, a restart-only change or an edit not yet
    reloaded runs what the others run. Written at start and at each accepted reload, and
    again before a worker starts if they are gone (a /tmp cleaner); each file is replaced
    whole, so a worker reads the old one or the new one."""

    def __init__(self, pinned: dict[str, Any]) -> None:
        #: settings the workers get other than the accepted ones (a granted --pipe-size)
        self.pinned = pinned
        self.directory = tempfile.mkdtemp(prefix="splicegate-settings-")
        self.path = os.path.join(self.directory, "settings.toml")
        self._users = os.path.join(self.directory, "users")
        self._accepted: tuple[bytes, bytes | None] = (b"", None)

    def accept(self, config: Config) -> None:
        """Hand ``config`` to the workers. Raises ConfigError or OSError, and then what
        they run on is as it was."""
        self._make_directory()
        users = None
        pinned = dict(self.pinned)
        if config.auth_file:
            users = read_regular(config.auth_file)
            pinned["auth_file"] = self._users
        # An unchanged copy stays as it is: a worker re-reads one that changed (a new inode
        # is a change), and empties its credential cache when it does.
        new_users = users is not None and (
            users != self._accepted[1] or not os.path.exists(self._users)
        )
        empty = False
        if users is not None and new_users:
            self._stage(self._users, users)
            try:  # the copy is what counts: the file may have changed since it was checked
                empty = not auth.read_users(self._users + ".new")
            except (ValueError, OSError):
                raise ConfigError(
                    f"the password file {config.auth_file} changed while it was read; reload again"
                ) from None
        text = render(config, pinned).encode()
        self._stage(self.path, text)
        self._commit(new_users)
        self._accepted = (text, users)
        if empty:  # said here, once, under the operator's name for it
            auth.warn_no_users(config.auth_file)

    def restore(self) -> None:
        """Before a worker starts: the accepted files written again if they are gone. What
        is at the path must be this process's own directory first: a worker is never
        started on files someone else put there after a cleaner removed it."""
        self._make_directory()
        text, users = self._accepted
        if os.path.exists(self.path) and (users is None or os.path.exists(self._users)):
            return
        if users is not None:
            self._stage(self._users, users)
        self._stage(self.path, text)
        self._commit(users is not None)

    def _make_directory(self) -> None:
        """Made again, at the same path (the running workers' --config), if it was removed;
        refused when what is there now is not a private directory of this user's."""
        try:
            os.mkdir(self.directory, 0o700)
        except FileExistsError:
            if not self._mine():
                raise OSError(f"{self.directory} is no longer this supervisor's own") from None

    def _mine(self) -> bool:
        return private_directory(self.directory)

    def remove(self) -> None:
        """At exit; what is at the path now is left alone unless it is still ours."""
        if self._mine():
            shutil.rmtree(self.directory, ignore_errors=True)

    @staticmethod
    def _stage(path: str, data: bytes) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path + ".new", flags, 0o600)
        with open(fd, "wb") as f:
            f.write(data)

    def _commit(self, users: bool) -> None:
        if users:  # first: settings naming the copy never come before it
            os.replace(self._users + ".new", self._users)
        os.replace(self.path + ".new", self.path)


_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid
_CREDENTIALS_SPACE = socket.CMSG_SPACE(_UCRED.size)


def _sender_pid(ancillary: list[tuple[int, int, bytes]]) -> int:
    """The sending process's pid from SCM_CREDENTIALS; 0 when there is none."""
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            return _UCRED.unpack_from(data)[0]
    return 0


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"code {code}"
