"""The sans-IO parser: every case fed whole, byte by byte, and with trailing bytes."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splicegate import errors
from splicegate import request as request_module
from splicegate.request import CLOSED, DEFAULT_MAX_FIELDS, NEED_DATA, Request, RequestParser

TRAILER = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfcCLIENTHELLO\r\n\r\nGET / HTTP/1.1\r\n\r\n"


def feed(data: bytes, *, bytewise: bool, close: bool = True, **limits: int):
    """Feed data whole or one byte at a time; return (event, trailing) or the error raised."""
    parser = RequestParser(**limits)
    chunks = [data[i : i + 1] for i in range(len(data))] if bytewise else [data][: len(data)]
    try:
        for chunk in chunks:
            parser.receive_data(chunk)
            event = parser.next_event()
            if event is not NEED_DATA:
                return event, parser.trailing_data
        if not close:
            return parser.next_event()
        parser.receive_data(b"")
        return parser.next_event(), parser.trailing_data
    except errors.ProxyError as err:
        return err


def parse_all_ways(head: bytes, **limits: int):
    """The one outcome of a head fed whole, byte by byte, and followed by tunnel bytes."""
    whole = feed(head, bytewise=False, **limits)
    dribbled = feed(head, bytewise=True, **limits)
    if isinstance(whole, errors.ProxyError):
        assert type(dribbled) is type(whole), (whole, dribbled)
        return whole
    # Byte by byte, the head ends with the byte that completes it: nothing trails yet.
    assert dribbled[0] == whole[0] and whole[1].startswith(dribbled[1])
    if whole[0] is CLOSED:
        return CLOSED
    event, trailing = feed(head + TRAILER, bytewise=False, **limits)
    assert trailing == whole[1] + TRAILER
    assert event == whole[0]
    return whole[0]


GOOD = [
    (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", "example.com", 443),
    (b"CONNECT example.com:443 HTTP/1.1\nHost: example.com\n\n", "example.com", 443),
    (b"CONNECT EXAMPLE.com.:8443 HTTP/1.1\r\nHost: x\r\n\r\n", "example.com", 8443),
    (b"CONNECT 192.0.2.1:1 HTTP/1.1\r\nHost: 192.0.2.1:1\r\n\r\n", "192.0.2.1", 1),
    (b"CONNECT [2001:db8::1]:65535 HTTP/1.1\r\nHost: [2001:db8::1]\r\n\r\n", "2001:db8::1", 65535),
    (b"CONNECT [::ffff:10.0.0.1]:443 HTTP/1.1\r\nHost: a\r\n\r\n", "::ffff:a00:1", 443),
    (b"CONNECT a_b.example:443 HTTP/1.0\r\n\r\n", "a_b.example", 443),
    (b"\r\nCONNECT a.example:443 HTTP/1.1\r\nHost: a\r\n\r\n", "a.example", 443),
    (b"CONNECT a.example:443 HTTP/1.1\r\nHost:\r\n\r\n", "a.example", 443),
    (
        b"CONNECT a.example:443 HTTP/1.1\r\nHost:   a.example  \r\nUser-Agent: x/1 (\xe9)\r\n"
        b"Proxy-Authorization: Basic Zm9vOmJhcg==\r\n\r\n",
        "a.example",
        443,
    ),
]


@pytest.mark.parametrize(("head", "host", "port"), GOOD)
def test_valid_connect(head: bytes, host: str, port: int) -> None:
    event = parse_all_ways(head)
    assert isinstance(event, Request)
    assert (event.method, event.host, event.port) == ("CONNECT", host, port)


def test_fields_and_ows_trimmed() -> None:
    event = parse_all_ways(
        b"CONNECT a.example:443 HTTP/1.1\r\nHost: \t a.example \t\r\nX-A: 1 2\r\n\r\n"
    )
    assert event.field(b"host") == b"a.example"
    assert event.field(b"x-a") == b"1 2"
    assert event.field(b"missing") is None


def test_http10_may_omit_host_and_later_minor_is_11() -> None:
    assert parse_all_ways(b"CONNECT a.example:443 HTTP/1.0\r\n\r\n").http_version == (1, 0)
    event = parse_all_ways(b"CONNECT a.example:443 HTTP/1.7\r\nHost: a\r\n\r\n")
    assert event.http_version == (1, 1)


def test_other_methods_parse_for_a_405() -> None:
    event = parse_all_ways(b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n")
    assert (event.method, event.target, event.port) == ("GET", "http://a.example/", 0)


BAD = {
    "no target port": b"CONNECT example.com HTTP/1.1\r\nHost: a\r\n\r\n",
    "empty port": b"CONNECT example.com: HTTP/1.1\r\nHost: a\r\n\r\n",
    "port zero": b"CONNECT example.com:0 HTTP/1.1\r\nHost: a\r\n\r\n",
    "port too big": b"CONNECT example.com:65536 HTTP/1.1\r\nHost: a\r\n\r\n",
    "port sign": b"CONNECT example.com:+443 HTTP/1.1\r\nHost: a\r\n\r\n",
    "empty host": b"CONNECT :443 HTTP/1.1\r\nHost: a\r\n\r\n",
    "origin-form": b"CONNECT / HTTP/1.1\r\nHost: a\r\n\r\n",
    "absolute-form": b"CONNECT https://a.example:443 HTTP/1.1\r\nHost: a\r\n\r\n",
    "userinfo": b"CONNECT user@a.example:443 HTTP/1.1\r\nHost: a\r\n\r\n",
    "unbracketed v6": b"CONNECT 2001:db8::1:443 HTTP/1.1\r\nHost: a\r\n\r\n",
    "bad v6": b"CONNECT [2001:db8::g]:443 HTTP/1.1\r\nHost: a\r\n\r\n",
    "bad v4": b"CONNECT 256.1.1.1:443 HTTP/1.1\r\nHost: a\r\n\r\n",
    "numeric name": b"CONNECT 2130706433:443 HTTP/1.1\r\nHost: a\r\n\r\n",
    "short dotted": b"CONNECT 127.1:443 HTTP/1.1\r\nHost: a\r\n\r\n",
    "label dash": b"CONNECT -a.example:443 HTTP/1.1\r\nHost: a\r\n\r\n",
    "empty label": b"CONNECT a..example:443 HTTP/1.1\r\nHost: a\r\n\r\n",
    "two spaces": b"CONNECT  a.example:443 HTTP/1.1\r\nHost: a\r\n\r\n",
    "no version": b"CONNECT a.example:443\r\nHost: a\r\n\r\n",
    "lower version": b"CONNECT a.example:443 http/1.1\r\nHost: a\r\n\r\n",
    "bad method": b"CON(NECT a.example:443 HTTP/1.1\r\nHost: a\r\n\r\n",
    "space before colon": b"CONNECT a.example:443 HTTP/1.1\r\nHost : a\r\n\r\n",
    "tab before colon": b"CONNECT a.example:443 HTTP/1.1\r\nHost\t: a\r\n\r\n",
    "obs-fold": b"CONNECT a.example:443 HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n 2\r\n\r\n",
    "obs-fold tab": b"CONNECT a.example:443 HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n\t2\r\n\r\n",
    "NUL in value": b"CONNECT a.example:443 HTTP/1.1\r\nHost: a\r\nX-A: 1\x002\r\n\r\n",
    "bare CR in value": b"CONNECT a.example:443 HTTP/1.1\r\nHost: a\r\nX-A: 1\r2\r\n\r\n",
    "bare CR line end": b"CONNECT a.example:443 HTTP/1.1\rHost: a\r\n\r\n",
    "CR CR LF": b"CONNECT a.example:443 HTTP/1.1\r\r\nHost: a\r\n\r\n",
    "control in value": b"CONNECT a.example:443 HTTP/1.1\r\nHost: a\r\nX-A: \x01\r\n\r\n",
    "no colon": b"CONNECT a.example:443 HTTP/1.1\r\nHost: a\r\nNoColon\r\n\r\n",
    "bad name char": b"CONNECT a.example:443 HTTP/1.1\r\nHost: a\r\nX(A): 1\r\n\r\n",
    "empty name": b"CONNECT a.example:443 HTTP/1.1\r\nHost: a\r\n: 1\r\n\r\n",
    "missing host 1.1": b"CONNECT a.example:443 HTTP/1.1\r\n\r\n",
    "two hosts": b"CONNECT a.example:443 HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
    "two hosts 1.0": b"CONNECT a.example:443 HTTP/1.0\r\nHost: a\r\nhost: b\r\n\r\n",
    "bad host": b"CONNECT a.example:443 HTTP/1.1\r\nHost: a b\r\n\r\n",
    "bad host port": b"CONNECT a.example:443 HTTP/1.1\r\nHost: a:44x\r\n\r\n",
    "too many empty lines": b"\r\n" * 5 + b"CONNECT a.example:443 HTTP/1.1\r\nHost: a\r\n\r\n",
    "truncated head": b"CONNECT a.example:443 HTTP/1.1\r\nHost: a\r\n",
    "content-length": b"CONNECT a.example:443 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n",
    "transfer-encoding": b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
}


@pytest.mark.parametrize("head", BAD.values(), ids=BAD.keys())
def test_malformed_is_400(head: bytes) -> None:
    err = parse_all_ways(head)
    assert isinstance(err, errors.BadRequest), err
    assert err.status == 400
    assert err.message and err.details


@pytest.mark.parametrize(
    ("target", "hint"),
    [
        (b"http://a.example/", "not a URL or a path"),
        (b"/index.html", "not a URL or a path"),
        (b"[::1]", "the port is missing"),
        (b"a.example", "the port is missing"),
        (b"a.example:", "must be a number from 1 to 65535"),
        (b":443", "the host is missing"),
        (b"[fe80::1%eth0]:443", "an IPv6 zone (%interface) cannot be named"),
        (b"a b:443", "malformed request line"),  # a space splits the request line itself
    ],
)
def test_a_bad_target_is_told_what_is_wrong_with_it(target: bytes, hint: str) -> None:
    err = parse_all_ways(b"CONNECT " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n")
    assert isinstance(err, errors.BadRequest) and hint in err.message, err.message


#: The start of a TLS 1.2/1.3 ClientHello record, as a client sends it to an https:// proxy URL.
CLIENT_HELLO = bytes.fromhex("160301020001") + b"\x00\x01\xfc\x03\x03" + bytes(32)


@pytest.mark.parametrize(
    ("start", "hint"),
    [
        (CLIENT_HELLO, "TLS handshake"),
        (b"GE\x00T", "malformed request line"),
        (b" CONNECT", "malformed request line"),
    ],
)
def test_a_line_no_request_starts_with_is_refused_before_it_ends(start: bytes, hint: str) -> None:
    """Without waiting for a newline, which a TLS client never sends: else the client
    would wait out --header-timeout for an answer it cannot read anyway."""
    for bytewise in (False, True):
        err = feed(start, bytewise=bytewise, close=False)
        assert isinstance(err, errors.BadRequest) and hint in err.message, err
    assert isinstance(parse_all_ways(start + b"\r\n\r\n"), errors.BadRequest)


@pytest.mark.parametrize("start", [b"C", b"CONNECT", b"CONNECT ", b"CONNECT a.example:4", b"x-y "])
def test_the_start_of_a_request_line_waits_for_the_rest(start: bytes) -> None:
    assert feed(start, bytewise=False, close=False) is NEED_DATA
    assert feed(start, bytewise=True, close=False) is NEED_DATA


BARE_CR_BEFORE_THE_END = {
    "CR CR LF for the empty line": (
        b"CONNECT 127.0.0.1:9000 HTTP/1.1\r\nHost: 127.0.0.1:9000\r\n\r\r\nx"
    ),
    "CR in a field, no end yet": b"CONNECT a.example:443 HTTP/1.1\r\nHost: a\r\nX-A: 1\r2",
    "CR ends the request line": b"CONNECT a.example:443 HTTP/1.1\rHost: a.example:443",
    "CR in the target": b"CONNECT a.exa\rmple:443",
    "CR LF CR": b"CONNECT a.example:443 HTTP/1.1\r\n\rX",
}


@pytest.mark.parametrize("data", BARE_CR_BEFORE_THE_END.values(), ids=BARE_CR_BEFORE_THE_END.keys())
def test_a_bare_cr_is_refused_as_soon_as_the_byte_after_it_comes(data: bytes) -> None:
    """The end of the head may never come after a bare CR (CR CR LF is no empty line), and
    the client would wait out --header-timeout for its 400: it is refused at once."""
    refused = parse_all_ways(BAD["bare CR in value"])
    for bytewise in (False, True):
        err = feed(data, bytewise=bytewise, close=False)
        assert isinstance(err, errors.BadRequest), err
        assert (err.message, err.details) == (refused.message, refused.details)


@pytest.mark.parametrize(
    "data",
    [
        b"\r",
        b"CONNECT a.example:443 HTTP/1.1\r",
        b"CONNECT a.example:443 HTTP/1.1\r\nHost: a\r",
        b"CONNECT a.example:443 HTTP/1.1\r\nHost: a\r\n\r",
    ],
)
def test_a_cr_last_waits_for_the_byte_after_it(data: bytes) -> None:
    """Its LF may be in the next segment."""
    assert feed(data, bytewise=False, close=False) is NEED_DATA
    assert feed(data, bytewise=True, close=False) is NEED_DATA


def test_a_bare_cr_within_the_limit_is_a_400_before_the_size() -> None:
    """Fed byte by byte the CR is refused before the limit is reached, so fed whole it must
    be too; a CR past the limit is never looked at, and the head is too large."""
    start = b"CONNECT a.example:443 HTTP/1.1\r\nHost: a\r\nX-Pad: "
    err = parse_all_ways(start + b"1\r2" + b"p" * 2000 + b"\r\n\r\n", max_head_bytes=1024)
    assert isinstance(err, errors.BadRequest) and "bare CR" in err.message, err
    err = parse_all_ways(start + b"p" * 2000 + b"\r2\r\n\r\n", max_head_bytes=1024)
    assert isinstance(err, errors.HeadTooLarge), err
    # the CR is the limit's last byte: the byte after it is past the limit, and never read
    at_limit = start + b"p" * (1023 - len(start)) + b"\rX\r\n\r\n"
    err = parse_all_ways(at_limit, max_head_bytes=1024)
    assert isinstance(err, errors.HeadTooLarge), err


@pytest.mark.parametrize("value", [b"0", b"00", b"0, 0", b"0,0"])
def test_content_length_zero_on_a_connect_is_no_content(value: bytes) -> None:
    head = b"CONNECT a.example:443 HTTP/1.1\r\nHost: a\r\nContent-Length: " + value + b"\r\n\r\n"
    request = parse_all_ways(head)
    assert isinstance(request, Request) and request.host == "a.example"


@pytest.mark.parametrize(
    "version", [b"HTTP/2.0", b"HTTP/0.9", b"HTTP/3.0", b"HTTP/9.9"], ids=lambda v: v.decode()
)
def test_major_version_not_1_is_505(version: bytes) -> None:
    err = parse_all_ways(b"CONNECT a.example:443 " + version + b"\r\nHost: a\r\n\r\n")
    assert isinstance(err, errors.VersionNotSupported)
    assert err.status == 505


def test_version_refused_before_the_head_is_complete() -> None:
    parser = RequestParser()
    parser.receive_data(b"CONNECT a.example:443 HTTP/2.0\r\nHost: a")
    with pytest.raises(errors.VersionNotSupported):
        parser.next_event()


def test_garbage_first_line_fails_early() -> None:
    parser = RequestParser()
    parser.receive_data(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\n")
    with pytest.raises(errors.BadRequest):
        parser.next_event()
    assert parser.request_line is None  # nothing a log could show as method and target


@pytest.mark.parametrize(
    ("head", "line"),
    [
        (b"CONNECT a.example HTTP/1.1\r\nHost: a\r\n\r\n", ("CONNECT", "a.example")),
        (b"CONNECT \xe4.example:443 HTTP/1.1\r\n\r\n", ("CONNECT", "\\xe4.example:443")),
        (b"CONNECT a.example:443 HTTP/1.1\r\nHost a\r\n\r\n", ("CONNECT", "a.example:443")),
        (b"CONNECT a.example:443 HTTP/2.0\r\n", ("CONNECT", "a.example:443")),  # a 505
        # a backslash the client sent is doubled: it cannot pass for an escaped byte
        (b"CONNECT a\\xe4:443 HTTP/1.1\r\n\r\n", ("CONNECT", "a\\\\xe4:443")),
    ],
)
def test_a_refused_head_keeps_its_request_line_for_the_log(head: bytes, line: tuple) -> None:
    parser = RequestParser()
    assert parser.request_line is None
    parser.receive_data(head)
    with pytest.raises((errors.BadRequest, errors.VersionNotSupported)):
        parser.next_event()
    assert parser.request_line == line


@pytest.mark.parametrize(
    ("head", "secret"),
    [
        # the colon missing: the whole line would have passed for the field's name
        (b"CONNECT a.example:443 HTTP/1.1\r\nHost: a\r\n"
         b"Proxy-Authorization Basic YWxpY2U6UzNjcmV0UFch\r\n\r\n", b"YWxpY2U6UzNjcmV0UFch"),
        (b"CONNECT a.example:443 HTTP/1.1\r\nProxy-Authorization : Basic c2VjcmV0\r\n\r\n",
         b"c2VjcmV0"),
        (b"CONNECT alice:S3cret@a.example:443 HTTP/1.1\r\nHost: a\r\n\r\n", b"S3cret"),
        (b"CONNECT alice:S3/cret@a.example:443 HTTP/1.1\r\nHost: a\r\n\r\n", b"S3/cret"),
        (b"CONNECT alice:S3//cret@a.example:443 HTTP/1.1\r\nHost: a\r\n\r\n", b"S3"),
        (b"CONNECT a.example:443 HTTP/1.1\r\nHost: alice:S3/cret@a\r\n\r\n", b"S3/cret"),
        (b"CONNECT a.example:443 HTTP/1.1\r\nHost: alice:S3cret" + b"x" * 100 + b"@a\r\n\r\n",
         b"S3cret"),  # the @ beyond the part of the field a message shows
        (b"CONNECT http://alice:S3cret@a.example/ HTTP/1.1\r\nHost: a\r\n\r\n", b"S3cret"),
        (b"CONNECT a.example:443 HTTP/1.1\r\nHost: alice:S3cret@a\r\n\r\n", b"S3cret"),
    ],
)  # fmt: skip
def test_a_refusal_never_repeats_credentials(head: bytes, secret: bytes) -> None:
    """What a 400 says is logged and sent back: no password or credential in it, nor in
    the request line kept for the log, wherever the client put it."""
    err = parse_all_ways(head)
    assert isinstance(err, errors.BadRequest)
    parser = RequestParser()
    parser.receive_data(head)
    with pytest.raises(errors.BadRequest):
        parser.next_event()
    shown = [err.message, err.details or "", repr(parser.request_line), errors.render(err)]
    for text in shown:
        assert secret.decode() not in (text if isinstance(text, str) else text.decode())


@pytest.mark.parametrize(
    ("line", "details"),
    [(b"NoColon", "no colon"), (b": 1", "no name"), (b"X(A): 1", "X"), (b"Host : a", "Host")],
)
def test_a_malformed_field_is_named_by_what_is_wrong(line: bytes, details: str) -> None:
    err = parse_all_ways(b"CONNECT a.example:443 HTTP/1.1\r\n" + line + b"\r\n\r\n")
    assert isinstance(err, errors.BadRequest)
    assert err.details == f"malformed field: {details}"


def test_head_over_limit_is_431() -> None:
    head = b"CONNECT a.example:443 HTTP/1.1\r\nHost: a\r\nX-Pad: " + b"a" * 2000 + b"\r\n\r\n"
    err = parse_all_ways(head, max_head_bytes=1024)
    assert isinstance(err, errors.HeadTooLarge)
    assert err.status == 431
    # no end of head in sight, the buffer over the limit: refused without waiting for more
    assert isinstance(
        feed(head[:1500], bytewise=False, close=False, max_head_bytes=1024), errors.HeadTooLarge
    )


def test_a_request_line_over_the_limit_is_414() -> None:
    """RFC 9112 §3: a target longer than the server wishes to parse is a 414, which tells
    the client that the target is what to shorten, not its fields."""
    line = b"CONNECT " + b"a" * 2000 + b".example:443 HTTP/1.1\r\n"
    err = parse_all_ways(line + b"Host: a\r\n\r\n", max_head_bytes=1024)
    assert isinstance(err, errors.RequestLineTooLong), err
    assert err.status == 414
    assert "request line" in err.message and "1024 bytes" in err.message, err.message
    # no newline in sight and the limit reached: refused without waiting for more
    for bytewise in (False, True):
        early = feed(line[:1024], bytewise=bytewise, close=False, max_head_bytes=1024)
        assert isinstance(early, errors.RequestLineTooLong), early
        assert feed(line[:1023], bytewise=bytewise, close=False, max_head_bytes=1024) is NEED_DATA


@pytest.mark.parametrize(
    ("line_bytes", "refusal"),
    [(1024, errors.HeadTooLarge), (1025, errors.RequestLineTooLong)],
)
def test_a_request_line_that_fits_the_limit_leaves_the_blame_to_the_fields(
    line_bytes: int, refusal: type[errors.ProxyError]
) -> None:
    """The line with its CRLF within the limit: what pushes the head past it is a 431."""
    line = b"CONNECT " + b"a" * (line_bytes - 23) + b":443 HTTP/1.1\r\n"
    assert len(line) == line_bytes
    err = parse_all_ways(line + b"Host: a\r\n\r\n", max_head_bytes=1024)
    assert type(err) is refusal, err


@pytest.mark.parametrize("line", [b"CONNECTS:443 HTTP/1.1\r\n", b"CONNECT\x16\r\n"])
def test_the_start_of_a_request_line_is_judged_within_the_limit(line: bytes) -> None:
    """Fed a byte at a time, a line is refused for its size on reaching the limit, before
    the bytes past it are seen; fed whole, what lies past it must not decide either."""
    err = parse_all_ways(line + b"Host: a\r\n\r\n", max_head_bytes=7)
    assert isinstance(err, errors.RequestLineTooLong), err


def test_head_exactly_at_limit_is_accepted() -> None:
    head = b"CONNECT a.example:443 HTTP/1.1\r\nHost: a\r\nX-Pad: "
    head += b"a" * (1024 - len(head) - 4) + b"\r\n\r\n"
    assert len(head) == 1024
    assert isinstance(parse_all_ways(head, max_head_bytes=1024), Request)
    assert isinstance(parse_all_ways(head + b"", max_head_bytes=1023), errors.HeadTooLarge)


def test_trailing_bytes_do_not_count_against_the_limit() -> None:
    head = b"CONNECT a.example:443 HTTP/1.1\r\nHost: a\r\n\r\n"
    event, trailing = feed(head + b"x" * 100_000, bytewise=False, max_head_bytes=1024)
    assert isinstance(event, Request)
    assert len(trailing) == 100_000


def test_too_many_fields_is_431() -> None:
    head = b"CONNECT a.example:443 HTTP/1.1\r\nHost: a\r\n"
    head += b"".join(b"X-%d: 1\r\n" % i for i in range(100)) + b"\r\n"
    err = parse_all_ways(head, max_fields=100)
    assert isinstance(err, errors.HeadTooLarge)
    assert isinstance(parse_all_ways(head, max_fields=101), Request)


def test_need_data_then_closed() -> None:
    parser = RequestParser()
    assert parser.next_event() is NEED_DATA
    parser.receive_data(b"")
    assert parser.next_event() is CLOSED


def test_trailing_data_untouched_even_if_it_looks_like_a_request() -> None:
    smuggled = b"CONNECT internal:22 HTTP/1.1\r\nHost: internal\r\n\r\n"
    event, trailing = feed(
        b"CONNECT a.example:443 HTTP/1.1\r\nHost: a\r\n\r\n" + smuggled, bytewise=False
    )
    assert event.host == "a.example"
    assert trailing == smuggled


# --- property-based sweep --------------------------------------------------------------
# Hostile input in bounded runs: random bytes, soup of meaningful tokens, and valid heads
# mutated (bytes flipped, inserted, deleted, duplicated), fed in random chunks with random
# limits. The invariant, as the fuzz target's (fuzz/fuzz_request.py): a Request, NEED_DATA,
# CLOSED or a splicegate ProxyError, and the same outcome however the bytes are split.

HEAD_PARTS = st.sampled_from(
    [b"CONNECT", b"GET", b" ", b"  ", b"a.example", b":443", b":0", b"[::1]", b"HTTP/1.1",
     b"HTTP/2.0", b"\r\n", b"\n", b"\r", b"Host: a", b"Host : a", b"X: \x00", b"\t", b":",
     b"\xff", b"1.2.3.4", b"\r\n\r\n", b"Proxy-Authorization: Basic YTpi", b"HTTP/1.0",
     b"[2001:db8::1]:443", b"%", b"@", b"\x00"]
)  # fmt: skip
VALID_HEADS = [head for head, _, _ in GOOD] + [
    b"CONNECT a.example:443 HTTP/1.0\r\n\r\n",
    b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n",
]


@st.composite
def mutated_heads(draw: st.DrawFn) -> bytes:
    buf = bytearray(draw(st.sampled_from(VALID_HEADS)))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(buf)))
        how = draw(st.integers(0, 3))
        if how == 0 and buf:
            del buf[min(at, len(buf) - 1)]
        elif how == 1:
            buf[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif how == 2 and buf:
            buf[min(at, len(buf) - 1)] = draw(st.integers(0, 255))
        else:
            buf[at:at] = bytes(buf[at : at + draw(st.integers(1, 30))]) * draw(st.integers(1, 8))
    return bytes(buf)


HEADS = st.one_of(
    st.binary(max_size=300),
    st.lists(HEAD_PARTS, max_size=20).map(b"".join),
    mutated_heads(),
)


def outcome_of(data: bytes, cuts: list[int], **limits: int):
    """Feed ``data`` split at ``cuts``, then EOF: the event, or the type of error raised."""
    parser = RequestParser(**limits)
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    try:
        for low, high in itertools.pairwise(bounds):
            if high > low:
                parser.receive_data(data[low:high])
                event = parser.next_event()
                if event is not NEED_DATA:
                    return event, parser.trailing_data
        parser.receive_data(b"")
        return parser.next_event(), parser.trailing_data
    except errors.ProxyError as err:
        assert 400 <= err.status < 600 and err.message and err.details
        assert err.status in (400, 414, 431, 505), err
        # the body quotes the client's bytes as escapes, never as latin-1 characters
        assert err.message.isascii(), err
        return type(err)


@settings(max_examples=400, deadline=None)
@given(HEADS)
def test_any_input_gives_request_need_data_or_typed_error(data: bytes) -> None:
    for bytewise in (False, True):
        outcome = feed(data, bytewise=bytewise, close=False, max_head_bytes=256)
        assert (
            outcome is NEED_DATA
            or isinstance(outcome, errors.ProxyError)
            or (isinstance(outcome, tuple) and isinstance(outcome[0], Request))
        ), outcome
        if isinstance(outcome, errors.ProxyError):
            assert 400 <= outcome.status < 600
            assert outcome.status in (400, 414, 431, 505)
    # fed whole and fed byte by byte, a head meets the same fate
    parse_all_ways(data, max_head_bytes=256)


@settings(max_examples=300, deadline=None)
@given(
    HEADS,
    st.lists(st.integers(0, 10_000), max_size=8),
    st.integers(64, 512),
    st.integers(1, 8),
)
def test_any_split_and_any_limits_give_one_outcome(
    data: bytes, cuts: list[int], max_head_bytes: int, max_fields: int
) -> None:
    limits = {"max_head_bytes": max_head_bytes, "max_fields": max_fields}
    split = outcome_of(data, cuts, **limits)
    whole = outcome_of(data, [], **limits)
    if not isinstance(whole, tuple):
        assert split == whole, (split, whole)  # the same kind of error
        return
    assert isinstance(split, tuple) and split[0] == whole[0], (split, whole)
    event, trailing = whole
    assert event is CLOSED or isinstance(event, Request)
    if isinstance(event, Request):
        assert len(event.fields) <= max_fields
        # what trailed is never lost or reordered: split, less of it may have arrived yet
        assert data.endswith(trailing) and trailing.startswith(split[1])


@settings(max_examples=200, deadline=None)
@given(
    host=st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?(\.[a-z]{1,8}){1,3}", fullmatch=True),
    port=st.integers(1, 65535),
    fields=st.lists(
        st.tuples(
            st.from_regex(r"X-[A-Za-z0-9-]{1,10}", fullmatch=True),
            st.from_regex(r"[ -~]{0,20}", fullmatch=True).map(str.strip),
        ),
        max_size=5,
    ),
)
def test_generated_valid_requests_round_trip(host: str, port: int, fields) -> None:
    head = f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in fields) + "\r\n"
    event = parse_all_ways(head.encode())
    assert isinstance(event, Request)
    assert (event.host, event.port) == (host, port)
    assert len(event.fields) == 1 + len(fields)


# --- heads seen before ----------------------------------------------------------------------


def fresh_head(tag: str, *fields: str) -> bytes:
    """A head no other test has sent, so the first parse cannot be a hit."""
    lines = [f"CONNECT {tag}.seen.test:443 HTTP/1.1", f"Host: {tag}.seen.test:443", *fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_a_head_seen_before_gives_the_same_request_and_its_own_trailing_bytes() -> None:
    head = fresh_head("again", "User-Agent: t/1")
    first, first_rest = feed(head + b"one", bytewise=False)
    assert request_module._seen[head[:-3], DEFAULT_MAX_FIELDS] is first
    second, second_rest = feed(head + b"\x16two", bytewise=False)
    assert second is first and (first_rest, second_rest) == (b"one", b"\x16two")
    assert first.host == "again.seen.test" and first.field(b"user-agent") == b"t/1"


def test_a_head_with_credentials_is_never_kept() -> None:
    head = fresh_head("secret", "Proxy-Authorization: Basic dTpw")
    request, _ = feed(head, bytewise=False)
    assert request.field(b"proxy-authorization") == b"Basic dTpw"
    assert not any(b"dTpw" in key for key, _ in request_module._seen)


def test_a_head_seen_before_is_judged_again_under_other_limits() -> None:
    head = fresh_head("limits", "A: 1", "B: 2")
    request, _ = feed(head, bytewise=False)
    assert isinstance(request, Request)
    assert isinstance(feed(head, bytewise=False, max_fields=2), errors.HeadTooLarge)
    assert isinstance(feed(head, bytewise=False, max_head_bytes=len(head) - 1), errors.HeadTooLarge)
    # and after empty lines before it (no hit: the full path skips them), the same request
    assert feed(b"\r\n" + head, bytewise=False)[0] == request
