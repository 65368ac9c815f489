"""Connect to a destination with Happy Eyeballs v2 (RFC 8305 §4-5), within one deadline.

The addresses are interleaved by family (starting with the family of the first address,
keeping the given order within a family: that is the resolver's RFC 6724 order), then
attempted one after another, each started 250 ms after the previous one or at once when the
previous one fails, while earlier attempts keep running. The first connection that
completes wins; every other socket is closed. A host whose IPv6 path is black-holed thus
costs 250 ms over IPv4, not the whole ``--connect-timeout``; a host that refuses on one
address is tried on the next at once.

All attempts run in the calling greenlet as non-blocking sockets watched together through
``waiting.ready`` (libev watchers, no fd limit), so there is no greenlet per attempt and
every socket has one owner that closes it in a ``finally``, also when the caller is killed.

:func:`dial` has the fixed signature of :data:`Dialer`, so that an embedding application
can replace it (``Config(dialer=...)``), for example with one that chains through another
proxy. The deadline (a ``time.monotonic()`` value) covers every attempt together. Failures
are classified for the response: the deadline expired (504 ``connection_timeout``), every
address refused (502 ``connection_refused``, someone answered: the service is not
listening), anything else (502 ``destination_unavailable``: no route, host down).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import gevent

from splicegate.errors import (
    SHORTAGES,
    ConnectionRefused,
    ConnectTimeout,
    DestinationUnavailable,
    ProxyError,
    out_of_resources,
)
from splicegate.waiting import WRITE, ready

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: What the server calls to reach a target: ``dial(addresses, port, deadline)`` returns a
#: connected socket it then owns, or raises a ProxyError (ConnectTimeout, ConnectionRefused,
#: DestinationUnavailable...). Addresses are already checked against the destination policy.
Dialer = Callable[[Sequence[IPAddress], int, float], socket.socket]

__all__ = ["ATTEMPT_DELAY", "Dialer", "dial", "interleave"]

#: RFC 8305 §5 "Connection Attempt Delay": the recommended 250 ms (the RFC allows 100 ms to
#: 2 s; Chrome and curl use 250 ms, Apple's stack adapts it to the measured RTT).
ATTEMPT_DELAY = 0.25

#: How long past its deadline an application's dialer may run before it is cut off: time
#: for one that keeps its deadline to raise its own error, which may say more than ours.
DIALER_GRACE = 0.5

#: At most this many addresses are named in a message; the rest are counted.
_NAMED = 4

_IN_PROGRESS = frozenset((errno.EINPROGRESS, errno.EALREADY, errno.EWOULDBLOCK, errno.EAGAIN))


@dataclass(frozen=True, slots=True)
class _Failure:
    address: IPAddress
    errno: int | None
    reason: str


def interleave(addresses: Sequence[IPAddress]) -> list[IPAddress]:
    """RFC 8305 §4: alternate the families, first the family of the first address
    ("First Address Family Count" 1), keeping the given order within each family."""
    if not addresses:
        return []
    first = addresses[0].version
    preferred = [a for a in addresses if a.version == first]
    other = [a for a in addresses if a.version != first]
    ordered: list[IPAddress] = []
    for i in range(max(len(preferred), len(other))):
        ordered.extend(family[i] for family in (preferred, other) if i < len(family))
    return ordered


def dial(
    addresses: Sequence[IPAddress],
    port: int,
    deadline: float,
    *,
    attempt_delay: float = ATTEMPT_DELAY,
) -> socket.socket:
    """The first address to accept a TCP connection, racing them as RFC 8305 says.

    The socket is a non-blocking stdlib socket with TCP_NODELAY set: the tunnel relays
    small TLS records whose latency Nagle would add to. Every other socket
    opened here is closed before this returns or raises, so losers and failures leak nothing.
    """
    budget = deadline - time.monotonic()
    if not addresses:
        raise DestinationUnavailable(
            f"there is no address to connect to for port {port}",
            details=f"no address to dial for port {port}",
        )
    waiting = deque(interleave(addresses))
    racing: dict[socket.socket, IPAddress] = {}  # in the order the attempts started
    failures: list[_Failure] = []
    next_start = time.monotonic()
    try:
        # Bounded by the deadline: every pass starts an attempt (at most one per address),
        # settles at least one, or waits until the next start or the deadline.
        while True:
            if not racing and not waiting:
                raise _failure_error(failures, port)
            now = time.monotonic()
            if now >= deadline:
                raise _timeout_error([*racing.values(), *waiting], port, budget, failures)
            if waiting and (now >= next_start or not racing):
                address = waiting.popleft()
                sock, failure = _start(address, port)
                if failure is not None:
                    failures.append(failure)  # failed at once: the next one starts now
                    continue
                assert sock is not None
                if _has_peer(sock):  # the handshake completed inside connect(): no wait
                    return _connected(sock)
                racing[sock] = address
                next_start = now + attempt_delay
                continue
            wake = min(next_start, deadline) if waiting else deadline
            done = ready(racing, WRITE, wake - time.monotonic())
            for sock in [s for s in racing if s.fileno() in done]:  # the earliest first
                address = racing.pop(sock)
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code == 0:
                    return _connected(sock)
                sock.close()
                failures.append(_Failure(address, code, os.strerror(code)))
                next_start = time.monotonic()  # a failure starts the next attempt at once
    finally:
        for sock in racing:  # the losers, still connecting (or connected too late)
            sock.close()


def _start(address: IPAddress, port: int) -> tuple[socket.socket | None, _Failure | None]:
    """A socket with a connect in progress, or the reason it failed at once."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        # Non-blocking from socket(2) on: no ioctl(FIONBIO) afterwards.
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    except OSError as exc:  # EAFNOSUPPORT without IPv6, EMFILE
        return None, _Failure(address, exc.errno, _reason(exc))
    try:
        code = sock.connect_ex((_text(address), port))
    except BaseException:
        sock.close()
        raise
    if code == 0 or code in _IN_PROGRESS:
        return sock, None  # a connect that completed at once is seen writable at once
    sock.close()
    return None, _Failure(address, code, os.strerror(code))


@functools.lru_cache(maxsize=4096)
def _text(address: IPAddress) -> str:
    """The same few origins are dialled again and again: format each once."""
    return str(address)


def _has_peer(sock: socket.socket) -> bool:
    """Whether a connect in progress has completed: on loopback and on a LAN the handshake
    often finishes inside connect(2), and one getpeername() then saves a poll and a wait."""
    try:
        sock.getpeername()
    except OSError:  # ENOTCONN: still connecting, or failed (SO_ERROR says which, later)
        return False
    return True


def _is_dial(dialer: Dialer) -> bool:
    """:func:`dial`, alone or bound to some arguments with functools.partial: it sets
    TCP_NODELAY and keeps its deadline itself, so it needs neither wrapper below."""
    return dialer is dial or (isinstance(dialer, functools.partial) and dialer.func is dial)


def with_nodelay(dialer: Dialer) -> Dialer:
    """An application's dialer whose sockets get TCP_NODELAY, as :func:`dial`'s do
    (DESIGN.md: on both sockets); decided once, when the server is built."""
    if _is_dial(dialer):
        return dialer

    def dial_with_nodelay(
        addresses: Sequence[IPAddress], port: int, deadline: float
    ) -> socket.socket:
        sock = dialer(addresses, port, deadline)
        with contextlib.suppress(OSError):  # not TCP: no Nagle to turn off
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    return dial_with_nodelay


def with_deadline(dialer: Dialer, grace: float = DIALER_GRACE) -> Dialer:
    """An application's dialer cut off ``grace`` seconds after its deadline, with the
    ConnectTimeout (504) :func:`dial` raises when the deadline passes.

    The deadline is only passed to the dialer: one that ignores it (a chain through an
    upstream that never answers) would hold the client until the client gave up, and its
    handler until stop(). The cut is a gevent.Timeout raised where the dialer waits, as a
    stop()'s GreenletExit is: what it opened, it closes on the way out."""
    if _is_dial(dialer):
        return dialer

    def dial_by_deadline(
        addresses: Sequence[IPAddress], port: int, deadline: float
    ) -> socket.socket:
        budget = deadline - time.monotonic()
        timer = gevent.Timeout(max(budget, 0.0) + grace)
        timer.start()
        try:
            return dialer(addresses, port, deadline)
        except gevent.Timeout as exc:
            if exc is not timer:  # a caller's own Timeout: theirs to handle
                raise
            raise _timeout_error(addresses, port, budget, ()) from None
        finally:
            timer.close()

    return dial_by_deadline


def _connected(sock: socket.socket) -> socket.socket:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


def _reason(exc: OSError) -> str:
    if exc.errno:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


def _names(addresses: Sequence[IPAddress]) -> str:
    named = ", ".join(str(a) for a in addresses[:_NAMED])
    more = len(addresses) - _NAMED
    return f"{named} and {more} more" if more > 0 else named


def _timeout_error(
    pending: Sequence[IPAddress], port: int, budget: float, failures: Sequence[_Failure]
) -> ConnectTimeout:
    """The deadline expired with ``pending`` addresses still connecting or not yet tried."""
    pending = list(dict.fromkeys(pending))
    earlier = ""
    if failures:
        earlier = f" (besides: {_describe(failures)})"
    shown = max(budget, 0.0)
    if len(pending) == 1:
        details = f"connect timeout after {shown:.1f} s: {pending[0]} port {port}"
    else:
        details = f"connect timeout after {shown:.1f} s: {len(pending)} addresses, port {port}"
    return ConnectTimeout(
        f"connection to {_names(pending)} port {port} timed out after {shown:.1f} s"
        f"{earlier}; the host may be down or a firewall may be dropping the connection",
        details=details,
    )


def _describe(failures: Sequence[_Failure]) -> str:
    shown = ", ".join(f"{f.address}: {f.reason}" for f in failures[:_NAMED])
    more = len(failures) - _NAMED
    return f"{shown} and {more} more" if more > 0 else shown


def _failure_error(failures: Sequence[_Failure], port: int) -> ProxyError:
    """Refused only when every address refused; out of resources, or blocked on this host,
    when every attempt failed so here; any other failure means unreachable."""
    addresses = [f.address for f in failures]
    # Short of something here, and no address answered at all (refused or timed out):
    # the proxy's own 503, whatever the other attempts' routes said.
    # On IPv6, EADDRNOTAVAIL also means no usable source address: a route, not a shortage.
    shortages = [
        f
        for f in failures
        if f.errno in SHORTAGES and not (f.errno == errno.EADDRNOTAVAIL and f.address.version == 6)
    ]
    answered = (errno.ECONNREFUSED, errno.ETIMEDOUT)
    if shortages and not any(f.errno in answered for f in failures):
        return out_of_resources(shortages[0].errno, f"connecting to port {port}")
    if failures and all(f.errno in (errno.EACCES, errno.EPERM) for f in failures):
        return DestinationUnavailable(
            f"connections to {_names(addresses)} port {port} are blocked on this proxy's own "
            f"host ({failures[0].reason}): a firewall rule or security policy there forbids "
            "them",
            details=f"blocked on the proxy host: port {port}",
        )
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
