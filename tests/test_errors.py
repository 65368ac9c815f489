"""The one table: every cause answered with its status, Proxy-Status and a readable body."""

from __future__ import annotations

import pytest

from splicegate import errors

EXPECTED = {
    errors.BadRequest: (400, "http_request_error"),
    errors.ClientDenied: (403, "http_request_denied"),
    errors.PortDenied: (403, "http_request_denied"),
    errors.DomainDenied: (403, "http_request_denied"),
    errors.DestinationDenied: (403, "destination_ip_prohibited"),
    errors.ProxyLoop: (403, "proxy_loop_detected"),
    errors.MethodNotAllowed: (405, "http_request_denied"),
    errors.AuthRequired: (407, None),
    errors.HeadTimeout: (408, "http_request_error"),
    errors.RequestLineTooLong: (414, "http_request_error"),
    errors.HeadTooLarge: (431, "http_request_error"),
    errors.OverCapacity: (503, "proxy_internal_response"),
    errors.AuthOverloaded: (503, "proxy_internal_response"),
    errors.OutOfResources: (503, "proxy_internal_response"),
    errors.ShuttingDown: (503, "proxy_internal_response"),
    errors.DnsTimeout: (504, "dns_timeout"),
    errors.DnsError: (502, "dns_error"),
    errors.ConnectionRefused: (502, "connection_refused"),
    errors.DestinationUnavailable: (502, "destination_unavailable"),
    errors.ConnectTimeout: (504, "connection_timeout"),
    errors.VersionNotSupported: (505, "http_protocol_error"),
    errors.InternalError: (500, "proxy_internal_error"),
}


def parse_response(raw: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines)
    return status_line, fields, body


def test_every_error_class_is_in_the_table_and_never_3xx() -> None:
    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    assert set(subclasses(errors.ProxyError)) == set(errors.TABLE) == set(EXPECTED)
    assert all(not 300 <= r.status < 400 for r in errors.TABLE.values())


@pytest.mark.parametrize("cls", EXPECTED, ids=lambda c: c.__name__)
def test_render(cls: type[errors.ProxyError]) -> None:
    err = cls("port 25 is not allowed; allow it with --allow-port 25")
    status_line, fields, body = parse_response(errors.render(err))
    status, token = EXPECTED[cls]
    assert status_line.startswith(f"HTTP/1.1 {status} ")
    assert fields["Content-Type"] == "text/plain; charset=utf-8"
    assert fields["Content-Length"] == str(len(body))
    assert fields["Connection"] == "close"
    assert body == b"port 25 is not allowed; allow it with --allow-port 25\n"
    if token is None:
        assert fields["Proxy-Status"] == "splicegate"
    else:
        assert fields["Proxy-Status"] == (
            f'splicegate; error={token}; details="port 25 is not allowed; allow it with '
            '--allow-port 25"'
        )


def test_proxy_status_details_example_and_quoting() -> None:
    err = errors.DnsError(
        "the name example.invalid does not exist", details="no such name: example.invalid"
    )
    assert errors.proxy_status(err) == (
        'splicegate; error=dns_error; details="no such name: example.invalid"'
    )
    err.rcode = "NXDOMAIN"  # RFC 9209 §2.3.3's own parameter for it
    assert errors.proxy_status(err) == (
        'splicegate; error=dns_error; rcode="NXDOMAIN"; details="no such name: example.invalid"'
    )
    tricky = errors.BadRequest("x", details='a "quoted" \\ name\r\n\x00é')
    assert errors.proxy_status(tricky).endswith(r'details="a \"quoted\" \\ name????"')


def test_extra_fields() -> None:
    _, fields, _ = parse_response(errors.render(errors.MethodNotAllowed("no")))
    assert fields["Allow"] == "CONNECT"
    _, fields, _ = parse_response(errors.render(errors.OverCapacity("busy", retry_after=3)))
    assert fields["Retry-After"] == "3"
    _, fields, _ = parse_response(errors.render(errors.AuthRequired("who?", realm='my "r"')))
    assert fields["Proxy-Authenticate"] == 'Basic realm="my \\"r\\"", charset="UTF-8"'
