"""The control plane: accept, read the head, check, resolve, dial, answer, hand off.

One greenlet per connection owns it until its tunnel is established. Then both sockets are
detached (never ``fileno()``: a collected socket object would close an fd the engine owns)
and the engine takes them; the greenlet ends, so nothing in Python waits per open tunnel.
Every refusal goes through :func:`splicegate.errors.render` and a staged close, so the
client reads its answer instead of a reset.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

import gevent
from gevent import GreenletExit
from gevent.event import Event

from splicegate import accesslog, auth
from splicegate import dial as dial_module
from splicegate.admin import AdminServer
from splicegate.config import Config, component_fields
from splicegate.configfile import restart_only_changes
from splicegate.dnscache import DnsCache
from splicegate.errors import (
    SHORTAGES,
    ClientDenied,
    DestinationUnavailable,
    HeadTimeout,
    InternalError,
    MethodNotAllowed,
    ProxyError,
    out_of_resources,
    render,
    shutting_down,
)
from splicegate.handlers import HandlerPool
from splicegate.limits import NODELAY_INHERITED, Acceptor, ConnectionLimits, listening_socket
from splicegate.metrics import Metrics, cause_label
from splicegate.policy import IPAddress, Listener, Policy, socket_address
from splicegate.relay import Engine, TunnelRecord
from splicegate.request import CLOSED, NEED_DATA, Request, RequestParser, show_address
from splicegate.resolve import make_resolver
from splicegate.waiting import Expired, recv, send_all

log = logging.getLogger("splicegate")

ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


#: The status logged for a request whose client left before its answer (nginx's 499).
CLIENT_GONE = 499


class ClientGone(Exception):
    """The client's socket failed (a reset) before the tunnel was handed over: nothing to
    answer, and not the proxy's fault. Other OSErrors are the proxy's: a 503 when this host
    ran short of something, a 500 otherwise."""


#: What SO_ERROR says of a client that reset its connection.
_GONE = frozenset({errno.ECONNRESET, errno.EPIPE})


def _is_ipv6_wildcard(host: str) -> bool:
    return ":" in host and ipaddress.ip_address(host) == ipaddress.IPv6Address("::")


def _unexpected(exc: Exception, address: tuple) -> ProxyError:
    """The answer to an error no check mapped. The sites that can run out of descriptors
    or memory map that themselves, with their own words; this catches the ones that do not
    (an embedder's resolver or dialer, a path added later), so a shortage is still the 503
    it is, and no traceback is logged for it."""
    if isinstance(exc, OSError) and exc.errno in SHORTAGES:
        return out_of_resources(exc.errno, "serving the request")
    log.exception("internal error serving %s", show_address(address))
    return InternalError("internal proxy error; see the proxy log")


@dataclass(slots=True)
class Attempt:
    """What is known about one CONNECT as it goes; the access-log line is made from it."""

    client: tuple[str, int]
    accepted: float
    method: str = ""
    target: str = ""
    dialled: tuple | None = None  # the origin's socket address
    dns_s: float = 0.0
    connect_s: float = 0.0
    established_s: float = 0.0  # from accept to the 200 written; 0 without a 200
    status: int = 0
    error: str | None = None
    user: str = ""  # who passed proxy authentication; never anything of the password


class ProxyServer:
    """A CONNECT proxy on gevent: embeddable, or run by the ``splicegate`` CLI.

    ``config.resolver`` and ``config.dialer`` replace how names are looked up and targets
    are reached (a resolver with its own records; a dialer that chains through another
    proxy). The DNS cache sits in front of whichever resolver it is, and bounds its wait for
    it by --dns-timeout; an application's dialer is cut off shortly after its deadline
    (:func:`splicegate.dial.with_deadline`).
    """

    #: bytes read per recv while the head comes in
    recv_size = 16 * 1024
    #: after a refusal: how much to read and discard before closing, for at most the
    #: error's ``linger_seconds``, so the response is not lost to a reset (RFC 9112 §9.6)
    linger_bytes = 64 * 1024
    #: listen(2) backlog
    backlog = 1024

    def __init__(
        self,
        config: Config | None = None,
        *,
        engine: Engine | None = None,
        own_addresses: Sequence[tuple[str, int]] = (),
    ) -> None:
        """``own_addresses``: where else this proxy listens, beyond its listeners and its
        --admin endpoint (a supervisor's admin endpoint under --workers): a CONNECT there
        is refused as a loop too, or any client could reach what is bound to loopback for
        the operator alone. Each is an IP address and a port, checked here: a mistake shows
        when the server is made, not as a bare error from start()."""
        self.config = config or Config()
        self.engine = engine
        self.own_addresses = tuple(own_addresses)
        self._own_listeners = [_own_listener(address) for address in self.own_addresses]
        self.resolver: DnsCache
        self._dns_settings: tuple | None = None  # what self.resolver was built from
        self.dialer: dial_module.Dialer = dial_module.dial
        if self.config.dialer:  # the built-in dial keeps its deadline; an application's may not
            self.dialer = dial_module.with_deadline(dial_module.with_nodelay(self.config.dialer))
        #: where the proxy listens (with the real ports once started), and as policy sees it
        self.addresses: list[tuple[str, int]] = []
        self._listeners: list[Listener] = []
        #: connections open now, against --max-connections(-per-client); outlives reloads
        self.connections = ConnectionLimits()
        self.authenticator: auth.Authenticator | None = None
        self.access_log: accesslog.AccessLog | None = None
        #: counters for --admin's /metrics; kept across reloads
        self.metrics = Metrics()
        self.admin: AdminServer | None = None
        #: set when stop() begins: /healthz says 503 while tunnels drain
        self.draining = False
        self._stop_deadline = float("inf")
        self._engine_draining = False
        self._observer: gevent.Greenlet | None = None
        self._configure(self.config)
        self._servers: list[Acceptor] = []
        self._pool = HandlerPool()
        self._stopped = Event()

    def _configure(self, config: Config) -> None:
        """Build what a reload may change from the settings: the one place for it, so that
        start-up and a reload can never derive them differently. Everything is built before
        anything is put in force, so settings that fail (a broken password file, a log path
        that cannot be opened) leave the running ones whole."""
        # The same file and realm keep their authenticator; a changed file is read here and
        # its users put in force with the rest, below.
        authenticator, apply_users = auth.configure(
            self.authenticator, config.auth_file, config.auth_realm
        )
        cache = {
            "size": config.dns_cache_size,
            "min_ttl": config.dns_min_ttl,
            "max_ttl": config.dns_max_ttl,
            "negative_ttl": config.dns_negative_ttl,
        }
        dns_settings = (config.resolver, config.nameserver, cache)
        resolver = None
        if dns_settings != self._dns_settings:
            # A fresh cache for new DNS settings: answers from the old nameservers or
            # under the old TTL bounds are not carried over. Lookups in flight finish on the
            # old one, for the requests waiting on them.
            resolver = DnsCache(config.resolver or make_resolver(list(config.nameserver)), **cache)
        policy = Policy(
            allow_client=config.allow_client,
            allow_port=config.allow_port,
            allow_dest=config.allow_dest,
            deny_dest=config.deny_dest,
            listeners=self._listeners,
            allow_domain=config.allow_domain,
            deny_domain=config.deny_domain,
        )
        access_log = accesslog.reuse_or_open(
            self.access_log, config.access_log, config.log_format, self.metrics.log_lines_lost.inc
        )
        # Nothing below raises: the new settings go in force together.
        self.policy = policy
        apply_users()
        self.authenticator = authenticator
        if resolver is not None:
            if self._dns_settings is not None:  # the old cache's last counts, before it goes
                self.metrics.observe_dns(self.resolver)
            self.resolver, self._dns_settings = resolver, dns_settings
        self.connections.set_caps(config.max_connections, config.max_connections_per_client)
        if self.access_log is not access_log:
            if self.access_log is not None:
                self.access_log.close(wait=False)  # writes what it holds, then ends
            self.access_log = access_log

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Bind every listener and start accepting; raises OSError naming the address, and
        then holds nothing it took. A server starts once: stopped, it is done (a new one
        serves again), as its engine is shut down."""
        if self.draining:
            raise RuntimeError("this ProxyServer has been stopped; make a new one to serve again")
        if self._servers:  # start() leaves one at least (Config refuses an empty listen)
            raise RuntimeError("this ProxyServer has already started")
        made_engine = self.engine is None
        if made_engine:
            self.engine = self.config.create_engine()
        ipv4_ports = self.config.ipv4_listen_ports()
        try:
            for address in self.config.listen:
                listener = listening_socket(
                    address,
                    self.backlog,
                    reuse_port=self.config.workers > 1,
                    defer_accept=self.config.defer_accept,
                    # Only the IPv6 wildcard also takes IPv4 (::1 is IPv6-only anyway, and
                    # an IPv4-mapped address cannot be bound IPv6-only at all).
                    v6only=_is_ipv6_wildcard(address[0]) and address[1] in ipv4_ports,
                )
                server = Acceptor(listener, self.handle, self._pool.spawn)
                server.start()
                self._servers.append(server)
                bound = listener.getsockname()
                self.addresses.append(bound[:2])
                self._listeners.append(Listener(socket_address(bound[0]), bound[1]))
                log.info("listening on %s", show_address(bound))
            if self.config.admin is not None:
                self.admin = AdminServer(self.config.admin, self._scrape, lambda: not self.draining)
                self.admin.start()
                host, port = self.admin.address
                self._listeners.append(Listener(socket_address(host), port))
            self._listeners += self._own_listeners
        except BaseException:
            self._close_listeners()
            self.addresses.clear()
            self._listeners.clear()
            self.admin = None
            if made_engine:  # its done channel and watcher: an embedder may try again
                engine, self.engine = self.engine, None
                engine.shutdown(time.monotonic())
            raise
        if self.metrics.multiprocess:  # a supervisor answers the scrapes: keep files fresh
            self._observer = gevent.spawn(self._observe_forever)
        log.info(
            "relay engine: %s (%s)",
            self.engine.name,
            "splice" if self.engine.splices else "copying",
        )

    @property
    def address(self) -> tuple[str, int]:
        return self.addresses[0]

    def serve_forever(self) -> None:
        """Start (unless started) and return once :meth:`stop` has finished; at once if it
        already has. A stop that came first is not undone by a start here."""
        if not self._servers and not self.draining:
            self.start()
        self._stopped.wait()

    def stop(self, timeout: float | None = None) -> None:
        """Stop accepting; give handlers and tunnels ``timeout`` seconds, then close them.
        :meth:`hurry`, from another greenlet, cuts that time short. A second call, while
        the first runs, waits for it (with the first one's time); it may come from a hook,
        whose own request is then refused with a 503 rather than handed to the engine."""
        if self.draining:
            self._stopped.wait()
            return
        if timeout is None:
            timeout = self.config.drain_timeout
        self._stop_deadline = time.monotonic() + timeout
        self.draining = True
        self._close_listeners()
        self._pool.join(timeout=max(0.0, self._stop_deadline - time.monotonic()))
        self._pool.kill(block=True, timeout=1)
        self.resolver.close()
        if self.engine is not None:
            self._engine_draining = True
            self.engine.shutdown(self._stop_deadline)
        if self._observer is not None:
            self._observer.kill()
            assert self.engine is not None
            self._observe()  # the last second's bytes too
        if self.admin is not None:
            self.admin.stop()
        if self.access_log is not None:
            self.access_log.close()  # every line of the tunnels just closed is written
        self._stopped.set()

    def hurry(self) -> None:
        """End a drain now: requests still being handled are dropped, open tunnels closed
        (reason ``shutdown``). For the operator who will not wait, as nginx's second signal
        or gunicorn's SIGQUIT; a no-op unless :meth:`stop` runs."""
        if not self.draining:
            return
        self._stop_deadline = time.monotonic()  # stop() reads it when it reaches the engine
        self._pool.kill(block=False)
        if self._engine_draining:  # stop() waits in the engine's shutdown: cut it short
            assert self.engine is not None
            self.engine.shutdown(self._stop_deadline)

    def _close_listeners(self) -> None:
        for server in self._servers:
            server.close()
        self._servers.clear()

    # --- one connection --------------------------------------------------------------------

    def handle(self, sock: socket.socket, address: tuple, accepted: float) -> None:
        attempt = Attempt(client=(address[0], address[1]), accepted=accepted)
        self.metrics.connections.inc()
        handed_off = admitted = False
        try:
            # Counted from here until the tunnel closes (on_done), or until this handler
            # ends without a tunnel; over a cap: 503 through the refusal path, uncounted.
            self.connections.admit(attempt.client[0])
            admitted = True
            handed_off = self._serve(sock, attempt)
        except ProxyError as err:
            self._refuse(sock, attempt, err)
        except ClientGone as gone:
            self._client_gone(attempt, str(gone))
        except Exception as exc:
            self._refuse(sock, attempt, _unexpected(exc, attempt.client))
        except GreenletExit:
            # Ended by stop() at the drain's deadline, or by hurry(): the request still gets
            # its answer and its line, unless it had one already (killed while lingering).
            if not attempt.status:
                self._refuse(sock, attempt, shutting_down())
            raise
        finally:
            if not handed_off:
                sock.close()
                if admitted:
                    self.connections.release(attempt.client[0])

    def _serve(self, sock: socket.socket, attempt: Attempt) -> bool:
        """Run the checks in DESIGN.md's order; True once the engine owns the sockets."""
        read = self._read_head(sock, attempt)
        if read is None:
            return False
        request, early = read
        attempt.method = request.method
        attempt.target = request.authority if request.method == "CONNECT" else request.target
        if request.method != "CONNECT":
            why = (
                "methods are case-sensitive (RFC 9110, 9.1): send CONNECT"
                if request.method.upper() == "CONNECT"
                else f"{request.method} (plain-HTTP forwarding) is not supported"
            )
            raise MethodNotAllowed(
                f"this proxy tunnels with CONNECT only; {why}",
                details=f"method {request.method} not allowed",
            )
        policy = self.policy
        policy.admit_client(attempt.client[0])
        if self.authenticator is not None:  # every CONNECT, whatever its version or fields
            attempt.user = self.authenticator.check(request)
        self._authorize(request, attempt)
        policy.admit_target(request.host, request.port, request.is_ip_literal)
        addresses = self._resolve(request, attempt)
        allowed = policy.destinations(request.host, request.port, addresses)
        started = time.monotonic()
        try:
            origin = self.dialer(allowed, request.port, started + self.config.connect_timeout)
        finally:
            attempt.connect_s = time.monotonic() - started  # failures are logged with it too
        try:
            try:
                attempt.dialled = origin.getpeername()  # shown only when a line is written
            except OSError as exc:  # connected, then reset before we looked: the origin's
                raise DestinationUnavailable(
                    f"the connection to port {request.port} was closed as soon as it was "
                    f"made ({exc.strerror or exc})",
                    details=f"closed at once: port {request.port}",
                ) from None
            if self._engine_draining:  # stop() ran from a hook of this very request
                raise shutting_down()
            try:
                if not NODELAY_INHERITED:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                send_all(sock, ESTABLISHED, time.monotonic() + self.config.header_timeout)
            except OSError as exc:  # Expired too: a client that reads nothing
                raise ClientGone(exc.strerror or str(exc) or "the 200 could not be sent") from None
        except BaseException:
            origin.close()
            raise
        attempt.status = 200
        attempt.established_s = time.monotonic() - attempt.accepted
        return self._hand_off(sock, origin, early, attempt)

    def _read_head(self, sock: socket.socket, attempt: Attempt) -> tuple[Request, bytes] | None:
        """The request and the bytes after it, or None if the client left without one.

        One deadline for the whole head, counted from accept: a client dripping bytes
        cannot extend it. The error is only built when the deadline passes. A head refused
        (or left) after its request line still has its line say what it asked for."""
        deadline = attempt.accepted + self.config.header_timeout
        parser = RequestParser(
            max_head_bytes=self.config.max_header_bytes, max_fields=self.config.max_header_fields
        )
        event: Request | object = NEED_DATA  # nothing read yet: no need to ask the parser
        try:
            while event is NEED_DATA:
                try:
                    parser.receive_data(recv(sock, self.recv_size, deadline))
                except Expired:
                    timeout = self.config.header_timeout
                    raise HeadTimeout(
                        f"the request head was not complete within {timeout:g} s",
                        details=f"head not complete in {timeout:g} s",
                    ) from None
                except OSError as exc:
                    raise ClientGone(exc.strerror or str(exc)) from None
                event = parser.next_event()
        except BaseException:  # refused, gone, or ended by a stop: the line says what was asked
            if parser.request_line is not None:
                attempt.method, attempt.target = parser.request_line
            raise
        if event is CLOSED:
            return None
        assert isinstance(event, Request)
        return event, parser.trailing_data

    def _resolve(self, request: Request, attempt: Attempt) -> list[IPAddress]:
        if request.address is not None:
            return [request.address]  # _serve checks it against our own listeners
        started = time.monotonic()
        try:
            return self.resolver.resolve(request.host, started + self.config.dns_timeout)
        finally:
            attempt.dns_s = time.monotonic() - started

    def _hand_off(
        self, sock: socket.socket, origin: socket.socket, early: bytes, attempt: Attempt
    ) -> bool:
        """Give both sockets to the engine; True once it owns them."""
        client_fd = sock.detach()
        origin_fd = origin.detach()

        def on_done(record: TunnelRecord) -> None:
            self.connections.release(attempt.client[0])  # the tunnel is over: uncount it
            self.tunnel_finished(attempt, record)

        try:
            assert self.engine is not None
            self.engine.submit(client_fd, origin_fd, early, on_done)
        except BaseException as exc:
            os.close(client_fd)
            os.close(origin_fd)
            if not isinstance(exc, Exception):
                raise
            # The 200 is out, so no error answer can follow: the client sees the tunnel
            # close; the log says why, and the line has the proxy's error.
            log.exception("the relay engine did not take the tunnel to %s", attempt.target)
            attempt.error = "proxy_internal_error"
            self._finished(attempt, None)
            return False
        self._observe_times(attempt)
        return True

    def tunnel_finished(self, attempt: Attempt, record: TunnelRecord) -> None:
        """Called in the hub once both sockets of a tunnel are closed."""
        if log.isEnabledFor(logging.DEBUG):  # _show_client formats: not for every tunnel
            log.debug(
                "tunnel %s -> %s (%s) closed: %s by %s, up %d B, down %d B, %.3f s",
                _show_client(attempt),
                attempt.target,
                show_address(attempt.dialled) if attempt.dialled else "-",
                record.reason,
                record.first_closer,
                record.bytes_up,
                record.bytes_down,
                record.duration_s,
            )
        self._finished(attempt, record)

    def _client_gone(self, attempt: Attempt, why: str) -> None:
        """The client's connection broke before its answer (a reset mid-head, or before the
        200 could be sent): no one to answer, but the line still says what was asked and
        what it cost, with nginx's 499 "client closed request". (A client that closes
        mid-head gets its 400 on the half it left open, through the refusal path.)"""
        attempt.status, attempt.error = CLIENT_GONE, None
        self._finished(attempt, None)
        log.info(
            "client %s left before the answer (%s): %s",
            _show_client(attempt),
            attempt.target or "-",
            why,
        )

    def _refuse(self, sock: socket.socket, attempt: Attempt, err: ProxyError) -> None:
        """Answer, then close in stages so the answer is read rather than reset away.

        A client that reset its connection while the proxy resolved or dialled (a DNS or
        connect timeout is long) is gone, not refused: its line says 499, as for a reset
        mid-head, and names the answer it left before. The reset is looked for before the
        line is written, so that a client that reads its answer finds the line there. Only
        after a lookup or a dial: a refusal of the head (a 407, a policy 403) waited on
        nothing, and is answered without the extra system call."""
        code = 0
        if attempt.dns_s or attempt.connect_s:
            try:
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            except OSError as exc:
                code = exc.errno or 0
        # Only a reset: SO_ERROR also reports a soft error an ICMP message left on a client
        # still there (EHOSTUNREACH), which must still get its answer.
        if code in _GONE:
            status = f"{err.status} {err.proxy_status_error or ''}".rstrip()
            self._client_gone(attempt, f"{os.strerror(code)}, before its {status}")
            return
        attempt.status, attempt.error = err.status, err.proxy_status_error
        self.metrics.refusals.labels(cause_label(err)).inc()
        self._finished(attempt, None)
        log.info(
            "refused %s %s: %d %s: %s",
            _show_client(attempt),
            attempt.target or "-",
            err.status,
            err.proxy_status_error or "-",
            err.message,
        )
        deadline = time.monotonic() + err.linger_seconds
        try:
            send_all(sock, render(err), deadline)
            sock.shutdown(socket.SHUT_WR)
            drained = 0
            while drained < self.linger_bytes:
                data = recv(sock, self.recv_size, deadline)
                if not data:
                    break
                drained += len(data)
        except OSError:
            pass  # the client is gone, or the linger is over (Expired): nothing more to say

    # --- operating it: hooks, access log, metrics, reload --------------------------------

    def _authorize(self, request: Request, attempt: Attempt) -> None:
        """The application's ``authorize(request, client)``: None or True allows, a str
        allows as that user, a ProxyError (returned or raised) refuses with its response,
        False refuses with a 403."""
        hook = self.config.authorize
        if hook is None:
            return
        verdict = hook(request, attempt.client)
        if verdict is None or verdict is True:
            return
        if isinstance(verdict, str):
            attempt.user = verdict
        elif isinstance(verdict, ProxyError):
            raise verdict
        elif verdict is False:
            raise ClientDenied("this request is not allowed", details="refused by authorize")
        else:
            raise TypeError(f"authorize returned {verdict!r}: None, True, a str or a ProxyError")

    def _finished(self, attempt: Attempt, record: TunnelRecord | None) -> None:
        """A request is over (a tunnel closed, or refused): its metrics, access-log line and
        ``on_tunnel_closed`` hook. The line is only built when someone reads it: this runs
        once per CONNECT."""
        self.metrics.finished(attempt.status, attempt.error)
        if record is None:  # a tunnel's were observed when it was established
            self._observe_times(attempt)
        hook = self.config.on_tunnel_closed if record is not None else None
        if self.access_log is None and hook is None:
            return
        entry = accesslog.entry_for(attempt, record)
        if self.access_log is not None:
            self.access_log.write(entry)
        if hook is not None:
            try:
                hook(entry)
            except Exception:
                log.exception("on_tunnel_closed hook failed")

    def _observe_times(self, attempt: Attempt) -> None:
        if attempt.dns_s > 0:  # 0: an IP literal, or refused before resolving
            self.metrics.dns.observe(attempt.dns_s)
        if attempt.connect_s > 0:
            self.metrics.connect.observe(attempt.connect_s)
        if attempt.established_s > 0:
            self.metrics.established.observe(attempt.established_s)

    def _scrape(self) -> bytes:
        self._observe()
        return self.metrics.render()

    def _observe(self) -> None:
        """The figures counted elsewhere (the engine's, the DNS cache's), into the metrics."""
        if self.engine is not None:
            self.metrics.observe_engine(self.engine.stats())
        self.metrics.observe_dns(self.resolver)

    def _observe_forever(self, every: float = 1.0) -> None:
        while self.engine is not None:
            self._observe()
            gevent.sleep(every)

    def reload(self, config: Config) -> list[str]:
        """Apply new settings (policy, credentials, caps, request timeouts, DNS, access log)
        without dropping a tunnel. Settings that need a restart (``restart=True`` in the
        table: a listener's, the engine's, the tunnel timeouts) keep their running values;
        their names are returned. Raises ValueError or OSError, with the running settings
        untouched, when the new ones cannot be applied. The objects only an application
        gives are kept when ``config`` has none; new hooks apply, a new resolver or dialer
        needs a restart."""
        ignored = restart_only_changes(self.config, config)
        components = component_fields()
        for f in components:
            new, old = getattr(config, f.name), getattr(self.config, f.name)
            if new is not None and new is not old and f.metadata.get("restart"):
                ignored.append(f.name)
        keep = {name: getattr(self.config, name) for name in ignored}
        for f in components:
            if getattr(config, f.name) is None:
                keep[f.name] = getattr(self.config, f.name)
        config = dataclasses.replace(config, **keep)
        self._configure(config)
        self.config = config
        return ignored


def _own_listener(address: object) -> Listener:
    """An entry of ``own_addresses`` as the loop check holds it, or ValueError naming it:
    the check compares addresses, so a host name (which would need DNS) is refused too."""
    match address:
        case (str() as host, int() as port) if not isinstance(port, bool) and 1 <= port <= 65535:
            try:
                return Listener(socket_address(host), port)
            except ValueError:
                pass
    raise ValueError(
        f"own_addresses: {address!r} is not an IP address and a port from 1 to 65535, "
        "such as ('127.0.0.1', 9090)"
    )


def _show_client(attempt: Attempt) -> str:
    """The client as log lines show it: its address, and its user once authenticated."""
    shown = show_address(attempt.client)
    return f"{shown} user {attempt.user}" if attempt.user else shown
