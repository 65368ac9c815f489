"""Shared fixtures. Each block belongs to one concern; add new ones as separate blocks."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import gevent
import pytest

from splicegate.relay import Engine, RelayTimeouts, create_engine, native_engine_error

# --- the hub's clock -----------------------------------------------------------------------
# libev reads the clock once per loop iteration, and gevent's timeouts count from that
# reading. A test that blocks the main thread for seconds without running the hub
# (subprocess.run, time.sleep, a ProxyProcess started and stopped) leaves it stale, and the
# next test's timeouts would count from seconds ago: a joinall(timeout=5) returned at once.


@pytest.fixture(autouse=True)
def fresh_hub_clock() -> None:
    gevent.get_hub().loop.update_now()


# --- relay engines ------------------------------------------------------------------------
# Every relay test runs against each engine that loads here: "python" always, "native" once
# splicegate._engine builds (and SPLICEGATE_PUREPYTHON is not set). The pure-Python engine is
# the reference the native one must match.

ENGINE_KINDS = ["python"] if native_engine_error() else ["python", "native"]


@pytest.fixture(params=ENGINE_KINDS)
def engine_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def make_engine(engine_kind: str) -> Iterator[Callable[..., Engine]]:
    """Build engines of the parametrised kind; each is shut down (closing what is left) at
    teardown, so a failing test cannot leak tunnels into the next one."""
    engines: list[Engine] = []

    def make(timeouts: RelayTimeouts | None = None, threads: int | None = None) -> Engine:
        engine = create_engine(engine_kind, timeouts or RelayTimeouts(), threads=threads)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.shutdown(time.monotonic())


# --- end relay engines --------------------------------------------------------------------


# --- DNS server (resolver and dialer tests) -----------------------------------------------
# A loopback DNS server in its own OS thread (tests/dnsserver.py); fresh for every test, so
# configured names and query counts never carry over. Stopping it joins its threads.

from dnsserver import DnsServer  # noqa: E402  (tests/ is on sys.path: rootdir conftest)


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    with DnsServer() as server:
        yield server


# --- end DNS server -----------------------------------------------------------------------
