"""The proxy end to end: a real ``splicegate`` process, real clients, loopback origins.

Every row of DESIGN.md's error table (but 407 and 503, owned by the security issue), the
tunnel itself with early bytes, half-close, resets and timeouts, many tunnels at once, IPv6,
HTTP/1.0, and no descriptor left behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from dnsserver import DnsServer
from proxyproc import (
    WAIT,
    ProxyProcess,
    connect_head,
    exchange,
    free_port,
    full_accept_queue,
    ipv6_loopback,
    open_tunnel,
    origin,
    read_reply,
    recv_exactly,
    recv_until_eof,
    request,
    sha256,
)

LOOPBACK_OK = ("--allow-dest", "127.0.0.0/8", "--allow-dest", "::1/128", "--allow-port", "any")


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    with DnsServer() as server:
        server.add("origin.test", a=["127.0.0.1"])
        server.add("nx.test", mode="nxdomain")
        server.add("fail.test", mode="servfail")
        server.add("empty.test", mode="noanswer")
        server.add("silent.test", mode="drop")
        server.add("private.test", a=["10.1.2.3"])
        server.add("metadata.test", a=["169.254.169.254"])
        server.add("mapped.test", aaaa=["::ffff:127.0.0.1"])
        yield server


@pytest.fixture(scope="module")
def proxy(dns: DnsServer) -> Iterator[ProxyProcess]:
    """A proxy that may reach loopback origins on any port, names from the test DNS."""
    nameserver = f"{dns.host}:{dns.port}"
    proc = ProxyProcess(
        *LOOPBACK_OK, "--nameserver", nameserver, "--dns-timeout", "1", "--connect-timeout", "1"
    )
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def strict_proxy() -> Iterator[ProxyProcess]:
    """A proxy with the default policy: port 443 only, no private destinations."""
    proc = ProxyProcess()
    yield proc
    assert proc.stop() == 0


def assert_refused(reply, status: int, error: str | None, *, body_has: str = "") -> None:
    assert reply.status == status, (reply.status, reply.body)
    assert reply.fields["connection"] == "close"
    assert reply.fields["content-type"] == "text/plain; charset=utf-8"
    assert int(reply.fields["content-length"]) == len(reply.body) > 0
    if error is None:
        assert reply.fields["proxy-status"] == "splicegate"
    else:
        assert reply.fields["proxy-status"].startswith(f"splicegate; error={error}; ")
        assert "; details=" in reply.fields["proxy-status"]
    assert body_has in reply.body.decode()


# --- the tunnel ---------------------------------------------------------------------------


def test_tunnel_with_early_bytes(proxy: ProxyProcess) -> None:
    with origin() as server:
        early = b"\x16\x03\x01 a ClientHello sent before the 200"
        sock, reply = open_tunnel(proxy.address, f"127.0.0.1:{server.port}", early=early)
        with sock:
            assert reply.status == 200
            assert reply.raw_head == b"HTTP/1.1 200 Connection established\r\n\r\n"
            assert recv_exactly(sock, len(early)) == early
            sock.sendall(b"after")
            assert recv_exactly(sock, 5) == b"after"


def test_http10_connect_and_name_from_dns(proxy: ProxyProcess) -> None:
    with origin() as server:
        sock, reply = open_tunnel(proxy.address, f"origin.test:{server.port}", version="1.0",
                                  host="")  # fmt: skip
        with sock:
            assert reply.status == 200
            sock.sendall(b"ping")
            assert recv_exactly(sock, 4) == b"ping"


def test_half_close_client_first(proxy: ProxyProcess) -> None:
    """The client's EOF reaches the origin, which still answers everything, then closes."""
    payload = os.urandom(3 * 1024 * 1024)
    with origin() as server:
        sock, reply = open_tunnel(proxy.address, f"127.0.0.1:{server.port}")
        with sock:
            assert reply.status == 200
            received = exchange(sock, payload)
    assert sha256(received) == sha256(payload)
    assert not server.errors


def test_half_close_origin_first(proxy: ProxyProcess) -> None:
    """The origin's EOF reaches the client; the client can still send, and it arrives."""
    got: list[bytes] = []

    def greet_then_listen(conn: socket.socket) -> None:
        conn.sendall(b"hello")
        conn.shutdown(socket.SHUT_WR)
        got.append(recv_until_eof(conn))

    with origin(greet_then_listen) as server:
        sock, reply = open_tunnel(proxy.address, f"127.0.0.1:{server.port}")
        with sock:
            assert reply.status == 200
            assert recv_until_eof(sock) == b"hello"
            sock.sendall(b"still open upstream")
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(1) == b""
        server.close()
    assert got == [b"still open upstream"]


def test_origin_reset_reaches_client(proxy: ProxyProcess) -> None:
    def reset(conn: socket.socket) -> None:
        conn.recv(10)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")

    with origin(reset) as server:
        sock, reply = open_tunnel(proxy.address, f"127.0.0.1:{server.port}")
        with sock:
            assert reply.status == 200
            sock.sendall(b"x")
            with pytest.raises(ConnectionResetError):
                recv_until_eof(sock)


def test_client_reset_reaches_origin(proxy: ProxyProcess) -> None:
    outcome: list[BaseException | bytes] = []
    ready = threading.Event()

    def wait_for_abort(conn: socket.socket) -> None:
        conn.sendall(b"ready")
        ready.set()
        try:
            outcome.append(recv_until_eof(conn))
        except OSError as exc:
            outcome.append(exc)

    with origin(wait_for_abort) as server:
        sock, reply = open_tunnel(proxy.address, f"127.0.0.1:{server.port}")
        assert reply.status == 200
        assert recv_exactly(sock, 5) == b"ready"
        assert ready.wait(WAIT)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
        server.close()
    assert len(outcome) == 1 and isinstance(outcome[0], ConnectionResetError), outcome


def test_ipv6_listener_and_origin() -> None:
    proc = ProxyProcess(*LOOPBACK_OK, listen=["[::1]:0"])
    try:
        assert proc.address[0] == "::1"
        with origin(host="::1") as server:
            sock, reply = open_tunnel(proc.address, f"[::1]:{server.port}")
            with sock:
                assert reply.status == 200
                sock.sendall(b"six")
                assert recv_exactly(sock, 3) == b"six"
    finally:
        assert proc.stop() == 0


def test_64_mib_both_ways_at_once(proxy: ProxyProcess) -> None:
    size = 64 * 1024 * 1024
    sent_down = os.urandom(size)
    got_up: list[str] = []

    def sink_and_source(conn: socket.socket) -> None:
        reader = threading.Thread(target=lambda: got_up.append(sha256(recv_until_eof(conn))))
        reader.start()
        conn.sendall(sent_down)
        conn.shutdown(socket.SHUT_WR)
        reader.join(60)

    sent_up = os.urandom(size)
    with origin(sink_and_source) as server:
        sock, reply = open_tunnel(proxy.address, f"127.0.0.1:{server.port}")
        sock.settimeout(60)
        with sock:
            assert reply.status == 200
            received = exchange(sock, sent_up, timeout=60)
        server.close()
    assert sha256(received) == sha256(sent_down)
    assert got_up == [sha256(sent_up)]


def test_200_concurrent_tunnels(proxy: ProxyProcess) -> None:
    results: dict[int, bool] = {}

    def one(i: int, port: int) -> None:
        payload = os.urandom(1000 + i * 97)
        sock, reply = open_tunnel(proxy.address, f"127.0.0.1:{port}", early=payload[:10])
        with sock:
            assert reply.status == 200
            sock.sendall(payload[10:])
            sock.shutdown(socket.SHUT_WR)
            results[i] = recv_until_eof(sock) == payload

    with origin() as server:
        threads = [threading.Thread(target=one, args=(i, server.port)) for i in range(200)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT * 2)
    assert len(results) == 200 and all(results.values())


def test_idle_timeout_closes_tunnel(dns: DnsServer) -> None:
    proc = ProxyProcess(*LOOPBACK_OK, "--idle-timeout", "0.5", "--log-level", "debug")
    try:
        with origin() as server:
            sock, reply = open_tunnel(proc.address, f"127.0.0.1:{server.port}")
            with sock:
                assert reply.status == 200
                started = time.monotonic()
                assert recv_until_eof(sock) == b""
                assert time.monotonic() - started >= 0.4
        proc.wait_for_log(r"closed: idle by proxy")
    finally:
        proc.stop()


def test_half_closed_timeout_and_lifetime() -> None:
    proc = ProxyProcess(*LOOPBACK_OK, "--half-closed-timeout", "0.5", "--max-lifetime", "3",
                        "--log-level", "debug")  # fmt: skip

    def never_close(conn: socket.socket) -> None:
        conn.recv(100)
        time.sleep(5)

    try:
        with origin(never_close) as server:
            sock, reply = open_tunnel(proc.address, f"127.0.0.1:{server.port}")
            with sock:
                assert reply.status == 200
                sock.shutdown(socket.SHUT_WR)
                assert recv_until_eof(sock) == b""
            proc.wait_for_log(r"closed: half_closed_timeout by client")
            sock, reply = open_tunnel(proc.address, f"127.0.0.1:{server.port}")
            with sock:
                assert reply.status == 200
                for _ in range(8):  # traffic, yet the lifetime ends it
                    sock.sendall(b"x")
                    time.sleep(0.05)
                assert recv_until_eof(sock) == b""
            proc.wait_for_log(r"closed: lifetime by proxy")
    finally:
        proc.stop()


# --- every row of the error table ---------------------------------------------------------


def test_400_malformed(proxy: ProxyProcess) -> None:
    reply = request(proxy.address, b"CONNECT example.com HTTP/1.1\r\nHost: x\r\n\r\n")
    assert_refused(reply, 400, "http_request_error", body_has="host:port")
    reply = request(proxy.address, b"CONNECT a.test:443 HTTP/1.1\r\nHost : x\r\n\r\n")
    assert_refused(reply, 400, "http_request_error")
    reply = request(proxy.address, b"CONNECT a.test:443 HTTP/1.1\r\n\r\n")
    assert_refused(reply, 400, "http_request_error", body_has="Host")


def test_400_for_userinfo_in_the_target_shows_no_password() -> None:
    """A password may hold "/": in a CONNECT target (authority form, no path) everything up
    to the last "@" is userinfo, hidden from the answer, the log and the access log."""
    proc = ProxyProcess(*LOOPBACK_OK, "--access-log", "-")
    try:
        head = b"CONNECT bob:SEKRET/PWi@127.0.0.1:18443 HTTP/1.1\r\nHost: a\r\n\r\n"
        reply = request(proc.address, head)
        assert_refused(reply, 400, "http_request_error", body_has="***@127.0.0.1:18443")
        assert "SEKRET" not in reply.raw_head.decode() + reply.body.decode()
        proc.wait_for_log(r"refused 127\.0\.0\.1:\d+ \*\*\*@127\.0\.0\.1:18443: 400")
        proc.wait_for_log(r"target=\*\*\*@127\.0\.0\.1:18443 .*status=400")  # access log
        assert "SEKRET" not in proc.log() and "PWi" not in proc.log()
    finally:
        assert proc.stop() == 0


def test_400_for_a_tls_handshake_comes_at_once(proxy: ProxyProcess) -> None:
    """A client given an https:// proxy URL sends a ClientHello, never a newline: it is told
    at once, not after --header-timeout (10 s)."""
    started = time.monotonic()
    reply = request(proxy.address, bytes.fromhex("1603010200010001fc0303") + bytes(32))
    assert time.monotonic() - started < 5
    assert_refused(reply, 400, "http_request_error", body_has="https://")


def test_403_client_not_allowed() -> None:
    proc = ProxyProcess(*LOOPBACK_OK, "--allow-client", "10.0.0.0/8")
    try:
        reply = request(proc.address, b"CONNECT a.test:443 HTTP/1.1\r\nHost: a\r\n\r\n")
        assert_refused(reply, 403, "http_request_denied", body_has="--allow-client 127.0.0.1")
    finally:
        proc.stop()


def test_403_port_not_allowed(strict_proxy: ProxyProcess) -> None:
    reply = request(strict_proxy.address, b"CONNECT 127.0.0.1:25 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert_refused(
        reply, 403, "http_request_denied", body_has="port 25 is not allowed; allow it with "
        "--allow-port 25"
    )  # fmt: skip
    strict_proxy.wait_for_log(r"refused 127\.0\.0\.1:\d+ 127\.0\.0\.1:25: 403")


@pytest.mark.parametrize(
    "target",
    ["127.0.0.1:443", "10.0.0.1:443", "169.254.169.254:443", "[::1]:443", "[fe80::1]:443",
     "[::ffff:127.0.0.1]:443", "[::ffff:10.0.0.1]:443", "[64:ff9b::7f00:1]:443",
     "[64:ff9b::a9fe:a9fe]:443", "[2002:7f00:1::]:443", "[2002:c0a8:101::1]:443",
     "0.0.0.0:443", "224.0.0.1:443", "255.255.255.255:443"],
)  # fmt: skip
def test_403_destination_classes(strict_proxy: ProxyProcess, target: str) -> None:
    reply = request(strict_proxy.address, connect_head(target))
    assert_refused(reply, 403, "destination_ip_prohibited", body_has="--allow-dest")


@pytest.mark.parametrize("name", ["private.test", "metadata.test", "mapped.test"])
def test_403_names_resolving_to_denied_addresses(dns: DnsServer, name: str) -> None:
    proc = ProxyProcess("--nameserver", f"{dns.host}:{dns.port}")
    try:
        reply = request(proc.address, connect_head(f"{name}:443"))
        assert_refused(reply, 403, "destination_ip_prohibited", body_has=name)
    finally:
        proc.stop()


def test_403_proxy_loop(proxy: ProxyProcess) -> None:
    host, port = proxy.address
    reply = request(proxy.address, connect_head(f"{host}:{port}"))
    assert_refused(reply, 403, "proxy_loop_detected")
    reply = request(proxy.address, connect_head(f"origin.test:{port}"))
    assert_refused(reply, 403, "proxy_loop_detected")


def test_403_to_the_admin_endpoint(dns: DnsServer) -> None:
    """--admin is bound to loopback for the operator: a client allowed loopback
    destinations must not reach it through a tunnel. Under --workers the admin endpoint is
    the supervisor's, which the workers are told of."""
    for workers in ([], ["--workers", "2"]):
        listen = [f"127.0.0.1:{free_port()}"] if workers else ["127.0.0.1:0"]
        proc = ProxyProcess(*LOOPBACK_OK, "--admin", "127.0.0.1:0", *workers, listen=listen)
        try:
            if workers:
                proc.wait_for_log("all 2 workers ready")
            port = int(proc.wait_for_log(r"admin on http://127\.0\.0\.1:(\d+)").group(1))
            for _ in range(4):  # each worker in turn, whichever the kernel picks
                reply = request(proc.address, connect_head(f"127.0.0.1:{port}"))
                assert_refused(reply, 403, "proxy_loop_detected")
        finally:
            assert proc.stop() == 0


def test_405_other_methods(proxy: ProxyProcess) -> None:
    reply = request(proxy.address, b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n")
    assert_refused(reply, 405, "http_request_denied", body_has="CONNECT only")
    assert reply.fields["allow"] == "CONNECT"
    assert b"plain-HTTP forwarding" in reply.body
    # methods are case-sensitive (RFC 9110 §9.1): "connect" is another method, and is told so
    reply = request(proxy.address, b"connect 127.0.0.1:443 HTTP/1.1\r\nHost: a.test\r\n\r\n")
    assert_refused(reply, 405, "http_request_denied", body_has="methods are case-sensitive")


def test_408_head_deadline_is_total() -> None:
    proc = ProxyProcess("--header-timeout", "0.5")
    try:
        with socket.create_connection(proc.address, timeout=WAIT) as sock:
            started = time.monotonic()
            for byte in b"CONNECT a.test:443 HTTP/1.1\r\nHost":  # dripping cannot extend it
                try:
                    sock.send(bytes([byte]))
                except OSError:
                    break
                time.sleep(0.05)
                if time.monotonic() - started > 1.2:
                    break
            reply = read_reply(sock)
            elapsed = time.monotonic() - started
        assert_refused(reply, 408, "http_request_error")
        assert 0.4 < elapsed < 1.5
    finally:
        proc.stop()


@pytest.mark.parametrize("defer", [0, 1])
def test_408_for_a_client_that_never_sends(defer: int) -> None:
    """With --defer-accept the kernel hands a silent connection over after ``defer`` s; the
    head's deadline runs from then. Either way the client gets its 408, not a silent close."""
    proc = ProxyProcess("--header-timeout", "0.5", "--defer-accept", str(defer))
    try:
        with socket.create_connection(proc.address, timeout=WAIT) as sock:
            started = time.monotonic()
            reply = read_reply(sock)
            elapsed = time.monotonic() - started
        assert_refused(reply, 408, "http_request_error")
        assert defer + 0.4 < elapsed < defer + 1.5
    finally:
        proc.stop()


def test_a_deferred_listener_takes_a_client_at_its_first_bytes() -> None:
    """A client that sends at once is not held for the defer period."""
    proc = ProxyProcess("--defer-accept", "5")
    try:
        started = time.monotonic()
        reply = request(proc.address, b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n")
        assert reply.status == 405 and time.monotonic() - started < 2
    finally:
        proc.stop()


def test_431_head_too_large() -> None:
    proc = ProxyProcess("--max-header-bytes", "1024")
    try:
        raw = b"CONNECT a.test:443 HTTP/1.1\r\nHost: a\r\nX-Pad: " + b"p" * 2000 + b"\r\n\r\n"
        assert_refused(request(proc.address, raw), 431, "http_request_error")
    finally:
        proc.stop()


def test_505_version(proxy: ProxyProcess) -> None:
    reply = request(proxy.address, b"CONNECT a.test:443 HTTP/2.0\r\nHost: a\r\n\r\n")
    assert_refused(reply, 505, "http_protocol_error")


def test_502_dns_errors(proxy: ProxyProcess, dns: DnsServer) -> None:
    reply = request(proxy.address, b"CONNECT nx.test:443 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert_refused(reply, 502, "dns_error", body_has="nx.test")
    assert reply.fields["proxy-status"] == (
        'splicegate; error=dns_error; rcode="NXDOMAIN"; details="no such name: nx.test"'
    )
    for name, rcode in (("fail.test", '; rcode="SERVFAIL"'), ("empty.test", "")):
        reply = request(proxy.address, connect_head(f"{name}:443"))
        assert_refused(reply, 502, "dns_error", body_has=name)
        # RFC 9209 §2.3.3: the RCODE where one says why (a name without addresses: none)
        assert reply.fields["proxy-status"].startswith(f"splicegate; error=dns_error{rcode}; ")
    assert dns.count("fail.test") >= 1


def test_504_dns_timeout(proxy: ProxyProcess) -> None:
    started = time.monotonic()
    reply = request(proxy.address, b"CONNECT silent.test:443 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert_refused(reply, 504, "dns_timeout", body_has="silent.test")
    assert time.monotonic() - started >= 0.9  # --dns-timeout 1


def test_502_connection_refused(proxy: ProxyProcess) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, never listening: refused
        reply = request(proxy.address, connect_head(f"127.0.0.1:{port}"))
    assert_refused(reply, 502, "connection_refused", body_has="refused")


def test_504_connect_timeout_on_full_accept_queue(proxy: ProxyProcess) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(8):  # fill the accept queue; later SYNs are dropped
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        started = time.monotonic()
        reply = request(proxy.address, connect_head(f"127.0.0.1:{port}"))
        assert_refused(reply, 504, "connection_timeout")
        assert 0.9 <= time.monotonic() - started < WAIT  # --connect-timeout 1
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


@pytest.mark.skipif(
    os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("nsenter")),
    reason="needs root, unshare and nsenter for a private network namespace",
)
def test_502_destination_unavailable() -> None:
    """An unreachable route, made inside a network namespace of the test's own."""
    setup = 'ip link set lo up && ip route add unreachable 127.0.0.77/32 table local && exec "$@"'
    proc = ProxyProcess(*LOOPBACK_OK, prefix=["unshare", "--net", "sh", "-c", setup, "sh"])
    try:
        code = (
            "import socket,sys;s=socket.create_connection(('127.0.0.1',%d),5);"
            "s.sendall(b'CONNECT 127.0.0.77:443 HTTP/1.1\\r\\nHost: a\\r\\n\\r\\n');"
            "sys.stdout.buffer.write(s.recv(4096))".replace("%d", str(proc.address[1]))
        )
        out = subprocess.run(
            ["nsenter", f"--net=/proc/{proc.pid}/ns/net", sys.executable, "-c", code],
            capture_output=True, timeout=WAIT, check=True,
        ).stdout  # fmt: skip
        assert out.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), out
        assert b"Proxy-Status: splicegate; error=destination_unavailable;" in out
    finally:
        proc.stop()


def test_refusal_is_read_in_full_despite_early_tunnel_bytes(strict_proxy: ProxyProcess) -> None:
    """Bytes sent after a refused head are never parsed; the answer still arrives whole."""
    smuggled = b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: a\r\n\r\n" + os.urandom(20000)
    raw = b"CONNECT 127.0.0.1:25 HTTP/1.1\r\nHost: a\r\n\r\n" + smuggled
    reply = request(strict_proxy.address, raw)
    assert_refused(reply, 403, "http_request_denied", body_has="port 25")


def test_no_fd_left_after_500_failed_requests(proxy: ProxyProcess) -> None:
    bad = [
        b"CONNECT a.test HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"CONNECT nx.test:443 HTTP/1.1\r\nHost: a\r\n\r\n",
        b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: a\r\n\r\n",
        b"CONNECT 10.0.0.1:443 HTTP/1.1\r\nHost: a\r\n\r\n",
    ]
    for raw in bad:  # warm up anything created lazily (threadpool, resolver sockets)
        request(proxy.address, raw)
    before = proxy.fd_count()
    for i in range(500):
        request(proxy.address, bad[i % len(bad)])
    deadline = time.monotonic() + WAIT
    while proxy.fd_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proxy.fd_count() <= before


# --- DNS cache and Happy Eyeballs (RFC 8305), end to end ---------------------------------
# Names are unique per test: the module's proxy caches what it resolves.

needs_ipv6 = pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback")


def tunnel_echoes(proxy: ProxyProcess, target: str) -> None:
    sock, reply = open_tunnel(proxy.address, target)
    with sock:
        assert reply.status == 200, (reply.status, reply.body)
        sock.sendall(b"ping")
        assert recv_exactly(sock, 4) == b"ping"


def test_one_query_for_many_connects_to_a_name(proxy: ProxyProcess, dns: DnsServer) -> None:
    dns.add("cached.test", a=["127.0.0.1"])
    with origin() as server:
        for _ in range(10):
            tunnel_echoes(proxy, f"cached.test:{server.port}")
    assert dns.count("cached.test", "A") == 1


def test_dns_failure_is_cached(proxy: ProxyProcess, dns: DnsServer) -> None:
    # NXDOMAIN from A, AAAA silent: the lookup ends on the A answer, so it is counted.
    dns.add("nx-cached.test", modes={"A": "nxdomain", "AAAA": "drop"})
    for _ in range(5):
        assert_refused(request(proxy.address, connect_head("nx-cached.test:443")), 502,
                       "dns_error")  # fmt: skip
    assert dns.count("nx-cached.test", "A") == 1


@needs_ipv6
def test_black_holed_ipv6_connects_over_ipv4(proxy: ProxyProcess, dns: DnsServer) -> None:
    dns.add("he.test", aaaa=["::1"], a=["127.0.0.1"])
    with origin() as server, full_accept_queue("::1", server.port):
        started = time.monotonic()
        tunnel_echoes(proxy, f"he.test:{server.port}")
        assert time.monotonic() - started < 1.0  # --connect-timeout 1: IPv4 after 250 ms
        assert server.connections == 1


@needs_ipv6
def test_aaaa_only_name(proxy: ProxyProcess, dns: DnsServer) -> None:
    dns.add("aaaa-only.test", aaaa=["::1"])
    with origin(host="::1") as server:
        tunnel_echoes(proxy, f"aaaa-only.test:{server.port}")


@needs_ipv6
@pytest.mark.parametrize("dns_timeout", ["5", "0.5"], ids=["long-deadline", "short-deadline"])
def test_aaaa_answered_and_a_lost_tunnels_over_ipv6(dns: DnsServer, dns_timeout: str) -> None:
    """A nameserver that never answers A costs one resend's wait (about a second), not
    --dns-timeout; and when the deadline comes first, the IPv6 answer in hand still wins
    over a 504."""
    dns.add("a-lost.test", aaaa=["::1"], modes={"A": "drop"})
    proc = ProxyProcess(*LOOPBACK_OK, "--nameserver", f"{dns.host}:{dns.port}",
                        "--dns-timeout", dns_timeout)  # fmt: skip
    try:
        with origin(host="::1") as server:
            started = time.monotonic()
            tunnel_echoes(proc, f"a-lost.test:{server.port}")  # a 200, not a 504
            assert time.monotonic() - started < 2.0  # long: about 1.05 s, not 5 s
    finally:
        assert proc.stop() == 0


def test_a_only_name(proxy: ProxyProcess, dns: DnsServer) -> None:
    dns.add("a-only.test", a=["127.0.0.1"])
    with origin() as server:
        tunnel_echoes(proxy, f"a-only.test:{server.port}")


@needs_ipv6
def test_502_both_families_refused(proxy: ProxyProcess, dns: DnsServer) -> None:
    dns.add("refused-both.test", aaaa=["::1"], a=["127.0.0.1"])
    with socket.socket() as v4, socket.socket(socket.AF_INET6) as v6:
        v4.bind(("127.0.0.1", 0))  # bound, never listening: refused
        port = v4.getsockname()[1]
        v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        v6.bind(("::1", port))
        reply = request(proxy.address, connect_head(f"refused-both.test:{port}"))
    assert_refused(reply, 502, "connection_refused", body_has="::1, 127.0.0.1")


@needs_ipv6
def test_504_both_families_black_holed(proxy: ProxyProcess, dns: DnsServer) -> None:
    dns.add("holes.test", aaaa=["::1"], a=["127.0.0.1"])
    with full_accept_queue("127.0.0.1") as port, full_accept_queue("::1", port):
        started = time.monotonic()
        reply = request(proxy.address, connect_head(f"holes.test:{port}"))
        assert_refused(reply, 504, "connection_timeout", body_has="::1, 127.0.0.1")
        assert 0.9 <= time.monotonic() - started < WAIT  # --connect-timeout 1


@needs_ipv6
def test_losing_sockets_are_closed(proxy: ProxyProcess, dns: DnsServer) -> None:
    dns.add("losers.test", aaaa=["::1"], a=["127.0.0.1"])
    with origin() as server, full_accept_queue("::1", server.port):
        tunnel_echoes(proxy, f"losers.test:{server.port}")  # warm up
        before = proxy.fd_count()
        for _ in range(20):
            tunnel_echoes(proxy, f"losers.test:{server.port}")
        deadline = time.monotonic() + WAIT
        while proxy.fd_count() > before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proxy.fd_count() <= before
