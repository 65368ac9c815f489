"""The client side of the benchmarks: CONNECT-rate loops, stream transfers, idle tunnels.

Every function takes ``proxy``, the proxy's address, or ``None`` for the direct path (straight
to the origin), so that each figure is measured the same way both ways and only the path
differs. The functions run in the calling process; ``RateRun``, ``run_stream``,
``run_multi_stream`` and ``IdleRun`` run them in fresh processes instead (``python
bench/loadgen.py rate|stream|streams|idle ...``, JSON lines on stdout), which is how the
benchmarks use them: the load generator then competes with the proxy for the CPU only as a
separate process would, and its own CPU time is reported.

* ``rate``: CONNECT-rate loops (connect, CONNECT, 200, 16-byte echo, close).
* ``stream``: one bulk transfer, up (client -> origin) or down.
* ``streams``: N such transfers side by side in one process, one thread each, summed.
* ``idle``: N tunnels opened (CONNECT, 200, one 16-byte echo) and then held without traffic
  until released on stdin, for the proxy's memory per idle tunnel. One process with gevent
  holds them all; it raises its own open-file limit to fit.

Only loopback addresses are accepted (``require_loopback``): these loops open thousands of
connections a second and must never be pointed at anything else.

Meant to be imported by other benchmarks (e.g. through a peer proxy): ``connect_rate``,
``stream_transfer``, ``multi_stream_transfer``, ``RateRun``, ``run_stream``,
``run_multi_stream``, ``IdleRun``, ``warm_up``, ``open_tunnel``.
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import json
import math
import os
import resource
import select
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gevent
from gevent import socket as gsocket
from procs import raise_open_file_limit
from streams import (
    DEFAULT_FILE_SIZE,
    SINK,
    SOURCE,
    Window,
    finish_receiver,
    finish_sender,
    make_header,
    payload_file,
    receive_window,
    recv_exactly,
    send_until_stopped,
)

Address = tuple[str, int]

ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
assert len(ESTABLISHED) == 39
#: Another proxy's 200 differs (HTTP/1.0, extra fields): a benchmark of a peer proxy sets the
#: exact bytes, hex, in this variable for the load-generator processes it starts (and sets
#: ESTABLISHED for calls in its own process); every tunnel then reads exactly them.
ESTABLISHED_ENV = "SPLICEGATE_BENCH_ESTABLISHED"
ESTABLISHED = bytes.fromhex(os.environ.get(ESTABLISHED_ENV, "")) or ESTABLISHED
#: What each rate loop sends through the tunnel and expects back.
PAYLOAD = b"splicegate-bench"
assert len(PAYLOAD) == 16
#: A rate loop that fails this many times in a row gives up instead of spinning.
MAX_CONSECUTIVE_ERRORS = 100
#: Slack over the announced window before a stream sender gives up on its receiver.
STOP_SLACK = 30.0
#: How long before the window a rate process is started (interpreter and gevent start-up).
RATE_LEAD_S = 1.5

LOADGEN = Path(__file__).resolve()


class ProtocolError(Exception):
    """The peer answered something other than what the benchmark protocol expects."""


def require_loopback(address: Address) -> Address:
    host, port = address
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"{host} is not a loopback address; the benchmarks run on loopback only")
    return host, port


def parse_address(text: str) -> Address:
    host, _, port = text.rpartition(":")
    return require_loopback((host.strip("[]"), int(port)))


def format_address(address: Address | None) -> str:
    return "none" if address is None else f"{address[0]}:{address[1]}"


def connect_request(target: Address, proxy_user: str | None = None) -> bytes:
    """The CONNECT head; with ``proxy_user`` ("user:password") it carries Basic
    Proxy-Authorization, to measure the rate with authentication on."""
    authority = f"{target[0]}:{target[1]}"
    credentials = ""
    if proxy_user is not None:
        token = base64.b64encode(proxy_user.encode()).decode()
        credentials = f"Proxy-Authorization: Basic {token}\r\n"
    return f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{credentials}\r\n".encode()


def open_tunnel(proxy: Address | None, target: Address, timeout: float) -> socket.socket:
    """A blocking socket connected to ``target``, through ``proxy`` when one is given.

    Reads exactly the 39-byte 200 and no further, so the next byte read is the origin's.
    """
    sock = socket.create_connection(require_loopback(proxy or target), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if proxy is not None:
            sock.sendall(connect_request(require_loopback(target)))
            head = recv_exactly(sock, len(ESTABLISHED))
            if head != ESTABLISHED:
                raise ProtocolError(f"proxy answered {head!r}")
    except BaseException:
        sock.close()
        raise
    return sock


# --- CONNECT rate ---------------------------------------------------------------------------


@dataclass(slots=True)
class RateResult:
    """Loops completed inside the window, and what they cost.

    ``latencies_ms`` holds, per completed loop, the time from connect start to the first
    answer: through a proxy the last byte of its 200, on the direct path the echo (the same
    shape: a connection and a small request answered by a server sharing the cores, so the
    direct figure is the yardstick for a proxy's time-to-200 under the same load).
    """

    completed: int = 0
    errors: int = 0
    duration: float = 0.0
    cpu_s: float = 0.0  # user + system CPU of the load generator process(es)
    late_s: float = 0.0  # how late the (latest) process started its loops
    first_error: str | None = None
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def per_second(self) -> float:
        return self.completed / self.duration if self.duration > 0 else 0.0

    def percentile_ms(self, q: float) -> float | None:
        """Nearest-rank percentile (q in 0..100) of the time-to-200, or None without one."""
        if not self.latencies_ms:
            return None
        ordered = sorted(self.latencies_ms)
        rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
        return ordered[rank]

    @classmethod
    def merge(cls, parts: list[RateResult]) -> RateResult:
        """Processes ran the same window side by side: counts and CPU add up."""
        return cls(
            completed=sum(p.completed for p in parts),
            errors=sum(p.errors for p in parts),
            duration=statistics.median(p.duration for p in parts) if parts else 0.0,
            cpu_s=sum(p.cpu_s for p in parts),
            late_s=max((p.late_s for p in parts), default=0.0),
            first_error=next((p.first_error for p in parts if p.first_error), None),
            latencies_ms=[x for p in parts for x in p.latencies_ms],
        )


def cpu_seconds_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def connect_rate(
    proxy: Address | None,
    target: Address,
    concurrency: int = 50,
    duration: float = 10.0,
    start_at: float | None = None,
    timeout: float = 5.0,
    proxy_user: str | None = None,
) -> RateResult:
    """Run ``concurrency`` greenlet loops of one short connection each for ``duration`` s.

    One loop: connect, (through a proxy: CONNECT, read exactly the 39-byte 200), send 16
    bytes, read their echo, close. A loop counts if it finished inside the window; loops
    still running at its end are let finish (bounded by ``timeout`` per step) but not
    counted. ``start_at`` (a ``time.time()`` value) lets several processes share one window.
    """
    target = require_loopback(target)
    dial = require_loopback(proxy or target)
    request = connect_request(target, proxy_user)
    result = RateResult(duration=duration)
    if start_at is not None:
        result.late_s = max(0.0, time.time() - start_at)
        gevent.sleep(max(0.0, start_at - time.time()))
    cpu_before = cpu_seconds_self()
    start = time.perf_counter()
    end = start + duration

    def loop() -> None:
        consecutive_errors = 0
        while True:
            began = time.perf_counter()
            if began >= end:
                return
            sock = gsocket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.connect(dial)
                if proxy is not None:
                    sock.sendall(request)
                    head = recv_exactly(sock, len(ESTABLISHED))  # type: ignore[arg-type]
                    if head != ESTABLISHED:
                        raise ProtocolError(f"proxy answered {head!r}")
                    established = time.perf_counter()
                sock.sendall(PAYLOAD)
                if recv_exactly(sock, len(PAYLOAD)) != PAYLOAD:  # type: ignore[arg-type]
                    raise ProtocolError("echo differs from what was sent")
                finished = time.perf_counter()
                if proxy is None:
                    established = finished
            except (OSError, ProtocolError) as exc:
                result.errors += 1
                if result.first_error is None:
                    result.first_error = f"{type(exc).__name__}: {exc}"
                consecutive_errors += 1
                if consecutive_errors >= MAX_CONSECUTIVE_ERRORS:
                    return
                gevent.sleep(0.01)  # do not spin on a refusing peer
                continue
            finally:
                sock.close()
            consecutive_errors = 0
            if finished <= end:
                result.completed += 1
                result.latencies_ms.append((established - began) * 1000)

    greenlets = [gevent.spawn(loop) for _ in range(concurrency)]
    gevent.joinall(greenlets, timeout=duration + 4 * timeout + 5)
    gevent.killall(greenlets, timeout=5)
    result.cpu_s = cpu_seconds_self() - cpu_before
    return result


class RateRun:
    """``connect_rate`` in ``procs`` fresh processes sharing one window, started at once.

    The concurrency is split between the processes (50 over 2: 25 each). ``start_at`` and
    ``end_at`` (``time.time()`` values) tell the caller when the window runs, so it can
    sample other processes' CPU exactly over it. ``collect()`` waits and merges.
    """

    def __init__(
        self,
        proxy: Address | None,
        target: Address,
        concurrency: int = 50,
        duration: float = 10.0,
        procs: int = 1,
        timeout: float = 5.0,
    ) -> None:
        self.timeout = timeout
        self.start_at = time.time() + RATE_LEAD_S
        self.end_at = self.start_at + duration
        procs = max(1, min(procs, concurrency))
        shares = [concurrency // procs + (i < concurrency % procs) for i in range(procs)]
        self.procs: list[subprocess.Popen[bytes]] = []
        try:
            for share in shares:
                cmd = [
                    sys.executable,
                    str(LOADGEN),
                    "rate",
                    "--proxy",
                    format_address(proxy),
                    "--target",
                    format_address(target),
                    "--concurrency",
                    str(share),
                    "--duration",
                    repr(duration),
                    "--start-at",
                    repr(self.start_at),
                    "--timeout",
                    repr(timeout),
                ]
                self.procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE))
        except BaseException:
            self.kill()
            raise

    def collect(self) -> RateResult:
        deadline = self.end_at + 4 * self.timeout + 30
        parts = []
        try:
            for proc in self.procs:
                out, _ = proc.communicate(timeout=max(1.0, deadline - time.time()))
                if proc.returncode != 0:
                    raise RuntimeError(f"rate load generator exited with {proc.returncode}")
                parts.append(RateResult(**json.loads(out)))
        finally:
            self.kill()
        return RateResult.merge(parts)

    def kill(self) -> None:
        """Stop the processes this run started, if any are still running."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


# --- stream throughput: one stream, or several side by side ------------------------------------


@dataclass(frozen=True, slots=True)
class StreamResult:
    """One transfer: the receiver's window, and every byte that crossed (for CPU per byte)."""

    direction: str  # "up" (client -> origin) or "down" (origin -> client)
    bytes: int
    seconds: float
    total_bytes: int
    cpu_s: float = 0.0  # load generator process

    @property
    def gbit_s(self) -> float:
        return Window(self.bytes, self.seconds).gbit_s


def _transfer(
    sock: socket.socket,
    direction: str,
    seconds: float,
    warmup: float,
    file_size: int,
) -> tuple[Window, int]:
    """One transfer over an open connection: the receiver's window and every byte that crossed."""
    if direction == "up":
        sock.sendall(make_header(SINK, seconds, warmup, 0))
        sent = send_until_stopped(sock, payload_file(file_size), warmup + seconds + STOP_SLACK)
        return Window.from_line(finish_sender(sock)), sent
    if direction == "down":
        sock.sendall(make_header(SOURCE, seconds, warmup, file_size))
        window, received = receive_window(sock, seconds, warmup)
        return window, received + finish_receiver(sock, b"stop\n")
    raise ValueError(f"direction must be up or down, not {direction!r}")


def stream_transfer(
    direction: str,
    proxy: Address | None,
    target: Address,
    seconds: float = 3.0,
    warmup: float = 0.5,
    file_size: int = DEFAULT_FILE_SIZE,
    timeout: float = 60.0,
) -> StreamResult:
    """One single-stream transfer to/from the origin's ``stream`` listener.

    ``up``: this process sends with ``sendfile`` and the origin counts. ``down``: the origin
    sends and this process counts with ``recv(MSG_TRUNC)``. Either way the receiver's window
    is the figure; ``total_bytes`` includes warm-up and the tail after the window.
    """
    if direction not in ("up", "down"):
        raise ValueError(f"direction must be up or down, not {direction!r}")
    cpu_before = cpu_seconds_self()
    if direction == "up":
        payload_file(file_size)  # before connecting: not inside anyone's window
    with open_tunnel(proxy, target, timeout) as sock:
        window, total = _transfer(sock, direction, seconds, warmup, file_size)
    return StreamResult(
        direction, window.bytes, window.seconds, total, cpu_seconds_self() - cpu_before
    )


@dataclass(slots=True)
class MultiStreamResult:
    """Concurrent transfers the same way: each stream's window, summed as rates.

    ``windows`` holds ``[bytes, seconds]`` per stream as its receiver measured it. The windows
    open within milliseconds of each other (the streams start together, after every tunnel is
    up), so the aggregate is the sum of the per-stream rates.
    """

    direction: str
    windows: list[list[float]]
    total_bytes: int  # every byte of every stream, warm-up and tail included
    cpu_s: float = 0.0  # load generator process, all its threads

    def stream_gbit_s(self) -> list[float]:
        return [Window(int(b), s).gbit_s for b, s in self.windows]

    @property
    def gbit_s(self) -> float:
        return sum(self.stream_gbit_s())


def multi_stream_transfer(
    direction: str,
    proxy: Address | None,
    target: Address,
    streams: int = 8,
    seconds: float = 3.0,
    warmup: float = 0.5,
    file_size: int = DEFAULT_FILE_SIZE,
    timeout: float = 60.0,
) -> MultiStreamResult:
    """``streams`` single-stream transfers side by side, one OS thread each, in this process.

    Every tunnel is opened first; the transfers start together once all are up (a barrier),
    so their windows coincide. Threads, not greenlets: the work is inside ``sendfile`` and
    ``recv(MSG_TRUNC)`` with the GIL released. One failed stream fails the whole measurement.
    """
    if direction not in ("up", "down"):
        raise ValueError(f"direction must be up or down, not {direction!r}")
    if streams < 1:
        raise ValueError("streams must be at least 1")
    cpu_before = cpu_seconds_self()
    if direction == "up":
        payload_file(file_size)  # shared by the senders; sendfile takes explicit offsets
    barrier = threading.Barrier(streams, timeout=timeout)
    results: list[tuple[Window, int] | None] = [None] * streams
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            with open_tunnel(proxy, target, timeout) as sock:
                barrier.wait()
                results[i] = _transfer(sock, direction, seconds, warmup, file_size)
        except BaseException as exc:  # reported below, in the calling thread
            barrier.abort()  # the others must not wait for a stream that will never start
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(streams)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout + warmup + seconds + STOP_SLACK + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    if any(thread.is_alive() for thread in threads):
        raise TimeoutError(f"{streams} streams did not finish by their deadline")
    if errors:
        # A broken barrier is only the echo of another stream's failure: report the cause.
        cause = next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), None)
        exc = cause or errors[0]
        raise RuntimeError(f"{len(errors)} of {streams} streams failed, first: {exc!r}") from exc
    done = [r for r in results if r is not None]
    return MultiStreamResult(
        direction,
        [[w.bytes, w.seconds] for w, _ in done],
        sum(total for _, total in done),
        cpu_seconds_self() - cpu_before,
    )


def _run_transfer(
    command: str,
    direction: str,
    proxy: Address | None,
    target: Address,
    seconds: float,
    warmup: float,
    file_size: int,
    timeout: float,
    extra: list[str],
) -> dict:
    """One transfer command of this module in a fresh process; waits for it (bounded)."""
    cmd = [
        sys.executable,
        str(LOADGEN),
        command,
        "--direction",
        direction,
        "--proxy",
        format_address(proxy),
        "--target",
        format_address(target),
        "--seconds",
        repr(seconds),
        "--warmup",
        repr(warmup),
        "--file-size",
        str(file_size),
        "--timeout",
        repr(timeout),
        *extra,
    ]
    done = subprocess.run(
        cmd, stdout=subprocess.PIPE, timeout=warmup + seconds + STOP_SLACK + 3 * timeout
    )
    if done.returncode != 0:
        raise RuntimeError(f"{command} load generator exited with {done.returncode}")
    return json.loads(done.stdout)


def run_stream(
    direction: str,
    proxy: Address | None,
    target: Address,
    seconds: float = 3.0,
    warmup: float = 0.5,
    file_size: int = DEFAULT_FILE_SIZE,
    timeout: float = 60.0,
) -> StreamResult:
    """``stream_transfer`` in a fresh process."""
    return StreamResult(
        **_run_transfer("stream", direction, proxy, target, seconds, warmup, file_size,
                        timeout, [])
    )  # fmt: skip


def run_multi_stream(
    direction: str,
    proxy: Address | None,
    target: Address,
    streams: int = 8,
    seconds: float = 3.0,
    warmup: float = 0.5,
    file_size: int = DEFAULT_FILE_SIZE,
    timeout: float = 60.0,
) -> MultiStreamResult:
    """``multi_stream_transfer`` in a fresh process."""
    return MultiStreamResult(
        **_run_transfer("streams", direction, proxy, target, seconds, warmup, file_size,
                        timeout, ["--streams", str(streams)])
    )  # fmt: skip


# --- idle tunnels ---------------------------------------------------------------------------


def warm_up(proxy: Address | None, target: Address, seconds: float, timeout: float = 5.0) -> int:
    """Tunnels one at a time for ``seconds``: open, 16-byte echo, close. Returns how many.

    Run against a freshly started proxy before its memory is read at rest, so that one-time
    costs (lazy imports, an engine's threads, first allocations) are paid by then; with one
    tunnel open at a time, no pool or free list grows beyond what one tunnel needs.
    """
    end = time.monotonic() + seconds
    done = 0
    while time.monotonic() < end:
        with open_tunnel(proxy, target, timeout) as sock:
            sock.sendall(PAYLOAD)
            if recv_exactly(sock, len(PAYLOAD)) != PAYLOAD:
                raise ProtocolError("echo differs from what was sent")
        done += 1
    return done


@dataclass(slots=True)
class IdleOpened:
    """The opening phase of an idle hold: what is held now, and what it took."""

    opened: int = 0
    errors: int = 0
    seconds: float = 0.0
    cpu_s: float = 0.0
    first_error: str | None = None


@dataclass(slots=True)
class IdleClosed:
    """The end of a hold: tunnels found closed by the other side while held, then closed."""

    dropped: int = 0
    closed: int = 0
    held_s: float = 0.0


def open_idle_tunnels(
    proxy: Address | None,
    target: Address,
    count: int,
    concurrency: int = 50,
    timeout: float = 5.0,
    open_timeout: float = 60.0,
) -> tuple[list[socket.socket], IdleOpened]:
    """Open ``count`` tunnels with ``concurrency`` greenlets; each does CONNECT, reads the 200,
    one 16-byte echo, and is then kept open without traffic. Raises the fd limit to fit.

    The whole phase is bounded by ``open_timeout``; tunnels that failed or were not opened by
    then are counted as errors, and the caller holds what did open.
    """
    raise_open_file_limit(count + 64)
    target = require_loopback(target)
    dial = require_loopback(proxy or target)
    request = connect_request(target)
    held: list[socket.socket] = []
    result = IdleOpened()
    todo = iter(range(count))
    cpu_before = cpu_seconds_self()
    start = time.monotonic()

    def opener() -> None:
        consecutive_errors = 0
        for _ in todo:
            sock = gsocket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.connect(dial)
                if proxy is not None:
                    sock.sendall(request)
                    head = recv_exactly(sock, len(ESTABLISHED))  # type: ignore[arg-type]
                    if head != ESTABLISHED:
                        raise ProtocolError(f"proxy answered {head!r}")
                sock.sendall(PAYLOAD)
                if recv_exactly(sock, len(PAYLOAD)) != PAYLOAD:  # type: ignore[arg-type]
                    raise ProtocolError("echo differs from what was sent")
            except (OSError, ProtocolError) as exc:
                sock.close()
                result.errors += 1
                if result.first_error is None:
                    result.first_error = f"{type(exc).__name__}: {exc}"
                consecutive_errors += 1
                if consecutive_errors >= MAX_CONSECUTIVE_ERRORS:
                    return
                gevent.sleep(0.01)
                continue
            consecutive_errors = 0
            held.append(sock)

    greenlets = [gevent.spawn(opener) for _ in range(min(concurrency, count))]
    gevent.joinall(greenlets, timeout=open_timeout)
    gevent.killall(greenlets, timeout=5)
    result.opened = len(held)
    result.errors = count - len(held)  # failed, or never tried within the bound
    result.seconds = time.monotonic() - start
    result.cpu_s = cpu_seconds_self() - cpu_before
    return held, result


def close_idle_tunnels(held: list[socket.socket], held_since: float) -> IdleClosed:
    """Count the tunnels that saw EOF, a reset or a byte while held (none should), close all."""
    poller = select.poll()
    for sock in held:
        poller.register(sock.fileno(), select.POLLIN | select.POLLRDHUP)
    dropped = len(poller.poll(0))  # POLLERR and POLLHUP are always reported
    for sock in held:
        sock.close()
    return IdleClosed(dropped, len(held), time.monotonic() - held_since)


class IdleRun:
    """``count`` idle tunnels held by one fresh process (``loadgen.py idle``) until released.

    ``wait_opened()`` returns once every tunnel is up (or the opening bound ran out); the
    tunnels stay open, without traffic, until ``release()``, which has the process check and
    close them. The process closes them by itself after ``hold_max`` s, or when this side's
    pipe closes, so it cannot outlive its caller holding thousands of sockets.
    """

    def __init__(
        self,
        proxy: Address | None,
        target: Address,
        count: int = 2000,
        concurrency: int = 50,
        timeout: float = 5.0,
        open_timeout: float = 60.0,
        hold_max: float = 120.0,
    ) -> None:
        self.open_timeout = open_timeout
        cmd = [
            sys.executable,
            str(LOADGEN),
            "idle",
            "--proxy",
            format_address(proxy),
            "--target",
            format_address(target),
            "--count",
            str(count),
            "--concurrency",
            str(concurrency),
            "--timeout",
            repr(timeout),
            "--open-timeout",
            repr(open_timeout),
            "--hold-max",
            repr(hold_max),
        ]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def _line(self, timeout: float) -> dict[str, object]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout.fileno()], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            rc = self.proc.poll()
            raise RuntimeError(
                "idle load generator " + (f"exited with {rc}" if rc is not None else "timed out")
            )
        return json.loads(line)

    def wait_opened(self) -> IdleOpened:
        return IdleOpened(**self._line(self.open_timeout + 30))  # type: ignore[arg-type]

    def release(self, timeout: float = 30.0) -> IdleClosed:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"close\n")
        self.proc.stdin.flush()
        closed = IdleClosed(**self._line(timeout))  # type: ignore[arg-type]
        self.proc.wait(timeout)
        return closed

    def kill(self) -> None:
        """Stop the process if it still runs (by its pid), and close the pipes to it."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


def hold_idle(args: argparse.Namespace) -> int:
    """``loadgen.py idle``: open, report, hold until told (or ``--hold-max``), check, close."""
    proxy = None if args.proxy == "none" else parse_address(args.proxy)
    held, opened = open_idle_tunnels(
        proxy, parse_address(args.target), args.count, args.concurrency, args.timeout,
        args.open_timeout,
    )  # fmt: skip
    sys.stdout.write(json.dumps(asdict(opened)) + "\n")
    sys.stdout.flush()
    held_since = time.monotonic()
    # Plain select on stdin: nothing else needs to run while the tunnels sit idle.
    select.select([sys.stdin.fileno()], [], [], args.hold_max)
    closed = close_idle_tunnels(held, held_since)
    sys.stdout.write(json.dumps(asdict(closed)) + "\n")
    sys.stdout.flush()
    return 0


# --- command line (how RateRun and run_stream start the work) ------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("rate", "stream", "streams", "idle"):
        p = sub.add_parser(name)
        p.add_argument("--proxy", default="none", help="HOST:PORT, or none for direct")
        p.add_argument("--target", required=True, help="origin HOST:PORT")
        p.add_argument("--timeout", type=float, default=5.0 if name in ("rate", "idle") else 60.0)
    rate = sub.choices["rate"]
    rate.add_argument("--concurrency", type=int, default=50)
    rate.add_argument("--duration", type=float, default=10.0)
    rate.add_argument("--start-at", type=float, default=None, help="time.time() to start at")
    rate.add_argument("--proxy-user", default=None, help="USER:PASSWORD, sent as Basic auth")
    for name in ("stream", "streams"):
        stream = sub.choices[name]
        stream.add_argument("--direction", choices=("up", "down"), required=True)
        stream.add_argument("--seconds", type=float, default=3.0)
        stream.add_argument("--warmup", type=float, default=0.5)
        stream.add_argument("--file-size", type=int, default=DEFAULT_FILE_SIZE)
    sub.choices["streams"].add_argument("--streams", type=int, default=8)
    idle = sub.choices["idle"]
    idle.add_argument("--count", type=int, default=2000)
    idle.add_argument("--concurrency", type=int, default=50)
    idle.add_argument("--open-timeout", type=float, default=60.0, help="bound on opening all")
    idle.add_argument("--hold-max", type=float, default=120.0, help="close after this anyway")
    args = parser.parse_args(argv)

    if args.command == "idle":
        return hold_idle(args)
    proxy = None if args.proxy == "none" else parse_address(args.proxy)
    target = parse_address(args.target)
    out: RateResult | StreamResult | MultiStreamResult
    if args.command == "rate":
        out = connect_rate(
            proxy, target, args.concurrency, args.duration, args.start_at, args.timeout,
            args.proxy_user,
        )  # fmt: skip
    elif args.command == "stream":
        out = stream_transfer(
            args.direction, proxy, target, args.seconds, args.warmup, args.file_size, args.timeout
        )
    else:
        out = multi_stream_transfer(
            args.direction, proxy, target, args.streams, args.seconds, args.warmup,
            args.file_size, args.timeout,
        )  # fmt: skip
    sys.stdout.write(json.dumps(asdict(out)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
