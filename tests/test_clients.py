"""Real clients through the proxy to a TLS origin with a throwaway CA: curl, http.client,
requests. What users run, with what users see when it fails."""

from __future__ import annotations

import http.client
import shutil
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import trustme

from proxyproc import WAIT, Origin, ProxyProcess, http_responder, origin, recv_exactly

BODY = b"hello through the tunnel\n"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


serve_http = http_responder(BODY, "text/plain")


@pytest.fixture(scope="module")
def tls_origin(ca: trustme.CA) -> Iterator[Origin]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    with origin(serve_http, tls=context) as server:
        yield server


@pytest.fixture(scope="module")
def proxy() -> Iterator[ProxyProcess]:
    proc = ProxyProcess("--allow-dest", "127.0.0.0/8", "--allow-dest", "::1/128",
                        "--allow-port", "any")  # fmt: skip
    yield proc
    assert proc.stop() == 0


def proxy_url(proxy: ProxyProcess) -> str:
    return f"http://{proxy.address[0]}:{proxy.address[1]}"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_https_through_the_tunnel(proxy: ProxyProcess, tls_origin: Origin,
                                       ca_file: Path) -> None:  # fmt: skip
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "-p", "-x", proxy_url(proxy), "--cacert",
         str(ca_file), f"https://localhost:{tls_origin.port}/"],
        capture_output=True, timeout=WAIT, check=True,
    )  # fmt: skip
    assert out.stdout == BODY


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_reports_the_proxy_status(proxy: ProxyProcess) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        out = subprocess.run(
            ["curl", "-sS", "--max-time", "10", "-p", "-x", proxy_url(proxy), "-v",
             f"http://127.0.0.1:{port}/"],
            capture_output=True, timeout=WAIT,
        )  # fmt: skip
    assert out.returncode == 56  # CURLE_RECV_ERROR: the proxy refused the tunnel
    assert b"HTTP/1.1 502 Bad Gateway" in out.stderr
    assert b"Proxy-Status: splicegate; error=connection_refused" in out.stderr


def test_http_client_tunnel(proxy: ProxyProcess, tls_origin: Origin, ca_file: Path) -> None:
    context = ssl.create_default_context(cafile=str(ca_file))
    conn = http.client.HTTPSConnection(*proxy.address, timeout=WAIT, context=context)
    conn.set_tunnel("localhost", tls_origin.port)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, BODY)
    finally:
        conn.close()


def test_http_client_tunnel_refused(proxy: ProxyProcess) -> None:
    conn = http.client.HTTPConnection(*proxy.address, timeout=WAIT)
    conn.set_tunnel("nonexistent.invalid..", 443)
    with pytest.raises(OSError, match="400"):
        conn.request("GET", "/")
    conn.close()


def test_requests_with_proxies(proxy: ProxyProcess, tls_origin: Origin, ca_file: Path) -> None:
    response = requests.get(
        f"https://localhost:{tls_origin.port}/",
        proxies={"https": proxy_url(proxy)},
        verify=str(ca_file),
        timeout=WAIT,
    )
    assert (response.status_code, response.content) == (200, BODY)


def test_requests_sees_a_refusal() -> None:
    strict = ProxyProcess()  # default policy: loopback destinations denied
    try:
        with pytest.raises(requests.exceptions.ProxyError, match="403"):
            requests.get("https://127.0.0.1:443/", proxies={"https": proxy_url(strict)},
                         timeout=WAIT)  # fmt: skip
    finally:
        strict.stop()


def test_tls_handshake_bytes_sent_early(proxy: ProxyProcess, tls_origin: Origin,
                                        ca_file: Path) -> None:  # fmt: skip
    """A client that sends its ClientHello with the CONNECT head, without waiting for 200."""
    context = ssl.create_default_context(cafile=str(ca_file))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    with socket.create_connection(proxy.address, timeout=WAIT) as sock:
        head = f"CONNECT localhost:{tls_origin.port} HTTP/1.1\r\nHost: localhost\r\n\r\n"
        sock.sendall(head.encode() + hello)
        expected = b"HTTP/1.1 200 Connection established\r\n\r\n"
        assert recv_exactly(sock, len(expected)) == expected
        for _ in range(20):  # bounded: a TLS 1.3 handshake needs a few flights
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if data := outgoing.read():
                    sock.sendall(data)
                incoming.write(sock.recv(65536))
        sock.sendall(outgoing.read())
        tls.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        sock.sendall(outgoing.read())
        received = b""
        for _ in range(20):
            try:
                received += tls.read(65536)
            except ssl.SSLWantReadError:
                incoming.write(sock.recv(65536))
                continue
            except ssl.SSLZeroReturnError:
                break
            if received.endswith(BODY):
                break
    assert received.startswith(b"HTTP/1.1 200 OK") and received.endswith(BODY)
