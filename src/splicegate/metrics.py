"""Prometheus metrics, with ``splicegate_`` names, for ``--admin``'s ``/metrics``.

Each :class:`Metrics` has a registry of its own, so two proxies embedded in one process
never collide. Under ``--workers`` the supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` before
it starts the workers: prometheus_client's multiprocess mode then keeps each worker's values
in files there, and the supervisor's one endpoint adds them up (:func:`collect_multiprocess`).
Gauges are ``livesum`` there: the files of a dead worker are dropped
(:func:`forget_process`), its counters kept.

Counts are made in the hub as things happen: a connection accepted, a request finished
(one ``tunnels_total`` per access-log line), a refusal. What the engine knows comes from
``engine.stats()``: the tunnels open now, its pipes and threads, and bytes as the increase
since the last look, so a long tunnel's bytes show while it runs, not only at its end. They
are looked at on every scrape, and once a second in a worker (whose scrapes the supervisor
answers). Nothing is counted per tunnel that the engine already counts: this runs on
every CONNECT.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from splicegate.dnscache import DnsCache

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

log = logging.getLogger("splicegate")

#: DNS lookups and connects on a LAN take a millisecond, across the world a few hundred;
#: the timeouts' defaults are 5 and 10 s
TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: a CONNECT to an address costs the proxy about a tenth of a millisecond from accept to 200
ESTABLISHED_BUCKETS = (0.0001, 0.00025, 0.0005, *TIME_BUCKETS)


def cause_label(error: BaseException) -> str:
    """``PortDenied`` -> ``port_denied``: finer than the Proxy-Status token, which one 403
    shares for a denied client and a denied port."""
    return _snake(type(error).__name__)


@functools.lru_cache(maxsize=64)
def _snake(name: str) -> str:
    """Once per error class, not a regex per refusal (a 407 or 503 flood is many)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def multiprocess() -> bool:
    """Whether prometheus_client keeps values in files (chosen when it was imported)."""
    from prometheus_client import values

    return values.ValueClass is not values.MutexValue


class Metrics:
    """The proxy's metrics; methods are called in the hub and never block."""

    def __init__(self) -> None:
        # Imported here, not at module level: under --workers the supervisor must set
        # PROMETHEUS_MULTIPROC_DIR before prometheus_client is first imported.
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.multiprocess = multiprocess()
        self.registry = CollectorRegistry(auto_describe=True)
        reg = None if self.multiprocess else self.registry
        live: dict[str, Any] = {"multiprocess_mode": "livesum", "registry": reg}
        self.connections = Counter(
            "splicegate_connections", "Client connections accepted", registry=reg
        )
        self.tunnels_active = Gauge("splicegate_tunnels_active", "Tunnels open now", **live)
        self.tunnels = Counter(
            "splicegate_tunnels",
            "Requests finished (a tunnel closed, a request refused): one per access-log line",
            ["status", "error"],
            registry=reg,
        )
        self.bytes = Counter(
            "splicegate_bytes",
            "Bytes relayed: up is client to origin, down is origin to client",
            ["direction"],
            registry=reg,
        )
        self.dns = Histogram(
            "splicegate_dns_seconds", "Name resolution time", buckets=TIME_BUCKETS, registry=reg
        )
        self.connect = Histogram(
            "splicegate_connect_seconds",
            "Time to connect to the target, after resolution",
            buckets=TIME_BUCKETS,
            registry=reg,
        )
        self.established = Histogram(
            "splicegate_time_to_established_seconds",
            "Time from accept to the 200 written: waiting for the hub, the head, the checks, "
            "DNS and connect",
            buckets=ESTABLISHED_BUCKETS,
            registry=reg,
        )
        self.pipes = Gauge(
            "splicegate_engine_pipes_in_use", "Splice pipes the relay engine holds", **live
        )
        self.threads = Gauge(
            "splicegate_engine_threads", "Native relay threads running (0: python engine)", **live
        )
        self.refusals = Counter(
            "splicegate_refusals",
            "Requests refused, by cause (the error class: port_denied, dns_error, ...)",
            ["cause"],
            registry=reg,
        )
        self.log_lines_lost = Counter(
            "splicegate_access_log_lines_lost",
            "Access-log lines lost: the writer was too far behind, or write(2) failed",
            registry=reg,
        )
        self.dns_lookups = Counter(
            "splicegate_dns_lookups",
            "Name lookups by how they were answered: from the cache, merged into a lookup "
            "of the same name already asking, or asked of the resolver",
            ["answer"],
            registry=reg,
        )
        self.dns_cache_entries = Gauge(
            "splicegate_dns_cache_entries", "Names the DNS cache holds (answers, failures)", **live
        )
        self._dns_answers = [self.dns_lookups.labels(a) for a in ("cache", "merged", "resolver")]
        self._dns_cache: object = None
        self._dns_seen = (0, 0, 0)
        #: tunnels_total's children by (status, error): labels() costs more than inc()
        self._finished: dict[tuple[int, str], Any] = {}
        self._up = self.bytes.labels("up")
        self._down = self.bytes.labels("down")
        self._seen_up = 0
        self._seen_down = 0

    def finished(self, status: int, error: str | None) -> None:
        """One request over: a tunnel closed, or a request refused."""
        key = (status, error or "")
        child = self._finished.get(key)
        if child is None:
            child = self._finished[key] = self.tunnels.labels(str(status), error or "")
        child.inc()

    def observe_engine(self, stats: Mapping[str, int]) -> None:
        """Bring the engine's figures in: gauges as they are, bytes as the increase past the
        most seen. An engine's totals count bytes delivered, so they fall back when a tunnel
        ends abortively with bytes it wrote still unsent; those were counted already, and
        bytes moved after count again only once the total passes its old height."""
        self.tunnels_active.set(stats.get("active", 0))
        self.pipes.set(stats.get("pipes_in_use", 0))
        self.threads.set(stats.get("threads", 0))
        up, down = stats.get("bytes_up", 0), stats.get("bytes_down", 0)
        if up > self._seen_up:
            self._up.inc(up - self._seen_up)
            self._seen_up = up
        if down > self._seen_down:
            self._down.inc(down - self._seen_down)
            self._seen_down = down

    def observe_dns(self, cache: DnsCache) -> None:
        """Bring the DNS cache's counts in, as the increase since the last look; a new
        cache (a reload with new DNS settings) counts from nothing."""
        counts = (cache.hits, cache.merged, cache.misses)
        seen = self._dns_seen if cache is self._dns_cache else (0, 0, 0)
        for child, now, before in zip(self._dns_answers, counts, seen, strict=True):
            if now > before:
                child.inc(now - before)
        self._dns_cache, self._dns_seen = cache, counts
        self.dns_cache_entries.set(len(cache))

    def render(self) -> bytes:
        """This process's metrics in the Prometheus text format; in multiprocess mode (an
        embedding application that set PROMETHEUS_MULTIPROC_DIR) they are in its files,
        summed with its other processes'."""
        if self.multiprocess:  # file reads: off the hub, as the supervisor does them
            import gevent

            return gevent.get_hub().threadpool.apply(collect_multiprocess)
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def collect_multiprocess(directory: str | None = None) -> bytes:
    """Every worker's metrics, added up, in the text format (the supervisor's /metrics)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory or os.environ[MULTIPROC_ENV])
    return generate_latest(registry)


def wipe_multiprocess(directory: str) -> None:
    """An operator's metrics directory, emptied of an earlier run's files, as
    prometheus_client requires: a run that ended by SIGKILL leaves its live gauges there,
    and every sum would carry them for good."""
    stale = sorted(Path(directory).glob("*.db"))
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log.info("metrics directory %s: %d files of an earlier run removed", directory, len(stale))


def forget_process(pid: int, directory: str | None = None) -> None:
    """Drop a dead worker's gauge files; its counters stay in the sums."""
    from prometheus_client.multiprocess import mark_process_dead

    mark_process_dead(pid, directory or os.environ[MULTIPROC_ENV])
