"""Every reason splicegate refuses a request, and the one table that turns it into a response.

Code raises the error where the fault is found (the parser, the policy, the resolver, the
dialer); only the server writes responses, and only through :func:`render`. The status code
and the Proxy-Status token (RFC 9209) of each error live in ``TABLE`` and nowhere else, so a
cause can never be answered with two different codes. A proxy never answers a failed
CONNECT with a 3xx: the resource did not move, and browsers ignore it anyway.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from http import HTTPStatus


class ProxyError(Exception):
    """A request splicegate refuses.

    ``message`` is the response body: a sentence a person can act on. ``details`` is the
    short machine-friendly text for the Proxy-Status ``details`` parameter; it defaults to
    the message.
    """

    #: how long the proxy reads and drops what the client still sends after the answer, so
    #: that the answer is not lost to a reset (RFC 9112 §9.6)
    linger_seconds = 2.0

    def __init__(self, message: str, *, details: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = message if details is None else details

    @property
    def status(self) -> int:
        return TABLE[type(self)].status

    @property
    def proxy_status_error(self) -> str | None:
        return TABLE[type(self)].error

    def headers(self) -> list[tuple[str, str]]:
        """Fields this kind of refusal adds to the response."""
        return []

    def status_parameters(self) -> list[tuple[str, str]]:
        """Proxy-Status parameters this kind of refusal adds beside ``error`` and
        ``details`` (RFC 9209 §2.3 defines some per error type), as (name, string value)."""
        return []


class BadRequest(ProxyError):
    """Malformed request, target, port or Host."""


class ClientDenied(ProxyError):
    """The client's address is not in --allow-client."""


class PortDenied(ProxyError):
    """The target port is not in --allow-port."""


class DomainDenied(ProxyError):
    """The target name is refused by a domain rule."""


class DestinationDenied(ProxyError):
    """Every address the target resolved to is refused by the destination table."""


class ProxyLoop(ProxyError):
    """CONNECT to one of the proxy's own listening addresses."""


class MethodNotAllowed(ProxyError):
    """A method other than CONNECT."""

    def headers(self) -> list[tuple[str, str]]:
        return [("Allow", "CONNECT")]


class AuthRequired(ProxyError):
    """Proxy credentials missing or wrong."""

    def __init__(self, message: str, *, realm: str = "splicegate") -> None:
        super().__init__(message)
        self.realm = realm

    def headers(self) -> list[tuple[str, str]]:
        realm = self.realm.replace("\\", "\\\\").replace('"', '\\"')
        return [("Proxy-Authenticate", f'Basic realm="{realm}", charset="UTF-8"')]


class HeadTimeout(ProxyError):
    """The request head was not complete by --header-timeout."""


class RequestLineTooLong(ProxyError):
    """The request line alone is over --max-header-bytes. RFC 9112 §3 answers a target
    longer than the server wishes to parse with 414, not 431: shortening the fields would
    not help the client."""


class HeadTooLarge(ProxyError):
    """The request head's fields take it over --max-header-bytes, or it has too many."""


class OverCapacity(ProxyError):
    """A connection cap is reached."""

    #: short: a flood is when fds are scarce, and its head has arrived already (deferred
    #: accept); a polite client closes within an RTT
    linger_seconds = 0.25

    def __init__(self, message: str, *, retry_after: int = 1, details: str | None = None) -> None:
        super().__init__(message, details=details)
        self.retry_after = retry_after

    def headers(self) -> list[tuple[str, str]]:
        return [("Retry-After", str(self.retry_after))]


class AuthOverloaded(OverCapacity):
    """Proxy authentication's password hashing is saturated (a flood of guesses): the same
    503 as a connection cap, but its own cause in the metrics, since the remedy differs."""


class ShuttingDown(OverCapacity):
    """The proxy stopped while the request was being handled: its handler was ended by the
    drain's deadline (or a second stop signal), or its own hook stopped the server, and no
    tunnel can be handed to an engine shutting down."""

    #: no wait: the stop that ends this request is already closing everything
    linger_seconds = 0.0


def shutting_down() -> ShuttingDown:
    """The 503 for a request the proxy's stop overtook."""
    return ShuttingDown("the proxy is stopping; try again shortly", details="proxy stopping")


class OutOfResources(OverCapacity):
    """The proxy's own host ran short (descriptors, socket memory, local ports) while serving
    the request: the same 503 as a connection cap, its own cause in the metrics, and never
    blamed on the destination or the nameserver, which are not at fault."""


#: What each errno that means "this host is short of something" is short of, and the remedy.
SHORTAGES: dict[int, str] = {
    errno.EMFILE: "open files (raise its limit, ulimit -n or LimitNOFILE, or lower "
    "--max-connections)",
    errno.ENFILE: "the system's open files (fs.file-max)",
    errno.ENOBUFS: "socket buffer memory",
    errno.ENOMEM: "memory",
    errno.EADDRNOTAVAIL: "local ports for new connections (net.ipv4.ip_local_port_range)",
}


def raise_if_short(exc: OSError, doing: str) -> None:
    """Raise the 503 when ``exc`` says this host ran short of something (a SHORTAGES
    errno) while ``doing`` something: never the destination's or the nameserver's fault."""
    if exc.errno in SHORTAGES:
        raise out_of_resources(exc.errno, doing) from None


def out_of_resources(code: int, doing: str) -> OutOfResources:
    """The 503 for a shortage errno (a key of SHORTAGES) met while ``doing`` something."""
    what = SHORTAGES[code]
    return OutOfResources(
        f"this proxy ran out of {what} while {doing}; try again shortly",
        details=f"out of resources ({os.strerror(code)}) while {doing}",
    )


class DnsTimeout(ProxyError):
    """Our own DNS deadline (--dns-timeout) expired."""


class DnsError(ProxyError):
    """NXDOMAIN, SERVFAIL, no address, or any other resolver failure. ``rcode``: the DNS
    RCODE that says why, where one does (RFC 9209 §2.3.3 gives it its own parameter)."""

    def __init__(self, message: str, *, details: str | None = None, rcode: str = "") -> None:
        super().__init__(message, details=details)
        self.rcode = rcode

    def status_parameters(self) -> list[tuple[str, str]]:
        return [("rcode", self.rcode)] if self.rcode else []


class ConnectionRefused(ProxyError):
    """Every address dialled refused the connection."""


class DestinationUnavailable(ProxyError):
    """The network or host is unreachable."""


class ConnectTimeout(ProxyError):
    """The connect deadline (--connect-timeout) expired."""


class VersionNotSupported(ProxyError):
    """HTTP major version other than 1."""


class InternalError(ProxyError):
    """A fault of splicegate's own; the client still gets an answer, the log the details."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    error: str | None  # the Proxy-Status error token; None adds no error parameter


#: The one mapping from cause to response (DESIGN.md, "Errors").
TABLE: dict[type[ProxyError], Response] = {
    BadRequest: Response(400, "http_request_error"),
    ClientDenied: Response(403, "http_request_denied"),
    PortDenied: Response(403, "http_request_denied"),
    DomainDenied: Response(403, "http_request_denied"),
    DestinationDenied: Response(403, "destination_ip_prohibited"),
    ProxyLoop: Response(403, "proxy_loop_detected"),
    MethodNotAllowed: Response(405, "http_request_denied"),
    AuthRequired: Response(407, None),
    HeadTimeout: Response(408, "http_request_error"),
    # RFC 9209 has no token for a request too large (its size tokens are for responses):
    # a request refused as it arrived is an http_request_error.
    RequestLineTooLong: Response(414, "http_request_error"),
    HeadTooLarge: Response(431, "http_request_error"),
    OverCapacity: Response(503, "proxy_internal_response"),
    AuthOverloaded: Response(503, "proxy_internal_response"),
    OutOfResources: Response(503, "proxy_internal_response"),
    ShuttingDown: Response(503, "proxy_internal_response"),
    DnsTimeout: Response(504, "dns_timeout"),
    DnsError: Response(502, "dns_error"),
    ConnectionRefused: Response(502, "connection_refused"),
    DestinationUnavailable: Response(502, "destination_unavailable"),
    ConnectTimeout: Response(504, "connection_timeout"),
    VersionNotSupported: Response(505, "http_protocol_error"),
    InternalError: Response(500, "proxy_internal_error"),
}

PROXY_NAME = "splicegate"


def _sf_string(text: str) -> str:
    """Quote text as a Structured Field string (RFC 8941 §3.3.3): printable ASCII only."""
    printable = "".join(c if " " <= c <= "~" else "?" for c in text)
    return '"' + printable.replace("\\", "\\\\").replace('"', '\\"') + '"'


def proxy_status(err: ProxyError) -> str:
    """The Proxy-Status field value for a refusal."""
    if err.proxy_status_error is None:
        return PROXY_NAME
    extra = "".join(f"; {name}={_sf_string(value)}" for name, value in err.status_parameters())
    return f"{PROXY_NAME}; error={err.proxy_status_error}{extra}; details={_sf_string(err.details)}"


def render(err: ProxyError) -> bytes:
    """The complete response for a refusal: status line, fields and a text/plain body."""
    status = HTTPStatus(err.status)
    body = (err.message.rstrip("\n") + "\n").encode("utf-8", "replace")
    fields = [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
        ("Proxy-Status", proxy_status(err)),
        *err.headers(),
    ]
    head = f"HTTP/1.1 {status.value} {status.phrase}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in fields)
    return head.encode("latin-1", "replace") + b"\r\n" + body
