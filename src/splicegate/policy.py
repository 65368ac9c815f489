"""Who may use the proxy, and where it may connect.

The destination table is explicit CIDRs, not ``ipaddress.is_global``: that property's
answers changed across Python versions and it knows nothing of NAT64. An IPv6 address that
carries an IPv4 one (mapped, NAT64, 6to4) is judged by the IPv4 address, so ``::ffff:10.0.0.1``
is as private as ``10.0.0.1``. Destinations are checked on every address actually dialled,
after resolution, so a name cannot smuggle a denied address in (DNS rebinding).
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import re
import socket
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from splicegate.errors import (
    ClientDenied,
    DestinationDenied,
    DomainDenied,
    PortDenied,
    ProxyLoop,
    raise_if_short,
)
from splicegate.request import show_address

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052 well-known prefix


def embedded_ipv4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for: mapped, NAT64 (RFC 6052) or 6to4 (RFC 3056)."""
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr in _NAT64:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return addr.sixtofour


def _unmapped(addr: IPAddress) -> IPAddress:
    mapped = addr.ipv4_mapped if isinstance(addr, ipaddress.IPv6Address) else None
    return mapped or addr


def effective(addr: IPAddress) -> IPAddress:
    """The address a rule is judged against: the embedded IPv4 one where there is one."""
    if isinstance(addr, ipaddress.IPv6Address):
        return embedded_ipv4(addr) or addr
    return addr


def judged_network(net: IPNetwork) -> IPNetwork:
    """A rule's network as addresses are judged: an IPv4-mapped one (``::ffff:a.b.c.d/N``,
    N >= 96) as the IPv4 network it stands for. An address is judged by its embedded IPv4
    one (:func:`effective`), so a rule written in the mapped form would never match."""
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96:
        mapped = net.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, net.prefixlen - 96))
    return net


# Denied by default (IANA special-purpose registries, RFC 6890 and successors). Everything
# else is allowed. Each entry names why, so a refusal can tell the operator what to allow.
DEFAULT_DENIED_DESTINATIONS: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "'this network' / unspecified"),
    ("10.0.0.0/8", "private network"),
    ("100.64.0.0/10", "carrier-grade NAT"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local (cloud metadata lives here)"),
    ("172.16.0.0/12", "private network"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "6to4 relay anycast"),
    ("192.168.0.0/16", "private network"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("255.255.255.255/32", "broadcast"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::/8", "reserved"),
    ("64:ff9b:1::/48", "local-use NAT64"),
    ("100::/64", "discard-only"),
    ("2001::/23", "IETF protocol assignments"),
    ("2001:db8::/32", "documentation"),
    ("3fff::/20", "documentation"),
    ("5f00::/16", "segment routing"),
    ("fc00::/7", "unique-local"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local"),
    ("ff00::/8", "multicast"),
)

# Squid's localnet plus loopback: who may use a proxy that nobody configured yet.
DEFAULT_ALLOWED_CLIENTS: tuple[str, ...] = (
    "127.0.0.0/8",
    "::1/128",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "fc00::/7",
    "fe80::/10",
)


@dataclass(frozen=True, slots=True)
class Rule:
    network: IPNetwork
    allow: bool
    why: str


class AddressTable:
    """Longest-prefix match over allow and deny rules.

    Rules are added in rising precedence: a later rule for the same prefix replaces an
    earlier one. So operator rules override defaults, and an operator's deny wins a tie with
    an operator's allow. An address no rule covers gets ``default``.
    """

    def __init__(self, rules: Iterable[Rule], default: Rule) -> None:
        self._default = default
        # per IP version: prefix length -> network address as int -> rule
        self._by_len: dict[int, dict[int, dict[int, Rule]]] = {4: {}, 6: {}}
        for rule in rules:
            net = rule.network
            self._by_len[net.version].setdefault(net.prefixlen, {})[int(net.network_address)] = rule
        self._lengths = {v: sorted(t, reverse=True) for v, t in self._by_len.items()}

    def lookup(self, addr: IPAddress) -> Rule:
        bits = addr.max_prefixlen
        value = int(addr)
        table = self._by_len[addr.version]
        for plen in self._lengths[addr.version]:
            key = value >> (bits - plen) << (bits - plen) if plen else 0
            rule = table[plen].get(key)
            if rule is not None:
                return rule
        return self._default


def parse_network(text: str) -> IPNetwork:
    """A CIDR or a single address; host bits set are an error, as they are a typo."""
    try:
        return ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a network: {exc}") from None


@dataclass(frozen=True, slots=True)
class PortRange:
    low: int
    high: int

    def __contains__(self, port: int) -> bool:
        return self.low <= port <= self.high

    def __str__(self) -> str:
        if (self.low, self.high) == (1, 65535):
            return "any"
        return str(self.low) if self.low == self.high else f"{self.low}-{self.high}"


def parse_port_spec(text: str) -> PortRange:
    """``443``, ``8000-8100`` or ``any``."""
    spec = text.strip().lower()
    if spec == "any":
        return PortRange(1, 65535)
    low, sep, high = spec.partition("-")
    try:
        rng = PortRange(int(low), int(high) if sep else int(low))
    except ValueError:
        raise ValueError(f"{text!r} is not a port, a range like 8000-8100, or 'any'") from None
    if not 1 <= rng.low <= rng.high <= 65535:
        raise ValueError(f"{text!r}: ports run from 1 to 65535, low to high")
    return rng


@dataclass(frozen=True, slots=True)
class Listener:
    """A listening address, for the proxy-loop check."""

    address: IPAddress
    port: int


def socket_address(host: str) -> IPAddress:
    """An address as a socket gives it (an IPv6 one may carry a %zone)."""
    return ipaddress.ip_address(host.partition("%")[0])


def _is_local_address(addr: IPAddress) -> bool:
    """Whether an address belongs to this host: binding to it succeeds only if it does.

    Multicast and broadcast addresses bind too, yet no connection to one reaches a listener;
    an IPv6 link-local one cannot be bound or reached without a zone. Neither is ever this
    proxy. Any other refusal to bind (EINVAL, EACCES) means the address is not usable here.

    Not cached here: addresses come and go while the proxy runs, and a Policy (rebuilt at
    each reload) already remembers the destinations it has judged."""
    if addr.is_loopback:
        return True
    if addr.is_multicast or addr == _BROADCAST or (addr.version == 6 and addr.is_link_local):
        return False
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    try:
        probe = socket.socket(family, socket.SOCK_DGRAM)
    except OSError as exc:
        raise_if_short(exc, "checking the target against its own addresses")
        return False  # no such family here (EAFNOSUPPORT): nothing of ours is in it
    with probe:
        try:
            probe.bind((str(addr), 0))
        except OSError:
            return False
        return addr.version == 6 or addr not in broadcast_addresses(probe)


_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
#: <linux/sockios.h>: an interface's IPv4 broadcast address
_SIOCGIFBRDADDR = 0x8919


def broadcast_addresses(probe: socket.socket) -> frozenset[ipaddress.IPv4Address]:
    """The IPv4 broadcast addresses of this host's interfaces (x.y.z.255 on a /24), asked
    through ``probe``, an AF_INET socket: they bind like its own addresses, yet no
    connection to one reaches a listener. Read anew each time: interfaces come and go, and
    only a bind that succeeded asks."""
    found: set[ipaddress.IPv4Address] = set()
    for _, name in socket.if_nameindex():
        request = struct.pack("256s", name.encode()[:15])
        try:
            reply = fcntl.ioctl(probe.fileno(), _SIOCGIFBRDADDR, request)
        except OSError:  # no IPv4 address on it, or no broadcast
            continue
        address = ipaddress.IPv4Address(reply[20:24])
        if not address.is_unspecified:
            found.add(address)
    return frozenset(found)


@dataclass(slots=True)
class Policy:
    """Client, port, domain, destination and self-loop checks (DESIGN.md steps 5, 7, 8, 10;
    domain rules before resolution, step 9)."""

    allow_client: Sequence[IPNetwork] = ()
    allow_port: Sequence[PortRange] = ()
    allow_dest: Sequence[IPNetwork] = ()
    deny_dest: Sequence[IPNetwork] = ()
    listeners: list[Listener] = field(default_factory=list)
    allow_domain: Sequence[DomainRule] = ()
    deny_domain: Sequence[DomainRule] = ()
    _clients: AddressTable = field(init=False)
    _dests: AddressTable = field(init=False)
    _domains: DomainRules = field(init=False)
    _passed: dict[tuple, Any] = field(init=False)

    #: checks remembered once passed (refusals are judged afresh, so each gets its own
    #: message): every CONNECT runs them, with the same few clients and targets again and
    #: again, and the policy never changes (a reload builds a new one)
    memo_size = 4096

    def __post_init__(self) -> None:
        self._passed = {}
        clients = self.allow_client or [parse_network(n) for n in DEFAULT_ALLOWED_CLIENTS]
        self._clients = AddressTable(
            (Rule(judged_network(n), True, "--allow-client") for n in clients),
            Rule(ipaddress.ip_network("::/0"), False, "not in --allow-client"),
        )
        if not self.allow_port:
            self.allow_port = (PortRange(443, 443),)
        rules = [Rule(parse_network(n), False, why) for n, why in DEFAULT_DENIED_DESTINATIONS]
        rules += [Rule(judged_network(n), True, "--allow-dest") for n in self.allow_dest]
        rules += [Rule(judged_network(n), False, "--deny-dest") for n in self.deny_dest]
        self._dests = AddressTable(rules, Rule(ipaddress.ip_network("::/0"), True, "default"))
        self._domains = DomainRules(self.allow_domain, self.deny_domain)

    def _remember(self, key: tuple, value: Any) -> None:
        if len(self._passed) >= self.memo_size:
            self._passed.clear()
        self._passed[key] = value

    def admit_client(self, host: str) -> None:
        """check_client for an accepted connection's address as the socket gives it."""
        key = ("client", host)
        if key not in self._passed:
            self.check_client(socket_address(host))
            self._remember(key, True)

    def admit_target(self, host: str, port: int, literal: bool) -> None:
        """check_port, then check_domain (before any DNS query)."""
        key = ("target", host, port, literal)
        if key not in self._passed:
            self.check_port(port)
            self.check_domain(host, literal)
            self._remember(key, True)

    def destinations(
        self, host: str, port: int, addresses: Sequence[IPAddress]
    ) -> tuple[IPAddress, ...]:
        """check_not_self for each address, then allowed_destinations."""
        key = ("dest", host, port, tuple(addresses), len(self.listeners))
        allowed = self._passed.get(key)
        if allowed is None:
            for addr in addresses:
                self.check_not_self(addr, port)
            allowed = tuple(self.allowed_destinations(host, addresses))
            self._remember(key, allowed)
        return allowed

    def check_client(self, addr: IPAddress) -> None:
        addr = effective(addr)
        if not self._clients.lookup(addr).allow:
            net = ipaddress.ip_network(addr)
            raise ClientDenied(
                f"client {addr} may not use this proxy; allow it with --allow-client {net}",
                details=f"client {addr} not allowed",
            )

    def check_port(self, port: int) -> None:
        if not any(port in rng for rng in self.allow_port):
            raise PortDenied(
                f"port {port} is not allowed; allow it with --allow-port {port}",
                details=f"port {port} not allowed",
            )

    def check_domain(self, host: str, literal: bool) -> None:
        """--allow-domain and --deny-domain, before DNS: DomainDenied names the rule."""
        self._domains.check(host, literal)

    def check_not_self(self, addr: IPAddress, port: int) -> None:
        """Refuse a CONNECT to one of our own listeners, which would loop forever (or
        reach the admin endpoint). Only an IPv4-mapped address reaches an IPv4 listener:
        a NAT64 or 6to4 one goes out through a gateway, unlike the destination rules'
        look-through. A listener on 0.0.0.0 takes IPv4 alone; one on :: may take both
        (whether it is IPv6-only is the socket's business, and refusing is the safe side).
        A target of 0.0.0.0 or :: is this host too (Linux connects it to loopback), so it
        is every listener of its family on that port."""
        addr = _unmapped(addr)
        for listener in self.listeners:
            if listener.port != port:
                continue
            mine = _unmapped(listener.address)
            if (
                mine == addr
                or (addr.is_unspecified and addr.version == mine.version)
                or (
                    mine.is_unspecified
                    and (mine.version == 6 or addr.version == 4)
                    and _is_local_address(addr)
                )
            ):
                shown = show_address((str(addr), port))
                raise ProxyLoop(
                    f"{shown} is this proxy itself; a CONNECT there would loop",
                    details=f"{shown} is this proxy",
                )

    def allowed_destinations(self, host: str, addresses: Sequence[IPAddress]) -> list[IPAddress]:
        """The addresses that may be dialled, or DestinationDenied naming the rule."""
        allowed = []
        denied: list[tuple[IPAddress, Rule]] = []
        for addr in addresses:
            rule = self._dests.lookup(effective(addr))
            if rule.allow:
                allowed.append(addr)
            else:
                denied.append((addr, rule))
        if allowed:
            return allowed
        addr, rule = denied[0]
        eff = effective(addr)
        shown = addr if str(addr) == host else f"{host} ({addr})"
        if rule.why == "--deny-dest":
            hint = f"{eff} is denied by --deny-dest {rule.network}"
        else:
            hint = (
                f"{eff} is in {rule.network} ({rule.why}), denied by default; "
                f"allow it with --allow-dest {ipaddress.ip_network(eff)}"
            )
        raise DestinationDenied(
            f"connecting to {shown} is not allowed: {hint}",
            details=f"{eff} is in {rule.network}",
        )


# --- domain rules (--allow-domain, --deny-domain) -------------------------------------------
# Checked on the name in the CONNECT target, before any DNS query, as Squid's dstdomain: a
# denied name is never looked up. Rules match names only, as dstdomain does: "example.com"
# is that name, ".example.com" the name and every name under it. A deny rule never matches an
# IP-literal target (a name rule cannot know which addresses are "its"), but an allow list
# is a list of what may be reached, so once one exists a literal is denied like any other
# target it does not list, unless a rule names that very address (--allow-domain
# 192.0.2.10); otherwise writing the address would bypass the list. An address is refused
# as a deny rule (--deny-dest is the rule for addresses). The destination table still
# judges every address dialled, names and literals alike.

_DOMAIN_LABEL = re.compile(r"[a-z0-9_](?:[-a-z0-9_]{0,61}[a-z0-9_])?")


@dataclass(frozen=True, slots=True)
class DomainRule:
    """``example.com`` (exact), ``.example.com`` (it and its subdomains), or an address."""

    name: str  # lower case, no leading or final dot; an address in its canonical form
    subdomains: bool

    def __str__(self) -> str:
        return "." + self.name if self.subdomains else self.name


def parse_domain_rule(text: str) -> DomainRule:
    """A domain rule as written on the command line; ValueError says what is allowed."""
    if isinstance(text, DomainRule):
        return text
    spec = str(text).strip().lower()
    subdomains = spec.startswith(".")
    name = spec[1:] if subdomains else spec
    name = name.removesuffix(".")
    if not subdomains:
        literal = name[1:-1] if name.startswith("[") and name.endswith("]") else name
        with contextlib.suppress(ValueError):
            return DomainRule(str(ipaddress.ip_address(literal)), False)
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_DOMAIN_LABEL.fullmatch(x) for x in labels):
        raise ValueError(
            f"{text!r} is not a domain: write example.com for that name, .example.com for it "
            "and its subdomains (names in ASCII; internationalised ones as xn--...)"
        )
    if labels[-1].isdigit():
        raise ValueError(f"{text!r}: a name's last label is not all digits; is it an address?")
    return DomainRule(name, subdomains)


def parse_deny_domain_rule(text: str) -> DomainRule:
    """A --deny-domain rule: a name, never an address. A deny rule written as an address
    would judge the target as written, which another spelling of the same address gets
    past (``[::ffff:192.0.2.10]``); --deny-dest judges every address dialled, in every
    form, names' addresses too."""
    rule = parse_domain_rule(text)
    try:
        address = ipaddress.ip_address(rule.name)
    except ValueError:
        return rule
    raise ValueError(
        f"{text!r} is an address, which --deny-domain does not judge (it matches names); "
        f"deny it with --deny-dest {address}/{address.max_prefixlen}, which covers every "
        "form of it"
    )


class DomainRules:
    """The allow and deny lists: deny wins; with any allow rule, what it does not list is
    denied. Lookups walk the name's suffixes in sets, so the cost is per label, not per
    rule."""

    def __init__(self, allow: Iterable[DomainRule] = (), deny: Iterable[DomainRule] = ()) -> None:
        self.allow = tuple(allow)
        self.deny = tuple(deny)
        self._allow = self._index(self.allow)
        self._deny = self._index(self.deny)

    @staticmethod
    def _index(rules: Sequence[DomainRule]) -> tuple[dict[str, DomainRule], dict[str, DomainRule]]:
        exact = {r.name: r for r in rules if not r.subdomains}
        under = {r.name: r for r in rules if r.subdomains}
        return exact, under

    @staticmethod
    def _match(
        host: str, index: tuple[dict[str, DomainRule], dict[str, DomainRule]]
    ) -> DomainRule | None:
        exact, under = index
        rule = exact.get(host)
        if rule is not None or not under:
            return rule
        name = host
        while True:
            rule = under.get(name)
            if rule is not None:
                return rule
            dot = name.find(".")
            if dot < 0:
                return None
            name = name[dot + 1 :]

    def check(self, host: str, literal: bool) -> None:
        """Raise DomainDenied naming the rule that refuses ``host``; return if allowed."""
        if not self.allow and not self.deny:
            return
        if literal:  # no deny rule; only an allow rule naming this very address matches
            host = str(ipaddress.ip_address(host))
            denied, allowed = None, self._allow[0].get(host)
        else:
            denied, allowed = self._match(host, self._deny), self._match(host, self._allow)
        if denied is not None:
            raise DomainDenied(
                f"{host} is denied by --deny-domain {denied}",
                details=f"{host} denied by --deny-domain {denied}",
            )
        if not self.allow or allowed is not None:
            return
        shown = ", ".join(map(str, self.allow[:5])) + (", ..." if len(self.allow) > 5 else "")
        what = "the address" if literal else "the name"
        raise DomainDenied(
            f"{what} {host} is not in the allowed domains ({shown}); allow it with "
            f"--allow-domain {host}",
            details=f"{host} not in --allow-domain",
        )
