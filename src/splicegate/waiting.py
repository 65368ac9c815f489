"""Waiting on several sockets at once without blocking the hub, at any descriptor number.

gevent's ``select`` first calls select(2) with a zero timeout, which refuses descriptors
above 1023; a busy proxy has thousands. gevent's ``poll`` uses libev watchers only.
"""

from __future__ import annotations

import select
from collections.abc import Iterable

from gevent import select as gselect
from gevent import socket as gsocket

READ = gselect.POLLIN
WRITE = gselect.POLLOUT


class _Expired(Exception):
    pass


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
        # object's set of them: this sits on every CONNECT's path.
        fd = socks[0].fileno()  # type: ignore[attr-defined]
        wait = gsocket.wait_write if events == WRITE else gsocket.wait_read
        try:
            wait(fd, timeout=max(timeout, 1e-6), timeout_exc=_Expired())
        except _Expired:
            return set()
        return {fd}
    poller = gselect.poll()
    for sock in socks:
        poller.register(sock, events)
    # A zero timeout would return before the loop ran the watchers; a microsecond lets it.
    return {fd for fd, _ in poller.poll(max(timeout * 1000.0, 0.001))}
