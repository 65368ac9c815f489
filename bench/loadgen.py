"""The client side of the benchmarks: CONNECT-rate loops and single-stream transfers.

Every function takes ``proxy``, the proxy's address, or ``None`` for the direct path (straight
to the origin), so that each figure is measured the same way both ways and only the path
differs. The functions run in the calling process; ``RateRun`` and ``run_stream`` run them in
fresh processes instead (``python bench/loadgen.py rate|stream ...``, one JSON line on
stdout), which is how the benchmarks use them: the load generator then competes with the
proxy for the CPU only as a separate process would, and its own CPU time is reported.

Only loopback addresses are accepted (``require_loopback``): these loops open thousands of
connections a second and must never be pointed at anything else.

Meant to be imported by other benchmarks (e.g. through a peer proxy): ``connect_rate``,
``stream_transfer``, ``RateRun``, ``run_stream``, ``open_tunnel``.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import resource
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gevent
from gevent import socket as gsocket
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


def connect_request(target: Address) -> bytes:
    authority = f"{target[0]}:{target[1]}"
    return f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()


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

    ``latencies_ms`` holds one time-to-200 per completed loop through a proxy (connect start
    to the last byte of the 200) and is empty for the direct path, which has no 200.
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
) -> RateResult:
    """Run ``concurrency`` greenlet loops of one short connection each for ``duration`` s.

    One loop: connect, (through a proxy: CONNECT, read exactly the 39-byte 200), send 16
    bytes, read their echo, close. A loop counts if it finished inside the window; loops
    still running at its end are let finish (bounded by ``timeout`` per step) but not
    counted. ``start_at`` (a ``time.time()`` value) lets several processes share one window.
    """
    target = require_loopback(target)
    dial = require_loopback(proxy or target)
    request = connect_request(target)
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
                if proxy is not None:
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
        self.duration = duration
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


# --- single-stream throughput -----------------------------------------------------------------


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
    cpu_before = cpu_seconds_self()
    if direction == "up":
        f = payload_file(file_size)  # before connecting: not inside anyone's window
        with open_tunnel(proxy, target, timeout) as sock:
            sock.sendall(make_header(SINK, seconds, warmup, 0))
            sent = send_until_stopped(sock, f, warmup + seconds + STOP_SLACK)
            window = Window.from_line(finish_sender(sock))
        total = sent
    elif direction == "down":
        with open_tunnel(proxy, target, timeout) as sock:
            sock.sendall(make_header(SOURCE, seconds, warmup, file_size))
            window, received = receive_window(sock, seconds, warmup)
            total = received + finish_receiver(sock, b"stop\n")
    else:
        raise ValueError(f"direction must be up or down, not {direction!r}")
    return StreamResult(
        direction, window.bytes, window.seconds, total, cpu_seconds_self() - cpu_before
    )


def run_stream(
    direction: str,
    proxy: Address | None,
    target: Address,
    seconds: float = 3.0,
    warmup: float = 0.5,
    file_size: int = DEFAULT_FILE_SIZE,
    timeout: float = 60.0,
) -> StreamResult:
    """``stream_transfer`` in a fresh process; waits for it (bounded) and returns its result."""
    cmd = [
        sys.executable,
        str(LOADGEN),
        "stream",
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
    ]
    done = subprocess.run(
        cmd, stdout=subprocess.PIPE, timeout=warmup + seconds + STOP_SLACK + 2 * timeout
    )
    if done.returncode != 0:
        raise RuntimeError(f"stream load generator exited with {done.returncode}")
    return StreamResult(**json.loads(done.stdout))


# --- command line (how RateRun and run_stream start the work) ------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("rate", "stream"):
        p = sub.add_parser(name)
        p.add_argument("--proxy", default="none", help="HOST:PORT, or none for direct")
        p.add_argument("--target", required=True, help="origin HOST:PORT")
        p.add_argument("--timeout", type=float, default=5.0 if name == "rate" else 60.0)
    rate = sub.choices["rate"]
    rate.add_argument("--concurrency", type=int, default=50)
    rate.add_argument("--duration", type=float, default=10.0)
    rate.add_argument("--start-at", type=float, default=None, help="time.time() to start at")
    stream = sub.choices["stream"]
    stream.add_argument("--direction", choices=("up", "down"), required=True)
    stream.add_argument("--seconds", type=float, default=3.0)
    stream.add_argument("--warmup", type=float, default=0.5)
    stream.add_argument("--file-size", type=int, default=DEFAULT_FILE_SIZE)
    args = parser.parse_args(argv)

    proxy = None if args.proxy == "none" else parse_address(args.proxy)
    target = parse_address(args.target)
    out: RateResult | StreamResult
    if args.command == "rate":
        out = connect_rate(
            proxy, target, args.concurrency, args.duration, args.start_at, args.timeout
        )
    else:
        out = stream_transfer(
            args.direction, proxy, target, args.seconds, args.warmup, args.file_size, args.timeout
        )
    sys.stdout.write(json.dumps(asdict(out)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
