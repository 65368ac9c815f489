"""The relay engine interface, shared by the native and the pure-Python engine.

The control plane owns a connection until its tunnel is established; then it detaches both
sockets and submits the two file descriptors here. From that moment the engine alone owns
them: it forwards bytes both ways, propagates half-close and resets, enforces the relay
timeouts, closes both fds exactly once, and reports a :class:`TunnelRecord` through
``on_done`` in the gevent hub. The interface is small on purpose, so that the two engines
stay interchangeable and every relay test runs against both.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

log = logging.getLogger("splicegate")

Closer = Literal["client", "origin", "proxy"]
Reason = Literal["eof", "reset", "idle", "half_closed_timeout", "lifetime", "shutdown", "error"]


@dataclass(slots=True)
class TunnelRecord:
    """What one finished tunnel did; the relay half of its access-log line."""

    bytes_up: int  # client -> origin, delivered, early_up included
    bytes_down: int  # origin -> client, delivered
    duration_s: float
    first_closer: Closer
    reason: Reason
    errno: int = 0


@dataclass(frozen=True, slots=True)
class RelayTimeouts:
    """Relay deadlines in seconds; 0 turns one off."""

    idle: float = 300.0  # no byte either way
    half_closed: float = 60.0  # after the first EOF
    lifetime: float = 0.0  # since submit

    @property
    def idle_look(self) -> float:
        """When, after the last byte an engine moved, it looks at the tunnel's send queues:
        halfway through the idle time. At the idle deadline it looks again, and a queue that
        changed between counts as a byte: a peer reading slowly out of a large send buffer
        gives the engine no room to write for seconds, yet reads all the while. So a peer
        that reads at least once in every half of the idle time keeps its tunnel open."""
        return self.idle / 2


OnDone = Callable[[TunnelRecord], None]


class Engine(Protocol):
    name: str  # "native" | "python"
    splices: bool  # whether bytes move with splice(2)

    def submit(self, client_fd: int, origin_fd: int, early_up: bytes, on_done: OnDone) -> None:
        """Take ownership of two connected sockets and relay between them.

        ``early_up`` is written to the origin before anything else. Raises OSError when an
        fd is not an open socket (EBADF, ENOTSOCK: a pipe or a file), and RuntimeError once
        the engine is shutting down; the caller then still owns and must close the fds.
        """

    def stats(self) -> dict[str, int]:
        """active, pipes_in_use, bytes_up, bytes_down, tunnels_total, threads."""

    def shutdown(self, deadline: float) -> None:
        """Stop taking tunnels; let active ones finish until ``deadline`` (a
        ``time.monotonic()`` value), then close the rest with reason ``shutdown``. Blocks
        the calling greenlet until every tunnel's ``on_done`` has run. A second call, from
        another greenlet while the first waits, closes the rest at once (an operator's
        second SIGTERM)."""


ENGINES = ("auto", "native", "python")

#: Set (to anything but "" or "0"), the native engine counts as missing, as msgpack's
#: MSGPACK_PUREPYTHON does for its extension: the fallback path (its warning, ``--version``,
#: ``--engine native`` refusing) can then be run and tested where the extension is built.
PUREPYTHON_ENV = "SPLICEGATE_PUREPYTHON"


#: How the native engine's relay threads are scheduled: SCHED_BATCH (a wake-up waits for the
#: running task's slice instead of preempting it: fewer context switches under load) or the
#: normal policy.
SCHEDULING = ("batch", "normal")


def default_max_pipes(pipe_size: int) -> int:
    """The pipes the per-user pipe quota (fs.pipe-user-pages-soft, in pages) holds: the
    server's default pipe cap. Past the quota the kernel hands out one-page pipes, so pipes
    beyond it would splice a page at a time."""
    try:
        with open("/proc/sys/fs/pipe-user-pages-soft") as f:
            pages = int(f.read())
    except (OSError, ValueError):
        pages = 16384
    # No quota (pages <= 0): a cap all the same, against running out of fds.
    quota = 4096 if pages <= 0 else pages * os.sysconf("SC_PAGE_SIZE") // max(pipe_size, 4096)
    return max(1, quota)


def usable_pipe_size(requested: int) -> int:
    """The pipe size the kernel will grant. Past fs.pipe-max-size only a process with
    CAP_SYS_RESOURCE (in the initial user namespace) may go; any other one's F_SETPIPE_SZ
    fails and leaves the pipe at its 64 KiB default. So one pipe is tried at that size: on
    EPERM the engine asks for the limit instead and says so once, keeping the big pipes the
    operator meant rather than silently sixteen times smaller ones."""
    limit = _pipe_max_size()
    if limit is None:
        return requested  # nothing to go by: let the kernel decide
    if requested <= limit:
        return requested
    try:
        read_end, write_end = os.pipe()
        try:
            fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, requested)
            return requested
        finally:
            os.close(read_end)
            os.close(write_end)
    except OSError as exc:  # EPERM as expected; anything else: the limit is the safe size
        why = (
            "which only a privileged process may pass"
            if exc.errno == errno.EPERM
            else f"and a pipe of that size could not be made ({exc.strerror})"
        )
    log.warning(
        "--pipe-size %d is above fs.pipe-max-size (%d), %s: pipes get %d bytes "
        "(raise fs.pipe-max-size for more)",
        requested,
        limit,
        why,
        limit,
    )
    return limit


def _pipe_max_size() -> int | None:
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def pipe_share(pipe_size: int, max_pipes: int | None, processes: int) -> int:
    """The pipes one engine may hold: the server's cap (``max_pipes``, or what the per-user
    quota holds at ``pipe_size``), split between its ``processes``, which share the one
    user's quota; at least one each."""
    return max(1, (max_pipes or default_max_pipes(pipe_size)) // max(1, processes))


_T = TypeVar("_T")


def run_each(items: Iterable[_T], step: Callable[[_T], object]) -> None:
    """``step`` for every item, also past an exit (SystemExit, a KeyboardInterrupt raised in
    the hub) that a tunnel's on_done raised in one of them: the first such exit is raised
    once all have run, so an engine never loses the tunnels after it (their memory, their
    on_done, a drain waiting for them)."""
    escaped: BaseException | None = None
    for item in items:
        try:
            step(item)
        except BaseException as exc:
            if escaped is None:
                escaped = exc
    if escaped is not None:
        raise escaped


def report_done(on_done: OnDone, record: TunnelRecord) -> None:
    """Run one tunnel's ``on_done``; an error in it is logged, never let out, because the
    engine calling it still has other tunnels to report and a drain to finish. An exit
    (SystemExit and the like) does go out: :func:`run_each` holds it until the rest ran."""
    try:
        on_done(record)
    except Exception:
        log.exception("tunnel on_done callback failed")


class _ForgetsAfterFork(Protocol):
    def _forget_after_fork(self) -> None: ...


_fork_aware: weakref.WeakSet[_ForgetsAfterFork] = weakref.WeakSet()


def forget_in_forked_child(engine: _ForgetsAfterFork) -> None:
    """Have a forked child call ``engine._forget_after_fork()``: the parent's tunnels stay
    the parent's. A child must neither relay them (it would read bytes meant for the
    parent) nor hold their fds (its copies would keep the parent's closes from reaching
    the peers). The engine is held weakly: registering never keeps one alive."""
    _fork_aware.add(engine)


def _forget_all_after_fork() -> None:
    for engine in list(_fork_aware):
        engine._forget_after_fork()


os.register_at_fork(after_in_child=_forget_all_after_fork)


def pipe_cap_bound(kind: str, pipe_size: int, max_pipes: int | None, processes: int) -> int:
    """The most pipes the engine ``kind`` will hold in one process, known before it is
    built (for the open-file limit): none for the pure-Python engine, else its share. A
    pipe size past fs.pipe-max-size is counted at that limit, as an unprivileged process
    gets it: the larger count."""
    if kind == "python" or (kind == "auto" and native_engine_error() is not None):
        return 0
    limit = _pipe_max_size()
    return pipe_share(pipe_size if limit is None else min(pipe_size, limit), max_pipes, processes)


def native_engine_error() -> str | None:
    """Why the native engine cannot load, or None when it can."""
    if os.environ.get(PUREPYTHON_ENV, "") not in ("", "0"):
        return f"{PUREPYTHON_ENV} is set"
    try:
        import splicegate._engine  # type: ignore[import-not-found]  # noqa: F401
    except ImportError as exc:
        return str(exc)
    return None


def create_engine(
    kind: str,
    timeouts: RelayTimeouts,
    *,
    threads: int | None = None,
    pipe_size: int | None = None,
    max_pipes: int | None = None,
    processes: int = 1,
    scheduling: str = "batch",
) -> Engine:
    """The engine ``kind`` asks for: native where it imports (auto), or the one named.

    ``--engine native`` fails clearly when the extension cannot load; ``auto`` falls back to
    the pure-Python engine and logs why, so a missing compiler never goes unnoticed. The
    keyword arguments tune the native engine (None: its defaults; ``processes``: how many
    share the server's pipe cap, ``max_pipes`` or the per-user quota's, so each takes its
    share; ``scheduling``: one of SCHEDULING); the pure-Python engine has no threads or
    pipes.
    """
    if kind not in ENGINES:
        raise ValueError(f"unknown engine {kind!r}; choose one of {', '.join(ENGINES)}")
    if kind in ("auto", "native"):
        why = native_engine_error()
        if why is None:
            from splicegate._engine import NativeEngine  # type: ignore[import-not-found]

            return NativeEngine(timeouts, threads, pipe_size, max_pipes, processes, scheduling)
        if kind == "native":
            raise RuntimeError(f"the native relay engine cannot be loaded: {why}")
        log.warning("native relay engine unavailable (%s); running the pure-Python engine", why)
    from splicegate.pyrelay import PythonEngine

    return PythonEngine(timeouts)
