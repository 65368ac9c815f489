"""systemd readiness (sd_notify(3)): one datagram to ``$NOTIFY_SOCKET``, no dependency.

``READY=1`` once every listener is bound, ``RELOADING=1`` (with ``MONOTONIC_USEC``, which
``Type=notify-reload`` wants) while a SIGHUP is applied and ``READY=1`` after it,
``STOPPING=1`` when draining starts. Without ``NOTIFY_SOCKET`` (not under systemd) it does
nothing. A supervisor hands its workers a socket of its own in the same variable, so a
worker's ``READY=1`` tells the supervisor, which tells systemd once all are ready.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("splicegate")

ENV = "NOTIFY_SOCKET"


def notify(*states: str) -> bool:
    """Send ``states`` (``READY=1``, ...) to the service manager; False when there is none
    or the datagram could not be sent (logged, never raised: readiness is advisory)."""
    path = os.environ.get(ENV)
    if not path:
        return False
    if path.startswith("@"):  # abstract namespace
        path = "\0" + path[1:]
    message = "\n".join(states).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)  # a stuck manager costs the message, never the hub
            sock.connect(path)
            sock.send(message)
    except OSError as exc:
        log.warning("cannot notify the service manager at %s: %s", os.environ[ENV], exc)
        return False
    return True


def reloading() -> bool:
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}")
