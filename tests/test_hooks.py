"""The embedding hooks, in one gevent process: ``authorize``, the dial hook
(``Config.dialer``) and ``on_tunnel_closed``; an embedded reload; examples/hooks.py."""

from __future__ import annotations

import functools
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
import pytest
from gevent import socket
from gevent.server import StreamServer

from dnsserver import DnsServer
from splicegate import Config, ProxyServer
from splicegate.accesslog import Entry
from splicegate.dial import DIALER_GRACE, dial
from splicegate.errors import AuthRequired, DomainDenied, PortDenied
from splicegate.request import Request

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
LOOPBACK_OK: dict[str, Any] = {
    "listen": ["127.0.0.1:0"],
    "allow_port": ["any"],
    "allow_dest": ["127.0.0.0/8"],
}


@pytest.fixture
def origin() -> Iterator[StreamServer]:
    def echo(sock: socket.socket, _address: tuple) -> None:
        while data := sock.recv(65536):
            sock.sendall(data)

    server = StreamServer(("127.0.0.1", 0), echo)
    server.start()
    yield server
    server.stop(timeout=1)


def exchange(proxy: ProxyServer, target: str, data: bytes = b"ping", extra: str = "") -> bytes:
    """A CONNECT, ``data`` through the tunnel, half-close; everything read back."""
    with socket.create_connection(proxy.address, timeout=5) as sock:
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode() + data)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while len(reply) < 1 << 20 and (chunk := sock.recv(65536)):  # bounded
            reply += chunk
        return reply


def wait_for(items: list, count: int = 1) -> None:
    for _ in range(250):  # bounded: 5 s
        if len(items) >= count:
            return
        gevent.sleep(0.02)
    raise AssertionError(f"{count} expected, {len(items)} came")


def test_authorize_allows_names_and_refuses(origin: StreamServer) -> None:
    seen: list[tuple[Request, tuple[str, int]]] = []
    closed: list[Entry] = []

    def authorize(request: Request, client: tuple[str, int]) -> Any:
        seen.append((request, client))
        verdict = request.field(b"x-verdict")
        if verdict == b"raise":
            raise DomainDenied("no such place")
        if verdict == b"backend-down":  # an OSError of the hook's own, not the client's
            raise ConnectionRefusedError(111, "the policy service is down")
        return {
            None: None,
            b"true": True,
            b"alice": "alice",
            b"port": PortDenied("not this port", details="port refused by the app"),
            b"false": False,
            b"407": AuthRequired("who are you?", realm="app"),
            b"odd": 42,
        }[verdict]

    proxy = ProxyServer(Config(**LOOPBACK_OK, authorize=authorize, on_tunnel_closed=closed.append))
    proxy.start()
    target = f"127.0.0.1:{origin.server_port}"
    try:
        assert exchange(proxy, target).endswith(b"\r\n\r\nping")
        assert exchange(proxy, target, extra="X-Verdict: true\r\n").endswith(b"\r\n\r\nping")
        assert exchange(proxy, target, extra="X-Verdict: alice\r\n").endswith(b"\r\n\r\nping")
        wait_for(closed, 3)
        assert [e.user for e in closed] == [None, None, "alice"]
        request, client = seen[0]
        assert request.method == "CONNECT" and request.port == origin.server_port
        assert client[0] == "127.0.0.1" and client[1] > 0

        port = exchange(proxy, target, extra="X-Verdict: port\r\n")
        assert port.startswith(b"HTTP/1.1 403 Forbidden\r\n")
        assert b'error=http_request_denied; details="port refused by the app"' in port
        assert port.endswith(b"\r\n\r\nnot this port\n")
        raised = exchange(proxy, target, extra="X-Verdict: raise\r\n")
        assert raised.startswith(b"HTTP/1.1 403 ") and raised.endswith(b"no such place\n")
        assert exchange(proxy, target, extra="X-Verdict: false\r\n").startswith(b"HTTP/1.1 403 ")
        auth = exchange(proxy, target, extra="X-Verdict: 407\r\n")
        assert auth.startswith(b"HTTP/1.1 407 ") and b'Basic realm="app"' in auth
        odd = exchange(proxy, target, extra="X-Verdict: odd\r\n")
        assert odd.startswith(b"HTTP/1.1 500 ")  # a hook's mistake is the proxy's fault
        down = exchange(proxy, target, extra="X-Verdict: backend-down\r\n")
        assert down.startswith(b"HTTP/1.1 500 ")  # answered, not taken for a client gone
        assert b"error=proxy_internal_error" in down
        assert len(closed) == 3  # refusals are no tunnels
        assert b"\nsplicegate_tunnels_active 0.0\n" in proxy.metrics.render()
    finally:
        proxy.stop(timeout=1)


def test_dial_hook_wraps_the_dialer(origin: StreamServer) -> None:
    """The dial hook is ``Config.dialer``: it gets the addresses the policy allowed."""
    calls: list[tuple[list, int, float]] = []

    def counting(addresses: list, port: int, deadline: float) -> socket.socket:
        calls.append((list(addresses), port, deadline))
        return dial(addresses, port, deadline)

    proxy = ProxyServer(Config(**LOOPBACK_OK, dialer=counting, connect_timeout=3))
    proxy.start()
    try:
        started = time.monotonic()
        assert exchange(proxy, f"127.0.0.1:{origin.server_port}").endswith(b"ping")
        ((addresses, port, deadline),) = calls
        assert [str(a) for a in addresses] == ["127.0.0.1"] and port == origin.server_port
        assert started < deadline <= time.monotonic() + 3
    finally:
        proxy.stop(timeout=1)


def test_a_dialer_that_ignores_its_deadline_gets_the_client_its_504_in_time() -> None:
    """The server bounds an application's dialer by the connect deadline (and a grace), as
    the built-in dial bounds itself: the client gets the 504 at once, not when it gives up,
    and the handler ends then too, not at stop()."""
    cut: list[float] = []

    def stuck(addresses: list, port: int, deadline: float) -> socket.socket:
        try:
            gevent.sleep(30)
        finally:
            cut.append(time.monotonic())
        raise AssertionError("not cut off")

    proxy = ProxyServer(Config(**LOOPBACK_OK, dialer=stuck, connect_timeout=1))
    proxy.start()
    try:
        started = time.monotonic()
        reply = exchange(proxy, "127.0.0.1:9")  # its socket gives up after 5 s
        assert reply.startswith(b"HTTP/1.1 504 ") and b"error=connection_timeout" in reply
        assert b"timed out after 1.0 s" in reply
        assert len(cut) == 1 and cut[0] - started < 1 + DIALER_GRACE + 1
    finally:
        proxy.stop(timeout=1)


def test_a_resolver_that_ignores_its_deadline_is_bounded_by_the_dns_cache() -> None:
    """The resolver hook needs no bound of its own: the DNS cache runs it in a flight of
    its own and each request stops waiting at its --dns-timeout, with the 504 the built-in
    resolver gives; stop() ends the flight."""
    asked: list[str] = []
    cut: list[str] = []

    class Stuck:
        def resolve(self, host: str, deadline: float) -> list:
            asked.append(host)
            try:
                gevent.sleep(30)
            finally:
                cut.append(host)
            raise AssertionError("not cut off")

    proxy = ProxyServer(Config(**LOOPBACK_OK, resolver=Stuck(), dns_timeout=1))
    proxy.start()
    try:
        started = time.monotonic()
        reply = exchange(proxy, "stuck.test:443")
        assert reply.startswith(b"HTTP/1.1 504 ") and b"error=dns_timeout" in reply
        assert time.monotonic() - started < 3
        assert asked == ["stuck.test"]
    finally:
        proxy.stop(timeout=1)
    assert cut == ["stuck.test"]


def test_what_a_custom_dialer_returns_gets_tcp_nodelay(origin: StreamServer) -> None:
    """DESIGN.md: TCP_NODELAY on both sockets, whoever dialled; the dup shares the option."""
    dups: list[socket.socket] = []

    def plain(addresses: list, port: int, deadline: float) -> socket.socket:
        sock = socket.create_connection((str(addresses[0]), port), timeout=3)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        dups.append(sock.dup())
        return sock

    proxy = ProxyServer(Config(**LOOPBACK_OK, dialer=plain))
    proxy.start()
    try:
        assert exchange(proxy, f"127.0.0.1:{origin.server_port}").endswith(b"ping")
        (dup,) = dups
        assert dup.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        dup.close()
    finally:
        proxy.stop(timeout=1)


def test_dial_bound_with_partial_is_not_wrapped_again() -> None:
    """dial sets TCP_NODELAY itself: an application's functools.partial of it needs no
    second setsockopt per CONNECT; any other dialer gets the wrapper."""
    from splicegate.dial import with_nodelay

    bound = functools.partial(dial)
    assert with_nodelay(bound) is bound
    other = functools.partial(socket.create_connection)
    assert with_nodelay(other) is not other  # type: ignore[arg-type]


def test_on_tunnel_closed_gets_the_entry_and_survives_a_failing_hook(
    origin: StreamServer,
) -> None:
    entries: list[Entry] = []

    def hook(entry: Entry) -> None:
        entries.append(entry)
        raise RuntimeError("the application's bug")

    proxy = ProxyServer(Config(**LOOPBACK_OK, on_tunnel_closed=hook))
    proxy.start()
    target = f"127.0.0.1:{origin.server_port}"
    try:
        for _ in range(2):  # the proxy goes on after the hook failed
            assert exchange(proxy, target, data=b"x" * 5000).endswith(b"x" * 5000)
        wait_for(entries, 2)
        entry = entries[0]
        assert (entry.status, entry.target, entry.dialled) == (200, target, target)
        assert (entry.bytes_up, entry.bytes_down) == (5000, 5000)
        assert entry.first_closer in ("client", "origin") and entry.reason == "eof"
    finally:
        proxy.stop(timeout=1)


def test_embedded_reload_keeps_hooks_and_reports_restart_settings(origin: StreamServer) -> None:
    closed: list[Entry] = []
    proxy = ProxyServer(Config(**LOOPBACK_OK, on_tunnel_closed=closed.append))
    proxy.start()
    target = f"127.0.0.1:{origin.server_port}"
    try:
        ignored = proxy.reload(
            Config(listen=["127.0.0.1:1"], allow_port=["1"], allow_dest=["127.0.0.0/8"])
        )
        assert ignored == ["listen"]
        assert proxy.config.listen == (("127.0.0.1", 0),)  # kept: needs a restart
        assert exchange(proxy, target).startswith(b"HTTP/1.1 403 ")  # the new allow-list
        with pytest.raises(ValueError, match="allow-port"):
            proxy.reload(Config(**{**LOOPBACK_OK, "allow_port": ["nope"]}))
        proxy.reload(Config(**LOOPBACK_OK))
        assert exchange(proxy, target).endswith(b"ping")
        wait_for(closed)  # the hook given at start outlived both reloads

        later: list[Entry] = []
        ignored = proxy.reload(Config(**LOOPBACK_OK, dialer=dial, on_tunnel_closed=later.append))
        assert ignored == ["dialer"]  # the server dials with what it started with
        assert exchange(proxy, target).endswith(b"ping")
        wait_for(later)  # a new hook applies at once
        assert len(closed) == 1
    finally:
        proxy.stop(timeout=1)


def test_reload_applies_new_dns_settings_with_a_fresh_cache(origin: StreamServer) -> None:
    """--nameserver and the DNS cache settings apply on reload, as Squid's reconfigure
    does: the next lookup asks the new server, and the old server's answers (here a cached
    NXDOMAIN) are not carried over."""
    target = f"svc.splicegate.test:{origin.server_port}"
    with DnsServer() as old, DnsServer() as new:
        new.add("svc.splicegate.test", a=["127.0.0.1"])
        settings = {**LOOPBACK_OK, "dns_negative_ttl": 300}
        proxy = ProxyServer(Config(**settings, nameserver=[f"{old.host}:{old.port}"]))
        proxy.start()
        try:
            refused = exchange(proxy, target)
            assert refused.startswith(b"HTTP/1.1 502 ") and b"error=dns_error" in refused
            ignored = proxy.reload(Config(**settings, nameserver=[f"{new.host}:{new.port}"]))
            assert ignored == []
            assert exchange(proxy, target).endswith(b"\r\n\r\nping")
            assert new.count("svc.splicegate.test", "A") >= 1
        finally:
            proxy.stop(timeout=1)


def test_example_hooks_runs() -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "hooks.py")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "without: HTTP/1.1 407 Proxy Authentication Required" in done.stdout
    assert "bytes per user: {'alice': 10}" in done.stdout
