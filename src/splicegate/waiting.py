"""Waiting on several sockets at once without blocking the hub, at any descriptor number.

gevent's ``select`` first calls select(2) with a zero timeout, which refuses descriptors
above 1023; a busy proxy has thousands. gevent's ``poll`` uses libev watchers only.
"""

from __future__ import annotations

from collections.abc import Iterable

from gevent import select as gselect

READ = gselect.POLLIN
WRITE = gselect.POLLOUT


def ready(sockets: Iterable[object], events: int, timeout: float) -> set[int]:
    """The fds among ``sockets`` that became ready for ``events`` within ``timeout`` s."""
    poller = gselect.poll()
    for sock in sockets:
        poller.register(sock, events)
    # A zero timeout would return before the loop ran the watchers; a microsecond lets it.
    return {fd for fd, _ in poller.poll(max(timeout * 1000.0, 0.001))}
