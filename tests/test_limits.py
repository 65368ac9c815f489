"""Connection caps and the accept loop's back-off, in process (the end-to-end cases are in
test_security.py)."""

from __future__ import annotations

import errno
import logging
import os
import socket as stdsocket
import time

import gevent
import pytest
from gevent import socket

from proxyproc import ipv6_loopback
from splicegate import limits
from splicegate.errors import OverCapacity, render
from splicegate.limits import Acceptor, ConnectionLimits, unmapped
from splicegate.relay import pipe_cap_bound

MiB = 1024 * 1024


def test_only_ipv4_mapped_clients_are_unmapped() -> None:
    assert unmapped(("::ffff:127.0.0.1", 5, 0, 0)) == ("127.0.0.1", 5)
    # Under ::ffff: but not in ::ffff:0:0/96: an IPv6 client, kept whole (cutting the
    # prefix off made '0:c000:207', which the client policy could not parse: a 500).
    assert unmapped(("::ffff:0:c000:207", 5, 0, 0)) == ("::ffff:0:c000:207", 5, 0, 0)
    assert unmapped(("::1", 5, 0, 0)) == ("::1", 5, 0, 0)


def test_total_cap() -> None:
    caps = ConnectionLimits(total=2)
    caps.admit("127.0.0.1")
    caps.admit("127.0.0.2")
    with pytest.raises(OverCapacity) as info:
        caps.admit("127.0.0.3")
    assert info.value.status == 503
    response = render(info.value).decode()
    assert "Retry-After: 1\r\n" in response
    assert 'error=proxy_internal_response; details="over --max-connections 2"' in response
    caps.release("127.0.0.1")
    caps.admit("127.0.0.3")  # the refused one was never counted
    assert caps.total == 2


def test_per_client_cap_and_counts_return_to_zero() -> None:
    caps = ConnectionLimits(total=100, per_client=2)
    for _ in range(2):
        caps.admit("::1")
    with pytest.raises(OverCapacity, match="client ::1 has 2 connections open"):
        caps.admit("::1")
    caps.admit("127.0.0.1")
    for client in ("::1", "::1", "127.0.0.1"):
        caps.release(client)
    assert caps.total == 0 and caps.per_client == {}  # no entry left per departed client


def test_new_caps_keep_the_counts() -> None:
    """A reload lowers a cap: nothing is closed, fewer are admitted until some leave."""
    caps = ConnectionLimits()
    for _ in range(5):
        caps.admit("10.0.0.1")
    caps.set_caps(total=3, per_client=0)
    with pytest.raises(OverCapacity):
        caps.admit("10.0.0.2")
    for _ in range(3):
        caps.release("10.0.0.1")
    caps.admit("10.0.0.2")
    assert caps.total == 3


def test_zero_means_no_cap() -> None:
    caps = ConnectionLimits(total=0, per_client=0)
    for _ in range(1000):
        caps.admit("127.0.0.1")
    assert caps.total == 1000


def test_fds_needed() -> None:
    """Two sockets a tunnel, two ends a pipe: pipes count by the engine's cap, not per
    tunnel, since they are lent only while bytes are in flight."""
    assert limits.fds_needed(10_000, 64) == 20_000 + 128 + limits.FDS_SPARE
    assert limits.fds_needed(10_000, 0) == 20_000 + limits.FDS_SPARE


def test_the_python_engine_holds_no_pipes() -> None:
    assert pipe_cap_bound("python", MiB, None, 1) == 0
    assert pipe_cap_bound("python", MiB, 500, 2) == 0
    # the native engine's share is checked against a built engine in test_engine_native


class FlakyListener:
    """A listening socket whose first ``failures`` accepts fail with ``error``."""

    def __init__(self, failures: int, error: int = errno.EMFILE) -> None:
        self.real = limits.listening_socket(("127.0.0.1", 0), 16)
        self.family = self.real.family
        self.failures = failures
        self.error = error

    def _accept(self) -> tuple[int, tuple]:
        if self.failures:
            self.failures -= 1
            raise OSError(self.error, os.strerror(self.error))
        return self.real._accept()

    def fileno(self) -> int:
        return self.real.fileno()

    def getsockname(self) -> tuple:
        return self.real.getsockname()

    def close(self) -> None:
        self.real.close()


def accept_into(handled: list, listener: object, stamps: list | None = None) -> Acceptor:
    def handle(sock: stdsocket.socket, address: tuple, accepted: float) -> None:
        if stamps is not None:
            stamps.append((accepted, time.monotonic()))
        nodelay = sock.getsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_NODELAY)
        handled.append((address, (sock.getblocking(), nodelay != 0)))
        sock.close()

    return Acceptor(listener, handle, lambda fn, *args: fn(*args))  # type: ignore[arg-type]


def connect_until_handled(server: Acceptor, handled: list) -> None:
    """Connect one client and wait (bounded) until the acceptor has handed it over."""
    with socket.create_connection(server.address, timeout=5), gevent.Timeout(5):
        while not handled:
            gevent.sleep(0.01)


def test_accept_gives_non_blocking_sockets() -> None:
    handled: list = []
    stamps: list = []
    server = accept_into(handled, limits.listening_socket(("127.0.0.1", 0), 16), stamps)
    server.start()
    try:
        before = time.monotonic()
        clients = [socket.create_connection(server.address, timeout=5) for _ in range(3)]
        with gevent.Timeout(5):
            while len(handled) < 3:
                gevent.sleep(0.01)
        # each handler is told when its connection was accepted: after the connects began,
        # and no later than the handler ran
        assert len(stamps) == 3
        assert all(before <= accepted <= ran for accepted, ran in stamps), stamps
        ports = sorted(c.getsockname()[1] for c in clients)
        assert sorted(address[1] for address, _ in handled) == ports
        # non-blocking, and on Linux with the listener's TCP_NODELAY
        assert [flags for _, flags in handled] == [(False, limits.NODELAY_INHERITED)] * 3
        for c in clients:
            c.close()
    finally:
        server.close()
    with pytest.raises(OSError):
        socket.create_connection(server.address, timeout=1)


@pytest.mark.parametrize("defer", [0, 1])
def test_listening_socket_defers_accept_when_asked(defer: int) -> None:
    sock = limits.listening_socket(("127.0.0.1", 0), 16, defer_accept=defer)
    with sock:
        assert sock.getsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_DEFER_ACCEPT) == defer
        assert not sock.getblocking()


def test_listening_socket_names_the_address() -> None:
    taken = limits.listening_socket(("127.0.0.1", 0), 16)
    try:
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}: "):
            limits.listening_socket(("127.0.0.1", port), 16)
    finally:
        taken.close()


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
def test_listening_socket_v6only_and_an_ipv6_address_in_brackets() -> None:
    # Bound to ::1 a socket is IPv6-only whatever was asked; an IPv4-mapped address shows
    # the option: Linux refuses to bind one to an IPv6-only socket.
    with limits.listening_socket(("::ffff:127.0.0.1", 0), 16) as sock:
        assert sock.getsockopt(stdsocket.IPPROTO_IPV6, stdsocket.IPV6_V6ONLY) == 0
    with pytest.raises(OSError, match=r"cannot listen on \[::ffff:127.0.0.1\]:0: Invalid"):
        limits.listening_socket(("::ffff:127.0.0.1", 0), 16, v6only=True)
    taken = limits.listening_socket(("::1", 0), 16)
    try:
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=rf"cannot listen on \[::1\]:{port}: "):
            limits.listening_socket(("::1", port), 16)
    finally:
        taken.close()


@pytest.mark.parametrize("error", [errno.EMFILE, errno.EINVAL])
def test_accept_pauses_with_doubling_delays_and_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, error: int
) -> None:
    """accept() failing (EMFILE, or anything not one client's): paused 10, 20, 40 ms ...
    and resumed each time, one warning, no traceback; the first success resets the delay
    and is logged."""
    handled: list = []
    listener = FlakyListener(4, error)
    server = accept_into(handled, listener)
    pauses: list[float] = []
    original_pause = Acceptor._pause

    def recording_pause(self: Acceptor, exc: OSError) -> None:
        pauses.append(self._pause_delay)
        original_pause(self, exc)

    monkeypatch.setattr(Acceptor, "_pause", recording_pause)
    caplog.set_level(logging.DEBUG, logger="splicegate")
    server.start()
    try:
        connect_until_handled(server, handled)
        assert pauses == [0.01, 0.02, 0.04, 0.08]
        assert server._pause_delay == server.min_delay
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "pausing accepts for 10 ms" in warnings[0].getMessage()
        assert os.strerror(error) in warnings[0].getMessage()
        assert any("accepting again after 4 failed accepts" in r.getMessage()
                   for r in caplog.records)  # fmt: skip
        assert not any(r.exc_info for r in caplog.records)
    finally:
        server.close()
    assert server._resume_timer is None


def test_a_client_gone_from_the_queue_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    handled: list = []
    server = accept_into(handled, FlakyListener(1, errno.ECONNABORTED))
    caplog.set_level(logging.DEBUG, logger="splicegate")
    server.start()
    try:
        connect_until_handled(server, handled)
        assert server._paused_since is None and not caplog.records
    finally:
        server.close()


def test_the_delay_stops_at_the_maximum() -> None:
    server = accept_into([], limits.listening_socket(("127.0.0.1", 0), 16))
    try:
        server._pause_delay = 0.8
        server._warned_at = float("inf")  # no warning: the test only watches the delay
        server._pause(OSError(errno.ENFILE, "Too many open files in system"))
        assert server._pause_delay == server.max_delay == 1.0
        server._pause(OSError(errno.ENFILE, "Too many open files in system"))
        assert server._pause_delay == 1.0
    finally:
        server.close()
