"""splicegate against the direct path, on loopback: ``python bench/run.py``.

Measures, for each relay engine asked for and for the direct path (client straight to the
origin), in one run:

1. the CONNECT rate: 50 concurrent loops of connect, CONNECT, the 39-byte 200, a 16-byte
   echo, close; tunnels/s, p50/p99 time-to-200 (direct: to the echo), and the rate
   relative to direct;
2. single-stream throughput each way (up: client -> origin; down: origin -> client) with a
   ``sendfile`` sender and a ``recv(MSG_TRUNC)`` receiver, relative to direct;
3. 8-stream throughput each way: 8 such streams side by side through one proxy, summed;
4. the proxy's CPU seconds per GiB relayed in those transfers;
5. idle memory per tunnel: on a proxy started just for it, after a 1 s warm-up, (RSS with
   2,000 idle tunnels open - RSS at rest) / 2,000, RSS summed over the proxy's process tree;

each the median of ``--runs`` runs, and prints one Markdown report (also written to
``bench/results/<timestamp>.md``) with the figures and the goals of the native-engine issue
next to them. Paths are measured interleaved (direct, then each engine, within every run) so
that noise from other work on the machine falls on all of them alike. ``--only`` picks parts.

Processes: one origin (``origin.py``), one proxy per engine (``splicegate ... --engine X``),
one more fresh proxy per engine and run for the idle test, and fresh load-generator processes
per measurement (``loadgen.py``); all on 127.0.0.1, all stopped by the pid this script got
when it started them.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from measure import (
    IDLE_SETTLE_S,
    add_measure_arguments,
    check_measure_arguments,
    fmt,
    hold_idle,
    median,
    rate,
    transfer,
)
from origin import Origin
from procs import (
    Proxy,
    describe_machine,
    describe_source,
    engine_available,
    rss_bytes_tree,
    start_splicegate,
)

BENCH = Path(__file__).resolve().parent
MIB = 1024**2
DIRECT = "direct"
#: The parts of a run, in the order they run; ``--only`` picks some.
PARTS = ("rate", "stream", "streams8", "idle")

#: (key, label, proxied paths only, has a ratio to direct, decimals); {streams} and {tunnels}
#: in a label are filled in from the settings.
ROWS = [
    ("rate", "CONNECT rate (tunnels/s; direct: connections/s)", False, True, 0),
    ("p50", "time-to-200 p50 (ms; direct: to the echo)", False, False, 2),
    ("p99", "time-to-200 p99 (ms; direct: to the echo)", False, False, 2),
    ("rate_cpu_proxy", "rate test: proxy CPU (% of one core)", True, False, 0),
    ("rate_cpu_tunnel", "rate test: proxy CPU per tunnel (µs)", True, False, 0),
    ("rate_cpu_client", "rate test: load generator CPU (% of one core)", False, False, 0),
    ("rate_cpu_origin", "rate test: origin CPU (% of one core)", False, False, 0),
    ("rate_errors", "rate test: failed loops", False, False, 0),
    ("up", "throughput up, client → origin (Gbit/s)", False, True, 2),
    ("down", "throughput down, origin → client (Gbit/s)", False, True, 2),
    ("cpu_up", "proxy CPU per GiB relayed, up (s)", True, False, 3),
    ("cpu_down", "proxy CPU per GiB relayed, down (s)", True, False, 3),
    ("machine_up", "machine CPU per GiB, up (s)", False, True, 3),
    ("machine_down", "machine CPU per GiB, down (s)", False, True, 3),
    ("up8", "{streams}-stream throughput up, summed (Gbit/s)", False, True, 2),
    ("down8", "{streams}-stream throughput down, summed (Gbit/s)", False, True, 2),
    ("cpu_up8", "proxy CPU per GiB relayed, {streams} streams up (s)", True, False, 3),
    ("cpu_down8", "proxy CPU per GiB relayed, {streams} streams down (s)", True, False, 3),
    ("machine_up8", "machine CPU per GiB, {streams} streams up (s)", False, True, 3),
    ("machine_down8", "machine CPU per GiB, {streams} streams down (s)", False, True, 3),
    ("idle_bytes", "idle memory per tunnel (bytes)", True, False, 0),
    ("idle_kib", "idle memory per tunnel (KiB)", True, False, 2),
    ("idle_rss_fresh", "idle test: proxy RSS just started (MiB)", True, False, 2),
    ("idle_rss_rest", "idle test: proxy RSS at rest, after warm-up (MiB)", True, False, 2),
    ("idle_rss_held", "idle test: proxy RSS with {tunnels} idle tunnels (MiB)", True, False, 2),
    ("idle_opened", "idle test: tunnels opened (of {tunnels})", True, False, 0),
    ("idle_sockets", "idle test: proxy sockets added per tunnel", True, False, 2),
    ("idle_pipes_rest", "idle test: proxy pipes open at rest (pipe fds / 2)", True, False, 0),
    ("idle_pipes_held", "idle test: proxy pipes open with the tunnels", True, False, 0),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="splicegate against the direct path on loopback: CONNECT rate, single- "
        "and 8-stream throughput, proxy CPU per GiB, idle memory per tunnel; medians of "
        "--runs runs, with the native-engine goals.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--engines",
        "--engine",
        default="python",
        help="relay engine(s) to measure, comma-separated (e.g. python,native); one that "
        "fails `splicegate --engine X --version` is skipped with a note",
    )
    parser.add_argument(
        "--only",
        default=",".join(PARTS),
        help="parts to run, comma-separated: rate (CONNECT rate), stream (single-stream "
        "throughput), streams8 (--streams streams side by side), idle (memory per tunnel)",
    )
    add_measure_arguments(parser)
    parser.add_argument(
        "--results-dir", type=Path, default=BENCH / "results", help="where the report goes"
    )
    args = parser.parse_args(argv)
    check_measure_arguments(parser, args)
    only = [part.strip() for part in args.only.split(",") if part.strip()]
    unknown = sorted(set(only) - set(PARTS))
    if unknown or not only:
        parser.error(f"--only takes some of {','.join(PARTS)}, not {args.only!r}")
    args.parts = [part for part in PARTS if part in only]
    return args


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
        began = time.monotonic()
        try:
            text = fn()
            print(f"{text}  [{time.monotonic() - began:.1f} s]", file=sys.stderr)
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
        text, _ = rate(
            self.samples, self.notes, column, proxy, self.origin.echo, self.origin.pid, self.args
        )
        return text

    def stream(self, direction: str, column: str, proxy: Proxy | None) -> str:
        return transfer(self.samples, direction, column, proxy, self.origin.stream, self.args)

    def streams8(self, direction: str, column: str, proxy: Proxy | None) -> str:
        return transfer(
            self.samples, f"{direction}8", column, proxy, self.origin.stream, self.args, each=True
        )

    def idle(self, engine: str) -> str:
        """Memory per idle tunnel, on a proxy of ``engine`` started for this alone."""
        args = self.args
        proxy = start_splicegate(engine)
        try:
            fresh = rss_bytes_tree(proxy.pid)
            hold = hold_idle(proxy, self.origin.echo, args)
            if proxy.proc.poll() is not None:
                raise RuntimeError(
                    f"the fresh {engine} proxy exited ({proxy.proc.returncode}):\n"
                    + proxy.log_text()[-3000:]
                )
        finally:
            rc = proxy.stop()
        if rc != 0:
            self.notes.append(f"the idle-test {engine} proxy exited with {rc} on SIGTERM")
        self.notes.extend(hold.notes(engine, args.idle_tunnels))
        opened, rest, held = hold.opened, hold.rest, hold.held
        if not opened.opened:
            raise RuntimeError("no idle tunnel opened")
        per_tunnel = hold.per_tunnel
        add = self.samples
        add["idle_bytes", engine].append(per_tunnel)
        add["idle_kib", engine].append(per_tunnel / 1024)
        add["idle_rss_fresh", engine].append(fresh / MIB)
        add["idle_rss_rest", engine].append(rest / MIB)
        add["idle_rss_held", engine].append(held / MIB)
        add["idle_opened", engine].append(opened.opened)
        add["idle_sockets", engine].append(hold.sockets)
        add["idle_pipes_rest", engine].append(hold.fds_rest["pipe"] / 2)
        add["idle_pipes_held", engine].append(hold.fds_held["pipe"] / 2)
        return (
            f"{per_tunnel:8.0f} B/tunnel  RSS fresh {fresh / MIB:.1f}, rest {rest / MIB:.1f}, "
            f"with {opened.opened} {held / MIB:.1f} MiB; opened in {opened.seconds:.1f} s"
        )

    def run(self) -> None:
        args = self.args
        for i in range(1, args.runs + 1):
            print(f"run {i}/{args.runs}", file=sys.stderr)
            began = time.monotonic()
            if "rate" in args.parts:
                for column, proxy in self.paths():
                    self.attempt("rate", column, proxy, lambda c=column, p=proxy: self.rate(c, p))
            for part, what, measure in (
                ("stream", "", self.stream),
                ("streams8", "8", self.streams8),
            ):
                if part not in args.parts:
                    continue
                for direction in ("up", "down"):
                    for column, proxy in self.paths():
                        self.attempt(
                            direction + what,
                            column,
                            proxy,
                            lambda d=direction, c=column, p=proxy, m=measure: m(d, c, p),
                        )
            if "idle" in args.parts:
                for proxy in self.proxies:
                    self.attempt("idle", proxy.engine, None, lambda e=proxy.engine: self.idle(e))
            print(f"run {i}/{args.runs} took {time.monotonic() - began:.0f} s", file=sys.stderr)


# --- the report ---------------------------------------------------------------------------------


def figures_table(
    samples: dict[tuple[str, str], list[float]],
    engines: list[str],
    per_run: bool,
    labels: dict[str, str],
) -> list[str]:
    """One row per figure measured; per engine a value column and, where it means something,
    a ratio."""
    head = ["figure", DIRECT]
    for engine in engines:
        head += [engine] if per_run else [engine, f"{engine} / direct"]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for key, label, proxied_only, has_ratio, decimals in ROWS:
        if not any(samples.get((key, column)) for column in [DIRECT, *engines]):
            continue  # a part not run (--only), or one that failed every time

        def cell(column: str, key: str = key, decimals: int = decimals) -> str:
            values = samples.get((key, column), [])
            if per_run:
                return ", ".join(fmt(v, decimals) for v in values) or "-"
            return fmt(median(values), decimals)

        row = [label.format(**labels), "-" if proxied_only else cell(DIRECT)]
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


#: The goals of issue 4 (the native engine), on a 2-core machine shared by client, proxy and
#: origin: (goal, engine, figure key, compared as a ratio to direct, "min" or "max", bound).
GOALS = [
    ("native single-stream up ≥ 0.6x direct", "native", "up", True, "min", 0.6),
    ("native single-stream down ≥ 0.6x direct", "native", "down", True, "min", 0.6),
    *(
        (f"native relay CPU ≤ 0.3 s per GiB, {what}", "native", key, False, "max", 0.3)
        for what, key in (
            ("single stream up", "cpu_up"),
            ("single stream down", "cpu_down"),
            ("{streams} streams up", "cpu_up8"),
            ("{streams} streams down", "cpu_down8"),
        )
    ),
    ("idle memory ≤ 2 KiB per tunnel, native", "native", "idle_kib", False, "max", 2.0),
    ("idle memory ≤ 2 KiB per tunnel, python (reference)", "python", "idle_kib", False, "max", 2),
]


def goals_table(
    samples: dict[tuple[str, str], list[float]],
    engines: list[str],
    labels: dict[str, str],
    idle_tunnels: int,
) -> list[str]:
    """Goal / measured (median) / holds?, for each goal whose engine was run.

    A native goal whose part was not run (or failed every time) shows "not measured"; a
    reference row for another engine is left out then. An idle figure taken over fewer
    tunnels than asked for is shown, but not judged: it is not the defined measurement.
    """
    lines = ["| goal | measured | holds? |", "|---|---:|:---:|"]
    for goal, engine, key, vs_direct, kind, bound in GOALS:
        if engine not in engines:
            continue
        mine = median(samples.get((key, engine), []))
        value: float | None = mine
        measured = ""
        if vs_direct:
            direct = median(samples.get((key, DIRECT), []))
            value = mine / direct if mine is not None and direct else None
            if value is not None:
                measured = f"{value:.2f}x ({mine:.2f} / {direct:.2f} Gbit/s)"
        elif mine is not None and key == "idle_kib":
            measured = f"{mine:.2f} KiB ({mine * 1024:,.0f} B)"
        elif mine is not None:
            measured = f"{mine:.3f} s/GiB"
        text = goal.format(**labels)
        if value is None:
            if engine == "native":
                lines.append(f"| {text} | not measured | - |")
            continue
        ok = value >= bound if kind == "min" else value <= bound
        holds = "yes" if ok else "**no**"
        opened = median(samples.get(("idle_opened", engine), []))
        if key == "idle_kib" and opened is not None and opened < idle_tunnels:
            holds = f"not judged: only {opened:,.0f} of {idle_tunnels:,} tunnels opened"
        lines.append(f"| {text} | {measured} | {holds} |")
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
        f"| settings | parts: {', '.join(args.parts)}; rate: {args.concurrency} loops x "
        f"{args.duration:g} s in {args.client_procs} process(es); throughput: 1 and "
        f"{args.streams} streams, {args.seconds:g} s window after {args.warmup:g} s warm-up, "
        f"{args.file_mib} MiB sendfile file; idle: {args.idle_tunnels:,} tunnels after a "
        f"{args.idle_warmup:g} s warm-up; median of {args.runs} run(s) |"
    )
    out.append("")
    labels = {"streams": str(args.streams), "tunnels": f"{args.idle_tunnels:,}"}
    if bench is not None:
        out += figures_table(bench.samples, list(engines), per_run=False, labels=labels)
        out.append("")
        out.append(
            "Ratios are of the medians. Time-to-200: connect start to the last byte of the "
            "200. CPU per GiB: utime+stime of the proxy process tree over one transfer, "
            "warm-up and tail included, divided by every byte of it. "
            f"{args.streams}-stream: that many transfers side by side through one proxy, "
            "their rates summed. Idle memory per tunnel: on a proxy started for it, "
            f"(RSS with {args.idle_tunnels:,} idle tunnels - RSS at rest) / "
            f"{args.idle_tunnels:,}, RSS summed over the proxy's process tree; at rest is after "
            f"{args.idle_warmup:g} s of tunnels one at a time and "
            f"{IDLE_SETTLE_S:g} s of quiet; each idle tunnel: CONNECT, 200, one 16-byte echo, "
            "then no traffic."
        )
        goals = goals_table(bench.samples, list(engines), labels, args.idle_tunnels)
        if len(goals) > 2:
            out += ["", "Goals (issue 4, the native engine; medians):", "", *goals]
    notes = [f"engine {e} skipped: {why}" for e, why in skipped.items()]
    notes += bench.notes if bench else []
    if notes:
        out += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    if bench is not None and args.runs > 1:
        out += ["", "Every run:", ""]
        out += figures_table(bench.samples, list(engines), per_run=True, labels=labels)
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.now(UTC)
    machine = describe_machine()
    machine["source at start"] = describe_source(BENCH.parent)

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
