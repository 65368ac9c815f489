"""Embed splicegate with the three hooks: authorize, dial and on_tunnel_closed.

Run it: ``python examples/hooks.py``. In one gevent process it starts an echo origin and a
proxy whose application decides

- ``authorize(request, client)``: who may connect. Here a bearer token in
  ``Proxy-Authorization`` names the user (returned as a str, so the access log and the
  tunnel's entry carry it); no token or an unknown one gets the proxy's own 407, a user
  asking for a port of someone else's a 403. Returning None allows without a user name;
- ``dialer`` (``Config.dialer``, the dial hook): how targets are reached, here the built-in
  Happy Eyeballs dialer wrapped to count connects per target;
- ``on_tunnel_closed(entry)``: what a finished tunnel did (the access-log entry: user,
  target, bytes up and down, who closed first), here added up per user, as a usage meter.

Then it opens one tunnel with a token and one without, and prints the usage.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Sequence

import gevent
from gevent import socket
from gevent.server import StreamServer

from splicegate import Config, ProxyServer
from splicegate.accesslog import Entry
from splicegate.dial import dial
from splicegate.errors import AuthRequired, PortDenied
from splicegate.request import Request


class TokenGate:
    """``authorize``: bearer tokens of known users, each allowed some ports."""

    def __init__(self, users: dict[str, tuple[str, Sequence[int]]]) -> None:
        self.users = users  # token -> (user, ports)

    def __call__(self, request: Request, client: tuple[str, int]) -> str | AuthRequired:
        credentials = (request.field(b"proxy-authorization") or b"").decode("latin-1")
        scheme, _, token = credentials.partition(" ")
        if scheme.lower() != "bearer" or token not in self.users:
            return AuthRequired("a bearer token is needed to use this proxy")
        user, ports = self.users[token]
        if request.port not in ports:
            raise PortDenied(f"{user} may not connect to port {request.port}")
        return user  # allowed, as this user


class CountingDialer:
    """The dial hook: the built-in dialer, counting connects per target."""

    def __init__(self) -> None:
        self.connects: Counter[str] = Counter()

    def __call__(self, addresses: Sequence, port: int, deadline: float) -> socket.socket:
        sock = dial(addresses, port, deadline)
        self.connects[f"{sock.getpeername()[0]}:{port}"] += 1
        return sock


class Usage:
    """``on_tunnel_closed``: bytes per user."""

    def __init__(self) -> None:
        self.bytes: Counter[str] = Counter()

    def __call__(self, entry: Entry) -> None:
        self.bytes[entry.user or "-"] += entry.bytes_up + entry.bytes_down


def echo(sock: socket.socket, _address: tuple) -> None:
    while data := sock.recv(65536):
        sock.sendall(data)


def through(proxy: tuple[str, int], target: str, token: str | None, data: bytes) -> bytes:
    """One tunnel: the CONNECT (with the token), then ``data``; what comes back."""
    auth = f"Proxy-Authorization: Bearer {token}\r\n" if token else ""
    with socket.create_connection(proxy, timeout=5) as client:
        client.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n".encode())
        reply = b""
        while b"\r\n\r\n" not in reply and len(reply) < 4096:  # bounded
            chunk = client.recv(1)
            if not chunk:
                return reply
            reply += chunk
        if not reply.startswith(b"HTTP/1.1 200 "):
            return reply
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        while len(reply) < 1 << 20 and (chunk := client.recv(65536)):  # bounded
            reply += chunk
        return reply


def main() -> int:
    origin = StreamServer(("127.0.0.1", 0), echo)
    origin.start()
    port = origin.server_port
    gate = TokenGate({"s3cret": ("alice", [port])})
    dialer, usage = CountingDialer(), Usage()
    proxy = ProxyServer(
        Config(
            listen=["127.0.0.1:0"],
            allow_port=["any"],
            allow_dest=["127.0.0.0/8"],
            authorize=gate,
            dialer=dialer,
            on_tunnel_closed=usage,
        )
    )
    proxy.start()
    try:
        target = f"127.0.0.1:{port}"
        allowed = through(proxy.address, target, "s3cret", b"hello")
        refused = through(proxy.address, target, None, b"")
        for _ in range(100):  # on_tunnel_closed runs in the hub once the tunnel closes
            if usage.bytes:
                break
            gevent.sleep(0.02)
        head, _, echoed = allowed.partition(b"\r\n\r\n")
        print("with a token:", head.decode(), "then", echoed.decode())
        print("without:", refused.split(b"\r\n")[0].decode())
        print("connects:", dict(dialer.connects))
        print("bytes per user:", dict(usage.bytes))
        ok = (
            allowed.endswith(b"\r\n\r\nhello")
            and refused.startswith(b"HTTP/1.1 407 ")
            and usage.bytes == {"alice": 10}
        )
        return 0 if ok else 1
    finally:
        proxy.stop(timeout=1)
        origin.stop(timeout=1)


if __name__ == "__main__":
    with gevent.Timeout(30):  # an example must not hang
        sys.exit(main())
