"""Time-to-200 through splicegate for a cached name, an uncached one and an IP literal.

    python bench/dns_latency.py [--count 500]

One proxy subprocess (``--nameserver`` pointing at the loopback DNS server of the tests,
tests/dnsserver.py, which runs in a thread of this process) and a loopback origin that
accepts and closes. Each sample is one fresh client connection, sequentially: connect, send
``CONNECT name:port``, read the 39-byte 200; the time from before the connect to the last
byte of the 200. "cached" asks for one name (looked up once before measuring), "uncached"
for a new name each time (so every sample is an A and an AAAA query), "literal" for
127.0.0.1 (no DNS at all: the floor). Sequential on purpose: it measures latency, not rate.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from dnsserver import DnsServer
from proxyproc import ProxyProcess

ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


def accept_and_close(listener: socket.socket, stop: threading.Event) -> None:
    listener.settimeout(0.2)
    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        conn.close()


def time_to_200(proxy: tuple[str, int], target: str) -> float:
    started = time.perf_counter()
    with socket.create_connection(proxy, timeout=10) as sock:
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        reply = b""
        while len(reply) < len(ESTABLISHED):  # bounded: the socket times out
            chunk = sock.recv(len(ESTABLISHED) - len(reply))
            if not chunk:
                break
            reply += chunk
    elapsed = time.perf_counter() - started
    if reply != ESTABLISHED:
        raise RuntimeError(f"{target}: {reply!r}")
    return elapsed


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=500, help="CONNECTs per case")
    args = parser.parse_args()
    stop = threading.Event()
    with DnsServer() as dns, socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        port = listener.getsockname()[1]
        acceptor = threading.Thread(target=accept_and_close, args=(listener, stop), daemon=True)
        acceptor.start()
        dns.add("cached.bench", a=["127.0.0.1"])
        for i in range(args.count):
            dns.add(f"n{i}.uncached.bench", a=["127.0.0.1"])
        proxy = ProxyProcess(
            "--allow-dest", "127.0.0.0/8", "--allow-port", "any",
            "--nameserver", f"{dns.host}:{dns.port}",
        )  # fmt: skip
        try:
            time_to_200(proxy.address, f"cached.bench:{port}")  # fills the cache
            time_to_200(proxy.address, f"127.0.0.1:{port}")  # warms the proxy up
            cases = {
                "literal": [f"127.0.0.1:{port}"] * args.count,
                "cached": [f"cached.bench:{port}"] * args.count,
                "uncached": [f"n{i}.uncached.bench:{port}" for i in range(args.count)],
            }
            results = {
                name: [time_to_200(proxy.address, t) for t in targets]
                for name, targets in cases.items()
            }
            queries = dns.count("cached.bench", "A")
        finally:
            proxy.stop()
            stop.set()
            acceptor.join(5)
    print(f"time-to-200, {args.count} sequential CONNECTs each, loopback DNS and origin")
    print("| name | p50 ms | p99 ms |")
    print("|---|---|---|")
    for name, samples in results.items():
        p50, p99 = percentile(samples, 50) * 1e3, percentile(samples, 99) * 1e3
        print(f"| {name} | {p50:.2f} | {p99:.2f} |")
    print(f"(A queries for the cached name over the whole run: {queries})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
