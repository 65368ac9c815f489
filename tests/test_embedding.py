"""ProxyServer inside a gevent application: the API the README shows, and its hooks."""

from __future__ import annotations

import ipaddress
import time

import gevent
import pytest
from gevent import socket

from splicegate import Config, ProxyServer
from splicegate.dial import dial
from splicegate.errors import DnsError

HEAD = "CONNECT {} HTTP/1.1\r\nHost: x\r\n\r\n"
ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


def echo_server() -> gevent.server.StreamServer:
    def echo(sock: socket.socket, _addr: tuple) -> None:
        while data := sock.recv(65536):
            sock.sendall(data)

    server = gevent.server.StreamServer(("127.0.0.1", 0), echo)
    server.start()
    return server


def tunnel(proxy: ProxyServer, target: str) -> bytes:
    with socket.create_connection(proxy.address, timeout=5) as sock:
        sock.sendall(HEAD.format(target).encode() + b"ping")
        reply = b""
        while not reply.endswith(b"ping") and len(reply) < 4096:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
        return reply


@pytest.fixture
def origin():
    server = echo_server()
    yield server
    server.stop()


def test_embedded_server_tunnels_and_stops(origin) -> None:
    proxy = ProxyServer(
        Config(listen=["127.0.0.1:0"], allow_port=["any"], allow_dest=["127.0.0.0/8"])
    )
    proxy.start()
    try:
        assert proxy.address[0] == "127.0.0.1" and proxy.address[1] > 0
        assert tunnel(proxy, f"127.0.0.1:{origin.server_port}") == ESTABLISHED + b"ping"
    finally:
        proxy.stop(timeout=1)
    with pytest.raises(OSError), socket.create_connection(proxy.address, timeout=1):
        pass


def test_custom_resolver_and_dialer(origin) -> None:
    dialled: list[tuple[list, int]] = []

    class Records:
        def resolve(self, host: str, deadline: float) -> list:
            assert deadline > time.monotonic()
            if host == "echo.internal":
                return [ipaddress.ip_address("127.0.0.1")]
            raise DnsError(f"unknown name {host}", details=f"no such name: {host}")

    def counting_dial(addresses, port, deadline):
        dialled.append((list(addresses), port))
        return dial(addresses, port, deadline)

    proxy = ProxyServer(
        Config(
            listen=["127.0.0.1:0"],
            allow_port=["any"],
            allow_dest=["127.0.0.0/8"],
            resolver=Records(),
            dialer=counting_dial,
        )
    )
    proxy.start()
    try:
        assert tunnel(proxy, f"echo.internal:{origin.server_port}") == ESTABLISHED + b"ping"
        assert dialled == [([ipaddress.ip_address("127.0.0.1")], origin.server_port)]
        refused = tunnel(proxy, "other.internal:443")
        assert refused.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
        assert b'error=dns_error; details="no such name: other.internal"' in refused
    finally:
        proxy.stop(timeout=1)


def test_stop_closes_open_tunnels_after_the_timeout(origin) -> None:
    proxy = ProxyServer(
        Config(listen=["127.0.0.1:0"], allow_port=["any"], allow_dest=["127.0.0.0/8"])
    )
    proxy.start()
    sock = socket.create_connection(proxy.address, timeout=5)
    sock.sendall(HEAD.format(f"127.0.0.1:{origin.server_port}").encode())
    assert sock.recv(len(ESTABLISHED)) == ESTABLISHED
    assert proxy.engine is not None and proxy.engine.stats()["active"] == 1
    started = time.monotonic()
    proxy.stop(timeout=0.3)
    assert 0.25 <= time.monotonic() - started < 3
    assert proxy.engine.stats()["active"] == 0
    assert sock.recv(10) == b""
    sock.close()
