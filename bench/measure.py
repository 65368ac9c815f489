"""Measurements bench/run.py and bench/peers.py share: the CONNECT rate with the proxy's CPU,
a stream with the proxy's CPU per GiB, the memory a proxy holds per idle tunnel, and the
command-line options that set them. Each report keeps its own labels and notes."""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from typing import Protocol

from loadgen import (
    IdleClosed,
    IdleOpened,
    IdleRun,
    RateResult,
    RateRun,
    run_multi_stream,
    run_stream,
    warm_up,
)
from procs import cpu_seconds_tree, fd_kinds_tree, machine_busy_seconds, rss_bytes_tree

Address = tuple[str, int]
Samples = dict[tuple[str, str], list[float]]

GIB = 1024**3
MIB = 1024**2
#: After the warm-up, and after the idle tunnels are up, before memory is read: time for the
#: proxy to finish closing the warm-up tunnels, or handing the new ones to its engine.
IDLE_SETTLE_S = 0.5


class Measured(Protocol):
    """A proxy under test: its address and the pid of its process tree."""

    address: Address

    @property
    def pid(self) -> int: ...


def transfer(
    samples: Samples,
    part: str,
    key: str,
    proxy: Measured | None,
    target: Address,
    args: argparse.Namespace,
    each: bool = False,
) -> str:
    """One stream (``up``/``down``) or ``--streams`` streams (``up8``/``down8``) to ``target``,
    through ``proxy`` or direct; records Gbit/s under ``part`` and, through a proxy, its CPU
    s/GiB under ``cpu_<part>``, and the whole machine's busy CPU s/GiB under ``machine_<part>``
    (for the direct path too: the ratio of the two is what relaying costs). ``each`` adds the
    per-stream range to the returned text."""
    direction = part.removesuffix("8")
    p0 = cpu_seconds_tree(proxy.pid) if proxy else 0.0
    m0 = machine_busy_seconds()
    where = proxy.address if proxy else None
    size = args.file_mib * MIB
    if part.endswith("8"):
        result = run_multi_stream(
            direction, where, target, args.streams, args.seconds, args.warmup, size
        )
    else:
        result = run_stream(direction, where, target, args.seconds, args.warmup, size)
    time.sleep(0.05)  # let the proxy finish closing the tunnels it just relayed
    p1 = cpu_seconds_tree(proxy.pid) if proxy else 0.0
    m1 = machine_busy_seconds()
    samples[part, key].append(result.gbit_s)
    text = f"{result.gbit_s:8.2f} Gbit/s"
    if each:
        rates = result.stream_gbit_s()  # type: ignore[union-attr]
        text += f"  ({len(rates)} streams, {min(rates):.2f}..{max(rates):.2f} each)"
    if proxy and result.total_bytes:
        per_gib = (p1 - p0) / (result.total_bytes / GIB)
        samples[f"cpu_{part}", key].append(per_gib)
        text += f"  proxy {per_gib:.3f} CPU s/GiB"
    if result.total_bytes:
        machine = (m1 - m0) / (result.total_bytes / GIB)
        samples[f"machine_{part}", key].append(machine)
        text += f"  machine {machine:.3f} CPU s/GiB"
    return text


@dataclass
class IdleHold:
    """Memory and descriptors of a proxy at rest, and while it held the idle tunnels."""

    rest: int
    fds_rest: Counter[str]
    held: int
    fds_held: Counter[str]
    opened: IdleOpened
    closed: IdleClosed

    @property
    def per_tunnel(self) -> float:
        return (self.held - self.rest) / self.opened.opened

    @property
    def sockets(self) -> float:
        return (self.fds_held["socket"] - self.fds_rest["socket"]) / self.opened.opened

    def notes(self, label: str, tunnels: int) -> list[str]:
        """What went wrong, for the report's notes (``label``: the engine or peer)."""
        opened, closed = self.opened, self.closed
        found = []
        if opened.errors:
            found.append(
                f"idle via {label}: {opened.errors} of {tunnels} tunnels did not "
                f"open, first error: {opened.first_error}; per tunnel is over the "
                f"{opened.opened} that did"
            )
        if closed.dropped:
            found.append(
                f"idle via {label}: {closed.dropped} of {closed.closed} tunnels were closed "
                "by the other side while held"
            )
        return found


def hold_idle(proxy: Measured, echo: Address, args: argparse.Namespace) -> IdleHold:
    """Warm ``proxy`` up, let it settle, read its memory; open ``--idle-tunnels`` idle tunnels
    to ``echo``, let it settle, read its memory again, then close them."""
    warm_up(proxy.address, echo, args.idle_warmup, args.timeout)
    time.sleep(IDLE_SETTLE_S)
    rest, fds_rest = rss_bytes_tree(proxy.pid), fd_kinds_tree(proxy.pid)
    run = IdleRun(proxy.address, echo, args.idle_tunnels, args.concurrency, args.timeout)
    try:
        opened = run.wait_opened()
        time.sleep(IDLE_SETTLE_S)
        held, fds_held = rss_bytes_tree(proxy.pid), fd_kinds_tree(proxy.pid)
        closed = run.release()
    finally:
        run.kill()
    return IdleHold(rest, fds_rest, held, fds_held, opened, closed)


def add_measure_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every benchmark of proxies against the direct path takes."""
    parser.add_argument("--runs", type=int, default=3, help="runs; each figure is the median")
    parser.add_argument("--duration", type=float, default=10.0, help="rate test seconds")
    parser.add_argument("--concurrency", type=int, default=50, help="rate test loops")
    parser.add_argument(
        "--client-procs", type=int, default=1, help="processes the rate loops are split over"
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="throughput window seconds")
    parser.add_argument(
        "--warmup", type=float, default=0.5, help="throughput warm-up before the window"
    )
    parser.add_argument("--file-mib", type=int, default=32, help="size of the sendfile file")
    parser.add_argument(
        "--streams", type=int, default=8, help="streams side by side in the multi-stream part"
    )
    parser.add_argument(
        "--idle-tunnels", type=int, default=2000, help="idle tunnels held in the idle part"
    )
    parser.add_argument(
        "--idle-warmup",
        type=float,
        default=1.0,
        help="idle part: seconds of tunnels one at a time before the at-rest reading",
    )
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="rate and idle tests: bound on each socket step"
    )


def check_measure_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.runs < 1 or args.duration <= 0 or args.seconds <= 0 or args.concurrency < 1:
        parser.error("--runs, --duration, --seconds and --concurrency must be positive")
    if args.streams < 1 or args.idle_tunnels < 1 or args.idle_warmup < 0:
        parser.error("--streams and --idle-tunnels must be positive, --idle-warmup not negative")


def rate(
    samples: Samples,
    notes: list[str],
    key: str,
    proxy: Measured | None,
    echo: Address,
    origin_pid: int,
    args: argparse.Namespace,
) -> tuple[str, RateResult]:
    """``--concurrency`` CONNECT + echo + close loops through ``proxy`` (or direct) for
    ``--duration`` s, with the CPU of the proxy, the origin and the load generator over
    exactly that window; recorded under ``key`` (see :func:`record_rate`)."""
    run = RateRun(
        proxy.address if proxy else None,
        echo,
        args.concurrency,
        args.duration,
        args.client_procs,
        args.timeout,
    )
    try:
        time.sleep(max(0.0, run.start_at - time.time()))
        p0 = cpu_seconds_tree(proxy.pid) if proxy else 0.0
        o0 = cpu_seconds_tree(origin_pid)
        time.sleep(max(0.0, run.end_at - time.time()))
        p1 = cpu_seconds_tree(proxy.pid) if proxy else 0.0
        o1 = cpu_seconds_tree(origin_pid)
        result = run.collect()
    finally:
        run.kill()
    if result.late_s > 0.5:
        notes.append(
            f"a rate load generator ({key}) started {result.late_s:.1f} s late; "
            "its loops ran that much less of the window"
        )
    text = record_rate(
        samples,
        notes,
        key,
        result,
        100 * (p1 - p0) / args.duration if proxy else None,
        {
            "rate_cpu_client": 100 * result.cpu_s / args.duration,
            "rate_cpu_origin": 100 * (o1 - o0) / args.duration,
        },
    )
    return text, result


def record_rate(
    samples: Samples,
    notes: list[str],
    key: str,
    result: RateResult,
    proxy_cpu: float | None,
    extra: dict[str, float] | None = None,
) -> str:
    """Record a connection-rate run through ``key``: loops per second, errors, the p50/p99
    time to the first answer, the ``extra`` figures, and through a proxy (``proxy_cpu``: its
    CPU %) that."""
    if result.first_error:
        notes.append(f"rate via {key}: {result.errors} failed loops, first: {result.first_error}")
    samples["rate", key].append(result.per_second)
    samples["rate_errors", key].append(result.errors)
    for figure, value in (extra or {}).items():
        samples[figure, key].append(value)
    text = f"{result.per_second:8.0f}/s  errors {result.errors}"
    p50, p99 = result.percentile_ms(50), result.percentile_ms(99)
    if p50 is not None and p99 is not None:
        samples["p50", key].append(p50)
        samples["p99", key].append(p99)
        text += f"  p50 {p50:.2f} ms  p99 {p99:.2f} ms"
    if proxy_cpu is not None:
        samples["rate_cpu_proxy", key].append(proxy_cpu)
        if result.per_second > 0:  # the proxy's CPU for one tunnel: steadier than the rate
            samples["rate_cpu_tunnel", key].append(proxy_cpu / 100 / result.per_second * 1e6)
    return text


# --- the reports' numbers -------------------------------------------------------------------


def fmt(value: float | None, decimals: int) -> str:
    """A figure for a Markdown table: thousands separated, ``-`` for none measured."""
    return "-" if value is None else f"{value:,.{decimals}f}"


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None
