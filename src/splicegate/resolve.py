"""Name resolution that never blocks the gevent hub and always ends by an absolute deadline.

Two resolvers share one small interface (:class:`Resolver`), so the server and the cache in
front of it do not care where answers come from:

- :class:`SystemResolver` asks the C library (``getaddrinfo``), which honours
  ``/etc/hosts``, nsswitch and the system's ``resolv.conf``. The C call blocks, so it runs
  in gevent's hub threadpool and the handler greenlet only waits for it, up to the deadline.
  A call that is still running at the deadline is abandoned (a thread cannot be cancelled);
  it finishes on its own later and its result is dropped.
- :class:`NameserverResolver` speaks DNS itself (``--nameserver HOST:PORT``) over gevent
  sockets: A and AAAA queries at once over UDP, retransmitted and rotated across the
  nameservers, TCP when an answer is truncated. It knows record TTLs, which the cache uses.

Deadlines are ``time.monotonic()`` values, not durations, so that one budget
(``--dns-timeout``) covers every step of a lookup however many retries it takes. Failures
are raised as :class:`~splicegate.errors.DnsTimeout` (our own deadline expired, 504) or
:class:`~splicegate.errors.DnsError` (anything else, 502), with a body a person can act on.
"""

from __future__ import annotations

import _socket  # the C module: never monkey-patched, safe to call in a worker thread
import ipaddress
import socket
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import gevent
from gevent import socket as gsocket

from splicegate.errors import (
    SHORTAGES,
    DnsError,
    DnsTimeout,
    OutOfResources,
    out_of_resources,
    raise_if_short,
)
from splicegate.request import show_address
from splicegate.waiting import READ, ready

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

__all__ = [
    "IPAddress",
    "NameserverResolver",
    "Resolution",
    "Resolver",
    "SystemResolver",
    "make_resolver",
]


class Resolver(Protocol):
    """What the server needs from a resolver.

    ``resolve`` is called only for names; the caller handles IP literals itself. It returns
    at least one address, or raises ``DnsTimeout`` once ``deadline`` (a
    ``time.monotonic()`` value) has passed, or ``DnsError`` for any other failure.
    """

    def resolve(self, host: str, deadline: float) -> list[IPAddress]: ...


@dataclass(frozen=True, slots=True)
class Resolution:
    """Addresses and, where the resolver knows it, the smallest TTL on the way to them.

    The cache (DESIGN.md, step 9) keeps an answer for its TTL when there is one and for a
    fixed time when there is not (getaddrinfo does not report TTLs); ``ttl`` is ``None``
    then. ``partial`` says that one address family had no definite answer (still pending
    when the lookup stopped waiting for it, or a server failure): the addresses are good to
    dial now, but the cache keeps them only briefly, so that a slow or failed AAAA query
    does not cost a name its IPv6 addresses for a whole TTL.
    """

    addresses: list[IPAddress]
    ttl: int | None = None
    partial: bool = False


# --- error messages: the response body a person reads, and the short Proxy-Status details


def _timeout_error(host: str, budget: float) -> DnsTimeout:
    return DnsTimeout(
        f"no DNS answer for {host} within {budget:.1f} s; the nameserver may be down, slow "
        f"or unreachable, try again or check the resolver configuration",
        details=f"no answer within {budget:.1f} s for: {host}",
    )


def _nxdomain_error(host: str) -> DnsError:
    return DnsError(
        f"the name {host} does not exist (NXDOMAIN); check the spelling of the host name",
        details=f"no such name: {host}",
        rcode="NXDOMAIN",
    )


def _servfail_error(host: str) -> DnsError:
    return DnsError(
        f"the DNS server failed to resolve {host} (SERVFAIL); the name's own nameservers may "
        f"be broken, try again later",
        details=f"server failure (SERVFAIL) for: {host}",
        rcode="SERVFAIL",
    )


def _refused_error(host: str) -> DnsError:
    return DnsError(
        f"the DNS server refused to resolve {host} (REFUSED); check that the configured "
        f"nameserver answers recursive queries from this proxy",
        details=f"query refused (REFUSED) for: {host}",
        rcode="REFUSED",
    )


def _rcode_error(host: str, rcode: str) -> DnsError:
    return DnsError(
        f"the DNS server could not resolve {host} (it answered {rcode})",
        details=f"{rcode} for: {host}",
        rcode=rcode,
    )


def _no_address_error(host: str) -> DnsError:
    return DnsError(
        f"the name {host} has no IPv4 or IPv6 address (no A or AAAA record)",
        details=f"no address for: {host}",
    )


def _invalid_name_error(host: str) -> DnsError:
    return DnsError(
        f"the host name {host!r} is not a valid DNS name; check the spelling",
        details=f"invalid name: {host}",
    )


def _unreachable_error(host: str, why: str) -> DnsError:
    return DnsError(
        f"could not ask any nameserver about {host} ({why}); check the --nameserver setting",
        details=f"nameserver unreachable for: {host}",
    )


def _dedup(addresses: Iterable[IPAddress]) -> list[IPAddress]:
    """Drop repeats but keep the first position of each: order is the caller's preference."""
    return list(dict.fromkeys(addresses))


# --- the system resolver


GetAddrInfo = Callable[..., list[tuple[Any, ...]]]


class SystemResolver:
    """getaddrinfo in gevent's hub threadpool, awaited until the deadline.

    ``getaddrinfo`` is a parameter only so tests can stand in a slow or failing one without
    sending a query off the machine; the default is the C module's function, which gevent's
    monkey-patching (in an embedding app) never replaces, so the worker thread never touches
    a gevent hub.
    """

    def __init__(self, getaddrinfo: GetAddrInfo = _socket.getaddrinfo) -> None:
        self._getaddrinfo = getaddrinfo

    def resolve(self, host: str, deadline: float) -> list[IPAddress]:
        return self.lookup(host, deadline).addresses

    def _getaddrinfo_caught(self, host: str) -> tuple[list[tuple[Any, ...]], Exception | None]:
        """Runs in the worker thread. A failure is returned, not raised: gevent's threadpool
        prints a traceback to stderr for every exception, and NXDOMAIN is no bug."""
        try:
            return self._getaddrinfo(host, None, socket.AF_UNSPEC, socket.SOCK_STREAM), None
        except Exception as exc:
            if not isinstance(exc, OSError):
                return [], exc  # a name IDNA refused: the C library never saw it
            # The C library reports a lack of descriptors as anything, even "no such name":
            # a failure while no socket can be opened is that shortage.
            try:
                _socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close()
            except OSError as probe:
                if probe.errno in SHORTAGES:
                    return [], probe
            return [], exc

    def lookup(self, host: str, deadline: float) -> Resolution:
        """Addresses in getaddrinfo's order (it already applies RFC 6724), without TTL."""
        budget = deadline - time.monotonic()
        if budget <= 0:
            raise _timeout_error(host, max(budget, 0.0))
        job = gevent.get_hub().threadpool.spawn(self._getaddrinfo_caught, host)
        # wait() rather than get(timeout=): a gevent.Timeout raised by the caller around us
        # must propagate as itself, not be mistaken for our own deadline.
        job.wait(timeout=max(deadline - time.monotonic(), 0.0))
        if not job.ready():
            raise _timeout_error(host, budget)
        infos, failure = job.value
        if failure is not None:
            raise _map_getaddrinfo_error(host, failure)
        addresses: list[IPAddress] = []
        for family, _type, _proto, _canon, sockaddr in infos:
            if family in (socket.AF_INET, socket.AF_INET6):
                addresses.append(ipaddress.ip_address(sockaddr[0]))
        if not addresses:
            raise _no_address_error(host)
        return Resolution(_dedup(addresses), None)


def _map_getaddrinfo_error(host: str, exc: BaseException | None) -> DnsError | OutOfResources:
    """Turn what getaddrinfo raised into a DnsError a person can act on."""
    if isinstance(exc, UnicodeError | ValueError):
        # The IDNA codec rejects empty or over-long labels before any query is sent.
        return _invalid_name_error(host)
    if isinstance(exc, OSError) and exc.errno in SHORTAGES:  # EAI_SYSTEM, or the probe's
        return out_of_resources(exc.errno, f"looking up {host}")
    if isinstance(exc, socket.gaierror):
        code = exc.errno
        if code == socket.EAI_NONAME:
            return _nxdomain_error(host)
        if code == getattr(socket, "EAI_NODATA", None):
            return _no_address_error(host)
        if code == socket.EAI_AGAIN:
            return DnsError(
                f"temporary failure resolving {host}: the system resolver got no answer "
                f"from its nameservers; try again, or check /etc/resolv.conf",
                details=f"temporary failure for: {host}",
            )
        if code == socket.EAI_FAIL:
            return _servfail_error(host)
        reason = exc.strerror or str(exc)
        return DnsError(
            f"the system resolver could not resolve {host}: {reason}",
            details=f"resolver error for: {host}",
        )
    return DnsError(
        f"the system resolver could not resolve {host}: {exc}",
        details=f"resolver error for: {host}",
    )


# --- the nameserver resolver


@dataclass(slots=True)
class _Outcome:
    """How one query (one record type) ended."""

    addresses: list[IPAddress] = field(default_factory=list)
    ttl: int | None = None
    rcode: int = dns.rcode.NOERROR
    unreachable: str | None = None  # why no nameserver could be asked at all
    timed_out: bool = False
    shortage: OutOfResources | None = None  # this host ran short: not the name's failure
    crash: BaseException | None = None  # a bug, re-raised in the caller's greenlet


#: RFC 8305 §3 "Resolution Delay": how long to wait for AAAA once a positive A answer is in.
RESOLUTION_DELAY = 0.05


class NameserverResolver:
    """Resolve with the given nameservers, A and AAAA in parallel, over gevent sockets.

    Each query has its own connected UDP socket per nameserver (a fresh random source port
    and id, and the kernel drops packets from any other source); a reply must also carry
    our id and question or it is ignored as stray. Without an answer after
    ``retry_interval`` the query goes to the next nameserver in turn (with one nameserver,
    it is retransmitted). SERVFAIL, REFUSED or an ICMP error from one nameserver moves on
    to the next at once; the failure is reported only when every nameserver gave one.

    Happy Eyeballs v2 (RFC 8305 §3): when A answers with addresses first, AAAA gets
    ``resolution_delay`` more (50 ms) and is then given up, so that a nameserver that drops
    AAAA queries costs 50 ms, not the whole ``--dns-timeout``. When AAAA answers first, A
    gets longer: ``retry_interval`` and the resolution delay, time for a lost A packet to be
    resent and answered. The answer is a list handed to the dialer in one piece, and IPv6
    alone would take away the IPv4 fallback that Happy Eyeballs exists for; but a
    nameserver that never answers A must not cost the whole deadline either, nor turn the
    IPv6 answer in hand into a timeout. Either family is given up a little before the
    deadline at the latest, so that the caller, whose own wait ends at the deadline, gets
    the addresses rather than a timeout.
    """

    MAX_UDP = 65535

    def __init__(
        self,
        nameservers: Sequence[tuple[str, int]],
        *,
        retry_interval: float = 1.0,
        udp_payload: int = 1232,
        resolution_delay: float = RESOLUTION_DELAY,
    ) -> None:
        if not nameservers:
            raise ValueError("NameserverResolver needs at least one nameserver")
        servers: list[tuple[str, int]] = []
        for host, port in nameservers:
            address = ipaddress.ip_address(host.strip("[]"))  # an IP literal, not a name
            if not 0 < int(port) < 65536:
                raise ValueError(f"nameserver port out of range: {port}")
            servers.append((str(address), int(port)))
        self.nameservers = servers
        self.retry_interval = retry_interval
        # 1232 bytes: the EDNS buffer size recommended by DNS Flag Day 2020 (no IP
        # fragmentation); larger answers come back truncated and are fetched over TCP.
        self.udp_payload = udp_payload
        self.resolution_delay = resolution_delay

    def resolve(self, host: str, deadline: float) -> list[IPAddress]:
        return self.lookup(host, deadline).addresses

    def lookup(self, host: str, deadline: float) -> Resolution:
        """AAAA answers then A answers, deduplicated, with the smallest TTL seen.

        Ends by the deadline; or, when one family has answered with addresses and the
        other has not, once that one's patience is out (``resolution_delay`` for AAAA,
        ``retry_interval`` and that for A), with the result ``partial``.
        """
        budget = deadline - time.monotonic()
        try:
            return Resolution([ipaddress.ip_address(host)], None)
        except ValueError:
            pass
        try:
            qname = dns.name.from_text(host)
        except (dns.exception.DNSException, UnicodeError, ValueError):
            raise _invalid_name_error(host) from None
        if budget <= 0:
            raise _timeout_error(host, max(budget, 0.0))

        jobs = {
            rdtype: gevent.spawn(self._query_guarded, qname, rdtype, deadline)
            for rdtype in (dns.rdatatype.AAAA, dns.rdatatype.A)
        }
        # A family still pending once the other has addresses is waited for until
        # ``other_by``, set then; never until the deadline itself (see the class docstring).
        other_by: float | None = None
        last_call = deadline - min(self.resolution_delay, budget / 10)
        patience = {
            dns.rdatatype.AAAA: self.resolution_delay,  # after a positive A
            dns.rdatatype.A: self.retry_interval + self.resolution_delay,  # after AAAA
        }
        try:
            # Bounded by the deadline: each pass either sees a query finish (both end by
            # the deadline on their own) or waits until the deadline or ``other_by``, and a
            # pass at or after the deadline always decides.
            while True:
                pending = [t for t, job in jobs.items() if not job.ready()]
                done = {t: job.value for t, job in jobs.items() if job.ready()}
                now = time.monotonic()
                waiting_for_one = len(pending) == 1 and any(o.addresses for o in done.values())
                if waiting_for_one and other_by is None:
                    other_by = min(now + patience[pending[0]], last_call)
                final = now >= deadline or (other_by is not None and now >= other_by)
                result = self._decide(host, budget, done, pending, final=final)
                if result is not None:
                    return result
                wake = other_by if other_by is not None else deadline
                gevent.wait(
                    [jobs[t] for t in pending],
                    timeout=max(wake - time.monotonic(), 0.0),
                    count=1,
                )
        finally:
            # Also runs when the caller is killed or times out around us: no query outlives it.
            gevent.killall([job for job in jobs.values() if not job.dead], timeout=1.0)

    def _decide(
        self,
        host: str,
        budget: float,
        done: dict[int, _Outcome],
        pending: list[int],
        *,
        final: bool,
    ) -> Resolution | None:
        """The answer once it is known; None to keep waiting. Raises the lookup's error."""
        for outcome in done.values():
            if outcome.crash is not None:
                raise outcome.crash
        have = any(o.addresses for o in done.values())
        if not have and any(o.rcode == dns.rcode.NXDOMAIN for o in done.values()):
            # NXDOMAIN is about the name, not a record type (RFC 8020): no need to wait.
            raise _nxdomain_error(host)
        if pending and not final:
            return None
        if have:
            # A family still pending now is given up; what we have is returned. Only
            # NOERROR (with or without records) and NXDOMAIN are definite answers for a
            # family; anything else makes the result partial (kept briefly by the cache).
            aaaa = done.get(dns.rdatatype.AAAA, _Outcome())
            a = done.get(dns.rdatatype.A, _Outcome())
            ttls = [o.ttl for o in (aaaa, a) if o.addresses and o.ttl is not None]
            partial = bool(pending) or any(
                o.timed_out
                or o.unreachable is not None
                or o.shortage is not None
                or o.rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN)
                for o in done.values()
            )
            return Resolution(
                _dedup([*aaaa.addresses, *a.addresses]), min(ttls, default=None), partial
            )
        # Without an address, this host's own shortage is what to report (a 503): it may
        # well be why the other family failed too, and a retry may fare better.
        for outcome in done.values():
            if outcome.shortage is not None:
                raise outcome.shortage
        if pending or any(o.timed_out for o in done.values()):
            raise _timeout_error(host, budget)
        # Both finished without an address: report the most telling failure.
        rcodes = [o.rcode for o in done.values()]
        if dns.rcode.SERVFAIL in rcodes:
            raise _servfail_error(host)
        if dns.rcode.REFUSED in rcodes:
            raise _refused_error(host)
        for rcode in rcodes:
            if rcode != dns.rcode.NOERROR:
                raise _rcode_error(host, dns.rcode.to_text(rcode))
        for outcome in done.values():
            if outcome.unreachable is not None:
                raise _unreachable_error(host, outcome.unreachable)
        raise _no_address_error(host)

    def _query_guarded(self, qname: dns.name.Name, rdtype: int, deadline: float) -> _Outcome:
        """Run one query; a bug comes back as a value so the greenlet never dies noisily.
        A shortage is kept apart from a bug: it fails one family, and an answer the other
        family already has still reaches the dialer."""
        try:
            return self._query(qname, rdtype, deadline)
        except OutOfResources as exc:
            return _Outcome(shortage=exc)
        except Exception as exc:
            return _Outcome(crash=exc)

    def _query(self, qname: dns.name.Name, rdtype: int, deadline: float) -> _Outcome:
        """One record type: UDP with retransmission and rotation, TCP on truncation."""
        query = dns.message.make_query(qname, rdtype, use_edns=0, payload=self.udp_payload)
        wire = query.to_wire()
        sockets: dict[tuple[str, int], gsocket.socket] = {}
        owner: dict[gsocket.socket, tuple[str, int]] = {}
        failed: dict[tuple[str, int], _Outcome] = {}
        turn = 0
        next_send = time.monotonic()
        try:
            # Bounded by the deadline: every pass sends, receives, or waits until the next
            # send or the deadline, whichever comes first.
            while True:
                now = time.monotonic()
                if now >= deadline:
                    return _Outcome(timed_out=True)
                live = [s for s in self.nameservers if s not in failed]
                if not live:
                    return self._all_failed(failed)
                if now >= next_send:
                    server = live[turn % len(live)]
                    turn += 1
                    next_send = now + self.retry_interval
                    try:
                        sock = sockets.get(server)
                        if sock is None:
                            sock = _udp_socket(server)
                            sockets[server] = sock
                            owner[sock] = server
                        sock.send(wire)
                    except OSError as exc:
                        raise_if_short(exc, f"looking up {qname.to_text(True)}")
                        failed[server] = _Outcome(unreachable=_why(server, exc))
                        next_send = now
                        continue
                wait = max(min(next_send, deadline) - time.monotonic(), 0.0)
                watched = [s for srv, s in sockets.items() if srv not in failed]
                readable = ready(watched, READ, wait)
                for sock in [s for s in watched if s.fileno() in readable]:
                    server = owner[sock]
                    if server in failed:
                        continue
                    try:
                        data = sock.recv(self.MAX_UDP)
                    except BlockingIOError:
                        continue
                    except OSError as exc:  # ICMP port/host unreachable from this server
                        failed[server] = _Outcome(unreachable=_why(server, exc))
                        next_send = time.monotonic()
                        continue
                    response, truncated = _parse_reply(query, data)
                    if response is None:
                        continue  # stray, spoofed or garbled: keep waiting for the real one
                    if truncated:
                        try:
                            response = _query_tcp(server, query, wire, deadline)
                        except TimeoutError:
                            continue  # the deadline is (about to be) over; the loop ends it
                        if response is None:
                            failed[server] = _Outcome(
                                unreachable=f"{show_address(server)}: no answer over TCP"
                            )
                            next_send = time.monotonic()
                            continue
                    outcome = _interpret(response)
                    if outcome.rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                        return outcome
                    failed[server] = outcome  # SERVFAIL, REFUSED, ...: ask the next one
                    next_send = time.monotonic()
        finally:
            for sock in sockets.values():
                sock.close()

    @staticmethod
    def _all_failed(failed: dict[tuple[str, int], _Outcome]) -> _Outcome:
        """Every nameserver failed: an answered rcode is more telling than silence."""
        outcomes = list(failed.values())
        for outcome in reversed(outcomes):
            if outcome.unreachable is None:
                return outcome
        return _Outcome(unreachable="; ".join(o.unreachable or "" for o in outcomes))


def _why(server: tuple[str, int], exc: OSError) -> str:
    return f"{show_address(server)}: {exc.strerror or exc}"


def _udp_socket(server: tuple[str, int]) -> gsocket.socket:
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    sock = gsocket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.connect(server)
    except BaseException:
        sock.close()
        raise
    return sock


def _parse_reply(
    query: dns.message.Message, data: bytes
) -> tuple[dns.message.Message | None, bool]:
    """The reply if it answers ``query`` (id, flags, question), and whether it is truncated."""
    truncated = False
    try:
        response = dns.message.from_wire(data, raise_on_truncation=True)
    except dns.message.Truncated as exc:
        response = exc.message()
        truncated = True
    except Exception:  # untrusted bytes: any parse failure means "not our answer"
        return None, False
    try:
        if not query.is_response(response):
            return None, False
    except Exception:
        return None, False
    return response, truncated


def _recv_exactly(sock: gsocket.socket, size: int, deadline: float) -> bytes:
    chunks: list[bytes] = []
    got = 0
    while got < size:  # bounded: each pass receives at least one byte or raises
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("deadline")
        sock.settimeout(remaining)
        chunk = sock.recv(size - got)
        if not chunk:
            raise ConnectionError("nameserver closed the TCP connection early")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _query_tcp(
    server: tuple[str, int], query: dns.message.Message, wire: bytes, deadline: float
) -> dns.message.Message | None:
    """The full answer over TCP (RFC 7766) after a truncated UDP one.

    None when this nameserver failed us (so the next one is asked); TimeoutError when the
    deadline ran out, which is the caller's timeout, not this nameserver's failure.
    """
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("deadline")
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    try:
        sock = gsocket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(remaining)
            sock.connect(server)
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.sendall(struct.pack("!H", len(wire)) + wire)
            (length,) = struct.unpack("!H", _recv_exactly(sock, 2, deadline))
            response = dns.message.from_wire(_recv_exactly(sock, length, deadline))
            return response if query.is_response(response) else None
        finally:
            sock.close()
    except TimeoutError:
        raise
    except OSError as exc:
        raise_if_short(exc, "asking a nameserver over TCP")
        return None
    except (dns.exception.DNSException, ValueError, struct.error):
        return None


def _interpret(response: dns.message.Message) -> _Outcome:
    """Addresses at the end of the CNAME chain inside the answer section, with its TTL."""
    rcode = response.rcode()
    if rcode != dns.rcode.NOERROR:  # NXDOMAIN, SERVFAIL, REFUSED, ...
        return _Outcome(rcode=rcode)
    try:
        chain = response.resolve_chaining()
    except dns.exception.DNSException:  # chain too long, malformed question
        return _Outcome(rcode=rcode)
    if chain.answer is None:
        return _Outcome(rcode=rcode)  # NODATA, or a CNAME chain leaving the answer section
    addresses = [ipaddress.ip_address(rdata.address) for rdata in chain.answer]
    return _Outcome(addresses=_dedup(addresses), ttl=chain.minimum_ttl, rcode=rcode)


def make_resolver(nameservers: Sequence[tuple[str, int]] | None) -> Resolver:
    """The resolver for a config: the given nameservers, else the system's."""
    if nameservers:
        return NameserverResolver(nameservers)
    return SystemResolver()
