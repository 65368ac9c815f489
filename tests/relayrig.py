"""Loopback rig for relay engine tests: the peers of a tunnel and the helpers that drive them.

Shared by the engine-parametrised relay suite (test_relay.py) and the native engine's own
tests (test_engine_native.py), and importable from child processes those tests start, so
every test builds tunnels, moves bytes and checks them the same way. A tunnel is built the
way the control plane builds one: a test client connects to a listener standing in for the
proxy, the proxy side dials a listener standing in for the origin, and the two proxy-side
sockets are detached and their fds submitted. The peers are gevent sockets in greenlets of
the same hub the engine runs in.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import struct
import time
from collections.abc import Callable
from typing import Any

import gevent
from gevent import socket
from gevent.event import AsyncResult

from proxyproc import sha256
from splicegate.relay import Engine, RelayTimeouts, TunnelRecord

WAIT = 20.0  # bound on any single wait; only reached when something is broken
MiB = 1024 * 1024
NO_TIMEOUTS = RelayTimeouts(idle=0, half_closed=0, lifetime=0)
LINGER_ABORT = struct.pack("ii", 1, 0)
EMPTY_SHA = hashlib.sha256(b"").hexdigest()


def randbytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        assert exc.errno == errno.EBADF
        return False
    return True


def read_fd(fd: int, n: int) -> bytes:
    """os.read, bounded: wait (in the hub) until ``fd`` is readable, for at most WAIT."""
    socket.wait_read(fd, timeout=WAIT, timeout_exc=TimeoutError(f"fd {fd} never readable"))
    return os.read(fd, n)


def count_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def abort(sock: socket.socket) -> None:
    """Close so that the peer sees a reset (RST), not an EOF."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ABORT)
    sock.close()


def pump(sock: socket.socket, data: bytes | memoryview) -> None:
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


def drain(sock: socket.socket) -> tuple[int, str]:
    """Read to EOF; the byte count and sha256 of everything read."""
    digest = hashlib.sha256()
    count = 0
    buf = bytearray(256 * 1024)
    view = memoryview(buf)
    while True:
        n = sock.recv_into(buf)
        if not n:
            return count, digest.hexdigest()
        digest.update(view[:n])
        count += n


def wait_until(
    predicate: Callable[[], Any], what: str, timeout: float = WAIT, poll: float = 0.01
) -> Any:
    """The predicate's first truthy value, polled with gevent.sleep so that an engine in this
    hub keeps running; a failed assertion after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"gave up after {timeout} s waiting for {what}"
        gevent.sleep(poll)
    return value


def together(*calls: tuple[Any, ...], timeout: float = 60.0) -> list[Any]:
    """Run each ``(fn, *args)`` in its own greenlet; their results, in order.

    The first failure is raised; greenlets still running at ``timeout`` are killed and fail
    the test, so nothing outlives it.
    """
    greenlets = [gevent.spawn(fn, *args) for fn, *args in calls]
    try:
        gevent.joinall(greenlets, timeout=timeout, raise_error=True)
    finally:
        pending = [g for g in greenlets if not g.ready()]
        gevent.killall(pending, timeout=WAIT)
    assert not pending, f"{len(pending)} of {len(greenlets)} greenlets still running"
    return [g.value for g in greenlets]


class Tunnel:
    """The two test peers of one submitted tunnel and the record its engine reports."""

    def __init__(
        self,
        client: socket.socket,
        origin: socket.socket,
        fds: tuple[int, int],
        raises: type[BaseException] | None,
    ) -> None:
        self.client = client
        self.origin = origin
        self.fds = fds
        self.raises = raises
        self.done: AsyncResult = AsyncResult()
        self.fds_closed_at_done: bool | None = None

    def on_done(self, record: TunnelRecord) -> None:
        # Meaningful for one tunnel at a time only: with several, another socket may
        # already have been given a just-closed fd number.
        self.fds_closed_at_done = not any(fd_is_open(fd) for fd in self.fds)
        self.done.set(record)
        if self.raises is not None:
            raise self.raises("on_done blew up")

    def record(self) -> TunnelRecord:
        return self.done.get(timeout=WAIT)

    def close(self) -> None:
        self.client.close()
        self.origin.close()


def exchange(t: Tunnel, up: bytes | memoryview, down: bytes | memoryview) -> None:
    """Both ways at once and both to EOF; every byte checked."""
    _, _, at_origin, at_client = together(
        (pump, t.client, up), (pump, t.origin, down), (drain, t.origin), (drain, t.client)
    )
    assert at_origin == (len(up), sha256(up))
    assert at_client == (len(down), sha256(down))


def exchange_many(
    tunnels: list[Tunnel],
    payloads: list[tuple[bytes | memoryview, bytes | memoryview]],
    timeout: float = 60.0,
) -> None:
    """Every tunnel both ways at once, all to EOF; every byte and every record checked."""
    calls: list[tuple[Any, ...]] = []
    for t, (up, down) in zip(tunnels, payloads, strict=True):
        calls += [
            (pump, t.client, up),
            (pump, t.origin, down),
            (drain, t.origin),
            (drain, t.client),
        ]
    results = together(*calls, timeout=timeout)
    for i, (t, (up, down)) in enumerate(zip(tunnels, payloads, strict=True)):
        assert results[4 * i + 2] == (len(up), sha256(up)), f"tunnel {i} up"
        assert results[4 * i + 3] == (len(down), sha256(down)), f"tunnel {i} down"
        record = t.record()
        assert (record.reason, record.bytes_up, record.bytes_down) == ("eof", len(up), len(down))


class Rig:
    """Loopback listeners standing in for the proxy's accept side and for the origin."""

    def __init__(self, engine: Engine, host: str, bufsize: int | None) -> None:
        self.engine = engine
        self.family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.bufsize = bufsize
        self.front = self._listener(host)
        self.back = self._listener(host)
        self.tunnels: list[Tunnel] = []

    def _socket(self) -> socket.socket:
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        sock.settimeout(WAIT)
        if self.bufsize:
            # Set before connect/listen so the window is small from the handshake on;
            # accepted sockets inherit the listener's sizes.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.bufsize)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.bufsize)
        return sock

    def _listener(self, host: str) -> socket.socket:
        sock = self._socket()
        sock.bind((host, 0))
        sock.listen(512)
        return sock

    def connect(self, listener: socket.socket) -> tuple[socket.socket, socket.socket]:
        """A connected pair: the dialling socket and the accepted one."""
        sock = self._socket()
        sock.connect(listener.getsockname()[:2])
        accepted, _ = listener.accept()
        accepted.settimeout(WAIT)
        return sock, accepted

    def open(
        self,
        early_up: bytes = b"",
        before_submit: Callable[[socket.socket, socket.socket], None] | None = None,
        on_done_raises: type[BaseException] | None = None,
    ) -> Tunnel:
        client, proxy_client = self.connect(self.front)
        proxy_origin, origin = self.connect(self.back)
        if before_submit is not None:
            before_submit(client, origin)
        fds = (proxy_client.detach(), proxy_origin.detach())
        tunnel = Tunnel(client, origin, fds, on_done_raises)
        self.engine.submit(fds[0], fds[1], early_up, tunnel.on_done)
        self.tunnels.append(tunnel)
        return tunnel

    def close(self) -> None:
        self.front.close()
        self.back.close()
        for tunnel in self.tunnels:
            tunnel.close()
