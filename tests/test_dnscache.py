"""The DNS cache (src/splicegate/dnscache.py) in front of the loopback DNS server.

Expiry is stepped with a fake clock (the cache's ``clock`` is for expiry only), so TTLs of
minutes are tested without waiting; deadlines stay real ``time.monotonic()`` values, and
timing is asserted only where it is the behaviour (a waiter stops at its own deadline).
"""

from __future__ import annotations

import ipaddress
import re
import time

import gevent
import pytest

from dnsserver import DnsServer
from splicegate.cli import build_parser
from splicegate.config import Config
from splicegate.dnscache import DnsCache
from splicegate.errors import DnsError, DnsTimeout
from splicegate.resolve import NameserverResolver, Resolution

ip = ipaddress.ip_address

SHORT = 0.3
LATE = 2.0


class Clock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def soon(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds


def cache_for(server: DnsServer, clock: Clock | None = None, **kw: object) -> DnsCache:
    inner = NameserverResolver([server.address], retry_interval=0.2)
    return DnsCache(inner, clock=clock or Clock(), **kw)  # type: ignore[arg-type]


def queries(server: DnsServer, name: str) -> int:
    """Queries for ``name`` of type A: one per lookup that reached the server."""
    return server.count(name, "A")


def add_nxdomain(server: DnsServer, name: str) -> None:
    """NXDOMAIN that comes from the A query, with AAAA silent: a lookup ends at the first
    NXDOMAIN (RFC 8020), so with both answering NXDOMAIN the A query could be given up
    before the server counted it; this way every lookup counts exactly one A query."""
    server.add(name, modes={"A": "nxdomain", "AAAA": "drop"})


class Counting:
    """A replaced resolver with records of its own and no TTLs (like getaddrinfo)."""

    def __init__(self, answer: list[str] | Exception) -> None:
        self.answer = answer
        self.calls = 0

    def resolve(self, host: str, deadline: float) -> list:
        self.calls += 1
        if isinstance(self.answer, Exception):
            raise self.answer
        return [ip(a) for a in self.answer]


# --- merging -------------------------------------------------------------------------------


def test_concurrent_lookups_of_one_name_send_one_query(dns_server: DnsServer) -> None:
    dns_server.add("merge.test", a=["127.0.0.1"], aaaa=["::1"])
    cache = cache_for(dns_server)
    lookups = [gevent.spawn(cache.resolve, "merge.test", soon()) for _ in range(20)]
    gevent.joinall(lookups, timeout=5, raise_error=True)
    assert [g.value for g in lookups] == [[ip("::1"), ip("127.0.0.1")]] * 20
    assert dns_server.count("merge.test", "A") == 1
    assert dns_server.count("merge.test", "AAAA") == 1
    assert (cache.misses, cache.merged) == (1, 19)


def test_a_waiter_arriving_mid_flight_joins_it(dns_server: DnsServer) -> None:
    # The first query of each type is lost and resent after 0.2 s: the flight is in the air.
    dns_server.add("slow.test", a=["127.0.0.1"], mode="dropfirst")
    cache = cache_for(dns_server)
    first = gevent.spawn(cache.resolve, "slow.test", soon())
    gevent.sleep(0.1)
    assert not first.ready()
    second = gevent.spawn(cache.resolve, "slow.test", soon())
    gevent.joinall([first, second], timeout=5, raise_error=True)
    assert first.value == second.value == [ip("127.0.0.1")]
    assert queries(dns_server, "slow.test") == 2  # one lookup: the lost query and its resend
    assert cache.merged == 1


def test_a_waiter_stops_at_its_own_deadline(dns_server: DnsServer) -> None:
    dns_server.add("void.test", mode="drop")
    cache = cache_for(dns_server)
    patient = gevent.spawn(cache.resolve, "void.test", soon(SHORT * 4))
    gevent.sleep(0)
    deadline = soon(SHORT)
    with pytest.raises(DnsTimeout) as caught:
        cache.resolve("void.test", deadline)
    assert deadline <= time.monotonic() < deadline + LATE
    assert not patient.ready()  # the flight goes on for the waiter with more time
    # its own budget (0.2 when the hub was late to get to it), not the patient's 1.2
    assert re.match(r"no answer within 0\.[23] s", caught.value.details)
    patient.join(timeout=5)
    assert isinstance(patient.exception, DnsTimeout)


def test_a_later_deadline_is_served_after_the_first_one_expires(dns_server: DnsServer) -> None:
    """The flight asks again for a waiter whose deadline outlives the one it started with."""
    dns_server.add("late.test", mode="drop")
    cache = cache_for(dns_server)
    hasty = gevent.spawn(cache.resolve, "late.test", soon(SHORT))
    gevent.sleep(0.05)
    patient = gevent.spawn(cache.resolve, "late.test", soon(SHORT * 8))
    hasty.join(timeout=5)
    assert isinstance(hasty.exception, DnsTimeout)
    dns_server.add("late.test", a=["127.0.0.1"])  # the nameserver comes back
    assert patient.get(timeout=5) == [ip("127.0.0.1")]
    assert cache.misses == 1  # one flight for both, asked twice


def test_a_killed_waiter_does_not_cancel_the_lookup(dns_server: DnsServer) -> None:
    dns_server.add("slow.test", a=["127.0.0.1"], mode="dropfirst")
    cache = cache_for(dns_server)
    leader = gevent.spawn(cache.resolve, "slow.test", soon())
    gevent.sleep(0.05)
    follower = gevent.spawn(cache.resolve, "slow.test", soon())
    gevent.sleep(0.05)
    leader.kill(timeout=5)  # its client went away
    assert follower.get(timeout=5) == [ip("127.0.0.1")]


def test_close_ends_flights_and_wakes_their_waiters(dns_server: DnsServer) -> None:
    dns_server.add("void.test", mode="drop")
    cache = cache_for(dns_server)
    waiter = gevent.spawn(cache.resolve, "void.test", soon(30))
    gevent.sleep(0.05)
    cache.close()
    waiter.join(timeout=5)
    assert isinstance(waiter.exception, DnsTimeout)


# --- answers: TTLs ------------------------------------------------------------------------


def test_ttl_is_honoured_and_expiry_asks_again(dns_server: DnsServer) -> None:
    dns_server.add("ttl.test", a=["127.0.0.1"], ttl=60)
    clock = Clock()
    cache = cache_for(dns_server, clock)
    assert cache.resolve("ttl.test", soon()) == [ip("127.0.0.1")]
    clock.advance(59)
    assert cache.resolve("ttl.test", soon()) == [ip("127.0.0.1")]
    assert queries(dns_server, "ttl.test") == 1
    assert cache.hits == 1
    clock.advance(2)
    dns_server.add("ttl.test", a=["127.0.0.2"], ttl=60)  # the record changed meanwhile
    assert cache.resolve("ttl.test", soon()) == [ip("127.0.0.2")]
    assert queries(dns_server, "ttl.test") == 2


@pytest.mark.parametrize(
    ("ttl", "kept"),
    [(0, 5.0), (1, 5.0), (100_000, 300.0)],
    ids=["zero-raised-to-min", "short-raised-to-min", "long-cut-to-max"],
)
def test_ttl_is_clamped(dns_server: DnsServer, ttl: int, kept: float) -> None:
    dns_server.add("clamp.test", a=["127.0.0.1"], ttl=ttl)
    clock = Clock()
    cache = cache_for(dns_server, clock)  # defaults: 5 s .. 300 s
    cache.resolve("clamp.test", soon())
    clock.advance(kept - 0.5)
    cache.resolve("clamp.test", soon())
    assert queries(dns_server, "clamp.test") == 1
    clock.advance(1)
    cache.resolve("clamp.test", soon())
    assert queries(dns_server, "clamp.test") == 2


def test_bounds_are_settable(dns_server: DnsServer) -> None:
    dns_server.add("bounds.test", a=["127.0.0.1"], ttl=60)
    clock = Clock()
    cache = cache_for(dns_server, clock, min_ttl=0, max_ttl=10)
    cache.resolve("bounds.test", soon())
    clock.advance(11)
    cache.resolve("bounds.test", soon())
    assert queries(dns_server, "bounds.test") == 2


def test_answer_without_ttl_is_kept_30_s() -> None:
    records = Counting(["127.0.0.1"])  # resolve() only: no TTL, like getaddrinfo
    clock = Clock()
    cache = DnsCache(records, clock=clock)
    cache.resolve("own.internal", soon())
    clock.advance(29)
    cache.resolve("own.internal", soon())
    assert records.calls == 1
    clock.advance(2)
    cache.resolve("own.internal", soon())
    assert records.calls == 2


def test_partial_answer_is_kept_only_min_ttl(dns_server: DnsServer) -> None:
    dns_server.add("half.test", a=["127.0.0.1"], ttl=300, modes={"AAAA": "drop"})
    clock = Clock()
    cache = cache_for(dns_server, clock)
    assert cache.lookup("half.test", soon()).partial
    clock.advance(4)
    cache.resolve("half.test", soon())
    assert queries(dns_server, "half.test") == 1
    clock.advance(2)
    cache.resolve("half.test", soon())
    assert queries(dns_server, "half.test") == 2


def test_names_are_case_insensitive(dns_server: DnsServer) -> None:
    dns_server.add("case.test", a=["127.0.0.1"])
    cache = cache_for(dns_server)
    cache.resolve("case.test", soon())
    assert cache.resolve("CASE.Test", soon()) == [ip("127.0.0.1")]
    assert queries(dns_server, "case.test") == 1


def test_ip_literal_is_not_resolved_nor_kept() -> None:
    records = Counting(["127.0.0.9"])
    cache = DnsCache(records)
    assert cache.resolve("127.0.0.5", soon()) == [ip("127.0.0.5")]
    assert cache.resolve("::1", soon()) == [ip("::1")]
    assert records.calls == 0 and len(cache) == 0


def test_returned_list_is_a_copy() -> None:
    cache = DnsCache(Counting(["127.0.0.1"]))
    cache.resolve("own.internal", soon()).append(ip("127.0.0.66"))
    assert cache.resolve("own.internal", soon()) == [ip("127.0.0.1")]


# --- failures -----------------------------------------------------------------------------


def test_failures_are_kept_5_s(dns_server: DnsServer) -> None:
    add_nxdomain(dns_server, "gone.test")
    clock = Clock()
    cache = cache_for(dns_server, clock)
    errors = []
    for _ in range(3):
        with pytest.raises(DnsError) as caught:
            cache.resolve("gone.test", soon())
        errors.append(caught.value)
        clock.advance(1)
    assert queries(dns_server, "gone.test") == 1
    assert {e.details for e in errors} == {"no such name: gone.test"}
    assert errors[1] is not errors[2]  # a fresh copy each time: no traceback grows
    clock.advance(3)
    dns_server.add("gone.test", a=["127.0.0.1"])  # the name now exists
    assert cache.resolve("gone.test", soon()) == [ip("127.0.0.1")]


def test_servfail_is_kept_too(dns_server: DnsServer) -> None:
    dns_server.add("broken.test", mode="servfail")
    cache = cache_for(dns_server)
    for _ in range(2):
        with pytest.raises(DnsError):
            cache.resolve("broken.test", soon())
    assert queries(dns_server, "broken.test") == 1


def test_negative_ttl_zero_keeps_no_failure(dns_server: DnsServer) -> None:
    add_nxdomain(dns_server, "gone.test")
    cache = cache_for(dns_server, negative_ttl=0)
    for _ in range(2):
        with pytest.raises(DnsError):
            cache.resolve("gone.test", soon())
    assert queries(dns_server, "gone.test") == 2


def test_our_own_timeout_is_not_kept(dns_server: DnsServer) -> None:
    dns_server.add("void.test", mode="drop")
    cache = cache_for(dns_server)
    with pytest.raises(DnsTimeout):
        cache.resolve("void.test", soon(SHORT))
    dns_server.add("void.test", a=["127.0.0.1"])
    assert cache.resolve("void.test", soon()) == [ip("127.0.0.1")]


def test_empty_answer_from_a_replaced_resolver_is_a_dns_error() -> None:
    cache = DnsCache(Counting([]))
    with pytest.raises(DnsError) as caught:
        cache.resolve("empty.internal", soon())
    assert caught.value.details == "no address for: empty.internal"


def test_a_resolver_bug_reaches_every_waiter_and_is_not_kept() -> None:
    broken = Counting(RuntimeError("bug"))
    cache = DnsCache(broken)
    waiters = [gevent.spawn(cache.resolve, "bug.internal", soon()) for _ in range(3)]
    gevent.joinall(waiters, timeout=5)
    assert all(isinstance(w.exception, RuntimeError) for w in waiters)
    with pytest.raises(RuntimeError):
        cache.resolve("bug.internal", soon())
    assert broken.calls == 2


def test_deadline_already_passed_sends_nothing() -> None:
    records = Counting(["127.0.0.1"])
    with pytest.raises(DnsTimeout):
        DnsCache(records).resolve("late.internal", time.monotonic() - 1)
    assert records.calls == 0


# --- size ---------------------------------------------------------------------------------


def test_least_recently_used_is_evicted() -> None:
    records = Counting(["127.0.0.1"])
    cache = DnsCache(records, size=2)
    for name in ("a.internal", "b.internal", "a.internal", "c.internal"):
        cache.resolve(name, soon())
    assert len(cache) == 2
    assert records.calls == 3  # a, b, c; the second a was a hit
    cache.resolve("a.internal", soon())  # used more recently than b: still there
    assert records.calls == 3
    cache.resolve("b.internal", soon())  # evicted when c came in
    assert records.calls == 4


def test_size_zero_keeps_nothing_but_still_merges() -> None:
    records = Counting(["127.0.0.1"])
    cache = DnsCache(records, size=0)
    waiters = [gevent.spawn(cache.resolve, "x.internal", soon()) for _ in range(5)]
    gevent.joinall(waiters, timeout=5, raise_error=True)
    assert records.calls == 1
    cache.resolve("x.internal", soon())
    assert records.calls == 2 and len(cache) == 0


def test_answer_from_lookup_is_used_when_there_is_one() -> None:
    class WithTtl(Counting):
        def lookup(self, host: str, deadline: float) -> Resolution:
            return Resolution(self.resolve(host, deadline), ttl=7)

    records = WithTtl(["127.0.0.1"])
    clock = Clock()
    cache = DnsCache(records, clock=clock)
    cache.resolve("ttl.internal", soon())
    clock.advance(6.5)
    cache.resolve("ttl.internal", soon())
    clock.advance(1)
    cache.resolve("ttl.internal", soon())
    assert records.calls == 2


# --- settings -----------------------------------------------------------------------------


def test_config_defaults_and_flags() -> None:
    config = Config()
    assert (config.dns_cache_size, config.dns_min_ttl, config.dns_max_ttl) == (10_000, 5, 300)
    assert config.dns_negative_ttl == 5
    assert config.resolver is None and config.dialer is None
    flags = build_parser().format_help()
    for flag in ("--dns-cache-size", "--dns-min-ttl", "--dns-max-ttl", "--dns-negative-ttl"):
        assert flag in flags
    assert "--resolver" not in flags and "--dialer" not in flags


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({"dns_min_ttl": 60, "dns_max_ttl": 30}, "dns-min-ttl: 60 is above --dns-max-ttl 30"),
        ({"dns_cache_size": -1}, "dns-cache-size"),
        ({"dns_negative_ttl": -1}, "dns-negative-ttl"),
        ({"resolver": object()}, "resolver: "),
        ({"dialer": "not callable"}, "dialer: "),
    ],
)
def test_config_refuses_bad_values(settings: dict, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        Config(**settings)
