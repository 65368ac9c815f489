"""Connect to a destination: each resolved address in turn, all within one deadline.

This is the plain sequential dialer. It is one function with a fixed signature so that the
server can take it as a parameter and an embedding app (or the Happy Eyeballs dialer of
RFC 8305, DESIGN.md step 11) can replace it.

The deadline (``--connect-timeout``, a ``time.monotonic()`` value) covers every attempt
together, so a destination with many dead addresses cannot stretch it; each attempt gets
whatever time is left. Failures are classified for the response: the deadline expired
(504 ``connection_timeout``), every address refused (502 ``connection_refused``, someone
answered: the service is not listening), anything else (502 ``destination_unavailable``:
no route, host down).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

from gevent import socket as gsocket

from splicegate.errors import ConnectionRefused, ConnectTimeout, DestinationUnavailable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

__all__ = ["dial"]

#: At most this many addresses are named in a message; the rest are counted.
_NAMED = 4


@dataclass(frozen=True, slots=True)
class _Failure:
    address: IPAddress
    errno: int | None
    reason: str


def dial(addresses: Sequence[IPAddress], port: int, deadline: float) -> gsocket.socket:
    """The first address (in the given order) that accepts a TCP connection, connected.

    The socket is a gevent socket in blocking mode (no timeout) with TCP_NODELAY set: the
    tunnel relays small TLS records whose latency Nagle would add to. Every socket that
    failed is closed before the next attempt, so failures leak nothing.
    """
    budget = deadline - time.monotonic()
    if not addresses:
        raise DestinationUnavailable(
            f"there is no address to connect to for port {port}",
            details=f"no address to dial for port {port}",
        )
    failures: list[_Failure] = []
    for address in addresses:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _timeout_error(address, port, budget, failures)
        sock: gsocket.socket | None = None
        try:
            family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
            sock = gsocket.socket(family, socket.SOCK_STREAM)
            sock.settimeout(remaining)
            sock.connect((str(address), port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(None)
        except TimeoutError as exc:
            if sock is not None:
                sock.close()
            if exc.errno is None:  # gevent's own timeout: our deadline, not the kernel's
                raise _timeout_error(address, port, budget, failures) from None
            failures.append(_Failure(address, exc.errno, _reason(exc)))
        except OSError as exc:
            if sock is not None:
                sock.close()
            failures.append(_Failure(address, exc.errno, _reason(exc)))
        except BaseException:  # killed or timed out from outside: still close the socket
            if sock is not None:
                sock.close()
            raise
        else:
            return sock
    raise _failure_error(failures, port)


def _reason(exc: OSError) -> str:
    if exc.errno:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


def _names(addresses: Sequence[IPAddress]) -> str:
    named = ", ".join(str(a) for a in addresses[:_NAMED])
    more = len(addresses) - _NAMED
    return f"{named} and {more} more" if more > 0 else named


def _timeout_error(
    address: IPAddress, port: int, budget: float, failures: Sequence[_Failure]
) -> ConnectTimeout:
    earlier = ""
    if failures:
        earlier = f" (before that: {_describe(failures)})"
    return ConnectTimeout(
        f"connection to {address} port {port} timed out after {max(budget, 0.0):.1f} s"
        f"{earlier}; the host may be down or a firewall may be dropping the connection",
        details=f"connect timeout after {max(budget, 0.0):.1f} s: {address} port {port}",
    )


def _describe(failures: Sequence[_Failure]) -> str:
    shown = ", ".join(f"{f.address}: {f.reason}" for f in failures[:_NAMED])
    more = len(failures) - _NAMED
    return f"{shown} and {more} more" if more > 0 else shown


def _failure_error(
    failures: Sequence[_Failure], port: int
) -> ConnectionRefused | DestinationUnavailable:
    """Refused only when every address refused; any other failure means unreachable."""
    addresses = [f.address for f in failures]
    if failures and all(f.errno == errno.ECONNREFUSED for f in failures):
        if len(failures) == 1:
            message = (
                f"connection to {addresses[0]} port {port} refused; check that a service "
                f"is listening on that port"
            )
            details = f"connection refused: {addresses[0]} port {port}"
        else:
            message = (
                f"connection to {_names(addresses)} port {port} refused by every address; "
                f"check that a service is listening on that port"
            )
            details = f"connection refused by {len(failures)} addresses, port {port}"
        return ConnectionRefused(message, details=details)
    if len(failures) == 1:
        only = failures[0]
        message = (
            f"could not reach {only.address} port {port} ({only.reason}); check that the "
            f"host is up and that this proxy has a route to it"
        )
        details = f"unreachable: {only.address} port {port} ({only.reason})"
    else:
        message = (
            f"could not reach any address on port {port} ({_describe(failures)}); check "
            f"that the host is up and that this proxy has a route to it"
        )
        details = f"no address reachable, port {port}"
    return DestinationUnavailable(message, details=details)
