"""splicegate against the direct path, on loopback: ``python bench/run.py``.

Measures, for each relay engine asked for and for the direct path (client straight to the
origin), in one run:

1. the CONNECT rate: 50 concurrent loops of connect, CONNECT, the 39-byte 200, a 16-byte
   echo, close; tunnels/s, p50/p99 time-to-200, and the rate relative to direct;
2. single-stream throughput each way (up: client -> origin; down: origin -> client) with a
   ``sendfile`` sender and a ``recv(MSG_TRUNC)`` receiver, relative to direct;
3. the proxy's CPU seconds per GiB relayed in those transfers;

each the median of ``--runs`` runs, and prints one Markdown report (also written to
``bench/results/<timestamp>.md``). Paths are measured interleaved (direct, then each engine,
within every run) so that noise from other work on the machine falls on all of them alike.

Processes: one origin (``origin.py``), one proxy per engine (``splicegate ... --engine X``),
and fresh load-generator processes per measurement (``loadgen.py``); all on 127.0.0.1, all
stopped by the pid this script got when it started them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from loadgen import RateRun, run_stream
from origin import Origin
from procs import Proxy, cpu_seconds_tree, describe_machine, engine_available, start_splicegate

BENCH = Path(__file__).resolve().parent
GIB = 1024**3
DIRECT = "direct"

#: (key, label, proxied paths only, has a ratio to direct, decimals)
ROWS = [
    ("rate", "CONNECT rate (tunnels/s; direct: connections/s)", False, True, 0),
    ("p50", "time-to-200 p50 (ms)", True, False, 2),
    ("p99", "time-to-200 p99 (ms)", True, False, 2),
    ("up", "throughput up, client → origin (Gbit/s)", False, True, 2),
    ("down", "throughput down, origin → client (Gbit/s)", False, True, 2),
    ("cpu_up", "proxy CPU per GiB relayed, up (s)", True, False, 3),
    ("cpu_down", "proxy CPU per GiB relayed, down (s)", True, False, 3),
    ("rate_cpu_proxy", "rate test: proxy CPU (% of one core)", True, False, 0),
    ("rate_cpu_client", "rate test: load generator CPU (% of one core)", False, False, 0),
    ("rate_cpu_origin", "rate test: origin CPU (% of one core)", False, False, 0),
    ("rate_errors", "rate test: failed loops", False, False, 0),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="splicegate against the direct path on loopback: CONNECT rate, "
        "single-stream throughput, proxy CPU per GiB; medians of --runs runs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--engines",
        "--engine",
        default="python",
        help="relay engine(s) to measure, comma-separated (e.g. python,native); one that "
        "fails `splicegate --engine X --version` is skipped with a note",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="rate test seconds")
    parser.add_argument("--seconds", type=float, default=3.0, help="throughput window seconds")
    parser.add_argument(
        "--warmup", type=float, default=0.5, help="throughput warm-up before the window"
    )
    parser.add_argument("--runs", type=int, default=3, help="runs; each figure is the median")
    parser.add_argument("--concurrency", type=int, default=50, help="rate test loops")
    parser.add_argument(
        "--client-procs", type=int, default=1, help="processes the rate loops are split over"
    )
    parser.add_argument("--file-mib", type=int, default=32, help="size of the sendfile file")
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="rate test: bound on each socket step"
    )
    parser.add_argument(
        "--results-dir", type=Path, default=BENCH / "results", help="where the report goes"
    )
    args = parser.parse_args(argv)
    if args.runs < 1 or args.duration <= 0 or args.seconds <= 0 or args.concurrency < 1:
        parser.error("--runs, --duration, --seconds and --concurrency must be positive")
    return args


def sleep_until(when: float) -> None:
    time.sleep(max(0.0, when - time.time()))


class Bench:
    """The running processes, and every sample taken, keyed by (figure, column)."""

    def __init__(self, args: argparse.Namespace, origin: Origin, proxies: list[Proxy]) -> None:
        self.args = args
        self.origin = origin
        self.proxies = proxies
        self.samples: dict[tuple[str, str], list[float]] = defaultdict(list)
        self.notes: list[str] = []
        self.dead: set[str] = set()

    def paths(self) -> list[tuple[str, Proxy | None]]:
        live = [(p.engine, p) for p in self.proxies if p.engine not in self.dead]
        return [(DIRECT, None), *live]

    def attempt(self, what: str, column: str, proxy: Proxy | None, fn: Callable[[], str]) -> None:
        """Run one measurement; a failure becomes a note and a missing sample, not an abort."""
        print(f"  {what:<6} {column:<8} ", end="", file=sys.stderr, flush=True)
        try:
            print(fn(), file=sys.stderr)
        except Exception as exc:
            print(f"FAILED: {exc}", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
            self.notes.append(f"{what} via {column} failed once: {type(exc).__name__}: {exc}")
        if proxy is not None and proxy.proc.poll() is not None:
            self.dead.add(proxy.engine)
            self.notes.append(
                f"the {proxy.engine} proxy exited ({proxy.proc.returncode}) during {what}; "
                f"its log:\n\n```\n{proxy.log_text()[-3000:]}\n```"
            )

    def rate(self, column: str, proxy: Proxy | None) -> str:
        args = self.args
        address = proxy.address if proxy else None
        run = RateRun(
            address, self.origin.echo, args.concurrency, args.duration, args.client_procs,
            args.timeout,
        )  # fmt: skip
        try:
            sleep_until(run.start_at)
            p0 = cpu_seconds_tree(proxy.pid) if proxy else 0.0
            o0 = cpu_seconds_tree(self.origin.pid)
            sleep_until(run.end_at)
            p1 = cpu_seconds_tree(proxy.pid) if proxy else 0.0
            o1 = cpu_seconds_tree(self.origin.pid)
            result = run.collect()
        finally:
            run.kill()
        if result.late_s > 0.5:
            self.notes.append(
                f"a rate load generator ({column}) started {result.late_s:.1f} s late; "
                "its loops ran that much less of the window"
            )
        if result.first_error:
            self.notes.append(
                f"rate via {column}: {result.errors} failed loops, first: {result.first_error}"
            )
        add = self.samples
        add["rate", column].append(result.per_second)
        add["rate_errors", column].append(result.errors)
        add["rate_cpu_client", column].append(100 * result.cpu_s / args.duration)
        add["rate_cpu_origin", column].append(100 * (o1 - o0) / args.duration)
        text = f"{result.per_second:8.0f}/s  errors {result.errors}"
        if proxy:
            add["rate_cpu_proxy", column].append(100 * (p1 - p0) / args.duration)
            p50, p99 = result.percentile_ms(50), result.percentile_ms(99)
            if p50 is not None and p99 is not None:
                add["p50", column].append(p50)
                add["p99", column].append(p99)
                text += f"  p50 {p50:.2f} ms  p99 {p99:.2f} ms"
        return text

    def stream(self, direction: str, column: str, proxy: Proxy | None) -> str:
        args = self.args
        p0 = cpu_seconds_tree(proxy.pid) if proxy else 0.0
        result = run_stream(
            direction,
            proxy.address if proxy else None,
            self.origin.stream,
            args.seconds,
            args.warmup,
            args.file_mib * 1024 * 1024,
        )
        time.sleep(0.05)  # let the proxy finish closing the tunnel it just relayed
        p1 = cpu_seconds_tree(proxy.pid) if proxy else 0.0
        self.samples[direction, column].append(result.gbit_s)
        text = f"{result.gbit_s:8.2f} Gbit/s"
        if proxy and result.total_bytes:
            per_gib = (p1 - p0) / (result.total_bytes / GIB)
            self.samples[f"cpu_{direction}", column].append(per_gib)
            text += f"  proxy {per_gib:.3f} CPU s/GiB"
        return text

    def run(self) -> None:
        args = self.args
        for i in range(1, args.runs + 1):
            print(f"run {i}/{args.runs}", file=sys.stderr)
            for column, proxy in self.paths():
                self.attempt("rate", column, proxy, lambda c=column, p=proxy: self.rate(c, p))
            for direction in ("up", "down"):
                for column, proxy in self.paths():
                    self.attempt(
                        direction,
                        column,
                        proxy,
                        lambda d=direction, c=column, p=proxy: self.stream(d, c, p),
                    )


# --- the report ---------------------------------------------------------------------------------


def fmt(value: float | None, decimals: int) -> str:
    if value is None:
        return "-"
    return f"{value:,.{decimals}f}"


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def figures_table(
    samples: dict[tuple[str, str], list[float]], engines: list[str], per_run: bool
) -> list[str]:
    """One row per figure; per engine a value column and, where it means something, a ratio."""
    head = ["figure", DIRECT]
    for engine in engines:
        head += [engine] if per_run else [engine, f"{engine} / direct"]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for key, label, proxied_only, has_ratio, decimals in ROWS:

        def cell(column: str, key: str = key, decimals: int = decimals) -> str:
            values = samples.get((key, column), [])
            if per_run:
                return ", ".join(fmt(v, decimals) for v in values) or "-"
            return fmt(median(values), decimals)

        row = [label, "-" if proxied_only else cell(DIRECT)]
        for engine in engines:
            row.append(cell(engine))
            if not per_run:
                ratio = None
                direct = median(samples.get((key, DIRECT), []))
                mine = median(samples.get((key, engine), []))
                if has_ratio and direct and mine is not None:
                    ratio = mine / direct
                row.append(fmt(ratio, 2) if has_ratio else "")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def report(
    args: argparse.Namespace,
    machine: dict[str, str],
    engines: dict[str, str],
    skipped: dict[str, str],
    bench: Bench | None,
    started: datetime,
) -> str:
    try:
        version = metadata.version("splicegate")
    except metadata.PackageNotFoundError:
        version = "unknown"
    out = [f"# splicegate benchmark, {started:%Y-%m-%d %H:%M:%S} UTC", ""]
    out += ["| machine | |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in machine.items()]
    out.append(f"| splicegate | {version} |")
    for engine, detail in engines.items():
        out.append(f"| engine {engine} | {detail} |")
    out.append(
        f"| settings | rate: {args.concurrency} loops x {args.duration:g} s in "
        f"{args.client_procs} process(es); throughput: {args.seconds:g} s window after "
        f"{args.warmup:g} s warm-up, {args.file_mib} MiB sendfile file; "
        f"median of {args.runs} run(s) |"
    )
    out.append("")
    if bench is not None:
        out += figures_table(bench.samples, list(engines), per_run=False)
        out.append("")
        out.append(
            "Ratios are of the medians. Time-to-200: connect start to the last byte of the "
            "200. CPU per GiB: utime+stime of the proxy process tree over one transfer, "
            "warm-up and tail included, divided by every byte of it."
        )
    notes = [f"engine {e} skipped: {why}" for e, why in skipped.items()]
    notes += bench.notes if bench else []
    if notes:
        out += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    if bench is not None and args.runs > 1:
        out += ["", "Every run:", ""]
        out += figures_table(bench.samples, list(engines), per_run=True)
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.now(UTC)
    machine = describe_machine()

    wanted = list(dict.fromkeys(e.strip() for e in args.engines.split(",") if e.strip()))
    engines: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for engine in wanted:
        ok, detail = engine_available(engine)
        (engines if ok else skipped)[engine] = detail
        if not ok:
            print(f"skipping engine {engine}: {detail}", file=sys.stderr)

    bench: Bench | None = None
    origin: Origin | None = None
    proxies: list[Proxy] = []
    try:
        origin = Origin.start()
        for engine in list(engines):
            try:
                proxies.append(start_splicegate(engine))
            except RuntimeError as exc:
                skipped[engine] = str(exc)
                del engines[engine]
        bench = Bench(args, origin, proxies)
        bench.run()
    finally:
        for proxy in proxies:
            rc = proxy.stop()
            if rc != 0 and bench is not None:
                bench.notes.append(f"the {proxy.engine} proxy exited with {rc} on SIGTERM")
        if origin is not None:
            origin.stop()

    text = report(args, machine, engines, skipped, bench, started)
    print(text)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"{started:%Y%m%dT%H%M%SZ}.md"
    path.write_text(text)
    print(f"written to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
