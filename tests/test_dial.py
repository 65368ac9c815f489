"""The Happy Eyeballs dialer (RFC 8305), on loopback only (127.0.0.0/8 and ::1).

A refusal comes from a port that is bound but not listening (so nobody else can take it
meanwhile); a timeout from a listener whose accept queue was filled first and which never
accepts, so the kernel drops further SYNs and the connect hangs until our deadline. Two
addresses with the same port number but different fates (one black-holed, one live) are
two listeners: 127.0.0.1 and 127.0.0.2, or 127.0.0.1 and an IPV6_V6ONLY one on ::1.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import os
import socket
import time
from collections.abc import Iterator

import gevent
import pytest

from proxyproc import (
    descriptors_above_1023,
    full_accept_queue,
    ipv6_loopback,
    no_descriptors_left,
)
from splicegate.dial import (
    _Failure,
    _failure_error,
    dial,
    interleave,
    with_deadline,
    with_nodelay,
)
from splicegate.errors import (
    ConnectionRefused,
    ConnectTimeout,
    DestinationUnavailable,
    OutOfResources,
)

ip = ipaddress.ip_address

SHORT = 0.5
LATE = 2.0


def soon(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds


def open_fds() -> int:
    """Descriptors open now, once the hub's loop runs: it opens two of its own (epoll and
    an eventfd) the first time anything waits, which is not a leak."""
    gevent.sleep(0)
    return len(os.listdir("/proc/self/fd"))


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


def test_connects_to_a_listener(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    sock = dial([ip("127.0.0.1")], port, soon())
    try:
        assert isinstance(sock, socket.socket)
        assert sock.getpeername() == ("127.0.0.1", port)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert not sock.getblocking()  # the engine and the hub's waits need it so
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


@pytest.mark.parametrize("code", [errno.ENETUNREACH, errno.ETIMEDOUT, errno.EINVAL])
def test_other_errors_are_unavailable(code: int) -> None:
    assert isinstance(_failure_error([_fail("127.0.0.1", code)], 443), DestinationUnavailable)


@pytest.mark.parametrize(
    ("code", "named"),
    [
        (errno.EMFILE, "open files"),
        (errno.ENFILE, "fs.file-max"),
        (errno.ENOBUFS, "socket buffer memory"),
        (errno.EADDRNOTAVAIL, "local ports"),
    ],
)
def test_a_shortage_on_this_host_is_a_503_not_the_destinations_fault(code: int, named: str) -> None:
    err = _failure_error([_fail("127.0.0.1", code), _fail("::1", code)], 443)
    assert isinstance(err, OutOfResources) and err.status == 503
    assert named in err.message and "127.0.0.1" not in err.message
    assert ("Retry-After", "1") in err.headers()


def test_a_shortage_beside_unreachable_routes_is_still_the_proxys() -> None:
    mixed = [_fail("::1", errno.ENETUNREACH), _fail("127.0.0.1", errno.EADDRNOTAVAIL)]
    assert isinstance(_failure_error(mixed, 443), OutOfResources)
    # an address that answered (refused) is the destination's say: not a shortage
    answered = [_fail("::1", errno.ECONNREFUSED), _fail("127.0.0.1", errno.EMFILE)]
    assert isinstance(_failure_error(answered, 443), DestinationUnavailable)


def test_eaddrnotavail_on_ipv6_is_a_route_not_a_shortage() -> None:
    """Linux says EADDRNOTAVAIL for an IPv6 destination when no source address can reach
    it: with IPv4 unreachable too, that is a 502, not the proxy's 503 about local ports."""
    failures = [_fail("::1", errno.EADDRNOTAVAIL), _fail("127.0.0.1", errno.ENETUNREACH)]
    err = _failure_error(failures, 443)
    assert isinstance(err, DestinationUnavailable) and err.status == 502, err


def test_a_firewall_on_this_host_is_named() -> None:
    err = _failure_error([_fail("127.0.0.1", errno.EPERM)], 443)
    assert isinstance(err, DestinationUnavailable)
    assert "blocked on this proxy's own host" in err.message


def test_dial_without_descriptors_left_is_out_of_resources(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    with no_descriptors_left(), pytest.raises(OutOfResources) as caught:
        dial([ipaddress.ip_address("127.0.0.1")], port, time.monotonic() + 2)
    assert "open files" in caught.value.message


def test_all_refused_is_refused() -> None:
    failures = [_fail("127.0.0.1", errno.ECONNREFUSED), _fail("::1", errno.ECONNREFUSED)]
    assert isinstance(_failure_error(failures, 443), ConnectionRefused)


# --- Happy Eyeballs (RFC 8305) ------------------------------------------------------------

needs_ipv6 = pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback")


def test_interleave_alternates_families_from_the_first_one() -> None:
    v6 = [ip("::1"), ip("::2"), ip("::3")]
    v4 = [ip("127.0.0.1"), ip("127.0.0.2")]
    assert interleave([*v6, *v4]) == [v6[0], v4[0], v6[1], v4[1], v6[2]]
    assert interleave([v4[0], *v6, v4[1]]) == [v4[0], v6[0], v4[1], v6[1], v6[2]]
    assert interleave(v4) == v4  # one family: the resolver's order, untouched
    assert interleave([]) == []


@contextlib.contextmanager
def live(host: str, port: int = 0) -> Iterator[socket.socket]:
    """A listener that completes handshakes through its backlog (never accepts, needn't)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as srv:
        if family == socket.AF_INET6:
            srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        srv.bind((host, port))
        srv.listen(64)
        yield srv


def pending_connections(srv: socket.socket) -> int:
    """Connections waiting in a listener's queue (accepted here, closed at once)."""
    srv.setblocking(False)
    count = 0
    for _ in range(64):  # bounded
        try:
            conn, _ = srv.accept()
        except BlockingIOError:
            return count
        conn.close()
        count += 1
    return count


def test_black_holed_first_address_falls_back_after_the_attempt_delay() -> None:
    with live("127.0.0.2") as srv:
        port = srv.getsockname()[1]
        with full_accept_queue("127.0.0.1", port):
            before = open_fds()
            started = time.monotonic()
            sock = dial([ip("127.0.0.1"), ip("127.0.0.2")], port, soon(10))
            elapsed = time.monotonic() - started
            with sock:
                assert sock.getpeername() == ("127.0.0.2", port)
                assert open_fds() == before + 1  # the winner only: the loser is closed
            assert open_fds() == before
    assert 0.25 <= elapsed < 5  # started 250 ms after the first, not at its deadline


@needs_ipv6
def test_black_holed_ipv6_falls_back_to_ipv4() -> None:
    with live("127.0.0.1") as srv:
        port = srv.getsockname()[1]
        with full_accept_queue("::1", port):
            started = time.monotonic()
            with dial([ip("::1"), ip("127.0.0.1")], port, soon(10)) as sock:
                assert sock.family == socket.AF_INET
                assert sock.getpeername() == ("127.0.0.1", port)
            assert time.monotonic() - started < 5


def test_a_failure_starts_the_next_attempt_at_once(closed_port: int) -> None:
    with live("127.0.0.2", closed_port) as srv:
        started = time.monotonic()
        # A 5 s attempt delay: only starting at the failure can finish well before it.
        with dial([ip("127.0.0.1"), ip("127.0.0.2")], closed_port, soon(10),
                  attempt_delay=5.0) as sock:  # fmt: skip
            assert sock.getpeername() == ("127.0.0.2", srv.getsockname()[1])
        assert time.monotonic() - started < 2.5


def test_first_success_wins_and_no_later_attempt_starts() -> None:
    with live("127.0.0.1") as first:
        port = first.getsockname()[1]
        with live("127.0.0.2", port) as second:
            with dial([ip("127.0.0.1"), ip("127.0.0.2")], port, soon()) as sock:
                assert sock.getpeername() == ("127.0.0.1", port)
            gevent.sleep(0.4)  # past the attempt delay: a second attempt would be in
            assert pending_connections(second) == 0


def test_every_address_black_holed_times_out_at_the_deadline() -> None:
    with full_accept_queue("127.0.0.1") as port, full_accept_queue("127.0.0.2", port):
        before = open_fds()
        deadline = soon(SHORT + 0.3)
        with pytest.raises(ConnectTimeout) as caught:
            dial([ip("127.0.0.1"), ip("127.0.0.2")], port, deadline)
        assert deadline <= time.monotonic() < deadline + LATE
        assert open_fds() == before
    err = caught.value
    assert f"127.0.0.1, 127.0.0.2 port {port} timed out" in err.message
    assert err.details == f"connect timeout after 0.8 s: 2 addresses, port {port}"


@needs_ipv6
def test_both_families_refused_is_refused() -> None:
    with socket.socket() as v4:
        v4.bind(("127.0.0.1", 0))
        port = v4.getsockname()[1]
        with socket.socket(socket.AF_INET6) as v6:
            v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            v6.bind(("::1", port))
            with pytest.raises(ConnectionRefused) as caught:
                dial([ip("::1"), ip("127.0.0.1")], port, soon())
    assert f"::1, 127.0.0.1 port {port} refused by every address" in caught.value.message


def test_refused_then_timed_out_names_both() -> None:
    with full_accept_queue("127.0.0.1") as port, socket.socket() as refusing:
        refusing.bind(("127.0.0.2", port))
        with pytest.raises(ConnectTimeout) as caught:
            dial([ip("127.0.0.2"), ip("127.0.0.1")], port, soon(SHORT))
    assert "besides: 127.0.0.2: Connection refused" in caught.value.message


def test_killed_mid_race_closes_every_socket() -> None:
    with full_accept_queue("127.0.0.1") as port, full_accept_queue("127.0.0.2", port):
        before = open_fds()
        racer = gevent.spawn(dial, [ip("127.0.0.1"), ip("127.0.0.2")], port, soon())
        gevent.sleep(0.4)  # both attempts are in flight
        assert open_fds() == before + 2
        racer.kill(timeout=5)
        assert racer.dead
        assert open_fds() == before


def test_no_fd_growth_over_many_races() -> None:
    with live("127.0.0.2") as srv:
        port = srv.getsockname()[1]
        with full_accept_queue("127.0.0.1", port):
            with dial([ip("127.0.0.2")], port, soon()):
                pass  # warm up lazily created gevent fds
            pending_connections(srv)
            before = open_fds()
            for _ in range(10):
                with dial([ip("127.0.0.1"), ip("127.0.0.2")], port, soon(), attempt_delay=0.01):
                    pass
                pending_connections(srv)
            assert open_fds() == before


def test_works_with_descriptors_above_1023(listener: socket.socket) -> None:
    """A busy proxy holds thousands of fds; select(2) cannot watch one numbered 1024+."""
    with descriptors_above_1023():
        sock = dial([ip("127.0.0.1")], listener.getsockname()[1], soon())
        with sock:
            assert sock.fileno() > 1023
            assert sock.getpeername() == listener.getsockname()


# --- an application's dialer ----------------------------------------------------------------


def ignores_its_deadline(addresses: list, port: int, deadline: float) -> socket.socket:
    """An application's dialer stuck past any deadline, as one chained through an upstream
    that never answers would be."""
    gevent.sleep(30)
    raise AssertionError("not cut off")


def test_a_dialer_that_ignores_its_deadline_is_cut_off_with_dials_error() -> None:
    deadline = soon(SHORT)
    with pytest.raises(ConnectTimeout) as caught:
        with_deadline(ignores_its_deadline, grace=0.2)([ip("127.0.0.1")], 9, deadline)
    assert deadline + 0.2 <= time.monotonic() < deadline + LATE
    assert caught.value.status == 504
    assert caught.value.details == f"connect timeout after {SHORT:.1f} s: 127.0.0.1 port 9"


def test_a_dialer_keeping_its_deadline_gives_its_own_error_within_the_grace() -> None:
    def late_but_honest(addresses: list, port: int, deadline: float) -> socket.socket:
        gevent.sleep(max(0.0, deadline - time.monotonic()) + 0.1)
        raise ConnectionRefused("the upstream refused", details="upstream refused")

    with pytest.raises(ConnectionRefused, match="upstream refused"):
        with_deadline(late_but_honest, grace=1.0)([ip("127.0.0.1")], 9, soon(SHORT))


def test_a_callers_own_timeout_passes_through_the_cut() -> None:
    """A Timeout the caller set (a stop's, a test's) is the caller's, not a 504."""
    mine = gevent.Timeout(SHORT)
    with pytest.raises(gevent.Timeout) as caught, mine:
        with_deadline(ignores_its_deadline)([ip("127.0.0.1")], 9, soon())
    assert caught.value is mine


def test_dial_itself_keeps_its_deadline_and_is_not_wrapped() -> None:
    """Bound to arguments or not (the README names it for a dialer that wraps it)."""
    bound = functools.partial(dial, attempt_delay=0.1)
    assert with_deadline(bound) is bound
    assert with_deadline(dial) is dial and with_nodelay(dial) is dial
