"""Tunnels per second with proxy authentication off and on, measured in one run.

    python bench/auth_rate.py                      # native engine, 3 rounds of 10 s each way
    python bench/auth_rate.py --rounds 1 --duration 5 --engine python

Two proxies run side by side from the start, the same engine and flags but for
``--auth-file`` (one user, the default scrypt parameters); the CONNECT-rate loop of
``loadgen.py rate`` (connect, CONNECT, the 200, a 16-byte echo, close; 50 loops at once)
runs against each in turn, off then on, round after round, so that whatever else the
machine does falls on both alike. With auth on, every CONNECT carries the same Basic
credentials: after the first check they come from the proxy's HMAC cache, which is the
case that matters for the rate (a client's many tunnels). The first check's scrypt cost is
reported separately, as the time-to-200 of one cold CONNECT.

Prints a Markdown table: tunnels/s per round and the median, and auth-on / auth-off.
"""

from __future__ import annotations

import argparse
import base64
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loadgen import LOADGEN, RateResult, open_tunnel
from origin import Origin
from procs import describe_machine, start_splicegate

from splicegate.auth import set_password

USER, PASSWORD = "bench", "a long benchmark password"


def rate(proxy: tuple[str, int], target: tuple[str, int], args: argparse.Namespace,
         proxy_user: str | None) -> RateResult:  # fmt: skip
    """One ``loadgen.py rate`` process against ``proxy`` (the CONNECT carries credentials
    when ``proxy_user`` is given)."""
    cmd = [sys.executable, str(LOADGEN), "rate",
           "--proxy", f"{proxy[0]}:{proxy[1]}", "--target", f"{target[0]}:{target[1]}",
           "--concurrency", str(args.concurrency), "--duration", repr(args.duration)]  # fmt: skip
    if proxy_user:
        cmd += ["--proxy-user", proxy_user]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, timeout=args.duration + 60, check=True)
    return RateResult(**json.loads(done.stdout))


def cold_check_ms(proxy: tuple[str, int], target: tuple[str, int]) -> float:
    """Time-to-200 of one CONNECT whose credentials are not cached: mostly the scrypt."""
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    head = (f"CONNECT {target[0]}:{target[1]} HTTP/1.1\r\nHost: x\r\n"
            f"Proxy-Authorization: Basic {token}\r\n\r\n").encode()  # fmt: skip
    started = time.perf_counter()
    with socket.create_connection(proxy, timeout=10) as sock:
        sock.sendall(head)
        got = b""
        while not got.endswith(b"\r\n\r\n") and len(got) < 4096:
            chunk = sock.recv(1)
            if not chunk:
                break
            got += chunk
    assert got.startswith(b"HTTP/1.1 200"), got
    return (time.perf_counter() - started) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", default="native", choices=("native", "python"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args()
    machine = describe_machine()  # the load before this run adds its own

    with tempfile.TemporaryDirectory() as tmp, Origin.start() as origin:
        users = Path(tmp) / "users"
        set_password(str(users), USER, PASSWORD)
        plain = start_splicegate(args.engine)
        authed = start_splicegate(args.engine, ["--auth-file", str(users)])
        try:
            with open_tunnel(plain.address, origin.echo, 10):
                pass  # warm up: lazy imports, the engine's threads
            cold = cold_check_ms(authed.address, origin.echo)
            off: list[float] = []
            on: list[float] = []
            paths = (("off", plain, None, off), ("on", authed, f"{USER}:{PASSWORD}", on))
            for i in range(args.rounds):
                for label, proxy, user, into in paths:
                    result = rate(proxy.address, origin.echo, args, user)
                    into.append(result.per_second)
                    print(f"round {i + 1} auth {label}: {result.per_second:.0f} tunnels/s, "
                          f"{result.errors} errors", file=sys.stderr, flush=True)  # fmt: skip
        finally:
            plain.stop()
            authed.stop()
    print(f"## Tunnels per second, proxy auth off and on ({args.engine} engine)\n")
    print(f"{machine['CPU']}, {machine['cores']}, load {machine['load average at start']}; "
          f"{args.concurrency} loops at once, {args.duration:g} s "
          f"per measurement, off and on interleaved\n")  # fmt: skip
    print("| | " + " | ".join(f"round {i + 1}" for i in range(args.rounds)) + " | median |")
    print("|---|" + "---|" * (args.rounds + 1))
    for label, values in (("auth off", off), ("auth on", on)):
        cells = " | ".join(f"{v:.0f}" for v in values)
        print(f"| {label} | {cells} | {statistics.median(values):.0f} |")
    ratio = statistics.median(on) / statistics.median(off)
    print(f"\nauth on / auth off: {ratio:.2f}. One uncached check (scrypt N=16384, r=8, p=1), "
          f"time-to-200: {cold:.0f} ms.")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
