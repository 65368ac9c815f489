"""Connection caps and the accept loop's back-off, in process (the end-to-end cases are in
test_security.py)."""

from __future__ import annotations

import errno
import logging

import gevent
import pytest
from gevent import socket

from splicegate import limits
from splicegate.errors import OverCapacity, render
from splicegate.limits import AcceptServer, ConnectionLimits


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
    assert limits.fds_needed(10_000) == 60_000 + limits.FDS_SPARE


def test_accept_pauses_with_doubling_delays_and_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """accept() failing with EMFILE: paused 10, 20, 40 ms ... and resumed each time, one
    warning, no traceback; the first success resets the delay and is logged."""
    handled: list[tuple] = []
    server = AcceptServer(("127.0.0.1", 0), lambda sock, addr: handled.append(addr))
    failures = {"left": 4}
    real_accept = server.__class__.__mro__[1].do_read
    pauses: list[float] = []

    def flaky_do_read(self: AcceptServer):  # type: ignore[no-untyped-def]
        if failures["left"]:
            failures["left"] -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return real_accept(self)

    monkeypatch.setattr(limits.StreamServer, "do_read", flaky_do_read)
    original_pause = AcceptServer._pause

    def recording_pause(self: AcceptServer, exc: OSError) -> None:
        pauses.append(self._pause_delay)
        original_pause(self, exc)

    monkeypatch.setattr(AcceptServer, "_pause", recording_pause)
    caplog.set_level(logging.DEBUG, logger="splicegate")
    server.start()
    try:
        with socket.create_connection(server.address, timeout=5), gevent.Timeout(5):
            while not handled:
                gevent.sleep(0.01)
        assert pauses == [0.01, 0.02, 0.04, 0.08]
        assert server._pause_delay == server.min_delay
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "pausing accepts for 10 ms" in warnings[0].getMessage()
        assert any("accepting again after 4 failed accepts" in r.getMessage()
                   for r in caplog.records)  # fmt: skip
        assert not any(r.exc_info for r in caplog.records)
    finally:
        server.close()
    assert server._resume_timer is None


def test_the_delay_stops_at_the_maximum() -> None:
    server = AcceptServer(("127.0.0.1", 0), lambda sock, addr: None)
    try:
        server._pause_delay = 0.8
        server._warned_at = float("inf")  # no warning: the test only watches the delay
        server._pause(OSError(errno.ENFILE, "Too many open files in system"))
        assert server._pause_delay == server.max_delay == 1.0
        server._pause(OSError(errno.ENFILE, "Too many open files in system"))
        assert server._pause_delay == 1.0
    finally:
        server.close()
