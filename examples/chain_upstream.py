"""Embed splicegate with a resolver of your own and a dialer that chains through a proxy.

Run it: ``python examples/chain_upstream.py``. In one gevent process it starts an echo
origin on 127.0.0.1, an upstream proxy (a plain splicegate, standing in for the corporate
proxy every connection must leave through) and the front proxy, configured with

- ``Records``: names the application knows itself (``echo.internal``), the system resolver
  for everything else. The DNS cache still sits in front of it;
- ``UpstreamDialer``: every target is reached with a CONNECT to the upstream proxy, and
  the upstream's refusals become the front proxy's own (refused, timed out, unreachable).

Then it opens a tunnel through the front proxy to ``echo.internal`` and prints the echo.
The front proxy still checks its own policy on the addresses before they are dialled.
"""

from __future__ import annotations

import ipaddress
import sys
import time
from collections.abc import Mapping, Sequence

import gevent
from gevent import socket
from gevent.server import StreamServer

from splicegate import Config, ProxyServer
from splicegate.errors import (
    ConnectionRefused,
    ConnectTimeout,
    DestinationUnavailable,
    DnsError,
    ProxyError,
)
from splicegate.resolve import SystemResolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Records:
    """Names this application knows itself; any other name goes to ``fallback``."""

    def __init__(self, records: Mapping[str, Sequence[str]], fallback: object = None) -> None:
        self.records = {
            name.lower().rstrip("."): [ipaddress.ip_address(a) for a in addresses]
            for name, addresses in records.items()
        }
        self.fallback = fallback

    def resolve(self, host: str, deadline: float) -> list[IPAddress]:
        found = self.records.get(host.lower().rstrip("."))
        if found:
            return list(found)
        if self.fallback is None:
            raise DnsError(f"{host} is not a known name", details=f"no such name: {host}")
        return self.fallback.resolve(host, deadline)  # type: ignore[attr-defined]


class UpstreamDialer:
    """A dialer (``dial(addresses, port, deadline) -> socket``) through an upstream proxy.

    Tries the addresses in turn within the one deadline. The socket returned is past the
    upstream's 200, so the front proxy relays the tunnel's bytes through it unchanged.
    """

    #: the longest upstream response head read
    max_head = 16 * 1024

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream

    def __call__(self, addresses: Sequence[IPAddress], port: int, deadline: float) -> socket.socket:
        refused, failed = [], []
        for address in addresses:
            target = f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"
            status, proxy_status, sock = self._connect(target, deadline)
            if sock is not None:
                return sock
            if "error=connection_timeout" in proxy_status:
                raise ConnectTimeout(f"the upstream proxy timed out connecting to {target}")
            (refused if "error=connection_refused" in proxy_status else failed).append(
                f"{target} ({status})"
            )
        if refused and not failed:
            raise ConnectionRefused(f"refused, said the upstream proxy: {', '.join(refused)}")
        raise DestinationUnavailable(
            f"the upstream proxy could not reach {', '.join(refused + failed)}"
        )

    def _connect(self, target: str, deadline: float) -> tuple[int, str, socket.socket | None]:
        """(status, Proxy-Status, the tunnel's socket on a 200 else None)."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ConnectTimeout(f"no time left to connect to {target} through the upstream")
        try:
            sock = socket.create_connection(self.upstream, timeout=remaining)
        except TimeoutError:
            raise ConnectTimeout("the upstream proxy did not answer in time") from None
        except OSError as exc:
            raise DestinationUnavailable(f"cannot reach the upstream proxy: {exc}") from None
        try:
            sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            status, fields = self._read_head(sock, deadline)
            if status == 200:
                sock.settimeout(None)  # blocking (cooperative) from now on, as dial() gives
                return status, "", sock
            sock.close()
            return status, fields.get("proxy-status", ""), None
        except TimeoutError:
            sock.close()
            raise ConnectTimeout(f"the upstream proxy did not answer for {target}") from None
        except (OSError, ValueError) as exc:
            sock.close()
            raise DestinationUnavailable(f"the upstream proxy failed: {exc}") from None

    def _read_head(self, sock: socket.socket, deadline: float) -> tuple[int, dict[str, str]]:
        """Byte by byte up to the empty line: what follows a 200 is the tunnel's."""
        head = b""
        while not head.endswith(b"\r\n\r\n"):  # bounded by max_head and the deadline
            if len(head) > self.max_head:
                raise ValueError("response head too large")
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            byte = sock.recv(1)
            if not byte:
                raise ValueError("closed before a full response head")
            head += byte
        status_line, *lines = head.decode("latin-1").split("\r\n")
        fields = {}
        for line in lines:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        return int(status_line.split(" ", 2)[1]), fields


def echo(sock: socket.socket, _address: tuple) -> None:
    while data := sock.recv(65536):
        sock.sendall(data)


def main() -> int:
    loopback_ok = {"listen": ["127.0.0.1:0"], "allow_port": ["any"], "allow_dest": ["127.0.0.0/8"]}
    origin = StreamServer(("127.0.0.1", 0), echo)
    origin.start()
    upstream = ProxyServer(Config(**loopback_ok))
    upstream.start()
    front = ProxyServer(
        Config(
            **loopback_ok,
            resolver=Records({"echo.internal": ["127.0.0.1"]}, fallback=SystemResolver()),
            dialer=UpstreamDialer(upstream.address),
        )
    )
    front.start()
    try:
        target = f"echo.internal:{origin.server_port}"
        with socket.create_connection(front.address, timeout=5) as client:
            client.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\nhello".encode())
            reply = b""
            while not reply.endswith(b"hello") and len(reply) < 4096:  # bounded
                chunk = client.recv(4096)
                if not chunk:
                    break
                reply += chunk
        print(reply.decode("latin-1").replace("\r\n", "\\r\\n"))
        return 0 if reply == b"HTTP/1.1 200 Connection established\r\n\r\nhello" else 1
    except (OSError, ProxyError) as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return 1
    finally:
        front.stop(timeout=1)
        upstream.stop(timeout=1)
        origin.stop(timeout=1)


if __name__ == "__main__":
    with gevent.Timeout(30):  # an example must not hang
        sys.exit(main())
