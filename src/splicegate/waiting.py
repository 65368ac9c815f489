"""Waiting on sockets without blocking the hub, at any descriptor number.

The control plane works on non-blocking stdlib sockets: an operation is tried first and
waited for only when it would block, so a CONNECT whose head has arrived and whose target
answers at once (loopback, a LAN) crosses the hub as few times as possible. The waits are
libev io watchers, bounded by a deadline (a ``time.monotonic()`` value).

gevent's ``select`` first calls select(2) with a zero timeout, which refuses descriptors
above 1023; a busy proxy has thousands. gevent's ``poll`` uses libev watchers only.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterable

from gevent import select as gselect
from gevent import socket as gsocket

READ = gselect.POLLIN
WRITE = gselect.POLLOUT


class Expired(TimeoutError):
    """A deadline passed while waiting on a socket."""


def wait(sock: socket.socket, events: int, deadline: float) -> None:
    """Wait until ``sock`` is ready for ``events`` (READ or WRITE); Expired at ``deadline``."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise Expired()
    waiter = gsocket.wait_write if events == WRITE else gsocket.wait_read
    waiter(sock.fileno(), timeout=remaining, timeout_exc=Expired())


def recv(sock: socket.socket, size: int, deadline: float) -> bytes:
    """Up to ``size`` bytes, b"" at EOF; Expired when nothing came by ``deadline``."""
    while True:
        try:
            return sock.recv(size)
        except BlockingIOError:
            wait(sock, READ, deadline)


def send_all(sock: socket.socket, data: bytes, deadline: float) -> None:
    """Every byte of ``data``, or Expired at ``deadline`` (OSError if the peer is gone)."""
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            wait(sock, WRITE, deadline)


def ready(sockets: Iterable[object], events: int, timeout: float) -> set[int]:
    """The fds among ``sockets`` that became ready for ``events`` within ``timeout`` s."""
    socks = list(sockets)
    # On loopback and on a LAN a connect has often completed, and an answer arrived, by the
    # time we look: one poll(2) that does not wait is cheaper than arming watchers.
    now = select.poll()
    for sock in socks:
        now.register(sock, events)
    done = {fd for fd, _ in now.poll(0)}
    if done or timeout <= 0:
        return done
    if len(socks) == 1:
        # The common case (one connect, one nameserver) costs one watcher, not a poll
        # object's set of them.
        try:
            wait(socks[0], events, time.monotonic() + timeout)  # type: ignore[arg-type]
        except Expired:
            return set()
        return {socks[0].fileno()}  # type: ignore[attr-defined]
    poller = gselect.poll()
    for sock in socks:
        poller.register(sock, events)
    # A zero timeout would return before the loop ran the watchers; a microsecond lets it.
    return {fd for fd, _ in poller.poll(max(timeout * 1000.0, 0.001))}
