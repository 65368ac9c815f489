"""Every setting, once: the fields of :class:`Config` are the settings table.

Each field carries its parser (which validates and coerces, raising ValueError with what is
allowed), its ``--help`` text and its metavar. The CLI builds its flags from this table, so
a setting cannot exist in one place and be missing in another; an embedding application
builds the same object with keywords: ``Config(listen=["127.0.0.1:0"], allow_port=["any"])``.
A few fields are objects rather than settings (the resolver, the dialer): an embedding
application may give them, the CLI has no flag for them (see :func:`component`).
"""

from __future__ import annotations

import ipaddress
import logging
import math
from collections.abc import Callable
from dataclasses import Field, dataclass, field, fields
from typing import Any

from splicegate.auth import read_users
from splicegate.dial import Dialer
from splicegate.policy import (
    DomainRule,
    IPNetwork,
    PortRange,
    parse_deny_domain_rule,
    parse_domain_rule,
    parse_network,
    parse_port_spec,
)
from splicegate.relay import (
    ENGINES,
    SCHEDULING,
    Engine,
    RelayTimeouts,
    create_engine,
    pipe_cap_bound,
)
from splicegate.resolve import Resolver

Address = tuple[str, int]

# Bounds the native engine enforces when it is built (csrc/engine.pyx, NativeEngine.__init__:
# "threads must be from 1 to 64", "pipe_size must be from 4096 to 67108864 bytes"; Core's
# max_pipes is an int64_t). The extension is not imported for them (the pure-Python install
# has none), so they are stated again here, once: a value the engine would refuse at start
# is refused as a setting, whichever engine runs. Keep them in step with engine.pyx.
MAX_RELAY_THREADS = 64
MAX_PIPE_SIZE = 64 * 1024 * 1024
MAX_PIPES = 2**63 - 1
# setsockopt(TCP_DEFER_ACCEPT) takes a C int; Python's setsockopt fails on a larger one (the
# kernel caps the wait at its most retransmissions, some hours, long before that).
MAX_DEFER_ACCEPT = 2**31 - 1


def _address_text(value: tuple[Any, ...]) -> str:
    """A ``(host, port)`` tuple as the HOST:PORT it stands for, so that it is checked
    exactly as that string is (the port's range, a host given)."""
    if len(value) != 2 or not isinstance(value[0], str):
        raise ValueError(f"{value!r} is not a (host, port) pair")
    host, port = value
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def parse_address(value: Any, default_port: int | None = None, *, least_port: int = 0) -> Address:
    """``HOST:PORT`` or ``[V6]:PORT``; the port may be left out where a default exists. A
    ``(host, port)`` tuple is checked as the string it stands for."""
    text = _address_text(value) if isinstance(value, tuple) else str(value).strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else None
        if not sep or (rest and port_text is None):
            raise ValueError(f"{text!r} is not HOST:PORT (IPv6 as [::1]:3128)")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host, port_text = text, None
        elif ":" in host:
            raise ValueError(f"{text!r}: put an IPv6 address in brackets, as [::1]:3128")
    if port_text is None:
        if default_port is None:
            raise ValueError(f"{text!r} has no port; write HOST:PORT")
        return host, default_port
    if not port_text.isdigit() or not least_port <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number from {least_port} to 65535")
    if not host:
        raise ValueError(f"{text!r} has no host; write HOST:PORT")
    return host, int(port_text)


def not_utf8(text: str) -> bool:
    """Whether ``text`` holds lone surrogates: bytes that were not UTF-8 (an argument, an
    environment variable), which no UTF-8 file, a TOML one above all, can hold."""
    return any("\ud800" <= c <= "\udfff" for c in text)


def _check_text(value: Any) -> None:
    """Such text is refused in every mode, as a settings file (and --workers, whose
    settings are one) cannot hold it."""
    for item in value if isinstance(value, tuple) else (value,):
        for text in item if isinstance(item, tuple) else (item,):
            if isinstance(text, str) and not_utf8(text):
                raise ValueError(f"{text!r} is not UTF-8; a setting is text, as in a file")


def _bound_as(host: str) -> tuple[int, ipaddress.IPv4Address | ipaddress.IPv6Address | None]:
    """The family a socket for ``host`` is bound in (a host without a colon, a name too,
    is bound IPv4, as the server binds it), and the address, if it is one: IPv4-mapped
    as the IPv4 address it holds."""
    try:
        if ":" not in host:
            return 4, ipaddress.IPv4Address(host)
        address = ipaddress.IPv6Address(host)
    except ValueError:
        return (6 if ":" in host else 4), None  # a name: which address, only a resolver knows
    return (4, address.ipv4_mapped) if address.ipv4_mapped else (6, address)


def _binds_collide(admin: str, listen: str, *, listen_dual_stack: bool) -> bool:
    """Whether sockets bound to these hosts on one port collide (Linux, SO_REUSEADDR set):
    the same address, or a wildcard and any address of its family, a name's too; an IPv6
    wildcard that is dual-stack (the admin endpoint's always is) covers IPv4 as well."""
    (family_a, a), (family_b, b) = _bound_as(admin), _bound_as(listen)
    if family_a != family_b:
        wildcard, dual_stack = (a, True) if family_a == 6 else (b, listen_dual_stack)
        return dual_stack and wildcard is not None and wildcard.is_unspecified
    if a is None or b is None:  # a name: the same name, or a wildcard's family
        return admin == listen or any(x is not None and x.is_unspecified for x in (a, b))
    return a == b or a.is_unspecified or b.is_unspecified


def parse_nameserver(value: Any) -> Address:
    """``IP[:PORT]``, port 53 by default: the resolver sends its queries to that address, so
    it is an IP address (a name would need a resolver first) and the port is not 0."""
    host, port = parse_address(value, default_port=53, least_port=1)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"{host!r} is not an IP address; a nameserver is one, not a name"
        ) from None
    return host, port


def _finite(value: Any) -> bool:
    """False for NaN and the infinities however written: "nan", "inf", 1e400 (which TOML
    and float() read as infinity), an integer too large to be a float."""
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False
    except (TypeError, ValueError):
        return True  # not a number at all: the caller's conversion says so


def _number(
    kind: type, low: float, *, high: float | None = None, zero_ok: bool | str = False
) -> Callable[[Any], Any]:
    """``zero_ok``: 0 is allowed too, below ``low``; True where it turns the setting off,
    else what it does instead ("picks ...")."""
    if zero_ok is True:
        zero_ok = "turns it off"
    off = f" (0 {zero_ok})" if zero_ok else ""
    allowed = f"from {low} to {high}" if high is not None else f"{low} or more"
    what = "a whole number" if kind is int else "a number"

    def parse(value: Any) -> Any:
        # NaN fails every range check below and infinity passes the least, so either would
        # slip through as a limit that never fires (a timeout that waits for ever). "No
        # limit" is 0 where a setting has it, never inf.
        if not _finite(value):
            raise ValueError(f"{value!r} is not a finite number; allowed: {allowed}{off}")
        # int() would cut a TOML 2.5 to 2 and read 2.0 or 1e3, and both int() and float()
        # take True for 1, where the flag takes only a number: a whole-number setting takes
        # an integer, and none takes a boolean, as on the command line.
        if isinstance(value, bool) or (kind is int and isinstance(value, float)):
            raise ValueError(f"{value!r} is not {what}")
        try:
            number = kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"{value!r} is not {what}") from None
        if number == 0 and zero_ok:
            return number
        if number < low:
            raise ValueError(f"{value!r} is too small; the least is {low}{off}")
        if high is not None and number > high:
            raise ValueError(f"{value!r} is too large; the most is {high}")
        return number

    return parse


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = str(value).lower()
        if text not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return text

    return parse


def _network(value: Any) -> IPNetwork:
    return parse_network(str(value))


def _port(value: Any) -> PortRange:
    return value if isinstance(value, PortRange) else parse_port_spec(str(value))


def _auth_file(value: Any) -> str:
    """A password file, read and checked now, so that a bad one is refused at start and by a
    reload alike, naming the line at fault; "" for no authentication."""
    path = "" if value is None else str(value).strip()
    if path:
        read_users(path)
    return path


def _realm(value: Any) -> str:
    text = str(value)
    if not text or not all(" " <= c <= "~" for c in text):
        raise ValueError(f"{value!r}: a realm is printable ASCII, not empty")
    return text


def setting(
    default: Any,
    parse: Callable[[Any], Any],
    help: str,
    *,
    metavar: str = "",
    multiple: bool = False,
    shown_default: str | None = None,
    restart: bool = False,
) -> Any:
    """A Config field with what the CLI and validation need to know about it.

    ``restart``: a running proxy cannot change it (a listener, the engine's threads), so a
    reload (SIGHUP) reports a new value as ignored until restart instead of applying it.
    """
    meta = {
        "parse": parse,
        "help": help,
        "metavar": metavar,
        "multiple": multiple,
        "shown_default": shown_default,
        "restart": restart,
    }
    if multiple:
        return field(default_factory=lambda: tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


def component(parse: Callable[[Any], Any], help: str, *, restart: bool = False) -> Any:
    """A Config field for an object only an embedding application can give (a resolver, a
    dialer): no CLI flag and no TOML key (``cli`` is False), None meaning the built-in one.
    Not compared, so two configs with the same settings are equal. ``restart`` as for
    :func:`setting`: the server builds on it at start, so a reload cannot swap it."""
    meta = {
        "parse": parse,
        "help": help,
        "metavar": "",
        "multiple": False,
        "shown_default": "built in",
        "cli": False,
        "restart": restart,
    }
    return field(default=None, compare=False, metadata=meta)


def cli_fields() -> list[Field[Any]]:
    """The fields that are settings a user writes: one CLI flag (and TOML key) each."""
    return [f for f in fields(Config) if f.metadata.get("cli", True)]


def component_fields() -> list[Field[Any]]:
    """The fields for objects only an application gives (:func:`component`): no flag."""
    return [f for f in fields(Config) if not f.metadata.get("cli", True)]


def _resolver(value: Any) -> Any:
    if value is not None and not callable(getattr(value, "resolve", None)):
        raise ValueError(f"{value!r} has no resolve(host, deadline) method")
    return value


def _dialer(value: Any) -> Any:
    if value is not None and not callable(value):
        raise ValueError(f"{value!r} is not callable as dial(addresses, port, deadline)")
    return value


def _hook(signature: str) -> Callable[[Any], Any]:
    def parse(value: Any) -> Any:
        if value is not None and not callable(value):
            raise ValueError(f"{value!r} is not callable as {signature}")
        return value

    return parse


def _optional_address(value: Any) -> Address | None:
    """HOST:PORT, or nothing (None or an empty string) for off."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return parse_address(value)


def _log_destination(value: Any) -> str:
    """A file path, ``-`` for stderr, or an empty string for off."""
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a path, - (stderr) or an empty string (off)")
    return value.strip()


def _one_value(value: Any, metavar: str) -> bool:
    """Whether a repeatable setting was given one value rather than several: a string, a
    scalar, or for an address list a lone ``(host, port)`` pair, as the socket API writes
    one address (taken item by item, its host would be read as an address with no port)."""
    if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
        return True
    return (
        metavar == "HOST:PORT"
        and isinstance(value, tuple)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int)
    )


#: ``authorize(request, client)``: None or True allows; a str allows as that user (it is
#: logged); a ProxyError returned or raised refuses with that response; False refuses (403).
Authorize = Callable[[Any, Address], Any]


@dataclass(frozen=True, kw_only=True)
class Config:
    """The proxy's settings; construct with keywords, values as on the command line."""

    listen: tuple[Address, ...] = setting(
        ["127.0.0.1:3128"],
        parse_address,
        "address to listen on (repeatable; IPv6 as [::1]:3128; port 0 picks a free one)",
        metavar="HOST:PORT",
        multiple=True,
        restart=True,
    )
    header_timeout: float = setting(
        10.0,
        _number(float, 0.001),
        "seconds a client has to send the whole request head (else 408)",
        metavar="S",
    )
    defer_accept: int = setting(
        1,
        _number(int, 1, high=MAX_DEFER_ACCEPT, zero_ok=True),
        "seconds the kernel keeps a new connection until its first bytes arrive before "
        "handing it over anyway (TCP_DEFER_ACCEPT, as HAProxy's defer-accept); 0 turns it "
        "off. Connections then arrive with their request in: no wait per CONNECT",
        metavar="S",
        restart=True,
    )
    max_header_bytes: int = setting(
        32 * 1024,
        _number(int, 256),
        "largest request head accepted, in bytes (else 431; 414 when the request line alone "
        "is longer)",
        metavar="N",
    )
    max_header_fields: int = setting(
        100,
        _number(int, 1),
        "most header fields a request head may have (else 431)",
        metavar="N",
    )
    max_connections: int = setting(
        10_000,
        _number(int, 1),
        "connections at once, from accept until the tunnel closes; more get 503",
        metavar="N",
    )
    max_connections_per_client: int = setting(
        0,
        _number(int, 1, zero_ok=True),
        "connections at once from one client address; more get 503 (0: no limit)",
        metavar="N",
        shown_default="no limit",
    )
    allow_client: tuple[IPNetwork, ...] = setting(
        [],
        _network,
        "client network allowed to use the proxy (repeatable; the first one replaces the default)",
        metavar="CIDR",
        multiple=True,
        shown_default="loopback and private networks",
    )
    allow_port: tuple[PortRange, ...] = setting(
        [],
        _port,
        "target port allowed: 443, 8000-8100 or any (repeatable; the first one replaces the "
        "default)",
        metavar="SPEC",
        multiple=True,
        shown_default="443",
    )
    allow_dest: tuple[IPNetwork, ...] = setting(
        [],
        _network,
        "destination network to allow although the defaults deny it (repeatable; longest "
        "prefix wins)",
        metavar="CIDR",
        multiple=True,
        shown_default="none: loopback, private, link-local and special ranges are denied",
    )
    deny_dest: tuple[IPNetwork, ...] = setting(
        [],
        _network,
        "destination network to deny (repeatable; deny wins a tie with --allow-dest)",
        metavar="CIDR",
        multiple=True,
        shown_default="none",
    )
    allow_domain: tuple[DomainRule, ...] = setting(
        [],
        parse_domain_rule,
        "target name allowed, checked before DNS: example.com, or .example.com for it and its "
        "subdomains (repeatable; once given, other names and IP literals are denied)",
        metavar="DOMAIN",
        multiple=True,
        shown_default="every name",
    )
    deny_domain: tuple[DomainRule, ...] = setting(
        [],
        parse_deny_domain_rule,
        "target name denied, checked before DNS: example.com, or .example.com for it and its "
        "subdomains (repeatable; wins over --allow-domain)",
        metavar="DOMAIN",
        multiple=True,
        shown_default="none",
    )
    auth_file: str = setting(
        "",
        _auth_file,
        "require Basic proxy authentication against this file of user:scrypt$N$r$p$salt$hash "
        "lines (write it with: splicegate passwd FILE USER); re-read on reload",
        metavar="FILE",
        shown_default="none: no authentication",
    )
    auth_realm: str = setting(
        "splicegate",
        _realm,
        "the realm named in the 407's Proxy-Authenticate",
        metavar="REALM",
    )
    nameserver: tuple[Address, ...] = setting(
        [],
        parse_nameserver,
        "DNS server to ask instead of the system resolver (repeatable)",
        metavar="HOST:PORT",
        multiple=True,
        shown_default="the system resolver",
    )
    dns_timeout: float = setting(
        5.0, _number(float, 0.001), "seconds to resolve a name (else 504)", metavar="S"
    )
    dns_cache_size: int = setting(
        10_000,
        _number(int, 0, zero_ok="keeps none"),
        "names the DNS cache holds, least recently used evicted first (0 keeps none)",
        metavar="N",
    )
    dns_min_ttl: float = setting(
        5.0,
        _number(float, 0.0, zero_ok="sets no minimum"),
        "keep a DNS answer at least this many seconds, whatever its TTL",
        metavar="S",
    )
    dns_max_ttl: float = setting(
        300.0,
        _number(float, 0.0, zero_ok="keeps no answer, with --dns-min-ttl 0"),
        "keep a DNS answer at most this many seconds, whatever its TTL",
        metavar="S",
    )
    dns_negative_ttl: float = setting(
        5.0,
        _number(float, 0.001, zero_ok=True),
        "keep a DNS failure (NXDOMAIN, SERVFAIL, no address) this many seconds",
        metavar="S",
    )
    connect_timeout: float = setting(
        10.0,
        _number(float, 0.001),
        "seconds to connect to the target, after resolution (else 504)",
        metavar="S",
    )
    idle_timeout: float = setting(
        300.0,
        _number(float, 0.001, zero_ok=True),
        "close a tunnel after this many seconds without a byte either way",
        metavar="S",
        restart=True,
    )
    half_closed_timeout: float = setting(
        60.0,
        _number(float, 0.001, zero_ok=True),
        "close a tunnel this many seconds after one side finished sending",
        metavar="S",
        restart=True,
    )
    max_lifetime: float = setting(
        0.0,
        _number(float, 0.001, zero_ok=True),
        "close any tunnel after this many seconds",
        metavar="S",
        shown_default="off",
        restart=True,
    )
    drain_timeout: float = setting(
        30.0,
        _number(float, 0.0, zero_ok="closes them at once"),
        "on SIGTERM or SIGINT, seconds open tunnels get to finish",
        metavar="S",
    )
    engine: str = setting(
        "auto",
        _choice(*ENGINES),
        "relay engine: auto (native where it is built), native, python",
        metavar="|".join(ENGINES),
        restart=True,
    )
    relay_threads: int = setting(
        0,
        _number(int, 1, high=MAX_RELAY_THREADS, zero_ok="picks one per CPU, at most 4"),
        "native engine: relay threads, each with its own epoll loop",
        metavar="N",
        shown_default="one per CPU, at most 4",
        restart=True,
    )
    relay_scheduling: str = setting(
        "batch",
        _choice(*SCHEDULING),
        "native engine: how relay threads are scheduled: batch (SCHED_BATCH: a woken thread "
        "waits for the running task's slice rather than preempting it, so under load it "
        "wakes less and does more per wake) or normal",
        metavar="|".join(SCHEDULING),
        restart=True,
    )
    pipe_size: int = setting(
        1024 * 1024,
        _number(int, 4096, high=MAX_PIPE_SIZE),
        "native engine: bytes each splice pipe holds (more: fewer system calls per byte)",
        metavar="BYTES",
        restart=True,
    )
    max_pipes: int = setting(
        0,
        _number(int, 1, high=MAX_PIPES, zero_ok="means what the per-user pipe quota holds"),
        "native engine: pipes at most, split between --workers processes; past it tunnels "
        "copy through a buffer instead",
        metavar="N",
        shown_default="what the per-user pipe quota holds",
        restart=True,
    )
    log_level: str = setting(
        "info",
        _choice("debug", "info", "warning", "error"),
        "how much to log on stderr: debug, info, warning, error",
        metavar="LEVEL",
    )
    access_log: str = setting(
        "",
        _log_destination,
        "access log: one line per tunnel or refused request, to PATH or - for stderr "
        "(PATH is reopened on SIGUSR1, for logrotate)",
        metavar="PATH|-",
        shown_default="off; refusals are still logged on stderr with their reason",
    )
    log_format: str = setting(
        "text",
        _choice("text", "json"),
        "access-log format: text (one readable line) or json (one JSON object a line)",
        metavar="text|json",
    )
    admin: Address | None = setting(  # noqa: RUF009 (setting() returns a field, as above)
        None,
        _optional_address,
        "serve Prometheus /metrics and /healthz (200 serving, 503 draining) over HTTP here",
        metavar="HOST:PORT",
        shown_default="off",
        restart=True,
    )
    workers: int = setting(
        1,
        _number(int, 1),
        "processes sharing the listeners (SO_REUSEPORT) under a supervisor that restarts a "
        "crashed one; more than 1 needs fixed ports",
        metavar="N",
        restart=True,
    )
    # component() returns a dataclass field, like setting(); RUF009 cannot see that here
    # because the annotation is not a type it knows to be immutable.
    resolver: Resolver | None = component(  # noqa: RUF009
        _resolver, "resolve(host, deadline)", restart=True
    )
    dialer: Dialer | None = component(  # noqa: RUF009
        _dialer, "dial(addresses, port, deadline)", restart=True
    )
    authorize: Authorize | None = component(  # noqa: RUF009
        _hook("authorize(request, client)"), "authorize(request, client)"
    )
    on_tunnel_closed: Callable[[Any], None] | None = component(  # noqa: RUF009
        _hook("on_tunnel_closed(entry)"), "on_tunnel_closed(entry)"
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            parse = f.metadata["parse"]
            try:
                if f.metadata["multiple"]:
                    if _one_value(value, f.metadata["metavar"]):
                        value = [value]
                    coerced: Any = tuple(parse(v) for v in value)
                else:
                    coerced = parse(value)
                _check_text(coerced)
            except ValueError as exc:
                raise ValueError(f"{f.name.replace('_', '-')}: {exc}") from None
            object.__setattr__(self, f.name, coerced)
        if not self.listen:  # a server listening nowhere would wait for ever, serving no one
            raise ValueError("listen: no address given; at least one HOST:PORT is needed")
        if self.dns_min_ttl > self.dns_max_ttl:
            raise ValueError(
                f"dns-min-ttl: {self.dns_min_ttl:g} is above --dns-max-ttl {self.dns_max_ttl:g}"
            )
        if self.admin is not None:
            self._check_admin_port(self.admin)
        picked = [f"{host}:{port}" for host, port in self.listen if port == 0]
        if self.workers > 1 and picked:
            raise ValueError(
                f"workers: {self.workers} processes share each listener's port, so it must be "
                f"fixed; port 0 in --listen {picked[0]} would give each its own"
            )

    def _check_admin_port(self, admin: Address) -> None:
        """The admin endpoint cannot bind where a listener does: the start would fail on
        it, after check-config had called the settings valid. An IPv6 wildcard listener
        holds the port for IPv4 too, unless an IPv4 listener shares its port (the server
        then binds it IPv6-only)."""
        ipv4_ports = self.ipv4_listen_ports()
        for address in self.listen:
            if admin[1] == address[1] != 0 and _binds_collide(
                admin[0], address[0], listen_dual_stack=address[1] not in ipv4_ports
            ):
                raise ValueError(
                    f"admin: {_address_text(admin)} would take the port --listen "
                    f"{_address_text(address)} listens on; give it a port of its own"
                )

    def ipv4_listen_ports(self) -> set[int]:
        """The fixed ports an IPv4 listener takes (a host without a colon: a name binds
        IPv4 too). An IPv6 wildcard listener on one of them is bound IPv6-only, so that
        the two can share it."""
        return {port for host, port in self.listen if ":" not in host and port}

    @property
    def relay_timeouts(self) -> RelayTimeouts:
        return RelayTimeouts(
            idle=self.idle_timeout,
            half_closed=self.half_closed_timeout,
            lifetime=self.max_lifetime,
        )

    def pipes_per_process(self) -> int:
        """The most splice pipes the engine of :meth:`create_engine` will hold (0: the
        Python engine), known before it is built: the open-file limit counts them."""
        return pipe_cap_bound(self.engine, self.pipe_size, self.max_pipes or None, self.workers)

    def create_engine(self) -> Engine:
        """The relay engine these settings ask for."""
        return create_engine(
            self.engine,
            self.relay_timeouts,
            threads=self.relay_threads or None,
            pipe_size=self.pipe_size,
            max_pipes=self.max_pipes or None,  # the whole server's: the engines split it
            processes=self.workers,
            scheduling=self.relay_scheduling,
        )

    @property
    def log_level_number(self) -> int:
        return logging.getLevelName(self.log_level.upper())
