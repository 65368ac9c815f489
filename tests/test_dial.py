"""The sequential dialer, on loopback only (127.0.0.0/8 and ::1).

A refusal comes from a port that is bound but not listening (so nobody else can take it
meanwhile); a timeout from a listener whose accept queue was filled first and which never
accepts, so the kernel drops further SYNs and the connect hangs until our deadline.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import select
import socket
import time
from collections.abc import Iterator

import gevent
import pytest

from splicegate.dial import _Failure, _failure_error, dial
from splicegate.errors import ConnectionRefused, ConnectTimeout, DestinationUnavailable

ip = ipaddress.ip_address

SHORT = 0.5
LATE = 2.0


def soon(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A plain (blocking stdlib) listener on 127.0.0.1 that accepts via the backlog."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(16)
        yield srv


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses: bound (reserved) but not listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@contextlib.contextmanager
def full_accept_queue() -> Iterator[int]:
    """A listener with a tiny backlog, never accepting, its queue filled: connects hang."""
    fillers: list[socket.socket] = []
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(0)
        address = srv.getsockname()
        try:
            for _ in range(16):  # bounded: the queue holds one or two on Linux
                c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                fillers.append(c)
                c.setblocking(False)
                c.connect_ex(address)
                _, writable, _ = select.select([], [c], [], 0.3)
                if not writable:
                    break  # this connect hangs: the queue is full
            else:
                pytest.skip("could not fill the accept queue on this kernel")
            yield address[1]
        finally:
            for c in fillers:
                c.close()


def test_connects_to_a_listener(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    sock = dial([ip("127.0.0.1")], port, soon())
    try:
        assert isinstance(sock, gevent.socket.socket)
        assert sock.getpeername() == ("127.0.0.1", port)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert sock.gettimeout() is None
        peer, _ = listener.accept()
        with peer:
            sock.sendall(b"ping")
            assert peer.recv(4) == b"ping"
    finally:
        sock.close()


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback")
def test_connects_over_ipv6() -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as srv:
        srv.bind(("::1", 0))
        srv.listen(4)
        port = srv.getsockname()[1]
        sock = dial([ip("::1")], port, soon())
        with sock:
            assert sock.family == socket.AF_INET6
            assert sock.getpeername()[:2] == ("::1", port)


def test_refused(closed_port: int) -> None:
    with pytest.raises(ConnectionRefused) as caught:
        dial([ip("127.0.0.1")], closed_port, soon())
    err = caught.value
    assert err.message.startswith(f"connection to 127.0.0.1 port {closed_port} refused")
    assert err.details == f"connection refused: 127.0.0.1 port {closed_port}"
    assert err.status == 502
    assert err.proxy_status_error == "connection_refused"


def test_every_address_refused(closed_port: int) -> None:
    with pytest.raises(ConnectionRefused) as caught:
        dial([ip("127.0.0.1"), ip("127.0.0.2")], closed_port, soon())
    assert "127.0.0.1, 127.0.0.2" in caught.value.message


def test_first_address_refused_second_connects(listener: socket.socket) -> None:
    port = listener.getsockname()[1]  # bound to 127.0.0.1 only: 127.0.0.2 refuses
    sock = dial([ip("127.0.0.2"), ip("127.0.0.1")], port, soon())
    with sock:
        assert sock.getpeername() == ("127.0.0.1", port)


def test_times_out_at_the_deadline() -> None:
    with full_accept_queue() as port:
        before = open_fds()
        deadline = soon(SHORT)
        with pytest.raises(ConnectTimeout) as caught:
            dial([ip("127.0.0.1")], port, deadline)
        end = time.monotonic()
        assert deadline <= end < deadline + LATE
        assert open_fds() == before
    err = caught.value
    assert err.status == 504
    assert err.proxy_status_error == "connection_timeout"
    assert f"127.0.0.1 port {port}" in err.message
    assert err.details == f"connect timeout after {SHORT:.1f} s: 127.0.0.1 port {port}"


def test_one_deadline_covers_every_address() -> None:
    with full_accept_queue() as port:
        deadline = soon(SHORT)
        with pytest.raises(ConnectTimeout):
            dial([ip("127.0.0.1")] * 3, port, deadline)
        assert time.monotonic() < deadline + LATE  # not three times the deadline


def test_hub_keeps_running_while_connecting() -> None:
    ticks = 0

    def tick() -> None:
        nonlocal ticks
        for _ in range(10_000):  # bounded; killed long before
            gevent.sleep(0.02)
            ticks += 1

    ticker = gevent.spawn(tick)
    try:
        with full_accept_queue() as port, pytest.raises(ConnectTimeout):
            dial([ip("127.0.0.1")], port, soon(SHORT))
    finally:
        ticker.kill()
    assert ticks >= 5


def test_deadline_already_passed(listener: socket.socket) -> None:
    with pytest.raises(ConnectTimeout):
        dial([ip("127.0.0.1")], listener.getsockname()[1], time.monotonic() - 1)


def test_no_addresses() -> None:
    with pytest.raises(DestinationUnavailable):
        dial([], 443, soon())


def test_no_fd_leak_after_many_failures(closed_port: int) -> None:
    dial_fails = 0
    with contextlib.suppress(ConnectionRefused):
        dial([ip("127.0.0.1")], closed_port, soon())  # warm up lazily created gevent fds
    before = open_fds()
    for _ in range(100):
        with pytest.raises(ConnectionRefused):
            dial([ip("127.0.0.1"), ip("127.0.0.2")], closed_port, soon())
        dial_fails += 1
    assert dial_fails == 100
    assert open_fds() == before


# --- how failures are classified (the errnos loopback cannot produce) ------------------------


def _fail(address: str, code: int) -> _Failure:
    return _Failure(ip(address), code, os.strerror(code))


def test_unreachable_is_destination_unavailable() -> None:
    err = _failure_error([_fail("127.0.0.1", errno.EHOSTUNREACH)], 443)
    assert isinstance(err, DestinationUnavailable)
    assert err.proxy_status_error == "destination_unavailable"
    assert "could not reach 127.0.0.1 port 443" in err.message
    assert os.strerror(errno.EHOSTUNREACH) in err.details


def test_mixed_failures_are_unavailable_not_refused() -> None:
    failures = [
        _fail("::1", errno.ENETUNREACH),
        _fail("127.0.0.1", errno.ECONNREFUSED),
    ]
    err = _failure_error(failures, 443)
    assert isinstance(err, DestinationUnavailable)
    assert "::1" in err.message and "127.0.0.1" in err.message


@pytest.mark.parametrize("code", [errno.EADDRNOTAVAIL, errno.ENETUNREACH, errno.ETIMEDOUT])
def test_other_errors_are_unavailable(code: int) -> None:
    assert isinstance(_failure_error([_fail("127.0.0.1", code)], 443), DestinationUnavailable)


def test_all_refused_is_refused() -> None:
    failures = [_fail("127.0.0.1", errno.ECONNREFUSED), _fail("::1", errno.ECONNREFUSED)]
    assert isinstance(_failure_error(failures, 443), ConnectionRefused)
