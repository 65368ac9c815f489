"""Test helpers: the proxy as a real process, loopback origins in threads, a raw client.

The proxy runs as ``python -m splicegate`` so that tests see exactly what a user sees
(stderr lines, exit codes, its own file descriptors); clients and origins use plain blocking
sockets with timeouts, on loopback only.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import resource
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import pytest

WAIT = 15.0  # the longest any helper waits for anything


class ProxyProcess:
    """``splicegate`` started with the given flags; stopped by its pid only."""

    def __init__(self, *flags: str, listen: Sequence[str] = ("127.0.0.1:0",),
                 prefix: Sequence[str] = (), cwd: str | None = None,
                 safe_path: bool = True) -> None:  # fmt: skip
        # -P keeps the working directory off sys.path, as the console script does.
        cmd = [*prefix, sys.executable, *(["-P"] if safe_path else []), "-m", "splicegate"]
        for address in listen:
            cmd += ["--listen", address]
        cmd += flags
        self._log = tempfile.NamedTemporaryFile(prefix="splicegate-", suffix=".log")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._log, cwd=cwd
        )
        self.addresses: list[tuple[str, int]] = []
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            found = re.findall(r"listening on \[?([^\s\]]+?)\]?:(\d+)\n", self.log())
            if len(found) >= len(listen):  # more: --workers, each worker saying it
                self.addresses = [(host, int(port)) for host, port in found[: len(listen)]]
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        log = self.log()  # before stop(), which removes the file
        self.stop()
        raise RuntimeError(f"splicegate did not start: {log}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def address(self) -> tuple[str, int]:
        return self.addresses[0]

    def log(self) -> str:
        with open(self._log.name, encoding="utf-8", errors="replace") as f:
            return f.read()

    def wait_for_log(self, pattern: str, timeout: float = WAIT) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.log())
            if match:
                return match
            time.sleep(0.02)
        raise AssertionError(f"{pattern!r} not logged in {timeout} s:\n{self.log()}")

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(WAIT)
        self._log.close()
        return self.proc.returncode


@dataclass
class Origin:
    """A loopback TCP server whose per-connection behaviour is a function, in threads."""

    behaviour: Callable[[socket.socket], None]
    host: str = "127.0.0.1"
    tls: object | None = None  # an ssl.SSLContext to wrap accepted sockets with
    errors: list[BaseException] = field(default_factory=list)
    connections: int = 0

    def __post_init__(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind((self.host, 0))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._closing = False
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self._closing:
                conn.close()
                return
            self.connections += 1
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(WAIT)
        try:
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)  # type: ignore[attr-defined]
            self.behaviour(conn)
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            conn.close()

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._acceptor.join(WAIT)
        for thread in self._threads:
            thread.join(WAIT)


def echo(conn: socket.socket) -> None:
    """Echo until EOF, then finish sending and close: proves half-close reached the origin."""
    while data := conn.recv(65536):
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


@contextlib.contextmanager
def origin(behaviour: Callable[[socket.socket], None] = echo, **kw: object) -> Iterator[Origin]:
    server = Origin(behaviour, **kw)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.close()


@dataclass
class Reply:
    status: int
    reason: str
    fields: dict[str, str]
    body: bytes
    raw_head: bytes


def read_reply(sock: socket.socket) -> Reply:
    """One response head (and its body when it has a Content-Length), nothing more."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(1)  # byte by byte: never read past the head into tunnel bytes
        if not chunk:
            raise ConnectionError(f"closed before a full response head: {buf!r}")
        buf += chunk
    head = buf[:-4].decode("latin-1")
    status_line, *lines = head.split("\r\n")
    version, status, reason = status_line.split(" ", 2)
    assert version == "HTTP/1.1", status_line
    fields = {}
    for line in lines:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    body = b""
    if "content-length" in fields:
        body = recv_exactly(sock, int(fields["content-length"]))
    return Reply(int(status), reason, fields, body, buf)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(min(65536, size - len(buf)))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {size} bytes")
        buf += chunk
    return bytes(buf)


def recv_until_eof(sock: socket.socket, limit: int = 1 << 30) -> bytes:
    buf = bytearray()
    while len(buf) <= limit:
        chunk = sock.recv(65536)
        if not chunk:
            return bytes(buf)
        buf += chunk
    raise AssertionError("more data than expected")


def connect_head(target: str, version: str = "1.1", host: str | None = None,
                 extra: str = "") -> bytes:  # fmt: skip
    host_line = "" if host == "" else f"Host: {host or target}\r\n"
    return f"CONNECT {target} HTTP/{version}\r\n{host_line}{extra}\r\n".encode()


def open_tunnel(proxy: tuple[str, int], target: str, early: bytes = b"",
                **head: str) -> tuple[socket.socket, Reply]:  # fmt: skip
    """Send a CONNECT (with early bytes in the same write) and read the answer."""
    sock = socket.create_connection(proxy, timeout=WAIT)
    sock.sendall(connect_head(target, **head) + early)
    return sock, read_reply(sock)


def request(proxy: tuple[str, int], raw: bytes) -> Reply:
    """Send raw bytes as a request and read the answer; the proxy must close afterwards."""
    with socket.create_connection(proxy, timeout=WAIT) as sock:
        sock.sendall(raw)
        reply = read_reply(sock)
        assert sock.recv(1) == b"", "the proxy kept the connection open after a refusal"
        return reply


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def full_accept_queue(host: str = "127.0.0.1", port: int = 0) -> Iterator[int]:
    """A black hole on loopback: a listener with backlog 0 that never accepts, its queue
    filled first by non-blocking connects, so the kernel drops further SYNs and a connect
    hangs until the dialer's deadline. Yields the port. An IPv6 one is IPV6_V6ONLY, so it
    can share a port number with an IPv4 listener (bind that one first, on port 0)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    fillers: list[socket.socket] = []
    with socket.socket(family, socket.SOCK_STREAM) as srv:
        if family == socket.AF_INET6:
            srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # A port given may still have connections in TIME_WAIT from earlier tests.
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((host, port))
        srv.listen(0)
        address = srv.getsockname()
        try:
            for _ in range(16):  # bounded: the queue holds one or two on Linux
                filler = socket.socket(family, socket.SOCK_STREAM)
                fillers.append(filler)
                filler.setblocking(False)
                filler.connect_ex(address)
                _, writable, _ = select.select([], [filler], [], 0.3)
                if not writable:
                    break  # this connect hangs: the queue is full
            else:
                raise RuntimeError(f"could not fill the accept queue of {address}")
            yield address[1]
        finally:
            for filler in fillers:
                filler.close()


def run_code(
    code: str, *args: str, timeout: float = WAIT, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -c code args`` by this interpreter in a fresh process, with tests/
    importable and its output captured: for children that must start fresh."""
    tests = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": path},
    )


def free_port() -> int:
    """A port free on 127.0.0.1 now, for what cannot listen on port 0 (--workers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ipv6_loopback() -> bool:
    """Whether ::1 can be bound here (some containers have no IPv6 at all)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@contextlib.contextmanager
def descriptors_above_1023() -> Iterator[None]:
    """Hold 1,100 fds, so that every socket opened inside gets a number above 1023."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"the open-file hard limit is {hard}")
    with _descriptors_held(max(soft, 2048), 1100):
        yield


@contextlib.contextmanager
def no_descriptors_left() -> Iterator[None]:
    """Every descriptor number below the soft limit in use, so the next socket() inside
    fails with EMFILE; the limit lowered to just above what is open, and put back after."""
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    with _descriptors_held(highest + 16, None):
        yield


@contextlib.contextmanager
def _descriptors_held(soft_limit: int, count: int | None) -> Iterator[None]:
    """``count`` fds held under this soft open-file limit, or as many as it lets open
    (None); the fds and the limit are given back after, also when filling fails halfway,
    so a test that fails here does not starve the ones after it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft_limit, hard))
    filler: list[int] = []
    try:
        # bounded: ``count``, or the numbers left under the limit
        while count is None or len(filler) < count:
            try:
                filler.append(os.dup(0))
            except OSError:
                if count is not None:
                    raise
                break
        yield
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def http_responder(body: bytes, content_type: str) -> Callable[[socket.socket], None]:
    """An origin behaviour: read one request head, answer ``body`` with a 200, close."""

    def serve(conn: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(4096)
            if not chunk:
                return
            head += chunk
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (content_type.encode(), len(body), body)
        )

    return serve


def exchange(sock: socket.socket, payload: bytes, timeout: float = WAIT) -> bytes:
    """Send ``payload`` and half-close from a thread while reading until EOF: both
    directions move at once, so neither side's buffers can fill and stall the other."""

    def send() -> None:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send)
    sender.start()
    received = recv_until_eof(sock)
    sender.join(timeout)
    return received
