"""Limits that keep the proxy answering under load: connection caps, an accept loop that
survives running out of file descriptors, and the open-file limit those need.

A connection counts from accept until its tunnel completes (the engine's ``on_done``), not
until its handler greenlet ends: the greenlet ends as soon as the engine owns the sockets,
while the tunnel goes on holding two sockets and up to four pipe ends. Counting handlers
would let an unbounded number of tunnels pile up behind a cap that looks respected.
"""

from __future__ import annotations

import _socket
import errno
import logging
import os
import resource
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import gevent

from splicegate.errors import OverCapacity
from splicegate.request import show_address

log = logging.getLogger("splicegate")

#: Whether an accepted socket has its listener's TCP_NODELAY (Linux copies it); elsewhere
#: the handler sets it on each connection.
NODELAY_INHERITED = sys.platform.startswith("linux")

#: File descriptors one tunnel holds: its two sockets. A CONNECT still resolving or racing
#: addresses holds a few more for a moment; the spare below and the accept back-off (when
#: descriptors run out all the same) cover those.
FDS_PER_TUNNEL = 2
#: And one splice pipe, two ends. The native engine lends pipes from a pool only while bytes
#: are in flight, and never holds more than its pipe cap, so pipes count by that cap.
FDS_PER_PIPE = 2
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


def listening_socket(
    address: tuple[str, int],
    backlog: int,
    *,
    reuse_port: bool = False,
    defer_accept: int = 0,
    v6only: bool = False,
) -> socket.socket:
    """A bound, listening, non-blocking socket, with SO_REUSEADDR (a restart can bind again
    while old connections sit in TIME_WAIT) and, for ``--workers``, SO_REUSEPORT, so that
    every worker binds the same address and the kernel spreads the connections. Raises
    OSError naming the address.

    ``defer_accept`` (seconds, TCP_DEFER_ACCEPT) has the kernel hand a connection over once
    its first bytes have arrived, or after that long without any: a CONNECT then comes with
    its head, and the handler reads it at once instead of waiting on it in the hub (that
    wait was about a tenth of the proxy's CPU per tunnel on loopback). The head's deadline
    counts from the hand-over, so a silent client has up to ``defer_accept`` more.

    ``v6only`` (IPV6_V6ONLY) keeps an IPv6 listener to IPv6: an IPv4 listener on the same
    port takes the IPv4 clients (nginx's ipv6only=on), where a dual-stack ``[::]`` would
    hold the port for IPv4 too and make that bind fail."""
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if defer_accept:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, defer_accept)
        if v6only:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # Tunnels relay small TLS records, whose latency Nagle would add to; Linux gives an
        # accepted socket its listener's TCP_NODELAY, which saves a call per connection.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        where = show_address((host, port))
        raise OSError(exc.errno, f"cannot listen on {where}: {exc.strerror}") from None
    except BaseException:
        sock.close()
        raise
    return sock


def unmapped(address: tuple) -> tuple:
    """An IPv4 client of a dual-stack listener is that IPv4 client: one per-client count
    and one log form, whichever listener it used. Only ::ffff:0:0/96 is mapped, which
    inet_ntop writes with a dotted quad; other addresses under ::ffff: are IPv6 ones
    (``::ffff:0:c000:207``) and stay as they are."""
    host = address[0]
    if host.startswith("::ffff:") and "." in host:
        return (host[7:], address[1])
    return address


class Acceptor:
    """Accepts on one listening socket, in the hub, and survives running out of descriptors.

    An io watcher on the listener calls :meth:`_accept_ready`, which accepts what is queued
    (at most :attr:`max_accept` per wake-up, so one busy listener cannot starve the rest of
    the loop) and gives each connection, as a non-blocking stdlib socket, to
    ``spawn(handle, sock, address, accepted)``: ``accepted`` is the ``time.monotonic()`` of
    the accept, since the wait for the handler to run is the proxy's time too. It is
    gevent's StreamServer reduced to what the proxy uses: no gevent socket object per
    connection, no wrapper greenlet; the handler owns and closes the socket. That socket is
    the C-level ``_socket.socket`` (what the stdlib's ``socket.socket`` subclasses, with the
    same methods), whose creation runs no Python.

    The errors that mean "out of a resource for now" (EMFILE, ENFILE, ENOBUFS, ENOMEM), and
    any other that is not one client's, pause
    accepting for a delay that doubles from :attr:`min_delay` to :attr:`max_delay` while
    they last and is reset by the next successful accept; the first of a run is a warning,
    the rest debug lines, so the log stays readable just when the proxy is busiest. The
    listener's queue holds new clients meanwhile; nothing spins, and nothing dies. A client
    that gave up inside the queue (ECONNABORTED, EPROTO), or one a firewall rule refused at
    accept (EPERM), is skipped.
    """

    #: connections accepted per wake-up at most (gevent's StreamServer takes 100)
    max_accept = 100
    #: first pause after running out of descriptors, and the longest one (gevent's values)
    min_delay = 0.01
    max_delay = 1.0
    #: accept(2) errors that concern one client only, gone already
    client_errors = frozenset((errno.ECONNABORTED, errno.EPROTO, errno.EPERM))
    #: at most one warning per this many seconds while descriptors stay short
    warn_every = 10.0

    def __init__(
        self,
        listener: socket.socket,
        handle: Callable[[socket.socket, tuple, float], None],
        spawn: Callable[..., Any],
    ) -> None:
        self.socket = listener
        self.family = int(listener.family)  # the property builds an enum on each read
        self.handle = handle
        self.spawn = spawn
        self.loop = gevent.get_hub().loop
        self._watcher: Any = None
        self._pause_delay = self.min_delay
        self._resume_timer: Any = None
        self._paused_since: float | None = None
        self._warned_at = float("-inf")
        self._failures = 0
        self.closed = False

    @property
    def address(self) -> tuple:
        return self.socket.getsockname()

    def start(self) -> None:
        if self.closed or self._watcher is not None:
            return
        self._watcher = self.loop.io(self.socket.fileno(), 1)
        self._watcher.start(self._accept_ready)

    def _accept_ready(self) -> None:
        accept = self.socket._accept  # type: ignore[attr-defined]
        family = self.family
        for _ in range(self.max_accept):
            if self.closed:  # by a handler just run (a hook that stopped the server)
                return
            try:
                fd, address = accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in self.client_errors:
                    continue
                self._pause(exc)  # out of descriptors, or anything unforeseen: never spin
                return
            if self._paused_since is not None:
                log.info(
                    "accepting again after %d failed accepts in %.2f s",
                    self._failures,
                    time.monotonic() - self._paused_since,
                )
                self._paused_since = None
                self._failures = 0
                self._pause_delay = self.min_delay
            try:  # the fd is ours until the handler runs
                sock = _socket.socket(family, socket.SOCK_STREAM, 0, fd)
            except BaseException:
                os.close(fd)
                raise
            if family == socket.AF_INET6:
                address = unmapped(address)
            try:
                sock.setblocking(False)
                self.spawn(self.handle, sock, address, time.monotonic())
            except BaseException:
                sock.close()
                raise

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
        self._stop_watching()
        self._resume_timer = self.loop.timer(self._pause_delay)
        self._resume_timer.start(self._resume)
        self._pause_delay = min(self.max_delay, self._pause_delay * 2)

    def _resume(self) -> None:
        self._cancel_resume()
        self.start()

    def _cancel_resume(self) -> None:
        if self._resume_timer is not None:
            self._resume_timer.stop()
            self._resume_timer.close()
            self._resume_timer = None

    def _stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher.close()
            self._watcher = None

    def close(self) -> None:
        """Stop accepting and close the listener; connections already taken go on."""
        self.closed = True
        self._cancel_resume()
        self._stop_watching()
        self.socket.close()


def fds_needed(max_connections: int, max_pipes: int) -> int:
    """Descriptors the proxy needs at its connection cap with every pipe lent out."""
    return FDS_PER_TUNNEL * max_connections + FDS_PER_PIPE * max_pipes + FDS_SPARE


def raise_open_file_limit(max_connections: int, max_pipes: int) -> int:
    """Raise the soft open-file limit as far as the hard one allows, and warn when it is
    still below what ``max_connections`` tunnels and ``max_pipes`` pipes need. The usual
    soft limit of 1024 would hold about 416 tunnels beside the native engine's default 64
    pipes, 480 with the Python engine. Returns the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d: %s", soft, exc)
    needed = fds_needed(max_connections, max_pipes)
    if soft != resource.RLIM_INFINITY and soft < needed:
        pipe_fds = FDS_PER_PIPE * max_pipes
        log.warning(
            "open-file limit is %d, below the %d that --max-connections %d needs (%d per "
            "tunnel%s): at most about %d tunnels; raise the limit (ulimit -n, systemd's "
            "LimitNOFILE) or lower --max-connections",
            soft,
            needed,
            max_connections,
            FDS_PER_TUNNEL,
            f", and {pipe_fds} for {max_pipes} splice pipes" if max_pipes else "",
            max(0, soft - FDS_SPARE - pipe_fds) // FDS_PER_TUNNEL,
        )
    return soft
