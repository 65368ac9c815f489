"""Bulk-transfer primitives shared by the load generator (client side) and the origin.

A throughput figure is only worth having if the load generator is not what limits it, so the
two ends do as little per byte as Linux allows: the sender hands a file to ``sendfile(2)``
(no user-space copy, no Python per chunk beyond one call per few MiB), and the receiver
discards with ``recv(MSG_TRUNC)``, which on a TCP socket drops the bytes in the kernel
without copying them into the buffer. What is left to measure is the path between the two:
loopback alone (direct) or loopback through the proxy.

One transfer, whichever way it goes:

1. the client opens a connection (directly or through a CONNECT tunnel) and sends a
   fixed-size header naming the origin's role (``sink``: it receives; ``source``: it sends);
2. the sender streams until the receiver says stop; the receiver counts bytes in a
   time-bounded window that starts after a short warm-up;
3. the receiver sends one line (the window it measured, as JSON) and keeps discarding; the
   sender sees it, half-closes, reads the line to EOF and closes; the receiver, on EOF,
   closes too.

Every byte sent is therefore delivered and both ends close cleanly (no reset, which the proxy
would propagate and might log), and the receiver alone decides how long the window is.
"""

from __future__ import annotations

import json
import os
import select
import socket
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from typing import BinaryIO

#: Role of the origin on a stream connection, named in the header.
SINK = "sink"
SOURCE = "source"
HEADER_SIZE = 64
#: Largest single discard; the kernel returns whatever is queued, up to this.
RECV_SIZE = 4 * 1024 * 1024
#: Default size of the file ``sendfile`` repeats; large enough that one call per file costs
#: nothing, small enough to stay in the page cache.
DEFAULT_FILE_SIZE = 32 * 1024 * 1024
#: The receiver's result line is small; anything longer is a protocol error.
MAX_MESSAGE = 4096

_files: dict[int, BinaryIO] = {}
_files_lock = threading.Lock()  # several streams of one process may ask at once


@dataclass(frozen=True, slots=True)
class Window:
    """What a receiver counted: ``bytes`` in ``seconds`` of steady state."""

    bytes: int
    seconds: float

    @property
    def gbit_s(self) -> float:
        return self.bytes * 8 / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def to_line(self) -> bytes:
        return json.dumps(asdict(self)).encode() + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> Window:
        data = json.loads(line)
        return cls(bytes=int(data["bytes"]), seconds=float(data["seconds"]))


def payload_file(size: int = DEFAULT_FILE_SIZE) -> BinaryIO:
    """An unlinked temp file of ``size`` random bytes, made once per process and size.

    Random rather than zeros so that no layer could ever shortcut the payload; written once
    up front so that every ``sendfile`` reads from the page cache, not the disk. Shared by
    every stream of the process: ``sendfile`` is always given an explicit offset.
    """
    with _files_lock:
        f = _files.get(size)
        if f is None:
            # Kept open for the life of the process: it is the cache.
            f = tempfile.TemporaryFile(prefix="splicegate-bench-")  # noqa: SIM115
            piece = os.urandom(1024 * 1024)
            written = 0
            while written < size:
                written += f.write(piece[: size - written])
            f.flush()
            _files[size] = f
        return f


def make_header(role: str, seconds: float, warmup: float, file_size: int) -> bytes:
    """The fixed-size header: fixed so the origin can read exactly it and never a data byte."""
    text = f"{role} {seconds:.6f} {warmup:.6f} {file_size}"
    if len(text) > HEADER_SIZE:
        raise ValueError("header too long")
    return text.ljust(HEADER_SIZE).encode()


def parse_header(raw: bytes) -> tuple[str, float, float, int]:
    role, seconds, warmup, file_size = raw.decode().split()
    if role not in (SINK, SOURCE):
        raise ValueError(f"unknown role {role!r}")
    return role, float(seconds), float(warmup), int(file_size)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """Read exactly ``n`` bytes, never more: what follows belongs to the next protocol step."""
    chunks = []
    got = 0
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            raise ConnectionError(f"EOF after {got} of {n} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def send_until_stopped(sock: socket.socket, f: BinaryIO, max_seconds: float) -> int:
    """Repeat ``f`` with ``socket.sendfile`` until the peer sends something; returns bytes sent.

    The stop check (a zero-timeout poll) runs once per file, i.e. every few milliseconds at
    tens of Gbit/s: cheap, and late by at most one file, which the receiver discards anyway.
    ``max_seconds`` bounds the loop should the receiver never answer. Ends with a half-close.
    """
    size = os.fstat(f.fileno()).st_size
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    deadline = time.monotonic() + max_seconds
    sent = 0
    while not poller.poll(0):
        if time.monotonic() >= deadline:
            raise TimeoutError(f"receiver did not stop the transfer within {max_seconds:g} s")
        sent += sock.sendfile(f, 0, size)
    sock.shutdown(socket.SHUT_WR)
    return sent


def receive_window(sock: socket.socket, seconds: float, warmup: float) -> tuple[Window, int]:
    """Discard incoming bytes; count those that arrive in ``seconds`` after ``warmup``.

    The window opens at the first read that returns after the warm-up (bytes of that read
    arrived before it, so they are not counted) and closes at the first read returning after
    ``seconds``; its length is measured, not assumed. Returns the window and every byte
    received so far.
    """
    buf = bytearray(RECV_SIZE)
    n = sock.recv_into(buf, RECV_SIZE, socket.MSG_TRUNC)  # blocks until the first byte
    if not n:
        raise ConnectionError("EOF before any data")
    now = time.monotonic()
    warmed, start = _discard_until(sock, buf, now + warmup, now, "during warm-up")
    counted, now = _discard_until(
        sock, buf, start + seconds, start, "during the measurement window"
    )
    return Window(counted, now - start), n + warmed + counted


def _discard_until(
    sock: socket.socket, buf: bytearray, deadline: float, now: float, stage: str
) -> tuple[int, float]:
    """Discard incoming bytes until the first read returning at or after ``deadline``
    (``time.monotonic()``; ``now`` is the time of the last read). Returns the bytes discarded
    and the time that read returned; EOF is an error, named with ``stage``."""
    recv_into = sock.recv_into
    trunc = socket.MSG_TRUNC
    got = 0
    while now < deadline:
        n = recv_into(buf, RECV_SIZE, trunc)
        if not n:
            raise ConnectionError(f"EOF {stage}")
        got += n
        now = time.monotonic()
    return got, now


def finish_receiver(sock: socket.socket, message: bytes) -> int:
    """Tell the sender to stop, then discard until its EOF; returns the bytes discarded."""
    sock.sendall(message)
    buf = bytearray(RECV_SIZE)
    drained = 0
    while n := sock.recv_into(buf, RECV_SIZE, socket.MSG_TRUNC):
        drained += n
    return drained


def finish_sender(sock: socket.socket) -> bytes:
    """Read the receiver's message to EOF (the sender has half-closed already)."""
    data = b""
    while chunk := sock.recv(MAX_MESSAGE):
        data += chunk
        if len(data) > MAX_MESSAGE:
            raise ConnectionError("receiver message too long")
    return data
