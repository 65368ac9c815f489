"""Resolution against a loopback DNS server (tests/dnsserver.py) and the system resolver.

No query leaves the machine: the nameserver tests talk to the test server only, and the
system resolver is asked for an /etc/hosts name and for a name the IDNA codec rejects
before any query is built; everything else about getaddrinfo is played by a stand-in.
Timing is asserted only where it is the behaviour (a timeout fires after its deadline and
not long after it), never as speed.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import dns.name
import dns.rdatatype
import gevent
import pytest

from dnsserver import SPOOFED_ADDRESS, DnsServer
from proxyproc import descriptors_above_1023, no_descriptors_left
from splicegate.dnscache import DnsCache
from splicegate.errors import DnsError, DnsTimeout, OutOfResources, raise_if_short
from splicegate.resolve import (
    NameserverResolver,
    Resolver,
    SystemResolver,
    make_resolver,
)

ip = ipaddress.ip_address

#: Deadline for the timeout cases, and how late after it the error may come at most.
SHORT = 0.5
LATE = 2.0


def resolver(*servers: DnsServer, retry_interval: float = 1.0) -> NameserverResolver:
    return NameserverResolver([s.address for s in servers], retry_interval=retry_interval)


def soon(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Ticker:
    """A greenlet that counts ticks: if the hub were blocked, it would stop counting."""

    def __init__(self, interval: float = 0.02) -> None:
        self.ticks = 0
        self.interval = interval
        self.greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        for _ in range(10_000):  # bounded; killed long before
            gevent.sleep(self.interval)
            self.ticks += 1

    def stop(self) -> int:
        self.greenlet.kill()
        return self.ticks


@pytest.fixture
def ticker() -> Iterator[Callable[[], Ticker]]:
    made: list[Ticker] = []

    def make() -> Ticker:
        t = Ticker()
        made.append(t)
        return t

    yield make
    for t in made:
        t.stop()


# --- answers ------------------------------------------------------------------------------


def test_a_only(dns_server: DnsServer) -> None:
    dns_server.add("v4.test", a=["127.0.0.1", "127.0.0.2"])
    addresses = resolver(dns_server).resolve("v4.test", soon())
    # Records in one RRset have no order in DNS: compare as a set.
    assert sorted(addresses) == [ip("127.0.0.1"), ip("127.0.0.2")]
    # Both families were asked, once each.
    assert dns_server.count("v4.test", "A") == 1
    assert dns_server.count("v4.test", "AAAA") == 1


def test_aaaa_only(dns_server: DnsServer) -> None:
    dns_server.add("v6.test", aaaa=["::1"])
    assert resolver(dns_server).resolve("v6.test", soon()) == [ip("::1")]


def test_both_families_aaaa_first(dns_server: DnsServer) -> None:
    dns_server.add("both.test", a=["127.0.0.1"], aaaa=["::1"])
    assert resolver(dns_server).resolve("both.test", soon()) == [ip("::1"), ip("127.0.0.1")]


def test_cname_chain_is_followed_inside_the_answer(dns_server: DnsServer) -> None:
    dns_server.add("www.alias.test", cname="mid.alias.test", ttl=30)
    dns_server.add("mid.alias.test", cname="real.test", ttl=600)
    dns_server.add("real.test", a=["127.0.0.3"], aaaa=["::1"], ttl=120)
    result = resolver(dns_server).lookup("www.alias.test", soon())
    assert result.addresses == [ip("::1"), ip("127.0.0.3")]
    assert result.ttl == 30  # the smallest TTL on the way
    # The server followed the chain: no extra queries for the targets.
    assert dns_server.count("real.test") == 0


def test_name_is_case_insensitive_and_may_end_with_a_dot(dns_server: DnsServer) -> None:
    dns_server.add("case.test", a=["127.0.0.1"])
    assert resolver(dns_server).resolve("CaSe.Test.", soon()) == [ip("127.0.0.1")]


def test_ip_literal_is_returned_without_a_query(dns_server: DnsServer) -> None:
    assert resolver(dns_server).resolve("127.0.0.5", soon()) == [ip("127.0.0.5")]
    assert resolver(dns_server).resolve("::1", soon()) == [ip("::1")]


def test_stray_reply_with_wrong_id_is_ignored(dns_server: DnsServer) -> None:
    dns_server.add("spoofed.test", a=["127.0.0.1"], mode="spoof")
    addresses = resolver(dns_server).resolve("spoofed.test", soon())
    assert addresses == [ip("127.0.0.1")]
    assert ip(SPOOFED_ADDRESS) not in addresses


def test_truncated_answer_is_fetched_over_tcp(dns_server: DnsServer) -> None:
    dns_server.add("big.test", a=["127.0.0.1"], aaaa=["::1"], mode="truncate")
    assert resolver(dns_server).resolve("big.test", soon()) == [ip("::1"), ip("127.0.0.1")]
    for rdtype in ("A", "AAAA"):
        assert dns_server.count("big.test", rdtype, "udp") == 1
        assert dns_server.count("big.test", rdtype, "tcp") == 1


def test_lost_packet_is_retransmitted(dns_server: DnsServer) -> None:
    dns_server.add("lossy.test", a=["127.0.0.1"], mode="dropfirst")
    r = resolver(dns_server, retry_interval=0.2)
    assert r.resolve("lossy.test", soon()) == [ip("127.0.0.1")]
    assert dns_server.count("lossy.test", "A", "udp") == 2


def test_silent_nameserver_is_skipped_for_the_next(dns_server: DnsServer) -> None:
    dns_server.add("next.test", a=["127.0.0.1"])
    with DnsServer(default="drop") as silent:
        r = resolver(silent, dns_server, retry_interval=0.2)
        assert r.resolve("next.test", soon()) == [ip("127.0.0.1")]
        assert silent.count("next.test", "A") >= 1


def test_failing_nameserver_is_skipped_at_once(dns_server: DnsServer) -> None:
    dns_server.add("next.test", a=["127.0.0.1"])
    with DnsServer(default="servfail") as failing:
        # retry_interval far beyond the deadline: only an immediate move-on can succeed.
        r = resolver(failing, dns_server, retry_interval=30.0)
        assert r.resolve("next.test", soon(3.0)) == [ip("127.0.0.1")]


# --- failures -----------------------------------------------------------------------------


def test_nxdomain(dns_server: DnsServer) -> None:
    dns_server.add("gone.test", mode="nxdomain")
    with pytest.raises(DnsError) as caught:
        resolver(dns_server).resolve("gone.test", soon())
    assert caught.value.details == "no such name: gone.test"
    assert "does not exist" in caught.value.message
    assert caught.value.status == 502
    assert caught.value.proxy_status_error == "dns_error"


def test_unknown_name_is_nxdomain(dns_server: DnsServer) -> None:
    with pytest.raises(DnsError) as caught:
        resolver(dns_server).resolve("nobody.test", soon())
    assert caught.value.details == "no such name: nobody.test"


def test_cname_to_a_missing_name_is_nxdomain(dns_server: DnsServer) -> None:
    dns_server.add("dangling.test", cname="missing.test")
    with pytest.raises(DnsError) as caught:
        resolver(dns_server).resolve("dangling.test", soon())
    assert caught.value.details == "no such name: dangling.test"


def test_servfail(dns_server: DnsServer) -> None:
    dns_server.add("broken.test", mode="servfail")
    with pytest.raises(DnsError) as caught:
        resolver(dns_server).resolve("broken.test", soon())
    assert caught.value.details == "server failure (SERVFAIL) for: broken.test"
    assert "SERVFAIL" in caught.value.message


def test_refused(dns_server: DnsServer) -> None:
    dns_server.add("closed.test", mode="refused")
    with pytest.raises(DnsError) as caught:
        resolver(dns_server).resolve("closed.test", soon())
    assert "REFUSED" in caught.value.details


def test_no_address_records(dns_server: DnsServer) -> None:
    dns_server.add("empty.test", mode="noanswer")
    with pytest.raises(DnsError) as caught:
        resolver(dns_server).resolve("empty.test", soon())
    assert caught.value.details == "no address for: empty.test"


def test_no_answer_times_out_at_the_deadline(dns_server: DnsServer) -> None:
    dns_server.add("void.test", mode="drop")
    start = time.monotonic()
    deadline = start + SHORT
    with pytest.raises(DnsTimeout) as caught:
        resolver(dns_server).resolve("void.test", deadline)
    end = time.monotonic()
    assert deadline <= end < deadline + LATE
    assert caught.value.details == f"no answer within {SHORT:.1f} s for: void.test"
    assert caught.value.status == 504
    assert caught.value.proxy_status_error == "dns_timeout"


def test_aaaa_is_given_up_50_ms_after_a_positive_a(dns_server: DnsServer) -> None:
    """RFC 8305 §3 Resolution Delay: a dropped AAAA costs 50 ms, not the DNS deadline."""
    dns_server.add("half.test", a=["127.0.0.1"], modes={"AAAA": "drop"})
    deadline = soon(SHORT * 4)
    started = time.monotonic()
    result = resolver(dns_server).lookup("half.test", deadline)
    assert result.addresses == [ip("127.0.0.1")]
    assert result.partial  # AAAA never answered: the cache keeps this only briefly
    assert 0.05 <= time.monotonic() - started < SHORT * 2  # waited the delay, not the deadline
    assert dns_server.count("half.test", "AAAA") >= 1


def test_resolution_delay_is_configurable(dns_server: DnsServer) -> None:
    dns_server.add("half.test", a=["127.0.0.1"], modes={"AAAA": "drop"})
    r = NameserverResolver([dns_server.address], resolution_delay=0.3)
    started = time.monotonic()
    assert r.resolve("half.test", soon()) == [ip("127.0.0.1")]
    assert time.monotonic() - started >= 0.3


def test_a_gets_one_resend_after_aaaa_not_the_deadline(dns_server: DnsServer) -> None:
    """An AAAA-only answer would take the IPv4 fallback away, so A gets time for a lost
    packet to be resent; but a nameserver that never answers A costs that much, not the
    whole deadline, and the IPv6 answer in hand is returned."""
    dns_server.add("half6.test", aaaa=["::1"], modes={"A": "drop"})
    r = NameserverResolver([dns_server.address], retry_interval=0.3, resolution_delay=0.3)
    started = time.monotonic()
    result = r.lookup("half6.test", soon(LATE * 2))
    waited = time.monotonic() - started
    assert result.addresses == [ip("::1")]
    assert result.partial
    assert 0.6 <= waited < LATE  # the resend and the resolution delay, not the 4 s
    assert dns_server.count("half6.test", "A") >= 2  # it was resent


def test_a_resent_after_aaaa_is_still_taken(dns_server: DnsServer) -> None:
    dns_server.add("lossy6.test", aaaa=["::1"], a=["127.0.0.1"], modes={"A": "dropfirst"})
    r = NameserverResolver([dns_server.address], retry_interval=0.3, resolution_delay=0.3)
    result = r.lookup("lossy6.test", soon())
    assert result.addresses == [ip("::1"), ip("127.0.0.1")]
    assert not result.partial


def test_one_family_is_given_up_before_the_deadline_not_at_it(dns_server: DnsServer) -> None:
    """The caller's own wait ends at the deadline: an answer returned at it could be too
    late, and addresses in hand would become a timeout."""
    dns_server.add("half6.test", aaaa=["::1"], modes={"A": "drop"})
    r = NameserverResolver([dns_server.address], retry_interval=2.0, resolution_delay=0.3)
    deadline = soon(LATE)
    result = r.lookup("half6.test", deadline)  # A's patience, 2.3 s, is past the deadline
    assert result.addresses == [ip("::1")]
    assert time.monotonic() < deadline  # given up 0.2 s before it (a tenth of the budget)


def test_both_families_answered_is_not_partial(dns_server: DnsServer) -> None:
    dns_server.add("both.test", a=["127.0.0.1"], aaaa=["::1"], ttl=42)
    dns_server.add("v4only.test", a=["127.0.0.1"])  # AAAA: NODATA, a definite answer
    r = resolver(dns_server)
    both = r.lookup("both.test", soon())
    assert (both.partial, both.ttl) == (False, 42)
    assert not r.lookup("v4only.test", soon()).partial


def test_one_family_failing_returns_the_other(dns_server: DnsServer) -> None:
    dns_server.add("halfbroken.test", aaaa=["::1"], modes={"A": "servfail"})
    result = resolver(dns_server).lookup("halfbroken.test", soon())
    assert result.addresses == [ip("::1")]
    assert result.partial  # SERVFAIL for A is no answer about A


def test_unreachable_nameserver(dns_server: DnsServer) -> None:
    # A UDP port nobody listens on: the ICMP port-unreachable error ends the query.
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    closed = probe.getsockname()
    probe.close()
    r = NameserverResolver([closed])
    with pytest.raises(DnsError) as caught:
        r.resolve("any.test", soon(3.0))
    assert caught.value.details == "nameserver unreachable for: any.test"


def test_invalid_name_sends_no_query(dns_server: DnsServer) -> None:
    with pytest.raises(DnsError) as caught:
        resolver(dns_server).resolve("bad..name", soon())
    assert caught.value.details == "invalid name: bad..name"
    assert dns_server.count("bad..name") == 0


def test_deadline_already_passed(dns_server: DnsServer) -> None:
    dns_server.add("late.test", a=["127.0.0.1"])
    with pytest.raises(DnsTimeout):
        resolver(dns_server).resolve("late.test", time.monotonic() - 1)
    assert dns_server.count("late.test") == 0


def test_bad_nameserver_config() -> None:
    with pytest.raises(ValueError):
        NameserverResolver([])
    with pytest.raises(ValueError):
        NameserverResolver([("dns.example", 53)])  # must be an address, not a name
    with pytest.raises(ValueError):
        NameserverResolver([("127.0.0.1", 0)])


# --- the hub stays free, nothing leaks -----------------------------------------------------


def test_hub_keeps_running_while_a_lookup_waits(
    dns_server: DnsServer, ticker: Callable[[], Ticker]
) -> None:
    dns_server.add("slow.test", mode="drop")
    tick = ticker()
    with pytest.raises(DnsTimeout):
        resolver(dns_server).resolve("slow.test", soon(SHORT))
    # 0.5 s at one tick per 20 ms: a blocked hub would give 0 or 1.
    assert tick.stop() >= 5


def test_concurrent_lookups_run_side_by_side(dns_server: DnsServer) -> None:
    dns_server.add("slow.test", mode="drop")
    dns_server.add("fast.test", a=["127.0.0.1"])
    r = resolver(dns_server)
    slow = gevent.spawn(r.resolve, "slow.test", soon(SHORT))
    fast = gevent.spawn(r.resolve, "fast.test", soon())
    assert fast.get(timeout=5) == [ip("127.0.0.1")]
    assert not slow.ready()  # the fast one did not wait for the slow one
    slow.join(timeout=5)
    assert isinstance(slow.exception, DnsTimeout)


def test_no_fd_leak(dns_server: DnsServer) -> None:
    dns_server.add("ok.test", a=["127.0.0.1"])
    dns_server.add("gone.test", mode="nxdomain")
    dns_server.add("big.test", a=["127.0.0.1"], mode="truncate")
    dns_server.add("void.test", mode="drop")
    r = resolver(dns_server)
    r.resolve("ok.test", soon())  # warm up: gevent creates its own fds lazily
    before = open_fds()
    for _ in range(20):
        r.resolve("ok.test", soon())
        with pytest.raises(DnsError):
            r.resolve("gone.test", soon())
    r.resolve("big.test", soon())
    with pytest.raises(DnsTimeout):
        r.resolve("void.test", soon(0.2))
    assert open_fds() == before


def test_killed_lookup_closes_its_sockets(dns_server: DnsServer) -> None:
    dns_server.add("void.test", mode="drop")
    r = resolver(dns_server)
    before = open_fds()
    lookup = gevent.spawn(r.resolve, "void.test", soon())
    gevent.sleep(0.1)
    assert open_fds() > before  # its sockets are open while it waits
    lookup.kill(timeout=5)
    assert lookup.dead
    assert open_fds() == before


# --- the system resolver --------------------------------------------------------------------


def test_system_resolver_localhost() -> None:
    addresses = SystemResolver().resolve("localhost", soon())
    assert addresses
    assert all(a.is_loopback for a in addresses)
    assert len(addresses) == len(set(addresses))


def test_system_resolver_rejects_an_invalid_name_locally() -> None:
    with pytest.raises(DnsError) as caught:
        SystemResolver().resolve("bad..name", soon())
    assert caught.value.details == "invalid name: bad..name"


def _fake_getaddrinfo(result: Any = None, error: BaseException | None = None, delay: float = 0):
    def getaddrinfo(host: str, port: Any, family: int, type: int) -> Any:
        assert (family, type) == (socket.AF_UNSPEC, socket.SOCK_STREAM)
        if delay:
            time.sleep(delay)  # really blocks: this runs in a worker thread
        if error is not None:
            raise error
        return result

    return getaddrinfo


def _info(address: str) -> tuple[Any, ...]:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sockaddr = (address, 0, 0, 0) if ":" in address else (address, 0)
    return (family, socket.SOCK_STREAM, 6, "", sockaddr)


def test_system_resolver_keeps_order_and_drops_repeats() -> None:
    infos = [_info("::1"), _info("127.0.0.1"), _info("::1"), _info("127.0.0.2")]
    r = SystemResolver(getaddrinfo=_fake_getaddrinfo(infos))
    result = r.lookup("x.test", soon())
    assert result.addresses == [ip("::1"), ip("127.0.0.1"), ip("127.0.0.2")]
    assert result.ttl is None


@pytest.mark.parametrize(
    ("code", "details"),
    [
        (socket.EAI_NONAME, "no such name: x.test"),
        (socket.EAI_AGAIN, "temporary failure for: x.test"),
        (socket.EAI_FAIL, "server failure (SERVFAIL) for: x.test"),
    ],
)
def test_system_resolver_failures(code: int, details: str) -> None:
    r = SystemResolver(getaddrinfo=_fake_getaddrinfo(error=socket.gaierror(code, "fake")))
    with pytest.raises(DnsError) as caught:
        r.resolve("x.test", soon())
    assert caught.value.details == details


def test_a_shortage_on_this_host_is_no_dns_error(dns_server: DnsServer) -> None:
    """Out of descriptors for the query's socket (or getaddrinfo's EAI_SYSTEM with EMFILE)
    is the proxy's own 503, not the nameserver's 502; and a cache in front keeps nothing."""
    failing = SystemResolver(getaddrinfo=_fake_getaddrinfo(error=OSError(errno.EMFILE, "fake")))
    with pytest.raises(OutOfResources):
        failing.resolve("x.test", soon())
    # The C library reports a lack of descriptors as anything, even "no such name": a
    # failure while no socket can be opened is the shortage, not the name's.
    noname = SystemResolver(
        getaddrinfo=_fake_getaddrinfo(error=socket.gaierror(socket.EAI_NONAME, "x"))
    )
    with no_descriptors_left(), pytest.raises(OutOfResources):
        noname.resolve("x.test", soon())
    with pytest.raises(DnsError):  # the same failure with descriptors to spare
        noname.resolve("x.test", soon())
    # A name IDNA refuses never reached the C library: no shortage can have caused it.
    idna = SystemResolver(getaddrinfo=_fake_getaddrinfo(error=UnicodeError("label too long")))
    with no_descriptors_left(), pytest.raises(DnsError):
        idna.resolve("x.test", soon())
    dns_server.add("short.test", a=["127.0.0.1"])
    cache = DnsCache(resolver(dns_server))
    with no_descriptors_left(), pytest.raises(OutOfResources) as caught:
        cache.resolve("short.test", soon())
    assert "open files" in caught.value.message and caught.value.status == 503
    assert cache.resolve("short.test", soon()) == [ip("127.0.0.1")]  # not kept as a failure


class _ShortOn(NameserverResolver):
    """Runs out of descriptors for the queries of the given record types, as when the
    last descriptor went to the other family's socket."""

    def __init__(self, server: DnsServer, *short: str) -> None:
        super().__init__([server.address])
        self.short = {dns.rdatatype.from_text(t) for t in short}

    def _query(self, qname: dns.name.Name, rdtype: int, deadline: float) -> Any:
        if rdtype in self.short:
            raise_if_short(OSError(errno.EMFILE, "fake"), f"looking up {qname}")
        return super()._query(qname, rdtype, deadline)


def test_a_shortage_on_one_family_keeps_the_others_answer(dns_server: DnsServer) -> None:
    """AAAA failing for want of a descriptor does not throw away A's addresses: they are
    returned, as partial. Without any address the shortage is the answer, a 503."""
    dns_server.add("half.test", a=["127.0.0.1"])
    result = _ShortOn(dns_server, "AAAA").lookup("half.test", soon())
    assert result.addresses == [ip("127.0.0.1")] and result.partial
    dns_server.add("half6.test", aaaa=["::1"])
    result = _ShortOn(dns_server, "A").lookup("half6.test", soon())
    assert result.addresses == [ip("::1")] and result.partial
    dns_server.add("empty.test", mode="noanswer")
    with pytest.raises(OutOfResources) as caught:
        _ShortOn(dns_server, "AAAA").lookup("empty.test", soon())
    assert caught.value.status == 503 and "open files" in caught.value.message
    with pytest.raises(OutOfResources):
        _ShortOn(dns_server, "A", "AAAA").lookup("half.test", soon())
    # NXDOMAIN is about the name (RFC 8020), whichever family says it.
    with pytest.raises(DnsError) as nx:
        _ShortOn(dns_server, "AAAA").lookup("nowhere.test", soon())
    assert "no such name" in nx.value.details


def test_system_resolver_without_addresses() -> None:
    r = SystemResolver(getaddrinfo=_fake_getaddrinfo([]))
    with pytest.raises(DnsError) as caught:
        r.resolve("x.test", soon())
    assert caught.value.details == "no address for: x.test"


def test_system_resolver_times_out_without_blocking_the_hub(
    ticker: Callable[[], Ticker],
) -> None:
    r = SystemResolver(getaddrinfo=_fake_getaddrinfo([_info("127.0.0.1")], delay=SHORT + 0.5))
    tick = ticker()
    deadline = soon(SHORT)
    with pytest.raises(DnsTimeout) as caught:
        r.resolve("x.test", deadline)
    end = time.monotonic()
    assert deadline <= end < deadline + LATE
    assert caught.value.details == f"no answer within {SHORT:.1f} s for: x.test"
    assert tick.stop() >= 5


# --- choosing a resolver ------------------------------------------------------------------


def test_make_resolver(dns_server: DnsServer) -> None:
    assert isinstance(make_resolver([]), SystemResolver)
    chosen: Resolver = make_resolver([dns_server.address])
    assert isinstance(chosen, NameserverResolver)
    assert chosen.nameservers == [dns_server.address]


def test_works_with_descriptors_above_1023(dns_server: DnsServer) -> None:
    """Under load the query sockets get numbers past select(2)'s reach."""
    dns_server.add("busy.test", a=["127.0.0.1"])
    with descriptors_above_1023():
        assert resolver(dns_server).resolve("busy.test", soon()) == [ip("127.0.0.1")]
