"""The relay engines on real loopback TCP: exact bytes, half-close, resets, timeouts,
backpressure, shutdown and fd hygiene.

Every test runs on each engine that loads (see ``engine_kind`` in conftest.py). A tunnel is
built the way the control plane builds one: a test client connects to a listener standing
in for the proxy, the proxy side dials a listener standing in for the origin, and the two
proxy-side sockets are detached and their fds submitted. The peers are gevent sockets in
greenlets of the same hub the engine runs in.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import gevent
import pytest
from gevent import socket
from gevent.event import AsyncResult

from proxyproc import ipv6_loopback, recv_exactly, sha256
from relayrig import (
    EMPTY_SHA,
    NO_TIMEOUTS,
    WAIT,
    MiB,
    Rig,
    Tunnel,
    abort,
    count_fds,
    drain,
    exchange,
    exchange_many,
    fd_is_open,
    pump,
    randbytes,
    read_fd,
    together,
    wait_until,
)
from splicegate.relay import Engine, RelayTimeouts

STATS_KEYS = {"active", "pipes_in_use", "bytes_up", "bytes_down", "tunnels_total", "threads"}


@pytest.fixture
def make_rig(make_engine: Callable[..., Engine]) -> Any:
    """Build rigs on fresh engines; their test sockets close before the engines shut down."""
    rigs: list[Rig] = []

    def make(
        timeouts: RelayTimeouts | None = None,
        host: str = "127.0.0.1",
        bufsize: int | None = None,
        threads: int | None = None,
    ) -> Rig:
        rig = Rig(make_engine(timeouts, threads), host, bufsize)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()


# --- bytes ----------------------------------------------------------------------------------


def test_large_transfer_both_ways_at_once(make_rig: Any) -> None:
    rig = make_rig()
    t = rig.open()
    up, down = randbytes(64 * MiB, 1), randbytes(64 * MiB, 2)
    exchange(t, up, down)
    record = t.record()
    assert (record.reason, record.errno) == ("eof", 0)
    assert record.first_closer in ("client", "origin")
    assert (record.bytes_up, record.bytes_down) == (len(up), len(down))
    assert t.fds_closed_at_done


def test_many_small_messages(make_rig: Any) -> None:
    rig = make_rig()
    t = rig.open()
    rng = random.Random(3)
    round_trip_bytes = 0
    for _ in range(300):  # request/response: each tiny message must pass alone, in order
        msg = rng.randbytes(rng.randrange(1, 64))
        round_trip_bytes += len(msg)
        t.client.sendall(msg)
        assert recv_exactly(t.origin, len(msg)) == msg
        t.origin.sendall(msg[::-1])
        assert recv_exactly(t.client, len(msg)) == msg[::-1]
    ups = [rng.randbytes(rng.randrange(1, 100)) for _ in range(3000)]
    downs = [rng.randbytes(rng.randrange(1, 100)) for _ in range(3000)]

    def burst(sock: socket.socket, msgs: list[bytes]) -> None:
        for msg in msgs:
            sock.sendall(msg)
        sock.shutdown(socket.SHUT_WR)

    _, _, at_origin, at_client = together(
        (burst, t.client, ups), (burst, t.origin, downs), (drain, t.origin), (drain, t.client)
    )
    up, down = b"".join(ups), b"".join(downs)
    assert at_origin == (len(up), sha256(up))
    assert at_client == (len(down), sha256(down))
    record = t.record()
    assert record.reason == "eof"
    assert record.bytes_up == round_trip_bytes + len(up)
    assert record.bytes_down == round_trip_bytes + len(down)


def test_early_up_goes_first_and_is_counted(make_rig: Any) -> None:
    rig = make_rig()
    early = b"EARLY:" + randbytes(512 * 1024, 4)

    def client_sends_too_soon(client: socket.socket, origin: socket.socket) -> None:
        # Already waiting at the proxy when the tunnel starts; must still come after early_up.
        client.sendall(b"LATER")

    t = rig.open(early_up=early, before_submit=client_sends_too_soon)
    assert recv_exactly(t.origin, len(early) + 5) == early + b"LATER"
    t.client.shutdown(socket.SHUT_WR)
    assert t.origin.recv(1) == b""
    t.origin.shutdown(socket.SHUT_WR)
    assert t.client.recv(1) == b""
    record = t.record()
    assert (record.reason, record.first_closer) == ("eof", "client")
    assert (record.bytes_up, record.bytes_down) == (len(early) + 5, 0)


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
def test_ipv6_loopback(make_rig: Any) -> None:
    rig = make_rig(host="::1")
    t = rig.open(early_up=b"hello ")
    up, down = randbytes(MiB, 5), randbytes(MiB, 6)
    _, _, at_origin, at_client = together(
        (pump, t.client, up), (pump, t.origin, down), (drain, t.origin), (drain, t.client)
    )
    assert at_origin == (len(up) + 6, sha256(b"hello " + up))
    assert at_client == (len(down), sha256(down))
    record = t.record()
    assert (record.reason, record.bytes_up, record.bytes_down) == ("eof", len(up) + 6, len(down))


def test_blocking_sockets_handed_over_hold_up_no_other_tunnel(make_rig: Any) -> None:
    """gevent's sockets are non-blocking, but an embedding application may hand over
    blocking ones: the engine switches them before its first read or write. One relay
    thread, so that a read left waiting on a quiet tunnel would stall the busy one (the
    native engine); the pure-Python engine's hub would stall outright."""
    rig = make_rig(threads=1)
    client, proxy_client = rig.connect(rig.front)
    proxy_origin, origin = rig.connect(rig.back)
    fds = (proxy_client.detach(), proxy_origin.detach())
    for fd in fds:
        os.set_blocking(fd, True)
    quiet = Tunnel(client, origin, fds, None)
    rig.engine.submit(fds[0], fds[1], b"", quiet.on_done)
    rig.tunnels.append(quiet)
    quiet.client.sendall(b"one")  # read, and then nothing more to read either way
    assert recv_exactly(quiet.origin, 3) == b"one"
    quiet.origin.sendall(b"two")
    assert recv_exactly(quiet.client, 3) == b"two"
    exchange(rig.open(), randbytes(MiB, 21), randbytes(MiB, 22))
    exchange(quiet, b"up", b"down")
    record = quiet.record()
    assert (record.reason, record.bytes_up, record.bytes_down) == ("eof", 5, 7)


def test_records_and_stats_count_delivered_bytes(make_rig: Any) -> None:
    rig = make_rig()
    engine = rig.engine
    before = engine.stats()
    assert set(before) == STATS_KEYS
    if engine.name == "python":
        assert (before["pipes_in_use"], before["threads"]) == (0, 0)
    started = time.monotonic()
    t = rig.open(early_up=b"E" * 10)
    t.client.sendall(b"u" * 1000)
    assert recv_exactly(t.origin, 1010) == b"E" * 10 + b"u" * 1000
    t.origin.sendall(b"d" * 500)
    assert recv_exactly(t.client, 500) == b"d" * 500
    during = engine.stats()
    assert during["active"] == before["active"] + 1
    assert during["tunnels_total"] == before["tunnels_total"] + 1
    assert during["bytes_up"] - before["bytes_up"] == 1010
    assert during["bytes_down"] - before["bytes_down"] == 500
    t.origin.shutdown(socket.SHUT_WR)
    assert t.client.recv(1) == b""
    t.client.shutdown(socket.SHUT_WR)
    assert t.origin.recv(1) == b""
    record = t.record()
    elapsed = time.monotonic() - started
    after = engine.stats()
    assert after["active"] == before["active"]
    assert after["tunnels_total"] == before["tunnels_total"] + 1
    assert (record.bytes_up, record.bytes_down) == (1010, 500)
    assert after["bytes_up"] - before["bytes_up"] == 1010
    assert after["bytes_down"] - before["bytes_down"] == 500
    assert (record.reason, record.first_closer, record.errno) == ("eof", "origin", 0)
    assert 0 <= record.duration_s <= elapsed


# --- half-close and resets -------------------------------------------------------------------


@pytest.mark.parametrize("first", ["client", "origin"])
def test_half_close_keeps_the_other_direction_open(make_rig: Any, first: str) -> None:
    rig = make_rig()
    t = rig.open()
    closer, other = (t.client, t.origin) if first == "client" else (t.origin, t.client)
    last_words = randbytes(MiB, 7)
    pieces = [randbytes(128 * 1024, 8 + i) for i in range(8)]

    def other_side() -> tuple[int, str]:
        # Everything sent before the EOF arrives, then the EOF itself ...
        received = drain(other)
        # ... and the other direction still carries bytes for a while.
        for piece in pieces:
            other.sendall(piece)
            gevent.sleep(0.01)
        assert not t.done.ready()
        other.close()
        return received

    def closer_side() -> None:
        closer.sendall(last_words)
        closer.shutdown(socket.SHUT_WR)

    _, at_other, at_closer = together((closer_side,), (other_side,), (drain, closer))
    assert at_other == (len(last_words), sha256(last_words))
    rest = b"".join(pieces)
    assert at_closer == (len(rest), sha256(rest))
    record = t.record()
    assert (record.reason, record.first_closer, record.errno) == ("eof", first, 0)
    sent_up, sent_down = (last_words, rest) if first == "client" else (rest, last_words)
    assert (record.bytes_up, record.bytes_down) == (len(sent_up), len(sent_down))


@pytest.mark.parametrize("aborter", ["client", "origin"])
def test_reset_is_passed_on_as_a_reset(make_rig: Any, aborter: str) -> None:
    rig = make_rig()
    t = rig.open()
    side, peer = (t.client, t.origin) if aborter == "client" else (t.origin, t.client)
    side.sendall(b"hello")
    assert recv_exactly(peer, 5) == b"hello"
    abort(side)
    with pytest.raises(ConnectionResetError):
        drain(peer)
    record = t.record()
    assert (record.reason, record.first_closer) == ("reset", aborter)
    assert record.errno == errno.ECONNRESET
    sent_up, sent_down = (5, 0) if aborter == "client" else (0, 5)
    assert (record.bytes_up, record.bytes_down) == (sent_up, sent_down)
    assert t.fds_closed_at_done


def test_reset_after_half_close_names_the_first_closer(make_rig: Any) -> None:
    rig = make_rig()
    t = rig.open()
    t.client.shutdown(socket.SHUT_WR)
    assert t.origin.recv(1) == b""
    abort(t.origin)
    with pytest.raises(ConnectionResetError):
        drain(t.client)
    record = t.record()
    assert (record.reason, record.first_closer) == ("reset", "client")


@pytest.mark.parametrize("side", ["client", "origin"])
@pytest.mark.parametrize("when", ["after its eof was read", "at once"])
def test_a_reset_after_ones_own_half_close_is_passed_on(
    make_rig: Any, side: str, when: str
) -> None:
    """A peer half-closes, then aborts. The other peer has nothing to send, so no write can
    find the reset: the relay must notice it on the half-closed socket and pass it on at
    once, not end the tunnel at the half-closed timeout as if both had finished; also when
    the EOF and the reset reach the relay together."""
    rig = make_rig(RelayTimeouts(idle=0, half_closed=3 * WAIT, lifetime=0))
    t = rig.open()
    closer, peer = (t.client, t.origin) if side == "client" else (t.origin, t.client)
    closer.sendall(b"last")
    closer.shutdown(socket.SHUT_WR)
    if when == "after its eof was read":
        assert recv_exactly(peer, 4) == b"last" and peer.recv(1) == b""
    abort(closer)
    # The peer has read its EOF, so recv returns b"" at once: only the error the abort
    # leaves on its socket tells. A reset in CLOSE_WAIT is EPIPE.
    assert wait_until(
        lambda: peer.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR), "the abort passed on"
    ) in (errno.EPIPE, errno.ECONNRESET)
    record = t.record()
    assert (record.reason, record.first_closer) == ("reset", side)
    assert t.fds_closed_at_done


@pytest.mark.parametrize("early", [b"", b"client hello"])
@pytest.mark.parametrize("side", ["client", "origin"])
def test_bytes_sent_just_before_a_reset_arrive_then_the_abort(
    make_rig: Any, early: bytes, side: str
) -> None:
    """Linux keeps bytes that came before a reset readable, and the relay must pass them on
    before the abort: a peer sends and aborts at once, many times over (the bytes and the
    reset often reach the relay in one event). Early bytes put the client's socket under
    the Python engine's error watch from the start."""
    rig = make_rig()
    for i in range(40):  # bounded
        t = rig.open(early_up=early)
        if early:
            assert recv_exactly(t.origin, len(early)) == early
        sender, receiver = (t.client, t.origin) if side == "client" else (t.origin, t.client)
        last_words = randbytes(20_000, i)
        sender.sendall(last_words)
        abort(sender)
        got = bytearray()
        with pytest.raises(ConnectionResetError):  # after every byte, the abort: never an EOF
            while chunk := receiver.recv(65536):
                got += chunk
        assert bytes(got) == last_words, f"tunnel {i}: {len(got)} of {len(last_words)} bytes"
        record = t.record()
        assert (record.reason, record.first_closer) == ("reset", side)


@pytest.mark.parametrize("side", ["client", "origin"])
def test_a_reset_while_its_direction_waits_for_the_reader_is_passed_on(
    make_rig: Any, side: str
) -> None:
    """A peer sends until the other, which reads nothing, has it all backed up, then aborts.
    Nothing is read from the aborting side meanwhile (its direction waits for room), and
    nothing is written to it: the reset must still end the tunnel at once, as a reset,
    not at the idle timeout as the proxy's own doing."""
    rig = make_rig(RelayTimeouts(idle=3 * WAIT, half_closed=0, lifetime=0), bufsize=16 * 1024)
    t = rig.open()
    sender, silent = (t.client, t.origin) if side == "client" else (t.origin, t.client)
    sender.setblocking(False)
    chunk, stalled_since = b"s" * 65536, None
    deadline = time.monotonic() + WAIT
    while stalled_since is None or time.monotonic() - stalled_since < 0.3:  # bounded
        assert time.monotonic() < deadline, "the sender never filled up"
        try:
            sender.send(chunk)
            stalled_since = None
        except BlockingIOError:
            stalled_since = stalled_since or time.monotonic()
            gevent.sleep(0.02)
    abort(sender)
    assert (
        wait_until(
            lambda: silent.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR), "the abort passed on"
        )
        == errno.ECONNRESET
    )
    record = t.record()
    assert (record.reason, record.first_closer) == ("reset", side)


def test_socket_error_ends_the_tunnel_with_error(make_rig: Any) -> None:
    rig = make_rig()
    client, proxy_client = rig.connect(rig.front)
    # An unconnected UDP socket as the "origin": sending to it fails with EDESTADDRREQ,
    # an error that is neither an EOF nor a reset.
    not_an_origin = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    done: AsyncResult = AsyncResult()
    rig.engine.submit(proxy_client.detach(), not_an_origin.detach(), b"", done.set)
    try:
        client.sendall(b"data")
        with pytest.raises(ConnectionResetError):
            drain(client)
        record = done.get(timeout=WAIT)
    finally:
        client.close()
    assert (record.reason, record.first_closer) == ("error", "proxy")
    assert record.errno == errno.EDESTADDRREQ


# --- timeouts --------------------------------------------------------------------------------


def test_idle_timeout_closes_both_sides(make_rig: Any) -> None:
    rig = make_rig(RelayTimeouts(idle=0.3, half_closed=0, lifetime=0))
    t = rig.open()
    t.client.sendall(b"ping")
    assert recv_exactly(t.origin, 4) == b"ping"
    # Nothing was in flight, so both peers get a plain EOF, as from Squid or HAProxy.
    assert drain(t.client) == (0, EMPTY_SHA)
    assert drain(t.origin) == (0, EMPTY_SHA)
    record = t.record()
    assert (record.reason, record.first_closer, record.errno) == ("idle", "proxy", 0)
    assert (record.bytes_up, record.bytes_down) == (4, 0)
    assert record.duration_s >= 0.25
    assert t.fds_closed_at_done


def test_bytes_either_way_defer_the_idle_timeout(make_rig: Any) -> None:
    idle = 1.0  # bytes 0.04 s apart: a stall of most of a second on a busy CI host is slack
    rig = make_rig(RelayTimeouts(idle=idle, half_closed=0, lifetime=0))
    t = rig.open()
    # Each phase lasts longer than the idle timeout with bytes moving one way only.
    for sender, receiver in ((t.client, t.origin), (t.origin, t.client)):
        phase_end = time.monotonic() + 1.5 * idle
        for _ in range(100):
            if time.monotonic() >= phase_end:
                break
            sender.sendall(b"k")
            assert recv_exactly(receiver, 1) == b"k"
            gevent.sleep(0.04)
        assert not t.done.ready()
    record = t.record()
    assert (record.reason, record.first_closer) == ("idle", "proxy")


def read_slowly(sock: socket.socket, size: int) -> bytes:
    """Read 128 KiB every 0.25 s, out of a receive buffer pinned small first: what the
    reader has not read then stays in the engine's send queue, where the engine sees it
    move. In the reader's own buffer (loopback autotunes it to MiBs) that queue would
    empty, and the tunnel rightly go idle while the reader still has seconds of reading.
    Run it before the writer (``together`` starts greenlets in order), so the buffer is
    pinned before the first byte comes."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    got = bytearray()
    for _ in range(2 * size // (128 * 1024) + 100):  # bounded
        got += recv_exactly(sock, min(128 * 1024, size - len(got)))
        if len(got) == size:
            break
        gevent.sleep(0.25)
    return bytes(got)


def test_a_peer_reading_slowly_out_of_a_full_send_queue_is_not_idle(make_rig: Any) -> None:
    """A client reads 128 KiB every 0.25 s out of a send buffer that loopback autotunes to
    MiBs: the engine then finds no room to write for seconds at a time, yet bytes move
    all along, and idle means no byte either way. Cut at the idle timeout, the client would
    read less than everything, or meet a reset."""
    rig = make_rig(RelayTimeouts(idle=1.0, half_closed=0, lifetime=0))
    t = rig.open()
    data = randbytes(4 * MiB, 60)
    received, _ = together((read_slowly, t.client, len(data)), (pump, t.origin, data))
    assert (len(received), sha256(received)) == (len(data), sha256(data))
    assert not t.done.ready()
    t.client.shutdown(socket.SHUT_WR)
    assert drain(t.client) == (0, EMPTY_SHA)
    record = t.record()
    assert (record.reason, record.bytes_down) == ("eof", len(data))


def test_a_peer_that_reads_nothing_is_idle_with_bytes_queued_for_it(make_rig: Any) -> None:
    """The send-queue look defers the idle close only while a queue moves: bytes queued
    for a client that reads none of them end the tunnel at the idle timeout."""
    idle = 1.0
    timeouts = RelayTimeouts(idle=idle, half_closed=0, lifetime=0)
    rig = make_rig(timeouts)
    t = rig.open()
    t.origin.setblocking(False)
    chunk, stalled_since = b"q" * 65536, None
    deadline = time.monotonic() + WAIT
    while stalled_since is None or time.monotonic() - stalled_since < 0.3:  # bounded
        assert time.monotonic() < deadline, "the origin never filled up"
        try:
            t.origin.send(chunk)
            stalled_since = None
        except BlockingIOError:
            stalled_since = stalled_since or time.monotonic()
            gevent.sleep(0.02)
    record = t.record()
    # The engine's last write came before the origin stalled; 0.5 s of slack for the loop.
    assert time.monotonic() - stalled_since < idle + 0.5
    assert (record.reason, record.first_closer) == ("idle", "proxy")


def test_a_look_at_the_queues_from_before_the_last_byte_never_counts(make_rig: Any) -> None:
    """A slow reader's queues were looked at; once it has read everything, one byte goes
    up and nothing more moves: idle counts from that byte, not an idle time later."""
    idle = 1.0
    rig = make_rig(RelayTimeouts(idle=idle, half_closed=0, lifetime=0))
    t = rig.open()
    data = randbytes(2 * MiB, 61)
    assert together((read_slowly, t.client, len(data)), (pump, t.origin, data))[0] == data
    t.client.sendall(b"!")
    last_byte = time.monotonic()
    assert recv_exactly(t.origin, 1) == b"!"
    record = t.record()
    assert record.reason == "idle"
    assert time.monotonic() - last_byte < idle + 0.5  # not two idle times


def test_an_eof_is_no_activity(make_rig: Any) -> None:
    """Idle means no byte either way: a half-close does not defer the idle timeout."""
    idle = 3.0
    rig = make_rig(RelayTimeouts(idle=idle, half_closed=0, lifetime=0))
    t = rig.open()
    t.client.sendall(b"k")
    assert recv_exactly(t.origin, 1) == b"k"
    last_byte = time.monotonic()
    gevent.sleep(0.4 * idle)  # the FIN well before the deadline, however late this wakes
    t.client.shutdown(socket.SHUT_WR)
    record = t.record()
    assert (record.reason, record.first_closer) == ("idle", "client")  # its FIN came first
    # the idle deadline is 3 s after the byte: 4.2 s would be counting from the EOF
    assert time.monotonic() - last_byte < 1.2 * idle


@pytest.mark.parametrize("first", ["client", "origin"])
def test_half_closed_timeout_counts_from_the_first_eof(make_rig: Any, first: str) -> None:
    rig = make_rig(RelayTimeouts(idle=0, half_closed=0.3, lifetime=0))
    t = rig.open()
    closer, other = (t.client, t.origin) if first == "client" else (t.origin, t.client)
    closer.shutdown(socket.SHUT_WR)
    assert other.recv(1) == b""

    def trickle() -> bool:
        # Activity after the EOF does not extend the half-closed deadline: the proxy closes
        # while the other side is still sending (about 3 s of it would pass the deadline 10
        # times).
        for _ in range(100):
            try:
                other.sendall(b"t")
            except OSError:
                return True
            gevent.sleep(0.03)
        return False

    def closer_reads() -> int:
        try:
            return drain(closer)[0]
        except ConnectionResetError:
            return -1

    cut_off, received = together((trickle,), (closer_reads,))
    assert cut_off, "the tunnel outlived the half-closed timeout while bytes moved"
    record = t.record()
    # The side whose FIN came first, as after a reset: the reason says the proxy ended it.
    assert (record.reason, record.first_closer, record.errno) == ("half_closed_timeout", first, 0)
    assert record.duration_s >= 0.25
    towards_closer = record.bytes_down if first == "client" else record.bytes_up
    assert received in (towards_closer, -1)


def test_lifetime_ends_a_busy_tunnel(make_rig: Any) -> None:
    # Idle is on, as it would be, but well past the lifetime: a stall of the ping-pong on
    # a busy host must not end the tunnel as idle first.
    rig = make_rig(RelayTimeouts(idle=2.0, half_closed=0, lifetime=0.5))
    t = rig.open()

    def ping_pong() -> None:
        for _ in range(500):
            try:
                t.client.sendall(b"p")
                if t.origin.recv(1) != b"p":
                    return
                t.origin.sendall(b"q")
                if t.client.recv(1) != b"q":
                    return
            except OSError:
                return
            gevent.sleep(0.03)

    together((ping_pong,))
    record = t.record()
    assert (record.reason, record.first_closer, record.errno) == ("lifetime", "proxy", 0)
    assert record.duration_s >= 0.45


@pytest.mark.parametrize("cut", ["lifetime", "shutdown", "origin reset"])
def test_an_abortive_end_counts_only_what_the_reader_could_read(make_rig: Any, cut: str) -> None:
    """A tunnel cut while an origin pushes to a client that reads slowly ends with an abort
    to the client, and that throws away what its socket had not sent yet: bytes_down
    counts what the client could read, exactly. (Linux lets a receiver read everything
    that reached it before the reset; with autotuned buffers MiBs are still queued at the
    cut, unsent for the client's closed window.)"""
    lifetime = 1.0 if cut == "lifetime" else 0
    rig = make_rig(RelayTimeouts(idle=0, half_closed=0, lifetime=lifetime))
    t = rig.open()
    data = memoryview(randbytes(8 * MiB, 50))
    if cut == "shutdown":
        stopper = gevent.spawn(rig.engine.shutdown, time.monotonic() + 1.0)
    elif cut == "origin reset":
        stopper = gevent.spawn_later(1.0, abort, t.origin)

    def push() -> None:
        sent = 0
        while sent < len(data):
            try:
                sent += t.origin.send(data[sent : sent + 256 * 1024])
            except OSError:  # cut off (or, for the reset, closed by the stopper)
                return

    def read_slowly() -> int:
        # Reads 0.6 s apart, the cut at 1 s: nothing moves towards the client when it comes.
        # Once it has come, the rest is read at once, up to the reset.
        got = 0
        for _ in range(int(WAIT / 0.6) + 10_000):
            try:
                chunk = t.client.recv(64 * 1024)
            except ConnectionResetError:  # after everything that reached it
                return got
            if not chunk:
                return got
            got += len(chunk)
            if not t.done.ready():
                gevent.sleep(0.6)
        raise AssertionError("the client never saw the tunnel end")

    _, received = together((push,), (read_slowly,))
    if cut != "lifetime":
        stopper.get(timeout=WAIT)
    record = t.record()
    expected = "reset" if cut == "origin reset" else cut
    assert (record.reason, record.bytes_up) == (expected, 0)
    assert 0 < record.bytes_down < len(data)
    assert record.bytes_down == received


# --- backpressure ----------------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["up", "down"])
def test_a_slow_reader_stalls_its_writer(make_rig: Any, direction: str) -> None:
    rig = make_rig(bufsize=32 * 1024)
    t = rig.open()
    writer, reader = (t.client, t.origin) if direction == "up" else (t.origin, t.client)
    data = randbytes(16 * MiB, 9)
    view = memoryview(data)
    # The reader reads nothing: the writer must come to a halt well before all is sent.
    writer.settimeout(0.5)
    sent = 0
    stalled = False
    while sent < len(data):
        try:
            sent += writer.send(view[sent : sent + 256 * 1024])
        except TimeoutError:
            stalled = True
            break
    assert stalled, "the writer sent everything to a reader that read nothing"
    assert sent < 4 * MiB
    assert rig.engine.stats()[f"bytes_{direction}"] <= sent
    # Once the reader reads, every byte arrives.
    writer.settimeout(WAIT)
    _, received = together((pump, writer, view[sent:]), (drain, reader))
    assert received == (len(data), sha256(data))
    reader.shutdown(socket.SHUT_WR)
    record = t.record()
    assert getattr(record, f"bytes_{direction}") == len(data)


# --- many tunnels ----------------------------------------------------------------------------


def test_many_tunnels_at_once(make_rig: Any) -> None:
    rig = make_rig()
    rng = random.Random(10)
    tunnels = [rig.open() for _ in range(200)]
    payloads = [
        (rng.randbytes(rng.randrange(0, 256 * 1024)), rng.randbytes(rng.randrange(0, 256 * 1024)))
        for _ in tunnels
    ]
    exchange_many(tunnels, payloads)
    assert rig.engine.stats()["active"] == 0


def test_no_fd_leak_whichever_way_tunnels_end(make_rig: Any) -> None:
    # The baseline is taken before the engines exist: whatever they keep while they run
    # (epoll and event fds, pooled pipes) must be gone once they are shut down.
    before = count_fds()
    rig = make_rig(NO_TIMEOUTS)
    idle_rig = make_rig(RelayTimeouts(idle=0.3, half_closed=0, lifetime=0))

    def exchange(t: Tunnel) -> None:
        together((pump, t.client, b"up"), (pump, t.origin, b"down"))
        assert drain(t.client) == (4, sha256(b"down"))
        assert drain(t.origin) == (2, sha256(b"up"))

    def client_aborts(t: Tunnel) -> None:
        abort(t.client)
        with pytest.raises(ConnectionResetError):
            drain(t.origin)

    def origin_aborts(t: Tunnel) -> None:
        abort(t.origin)
        with pytest.raises(ConnectionResetError):
            drain(t.client)

    def idles_out(t: Tunnel) -> None:
        assert drain(t.client) == (0, EMPTY_SHA)
        assert drain(t.origin) == (0, EMPTY_SHA)

    endings: list[tuple[Rig, Callable[[Tunnel], None] | None, str]] = [
        (rig, exchange, "eof"),
        (rig, client_aborts, "reset"),
        (rig, origin_aborts, "reset"),
        (idle_rig, idles_out, "idle"),
        (rig, None, "shutdown"),  # left open until the engine shuts down
    ]
    plan: list[tuple[Callable[[Tunnel], None] | None, str, Tunnel]] = []
    for i in range(200):
        opener, ending, reason = endings[i % len(endings)]
        plan.append((ending, reason, opener.open()))
    together(*[(ending, t) for ending, _, t in plan if ending is not None])
    rig.engine.shutdown(time.monotonic())
    assert Counter(t.record().reason for _, _, t in plan) == Counter(r for _, r, _ in plan)
    for _, _, t in plan:
        t.close()
    idle_rig.engine.shutdown(time.monotonic())
    rig.close()
    idle_rig.close()
    assert count_fds() == before


# --- a bug in a callback (Python engine) ---------------------------------------------------


@pytest.mark.parametrize("engine_kind", ["python"])  # its callbacks run in the hub
def test_a_bug_in_a_callback_ends_its_tunnel_once(
    make_rig: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A callback that raises ends its tunnel (reason error, both peers aborted) with one
    traceback, rather than a watcher that fires and fails for ever; the others go on."""
    from splicegate import pyrelay

    rig = make_rig()
    bystander = rig.open()

    def bug(self: Any) -> None:
        raise RuntimeError("injected bug")

    monkeypatch.setattr(pyrelay._Direction, "_propagate_eof", bug)
    t = rig.open()
    sent = b"before the bug"
    t.client.sendall(sent)
    assert recv_exactly(t.origin, len(sent)) == sent
    with caplog.at_level(logging.ERROR, logger="splicegate"):
        t.client.shutdown(socket.SHUT_WR)  # the EOF reaches the injected bug
        record = t.record()
    assert (record.reason, record.first_closer) == ("error", "proxy")
    t.origin.settimeout(WAIT)
    with pytest.raises(ConnectionResetError):
        drain(t.origin)
    failures = [r for r in caplog.records if r.exc_info]
    assert len(failures) == 1 and failures[0].exc_info[0] is RuntimeError
    monkeypatch.undo()
    exchange(bystander, b"still", b"here")
    assert rig.engine.stats()["active"] == 0


# --- a submit that fails (Python engine) ----------------------------------------------------


class InjectedFailure(BaseException):
    """Raised from inside submit; not an Exception, so it cannot be caught along the way."""


@pytest.mark.parametrize("engine_kind", ["python"])  # its watchers are what is undone
@pytest.mark.parametrize("fails_in", ["the error watch", "the timer"])
def test_a_submit_failing_after_its_watchers_started_leaves_both_fds_as_they_were(
    make_rig: Any, monkeypatch: pytest.MonkeyPatch, fails_in: str
) -> None:
    """Early bytes put the client's socket on the error epoll within submit, and the timer
    is armed last: a failure right after either (every io watcher started by then, or the
    writer and the registration) must be undone whole. The caller closes both fds at once
    (the server does), and a libev watcher left on a closed fd aborts the process. So:
    the fds open, with the flags they came with, nothing read or written, nothing watching
    them, no tunnel counted, and the engine still relays."""
    from splicegate import pyrelay

    rig = make_rig(RelayTimeouts(idle=WAIT, half_closed=0, lifetime=0))  # a timer to arm
    warm = rig.open(early_up=b"early")  # the error epoll exists already
    assert recv_exactly(warm.origin, 5) == b"early"
    exchange(warm, b"warm", b"up")
    client, proxy_client = rig.connect(rig.front)
    proxy_origin, origin = rig.connect(rig.back)
    fds = (proxy_client.detach(), proxy_origin.detach())
    os.set_blocking(fds[0], True)  # one blocking, one not: each must come back as it was
    kept = [(fcntl.fcntl(fd, fcntl.F_GETFL), os.fstat(fd).st_ino) for fd in fds]
    before = rig.engine.stats()

    cls, name = (
        (pyrelay._ErrorWatch, "add") if fails_in == "the error watch" else (pyrelay._Tunnel, "_arm")
    )
    original = getattr(cls, name)

    def then_fail(self: Any, *args: Any) -> None:
        original(self, *args)
        raise InjectedFailure(fails_in)

    monkeypatch.setattr(cls, name, then_fail)
    with pytest.raises(InjectedFailure):
        rig.engine.submit(fds[0], fds[1], b"early", lambda record: None)
    monkeypatch.undo()

    assert [(fcntl.fcntl(fd, fcntl.F_GETFL), os.fstat(fd).st_ino) for fd in fds] == kept
    after = rig.engine.stats()
    assert after["active"] == 0
    assert after["tunnels_total"] == before["tunnels_total"]
    assert not set(fds) & set(rig.engine._errors._watched)  # type: ignore[attr-defined]
    try:
        # Bytes for the caller stay for the caller: with the hub running, no watcher
        # reads them first.
        client.sendall(b"to the client's fd")
        origin.sendall(b"to the origin's fd")
        gevent.sleep(0.1)
        assert read_fd(fds[0], 64) == b"to the client's fd"
        assert read_fd(fds[1], 64) == b"to the origin's fd"
    finally:
        for fd in fds:  # what the server does on a refusal: with a watcher left, a crash
            os.close(fd)
    gevent.sleep(0.1)  # the loop runs past the closed fds
    # Nothing was written to either peer (not the early bytes): each sees only the close.
    assert together((drain, client), (drain, origin)) == [(0, EMPTY_SHA)] * 2
    client.close()
    origin.close()
    again = rig.open(early_up=b"early")
    assert recv_exactly(again.origin, 5) == b"early"
    exchange(again, b"again", b"!")


# --- shutdown and callbacks ------------------------------------------------------------------


def test_shutdown_closes_what_is_left_by_the_deadline(make_rig: Any) -> None:
    rig = make_rig()
    lingering = [rig.open() for _ in range(5)]
    finishing = rig.open()

    def finish() -> None:
        gevent.sleep(0.1)
        together(
            (pump, finishing.client, b"bye"),
            (pump, finishing.origin, b"see you"),
            (drain, finishing.client),
            (drain, finishing.origin),
        )

    worker = gevent.spawn(finish)
    rig.engine.shutdown(time.monotonic() + 0.8)
    # shutdown() returns only once every on_done has run.
    assert all(t.done.ready() for t in [*lingering, finishing])
    worker.get(timeout=WAIT)
    record = finishing.record()
    assert (record.reason, record.bytes_up, record.bytes_down) == ("eof", 3, 7)
    for t in lingering:
        record = t.record()
        assert (record.reason, record.first_closer, record.errno) == ("shutdown", "proxy", 0)
        assert drain(t.client) == (0, EMPTY_SHA)
        assert drain(t.origin) == (0, EMPTY_SHA)
    assert rig.engine.stats()["active"] == 0

    # Refused after shutdown, and the fds stay the caller's.
    client, proxy_client = rig.connect(rig.front)
    proxy_origin, origin = rig.connect(rig.back)
    fds = (proxy_client.detach(), proxy_origin.detach())
    try:
        with pytest.raises(RuntimeError):
            rig.engine.submit(fds[0], fds[1], b"", lambda record: None)
        assert all(fd_is_open(fd) for fd in fds)
    finally:
        for fd in fds:
            os.close(fd)
        client.close()
        origin.close()


def test_shutdown_returns_once_tunnels_finish(make_rig: Any) -> None:
    rig = make_rig()
    tunnels = [rig.open() for _ in range(3)]

    def finish(t: Tunnel) -> None:
        gevent.sleep(0.05)
        t.client.close()
        t.origin.close()

    workers = [gevent.spawn(finish, t) for t in tunnels]
    deadline = time.monotonic() + 30
    rig.engine.shutdown(deadline)
    assert time.monotonic() < deadline  # it did not wait for a deadline nobody needed
    assert all(t.done.ready() for t in tunnels)
    gevent.joinall(workers, timeout=WAIT, raise_error=True)
    assert {t.record().reason for t in tunnels} == {"eof"}
    rig.engine.shutdown(time.monotonic() + 30)  # nothing left: returns at once


def test_a_second_shutdown_cuts_a_drain_short(make_rig: Any) -> None:
    """The operator's second SIGTERM: while one greenlet drains with an hour to go, a
    second call closes what is left at once, and both calls return."""
    rig = make_rig()
    tunnels = [rig.open() for _ in range(3)]
    exchange(tunnels[0], b"", b"")  # one ends on its own first
    started = time.monotonic()
    draining = gevent.spawn(rig.engine.shutdown, started + 3600)
    gevent.sleep(0.2)
    assert not draining.ready()
    assert not any(t.done.ready() for t in tunnels[1:])  # the drain waits for them
    rig.engine.shutdown(time.monotonic())
    draining.get(timeout=WAIT)
    assert time.monotonic() - started < WAIT
    for t in tunnels[1:]:
        record = t.record()
        assert (record.reason, record.first_closer) == ("shutdown", "proxy")
        assert drain(t.client) == (0, EMPTY_SHA)
        assert drain(t.origin) == (0, EMPTY_SHA)
    assert tunnels[0].record().reason == "eof"
    assert rig.engine.stats()["active"] == 0


def test_a_shutdown_killed_while_it_waits_can_be_done_again(make_rig: Any) -> None:
    """A caller's timeout may kill shutdown() in its wait; a later call must still close the
    tunnels and stop the engine, not take the first for still running."""
    rig = make_rig()
    tunnels = [rig.open() for _ in range(2)]
    waiting = gevent.spawn(rig.engine.shutdown, time.monotonic() + 3600)
    gevent.sleep(0.1)
    waiting.kill(timeout=WAIT)
    assert not any(t.done.ready() for t in tunnels)
    rig.engine.shutdown(time.monotonic())
    for t in tunnels:
        assert t.record().reason == "shutdown"
    assert rig.engine.stats()["active"] == 0
    client, proxy_client = rig.connect(rig.front)
    proxy_origin, origin = rig.connect(rig.back)
    try:
        with pytest.raises(RuntimeError):  # stopped for good: it takes no more tunnels
            rig.engine.submit(proxy_client.fileno(), proxy_origin.fileno(), b"", lambda r: None)
    finally:
        for sock in (client, proxy_client, proxy_origin, origin):
            sock.close()


class OnDoneExit(BaseException):
    """Not an Exception, so no engine logs it away: an exit raised from an on_done."""


def test_an_exit_from_one_on_done_does_not_lose_the_others(
    make_rig: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tunnels closed together are reported together; an on_done that raises past
    ``except Exception`` must still let every other one run and the drain end at once,
    and the exit itself go on (to the hub, which runs the callbacks)."""
    hub = gevent.get_hub()
    raised: list[type[BaseException]] = []
    monkeypatch.setattr(hub, "handle_error", lambda context, kind, value, tb: raised.append(kind))
    rig = make_rig(threads=1)  # one relay thread: the three end in one batch
    tunnels = [rig.open(on_done_raises=OnDoneExit) for _ in range(3)]
    gevent.sleep(0.1)  # every tunnel adopted, so one shutdown closes them all together
    started = time.monotonic()
    stopping = gevent.spawn(rig.engine.shutdown, time.monotonic())
    stopping.join(timeout=WAIT)
    assert stopping.ready()
    assert time.monotonic() - started < 5  # not the native engine's 10 s drain timeout
    for t in tunnels:
        assert t.record().reason == "shutdown"
    assert rig.engine.stats()["active"] == 0
    assert raised.count(OnDoneExit) == 1, raised  # the first exit, once the rest were done


def test_an_on_done_exception_is_logged_not_raised(
    make_rig: Any, caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig()
    t = rig.open(on_done_raises=RuntimeError)
    together((pump, t.client, b"a"), (pump, t.origin, b"b"), (drain, t.client))
    assert t.record().reason == "eof"
    gevent.sleep(0)  # the engine logs right after on_done returns
    failures = [r for r in caplog.records if r.name == "splicegate" and r.exc_info]
    assert failures, "the on_done exception was not logged"
    # The engine still works.
    t2 = rig.open()
    _, _, at_origin = together(
        (pump, t2.client, b"again"), (pump, t2.origin, b""), (drain, t2.origin)
    )
    assert at_origin == (5, sha256(b"again"))
    assert t2.record().reason == "eof"
