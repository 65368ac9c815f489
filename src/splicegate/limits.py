"""Limits that keep the proxy answering under load: connection caps, an accept loop that
survives running out of file descriptors, and the open-file limit those need.

A connection counts from accept until its tunnel completes (the engine's ``on_done``), not
until its handler greenlet ends: the greenlet ends as soon as the engine owns the sockets,
while the tunnel goes on holding two sockets and up to four pipe ends. Counting handlers
would let an unbounded number of tunnels pile up behind a cap that looks respected.
"""

from __future__ import annotations

import errno
import logging
import resource
import time
from typing import Any

from gevent.server import StreamServer

from splicegate.errors import OverCapacity

log = logging.getLogger("splicegate")

#: File descriptors one tunnel may hold: two sockets, and with the native engine a pipe
#: (two ends) per direction while bytes are in flight.
FDS_PER_TUNNEL = 6
#: Descriptors the proxy needs besides its tunnels: listeners, the engine's epoll and
#: eventfds, resolver sockets, log files, the hashing pool.
FDS_SPARE = 64


class ConnectionLimits:
    """Counts open connections, in total and per client address, against the caps.

    It lives as long as the server; a reload changes the caps (:meth:`set_caps`) and keeps
    the counts, so connections admitted before a reload are still released after it.
    """

    #: the Retry-After, in seconds, of a 503 for a cap
    retry_after = 1

    def __init__(self, total: int = 0, per_client: int = 0) -> None:
        self.total = 0
        self.per_client: dict[str, int] = {}
        self.max_total = total
        self.max_per_client = per_client

    def set_caps(self, total: int, per_client: int) -> None:
        """0 for either means no cap; lowering a cap closes nothing, it only admits less."""
        self.max_total = total
        self.max_per_client = per_client

    def admit(self, client: str) -> None:
        """Count a new connection from ``client``, or raise OverCapacity (503) uncounted."""
        if self.max_total and self.total >= self.max_total:
            raise OverCapacity(
                f"the proxy is at its limit of {self.max_total} connections; try again shortly",
                retry_after=self.retry_after,
                details=f"over --max-connections {self.max_total}",
            )
        mine = self.per_client.get(client, 0)
        if self.max_per_client and mine >= self.max_per_client:
            raise OverCapacity(
                f"client {client} has {mine} connections open, the limit for one client; "
                "try again when one closes",
                retry_after=self.retry_after,
                details=f"over --max-connections-per-client {self.max_per_client}",
            )
        self.total += 1
        self.per_client[client] = mine + 1

    def release(self, client: str) -> None:
        """Uncount one connection of ``client``: once per admitted connection."""
        self.total -= 1
        left = self.per_client.get(client, 0) - 1
        if left > 0:
            self.per_client[client] = left
        else:
            self.per_client.pop(client, None)


class AcceptServer(StreamServer):
    """gevent's StreamServer with an accept loop that survives running out of descriptors.

    gevent already pauses accepting after a failed ``accept()``, but it reports each failure
    through the hub's ``handle_error``, a traceback on stderr per failed accept, just when
    the proxy is busiest. Here the errors that mean "out of a resource for now" (EMFILE,
    ENFILE, ENOBUFS, ENOMEM) pause accepting for a delay that doubles from
    :attr:`min_delay` to :attr:`max_delay` while they last and is reset by the next
    successful accept; the first of a run is a warning, the rest debug lines, so the log
    stays readable. The listener's queue holds new clients meanwhile; nothing spins, and
    nothing dies. A client that gave up inside the queue (ECONNABORTED, EPROTO) is skipped.
    """

    #: first pause after running out of descriptors, and the longest one (gevent's values)
    min_delay = 0.01
    max_delay = 1.0
    #: accept(2) errors that mean "out of a resource for now"
    exhausted_errors = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
    #: accept(2) errors that concern one client only, gone already
    client_errors = frozenset((errno.ECONNABORTED, errno.EPROTO, errno.EPERM))
    #: at most one warning per this many seconds while descriptors stay short
    warn_every = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pause_delay = self.min_delay
        self._resume_timer: Any = None
        self._paused_since: float | None = None
        self._warned_at = float("-inf")
        self._failures = 0

    def do_read(self) -> Any:
        try:
            accepted = super().do_read()
        except OSError as exc:
            if exc.errno in self.exhausted_errors:
                self._pause(exc)
                return None  # gevent's loop stops here until the timer resumes it
            if exc.errno in self.client_errors:
                return None
            raise
        if accepted and self._paused_since is not None:
            log.info(
                "accepting again after %d failed accepts in %.2f s",
                self._failures,
                time.monotonic() - self._paused_since,
            )
            self._paused_since = None
            self._failures = 0
        if accepted:
            self._pause_delay = self.min_delay
        return accepted

    def _pause(self, exc: OSError) -> None:
        now = time.monotonic()
        self._failures += 1
        if self._paused_since is None:
            self._paused_since = now
        message = "cannot accept: %s; pausing accepts for %d ms"
        args = (exc.strerror or exc, round(self._pause_delay * 1000))
        if now - self._warned_at >= self.warn_every:
            self._warned_at = now
            log.warning(message + " (see --max-connections and the open-file limit)", *args)
        else:
            log.debug(message, *args)
        self.stop_accepting()
        self._resume_timer = self.loop.timer(self._pause_delay)
        self._resume_timer.start(self._resume)
        self._pause_delay = min(self.max_delay, self._pause_delay * 2)

    def _resume(self) -> None:
        self._cancel_resume()
        if self.started:
            self.start_accepting()

    def _cancel_resume(self) -> None:
        if self._resume_timer is not None:
            self._resume_timer.stop()
            self._resume_timer.close()
            self._resume_timer = None

    def stop_accepting(self) -> None:
        self._cancel_resume()
        super().stop_accepting()


def fds_needed(max_connections: int) -> int:
    """Descriptors the proxy needs at its connection cap."""
    return FDS_PER_TUNNEL * max_connections + FDS_SPARE


def raise_open_file_limit(max_connections: int) -> int:
    """Raise the soft open-file limit as far as the hard one allows, and warn when it is
    still below what ``max_connections`` tunnels need (six descriptors each). The usual
    soft limit of 1024 would hold about 170 tunnels. Returns the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d: %s", soft, exc)
    needed = fds_needed(max_connections)
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning(
            "open-file limit is %d, below the %d that --max-connections %d needs (%d per "
            "tunnel): at most about %d tunnels; raise the limit (ulimit -n, systemd's "
            "LimitNOFILE) or lower --max-connections",
            soft,
            needed,
            max_connections,
            FDS_PER_TUNNEL,
            max(0, soft - FDS_SPARE) // FDS_PER_TUNNEL,
        )
    return soft
