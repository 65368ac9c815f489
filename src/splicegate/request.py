"""The CONNECT request head, parsed sans-IO (RFC 9112).

Bytes go in with :meth:`RequestParser.receive_data`; :meth:`RequestParser.next_event` returns
a :class:`Request`, :data:`NEED_DATA`, or :data:`CLOSED`, or raises a
:class:`~splicegate.errors.ProxyError` that already knows its status. The parser owns no
socket and no clock: deadlines belong to the server. Whatever followed the head (a TLS
ClientHello sent without waiting for the 200) stays untouched in ``trailing_data``; it must
reach the origin and must never be read as another request.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass
from enum import Enum

from splicegate.errors import BadRequest, HeadTooLarge, RequestLineTooLong, VersionNotSupported

# Limits, checked once, when more data is asked for. 32 KiB for the head sits between
# h11 (16 KiB), Apache (8 KiB per line, 100 fields) and Squid (64 KiB); 100 fields is
# Apache's LimitRequestFields.
DEFAULT_MAX_HEAD_BYTES = 32 * 1024
DEFAULT_MAX_FIELDS = 100
# RFC 9112 §2.2: a server SHOULD ignore at least one empty line before the request-line.
_MAX_LEADING_EMPTY_LINES = 4

# --- Grammar (RFC 9110 §5.6.2, RFC 9112 §3, RFC 3986 §3.2), bytes, compiled at import ----
# tchar = "!" / "#" / "$" / "%" / "&" / "'" / "*" / "+" / "-" / "." / "^" / "_" / "`" / "|"
#       / "~" / DIGIT / ALPHA
_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
# request-line = method SP request-target SP HTTP-version
# HTTP-version = HTTP-name "/" DIGIT "." DIGIT
_REQUEST_LINE = re.compile(
    rb"(?P<method>" + _TOKEN + rb") (?P<target>[^\x00-\x20\x7f]+) "
    rb"HTTP/(?P<major>[0-9])\.(?P<minor>[0-9])"
)
# What an unfinished request line may hold so far: (part of) a method, then its space.
_TOKEN_CHARS = re.compile(_TOKEN[:-1] + b"*")  # as many token bytes as there are
#: The first byte of a TLS record carrying a handshake: a client that speaks TLS to this
#: plain-HTTP port (a proxy URL written https:// instead of http://).
_TLS_HANDSHAKE = 0x16
# field-line = field-name ":" OWS field-value OWS; field-name = token
# field-value = *field-content; field-vchar = VCHAR / obs-text; SP and HTAB inside
_FIELD_VALUE = rb"[^\x00-\x08\x0a-\x1f\x7f]*?"  # VCHAR, obs-text, SP, HTAB
_FIELD_LINE = re.compile(
    rb"(?P<name>" + _TOKEN + rb"):[ \t]*(?P<value>" + _FIELD_VALUE + rb")[ \t]*"
)
# authority-form = uri-host ":" port (RFC 9112 §3.2.3); reg-name restricted to DNS labels,
# the only names a resolver can look up (underscores occur in real names, so they pass).
_LABEL = rb"[A-Za-z0-9_](?:[-A-Za-z0-9_]{0,61}[A-Za-z0-9_])?"
_REG_NAME = re.compile(_LABEL + rb"(?:\." + _LABEL + rb")*\.?")
_IPV4 = re.compile(rb"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")
_IPV6_BRACKETED = re.compile(rb"\[(?P<addr>[0-9A-Fa-f:.]+)\]")
_PORT = re.compile(rb"[0-9]{1,5}")
# Host = uri-host [ ":" port ]; the value may be empty (RFC 9110 §7.2).
_HOST_FIELD = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[-A-Za-z0-9_.~!$&'()*+,;=%]*)(?::[0-9]*)?")
_END_OF_HEAD = re.compile(rb"\n\r?\n")
# A CR and the byte after it, when that byte is not LF (RFC 9112 §2.2: refused, not read as SP)
_BARE_CR = re.compile(rb"\r[^\n]")
# Content-Length: 0, or a list of zeros ("0, 0"): no content (RFC 9110 §8.6)
_ZEROS = re.compile(rb"0+(?:[ \t]*,[ \t]*0+)*")
#: where a URL's authority starts: after "scheme://", or "//" (a network-path reference)
_URL_AUTHORITY = re.compile(rb"(?:[A-Za-z][-A-Za-z0-9+.]*:)?//")


class _Sentinel(Enum):
    NEED_DATA = "need data"
    CLOSED = "closed"


NEED_DATA = _Sentinel.NEED_DATA
CLOSED = _Sentinel.CLOSED  # the client closed before sending anything


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """A parsed request head.

    ``host`` and ``port`` are set for CONNECT only; for other methods the server answers 405
    without looking at the target, which is kept as :func:`show_target` shows it. ``fields``
    keep the wire names' case lowered and the values as bytes, in order.
    """

    method: str
    target: str
    http_version: tuple[int, int]
    fields: tuple[tuple[bytes, bytes], ...]
    host: str = ""
    port: int = 0
    #: the target's address when the host is an IP literal (no DNS for it)
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None

    def field(self, name: bytes) -> bytes | None:
        """The value of a field that may occur once; None when absent."""
        for key, value in self.fields:
            if key == name:
                return value
        return None

    @property
    def is_ip_literal(self) -> bool:
        return self.address is not None

    @property
    def authority(self) -> str:
        """The target as a log and a message show it: host:port, [v6]:port."""
        return show_address((self.host, self.port))


def show_target(target: bytes) -> str:
    """A request target as a log shows it: as sent, with any byte outside ASCII as \\xNN
    and a backslash doubled, so that no client can spell an escape it did not send. The
    grammar keeps spaces and controls out; this keeps out C1 controls and look-alikes.
    Userinfo is hidden (:func:`_hide_userinfo`)."""
    target = _hide_userinfo(target)
    return target.replace(b"\\", b"\\\\").decode("ascii", "backslashreplace")


def _hide_userinfo(target: bytes) -> bytes:
    """``user:password@`` in a target's authority as ``***@``: a client that put its
    credentials there gets a 400, and neither the log nor the answer may keep them.

    In a URL the authority ends at the first "/" after "//". A target in authority form
    (host:port, as CONNECT and Host take it) has no path, so everything up to its last
    "@" is userinfo, a "/" in the password included. A path (origin form) has none."""
    url = _URL_AUTHORITY.match(target)
    if url:
        start = url.end()
        end = target.find(b"/", start)
        at = target.rfind(b"@", start, len(target) if end < 0 else end)
    elif target.startswith(b"/"):
        return target
    else:
        start, at = 0, target.rfind(b"@")
    return target if at < 0 else target[:start] + b"***" + target[at:]


def show_address(address: tuple) -> str:
    """A socket address as an authority is written: host:port, [v6]:port (logs, messages)."""
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@functools.lru_cache(maxsize=4096)
def parse_authority(
    target: bytes,
) -> tuple[str, int, ipaddress.IPv4Address | ipaddress.IPv6Address | None]:
    """Split a CONNECT target into host, port and (for an IP literal) address, or raise
    BadRequest.

    Cached: clients CONNECT to the same few targets again and again, and an address parsed
    by ``ipaddress`` costs more than the rest of the head. The result is immutable; an
    error is raised again each time, never cached."""
    shown = _hide_userinfo(target).decode("latin-1")
    host_part, sep, port_part = target.rpartition(b":")
    if b"/" in target:  # a URL (absolute form) or a path (origin form)
        raise BadRequest(
            f"CONNECT takes host:port, not a URL or a path: got {shown!a}; send "
            "'CONNECT example.com:443'",
            details=f"bad CONNECT target: {shown}",
        )
    if b"@" in target:
        raise BadRequest(
            f"a CONNECT target carries no user name or password: got {shown!a}; proxy "
            "credentials go in the Proxy-Authorization field",
            details=f"userinfo in CONNECT target: {shown}",
        )
    if sep and not host_part:
        raise BadRequest(
            f"CONNECT needs a target of the form host:port, got {shown!a}: the host is missing",
            details=f"bad CONNECT target: {shown}",
        )
    if not sep or (target.startswith(b"[") and target.endswith(b"]")):
        raise BadRequest(
            f"CONNECT needs a target of the form host:port, got {shown!a}: the port is missing",
            details=f"bad CONNECT target: {shown}",
        )
    if not _PORT.fullmatch(port_part) or not 1 <= int(port_part) <= 65535:
        raise BadRequest(
            f"the port in {shown!a} must be a number from 1 to 65535",
            details=f"bad port in target: {shown}",
        )
    port = int(port_part)
    bracketed = _IPV6_BRACKETED.fullmatch(host_part)
    if bracketed:
        try:
            v6 = ipaddress.IPv6Address(bracketed["addr"].decode())
        except ValueError:
            pass
        else:
            return str(v6), port, v6
    elif _IPV4.fullmatch(host_part):
        try:
            v4 = ipaddress.IPv4Address(host_part.decode())
        except ValueError:
            pass
        else:
            return str(v4), port, v4
    elif (
        len(host_part) <= 253
        and _REG_NAME.fullmatch(host_part)
        # an all-numeric last label is no DNS name, and getaddrinfo would read "2130706433"
        # or "127.1" as an address (RFC 3696 §2)
        and not host_part.rstrip(b".").rpartition(b".")[2].isdigit()
    ):
        return host_part.decode("ascii").rstrip(".").lower(), port, None
    if host_part.startswith(b"[") and b"%" in host_part:
        raise BadRequest(
            f"{host_part.decode('latin-1')!a}: an IPv6 zone (%interface) cannot be named in a "
            "CONNECT target; use a global address or a name",
            details=f"zone in target: {shown}",
        )
    raise BadRequest(
        f"{host_part.decode('latin-1')!a} is not a valid host name or address "
        "(IPv6 addresses go in brackets: [2001:db8::1]:443)",
        details=f"bad host in target: {shown}",
    )


def _bare_cr() -> BadRequest:
    """One answer for a bare CR, whether met early in a partial head or in a whole line."""
    return BadRequest(
        "the request contains a bare CR; lines end with CRLF",
        details="bare CR in request head",
    )


def _strip_cr(line: bytes) -> bytes:
    """A line without its CR of CRLF (a bare LF ending is fine); any other CR is an error."""
    if line.endswith(b"\r"):
        line = line[:-1]
    if b"\r" in line:
        raise _bare_cr()
    return line


def _malformed_request_line(line: bytes) -> BadRequest:
    if line[:1] == bytes([_TLS_HANDSHAKE]):
        return BadRequest(
            "this port speaks plain HTTP, and the client sent a TLS handshake: write the "
            "proxy's URL as http://, not https:// (the tunnel inside still carries TLS)",
            details="TLS handshake on the plain-HTTP port",
        )
    shown = line[:100].decode("latin-1")
    return BadRequest(
        f"malformed request line {shown!a}; expected 'CONNECT host:port HTTP/1.1'",
        details="malformed request line",
    )


def _parse_request_line(line: bytes) -> tuple[str, bytes, tuple[int, int]]:
    """Method, target and version as sent; the version is judged by :func:`_speak`."""
    match = _REQUEST_LINE.fullmatch(line)
    if match is None:
        raise _malformed_request_line(line)
    return (
        match["method"].decode("ascii"),
        match["target"],
        (int(match["major"]), int(match["minor"])),
    )


def _speak(version: tuple[int, int]) -> tuple[int, int]:
    """The version the request is handled as, or a 505."""
    major, minor = version
    if major != 1:
        raise VersionNotSupported(
            f"HTTP/{major}.{minor} is not supported; send the CONNECT request as HTTP/1.1",
            details=f"unsupported version HTTP/{major}.{minor}",
        )
    # RFC 9110 §2.5: a later minor version of 1.x is handled as the highest we speak.
    return 1, min(minor, 1)


def _parse_fields(lines: list[bytes], max_fields: int) -> tuple[tuple[bytes, bytes], ...]:
    if len(lines) > max_fields:
        raise HeadTooLarge(
            f"the request has {len(lines)} header fields; at most {max_fields} are accepted",
            details=f"more than {max_fields} fields",
        )
    fields = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            raise BadRequest(
                "obsolete line folding (a field line starting with whitespace) is not accepted",
                details="obs-fold in field line",
            )
        match = _FIELD_LINE.fullmatch(line)
        if match is None:
            raise _malformed_field(line)
        fields.append((match["name"].lower(), match["value"]))
    return tuple(fields)


def _malformed_field(line: bytes) -> BadRequest:
    """The 400 for a field line that is none, naming the field by its name alone: the
    message is logged and sent back, and a value is no one's to see there (a
    'Proxy-Authorization Basic ...' with its colon missing carries a password). A line
    without a colon has no name to show."""
    token = _TOKEN_CHARS.match(line)  # stops before any space, colon or control
    assert token is not None  # "*": it matches, if only nothing
    name = line[: min(token.end(), 60)].decode("latin-1")
    if b":" not in line:
        where, details = "a line without a colon", "no colon"
    elif not name:
        where, details = "a line with no name before its colon", "no name"
    else:
        where, details = f"{name!a}", name
    return BadRequest(
        f"malformed header field ({where}): a field is 'Name: value', no space before the "
        "colon, no control characters in the value",
        details=f"malformed field: {details}",
    )


def _check_host(version: tuple[int, int], fields: tuple[tuple[bytes, bytes], ...]) -> None:
    """RFC 9112 §3.2: an HTTP/1.1 request has exactly one valid Host; 1.0 may omit it."""
    hosts = [value for name, value in fields if name == b"host"]
    if len(hosts) > 1:
        raise BadRequest("the request has more than one Host field", details="duplicate Host")
    if not hosts:
        if version >= (1, 1):
            raise BadRequest(
                "an HTTP/1.1 request needs a Host field, e.g. 'Host: example.com:443'",
                details="missing Host",
            )
        return
    if not _HOST_FIELD.fullmatch(hosts[0]):
        shown = _hide_userinfo(hosts[0])[:100].decode("latin-1")  # cut after: the @ may be far
        raise BadRequest(f"the Host field {shown!a} is not valid", details="bad Host")


def _check_no_content(fields: tuple[tuple[bytes, bytes], ...]) -> None:
    """RFC 9110 §9.3.6: a CONNECT request has no content. Bytes after its head are the
    tunnel's, so a Transfer-Encoding or a non-zero Content-Length would make a front end
    and this proxy read them differently (request smuggling): refused, as Envoy does.
    Content-Length: 0, which some clients send, says the same as nothing (also as a list
    of zeros, RFC 9110 §8.6)."""
    for name, value in fields:
        if name == b"transfer-encoding" or (
            name == b"content-length" and not _ZEROS.fullmatch(value)
        ):
            raise BadRequest(
                f"a CONNECT request has no content, but this one has {name.decode()}: "
                f"{value[:40].decode('latin-1')!a}; send the tunnel's bytes after the head",
                details=f"content on CONNECT: {name.decode()}",
            )


def parse_head(
    head: bytes,
    max_fields: int = DEFAULT_MAX_FIELDS,
    request_line: tuple[str, bytes, tuple[int, int]] | None = None,
) -> Request:
    """Parse one complete head (up to, not including, the empty line); ``request_line`` is
    its first line already parsed and its version judged, by a parser that checked it
    early."""
    first, *rest = head.split(b"\n")
    if request_line is None:
        method, target, sent_version = _parse_request_line(_strip_cr(first))
        version = _speak(sent_version)
    else:
        method, target, version = request_line
    fields = _parse_fields([_strip_cr(line) for line in rest], max_fields)
    _check_host(version, fields)
    if method != "CONNECT":
        return Request(
            method=method,
            target=show_target(target),
            http_version=version,
            fields=fields,
        )
    _check_no_content(fields)
    host, port, address = parse_authority(target)
    return Request(
        method=method,
        target=show_target(target),
        http_version=version,
        fields=fields,
        host=host,
        port=port,
        address=address,
    )


#: Heads parsed before, by (head, max_fields): at most this many, of at most this size each,
#: and never one that carries credentials (Proxy-Authorization), so none are kept here.
_SEEN_HEADS = 1024
_SEEN_HEAD_BYTES = 1024
_seen: dict[tuple[bytes, int], Request] = {}


class RequestParser:
    """Accumulates bytes until one request head is complete.

    Searching resumes where the last search stopped, so a client dribbling its head a byte at
    a time costs linear work, not quadratic. A request line that is already complete is
    checked at once, so garbage is refused without waiting for the rest of the head.
    """

    def __init__(
        self, max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES, max_fields: int = DEFAULT_MAX_FIELDS
    ) -> None:
        self.max_head_bytes = max_head_bytes
        self.max_fields = max_fields
        self._buf = bytearray()
        self._searched = 0  # bytes of _buf known to hold no end of head
        # An unfinished request line, searched on from where the last look stopped: bytes
        # known to hold no LF, and bytes known to be a token (-1: a token and a space came).
        self._line_searched = 0
        self._line_token = 0
        self._started = False  # past any empty lines before the request line
        self._empty_lines = 0
        self._request_line: tuple[str, bytes, tuple[int, int]] | None = None
        self._eof = False
        self._done = False
        self.trailing_data = b""

    @property
    def request_line(self) -> tuple[str, str] | None:
        """The method and the target (as :func:`show_target` shows it) once the request line
        has passed, also when the head is refused after it: the log can say what was asked."""
        if self._request_line is None:
            return None
        method, target, _ = self._request_line
        return method, show_target(target)

    def receive_data(self, data: bytes) -> None:
        """Append bytes from the client; ``b""`` means the client closed its side."""
        if data:
            self._buf += data
        else:
            self._eof = True

    def next_event(self) -> Request | _Sentinel:
        if self._done:
            raise RuntimeError("the parser has already returned its request")
        if not self._started:
            seen = self._seen_before()
            if seen is not None:
                return seen
        self._skip_leading_empty_lines()
        # Order matters so that a head fed whole and fed byte by byte fail alike: the
        # request line first (as soon as it is complete), then a bare CR (as soon as the
        # byte after it has come, within the limit), then the size, then the fields.
        self._check_request_line_early()
        match = _END_OF_HEAD.search(self._buf, max(0, self._searched - 2))
        self._check_bare_cr(len(self._buf) if match is None else match.start())
        end = len(self._buf) if match is None else match.end()
        if end > self.max_head_bytes or (match is None and end == self.max_head_bytes):
            if self._request_line is None:  # its line end is not within the limit
                raise RequestLineTooLong(
                    f"the request line is longer than {self.max_head_bytes} bytes, the most "
                    "this proxy reads of a request head; a CONNECT target is host:port",
                    details=f"request line over {self.max_head_bytes} bytes",
                )
            raise HeadTooLarge(
                f"the request head is larger than {self.max_head_bytes} bytes",
                details=f"head over {self.max_head_bytes} bytes",
            )
        if match is None:
            self._searched = len(self._buf)
            if not self._eof:
                return NEED_DATA
            if not self._buf:
                return CLOSED
            raise BadRequest(
                "the connection was closed before the request head was complete",
                details="incomplete request head",
            )
        head = bytes(self._buf[: match.start()])
        self.trailing_data = bytes(self._buf[match.end() :])
        self._buf.clear()
        self._done = True
        request = parse_head(head, self.max_fields, self._request_line)
        if len(head) <= _SEEN_HEAD_BYTES and request.field(b"proxy-authorization") is None:
            if len(_seen) >= _SEEN_HEADS:
                _seen.clear()
            _seen[head, self.max_fields] = request
        return request

    def _seen_before(self) -> Request | None:
        """The request, when the buffer holds a whole head (CRLF lines, no empty lines
        before it) that was parsed before: clients send the same few heads again and again.
        The key is the head exactly as the full path cuts it, so a hit is a head that passed
        every check, with the same field limit."""
        end = self._buf.find(b"\r\n\r\n")
        if end <= 0 or end + 4 > self.max_head_bytes:
            return None
        request = _seen.get((bytes(self._buf[: end + 1]), self.max_fields))
        if request is not None:
            self.trailing_data = bytes(self._buf[end + 4 :])
            self._buf.clear()
            self._done = True
        return request

    def _skip_leading_empty_lines(self) -> None:
        while not self._started and self._buf:
            if self._buf.startswith(b"\r\n"):
                del self._buf[:2]
            elif self._buf.startswith(b"\n"):
                del self._buf[:1]
            elif self._buf == b"\r":
                return  # its LF may still come
            else:
                self._started = True
                return
            self._searched = 0
            self._empty_lines += 1
            if self._empty_lines > _MAX_LEADING_EMPTY_LINES:
                raise BadRequest(
                    "the request starts with too many empty lines",
                    details="empty lines before request line",
                )

    def _check_request_line_early(self) -> None:
        if self._request_line is not None or not self._started:
            return
        limit = self.max_head_bytes
        end = self._buf.find(b"\n", self._line_searched, limit)
        if end < 0:
            # Not a whole line yet, but bytes no request line starts with (a TLS
            # handshake, say) are refused now, not after --header-timeout: a request line
            # starts with a token and a space. Only the bytes within the limit count: fed a
            # byte at a time, the line would be too long before any past it came.
            have = min(len(self._buf), limit)
            self._line_searched = have
            if self._line_token >= 0:
                token = _TOKEN_CHARS.match(self._buf, self._line_token, limit)
                assert token is not None  # "*": it matches, if only nothing
                token_end = token.end()
                if token_end == have:
                    self._line_token = have  # a token so far: its space may still come
                elif token_end > 0 and self._buf[token_end] == 0x20:
                    self._line_token = -1
                else:
                    raise _malformed_request_line(bytes(self._buf[:100]))
            return
        method, target, sent_version = _parse_request_line(_strip_cr(bytes(self._buf[:end])))
        self._request_line = method, target, sent_version  # for the log, also if _speak
        self._request_line = method, target, _speak(sent_version)  # refuses it (a 505)

    def _check_bare_cr(self, head_end: int) -> None:
        """A bare CR may keep the end of the head from ever coming (CR CR LF is no empty
        line), and the client would wait out --header-timeout for its 400: refused as soon
        as the byte after the CR has come. Only within the limit, where a head fed a byte at
        a time meets it before the size check; a CR after the head is the tunnel's. The
        search resumes at the last byte already searched, a CR whose next byte had not come."""
        end = min(head_end, self.max_head_bytes)
        if _BARE_CR.search(self._buf, max(0, self._searched - 1), end) is not None:
            raise _bare_cr()
