"""ProxyServer inside a gevent application: the API the README shows, its hooks, and the
runnable example in examples/."""

from __future__ import annotations

import errno
import importlib.util
import ipaddress
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import gevent
import pytest
from gevent import socket
from gevent.event import Event

from proxyproc import full_accept_queue, ipv6_loopback, run_code
from splicegate import Config, ProxyServer, TunnelRecord
from splicegate import server as server_module
from splicegate.dial import dial
from splicegate.errors import DnsError
from splicegate.relay import native_engine_error
from splicegate.server import Attempt

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

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


def loopback_config(**extra: Any) -> Config:
    return Config(listen=["127.0.0.1:0"], allow_port=["any"], allow_dest=["127.0.0.0/8"], **extra)


def test_own_addresses_are_refused_as_a_loop(origin) -> None:
    """What else the application serves from this host is no tunnel's target."""
    port = origin.server_port
    proxy = ProxyServer(loopback_config(), own_addresses=[("127.0.0.1", port)])
    proxy.start()
    try:
        refused = tunnel(proxy, f"127.0.0.1:{port}")
        assert refused.startswith(b"HTTP/1.1 403 Forbidden\r\n")
        assert b"error=proxy_loop_detected" in refused
    finally:
        proxy.stop(timeout=1)


@pytest.mark.parametrize(
    "address",
    [("localhost", 8080), ("127.0.0.1", 99999), ("127.0.0.1", 0), ("127.0.0.1", "80"),
     ("127.0.0.1",), "127.0.0.1:80", ("127.0.0.1", 80, 0), ("127.0.0.1", True)],
)  # fmt: skip
def test_own_addresses_are_checked_when_the_server_is_made(address: Any) -> None:
    """A mistake is named at construction, not a bare ValueError from start() (a host
    name) nor silently kept (a port no CONNECT can name)."""
    with pytest.raises(ValueError, match=r"^own_addresses: .* is not an IP address and a port"):
        ProxyServer(loopback_config(), own_addresses=[("::1", 9090), address])
    server = ProxyServer(loopback_config(), own_addresses=[("::1", 9090), ["127.0.0.1", 80]])
    assert server.own_addresses == (("::1", 9090), ["127.0.0.1", 80])
    server.resolver.close()  # made, never started


def test_embedded_server_tunnels_and_stops(origin) -> None:
    proxy = ProxyServer(loopback_config())
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

    proxy = ProxyServer(loopback_config(resolver=Records(), dialer=counting_dial))
    proxy.start()
    try:
        assert tunnel(proxy, f"echo.internal:{origin.server_port}") == ESTABLISHED + b"ping"
        assert dialled == [([ipaddress.ip_address("127.0.0.1")], origin.server_port)]
        refused = tunnel(proxy, "other.internal:443")
        assert refused.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
        assert b'error=dns_error; details="no such name: other.internal"' in refused
    finally:
        proxy.stop(timeout=1)


def test_an_unmapped_failure_in_a_custom_dialer(caplog: pytest.LogCaptureFixture) -> None:
    """An embedder's dialer that runs out of descriptors gets the 503 a shortage is, with
    no traceback; any other error it raises is a 500 whose traceback goes to the log."""
    failures = [OSError(errno.EMFILE, "Too many open files"), RuntimeError("a bug")]

    def failing_dial(addresses, port, deadline):
        raise failures.pop(0)

    proxy = ProxyServer(loopback_config(dialer=failing_dial))
    proxy.start()
    try:
        with caplog.at_level(logging.ERROR, logger="splicegate"):
            short = tunnel(proxy, "127.0.0.1:9")
            assert short.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
            assert b"error=proxy_internal_response" in short and b"open files" in short
            assert not caplog.records  # a shortage is no bug
            bug = tunnel(proxy, "127.0.0.1:9")
        assert bug.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
        assert b"error=proxy_internal_error" in bug
        assert [r.exc_info[0] for r in caplog.records if r.exc_info] == [RuntimeError]
    finally:
        proxy.stop(timeout=1)


def test_the_ipv6_wildcard_sharing_an_ipv4_listeners_port_is_ipv6_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """So that [::]:P beside 0.0.0.0:P binds (nginx's ipv6only=on); alone, and for any other
    IPv6 address (::1 is IPv6-only anyway; an IPv4-mapped one cannot be), the system's
    default. What the server asks for is checked, and the wildcard is bound as ::1 instead:
    tests listen on loopback only."""
    asked: dict[tuple, bool] = {}
    real = server_module.listening_socket

    def recording(address: tuple, backlog: int, **options: Any) -> Any:
        asked[address] = options["v6only"]
        bind = ("::1", 0) if address[0] == "::" else address
        return real(bind, backlog, **options)

    monkeypatch.setattr(server_module, "listening_socket", recording)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    listen = [f"127.0.0.1:{port}", "[::ffff:127.0.0.2]:" + str(port), "[::ffff:127.0.0.1]:0"]
    expected = {("127.0.0.1", port): False, ("::ffff:127.0.0.2", port): False}
    expected[("::ffff:127.0.0.1", 0)] = False
    if ipv6_loopback():
        listen += [f"[::1]:{port}", f"[::]:{port}", "[::]:0"]
        expected.update({("::1", port): False, ("::", port): True, ("::", 0): False})
    proxy = ProxyServer(Config(listen=listen))
    proxy.start()
    try:
        assert asked == expected
    finally:
        proxy.stop(timeout=1)


def test_stop_closes_open_tunnels_after_the_timeout(origin) -> None:
    proxy = ProxyServer(loopback_config())
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


def test_attempt_records_the_winner_and_the_times() -> None:
    """What the access log is made of: the address that won the race, DNS and connect time."""
    finished: list[Attempt] = []
    done = Event()

    class Recording(ProxyServer):
        def tunnel_finished(self, attempt: Attempt, record: TunnelRecord) -> None:
            finished.append(attempt)
            done.set()

    class BothFamilies:
        def resolve(self, host: str, deadline: float) -> list:
            return [ipaddress.ip_address("::1"), ipaddress.ip_address("127.0.0.1")]

    if not ipv6_loopback():
        pytest.skip("no IPv6 loopback")
    origin = echo_server()
    port = origin.server_port
    proxy = Recording(
        Config(
            listen=["127.0.0.1:0"],
            allow_port=["any"],
            allow_dest=["127.0.0.0/8", "::1/128"],
            resolver=BothFamilies(),
            connect_timeout=5,
        )
    )
    proxy.start()
    try:
        with full_accept_queue("::1", port):  # ::1 black-holed: IPv4 wins after 250 ms
            assert tunnel(proxy, f"both.internal:{port}") == ESTABLISHED + b"ping"
            assert done.wait(timeout=5)
    finally:
        proxy.stop(timeout=1)
        origin.stop()
    (attempt,) = finished
    assert attempt.target == f"both.internal:{port}"
    assert attempt.dialled == ("127.0.0.1", port)
    assert 0.25 <= attempt.connect_s < 5
    assert 0 <= attempt.dns_s < 5
    assert attempt.status == 200


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_chain_upstream_runs() -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "chain_upstream.py")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "HTTP/1.1 200 Connection established\\r\\n\\r\\nhello"


def test_example_upstream_refusal_is_the_front_proxys_own() -> None:
    example = load_example("chain_upstream")
    loopback_ok = {"listen": ["127.0.0.1:0"], "allow_port": ["any"], "allow_dest": ["127.0.0.0/8"]}
    upstream = ProxyServer(Config(**loopback_ok))
    upstream.start()
    front = ProxyServer(
        Config(
            **loopback_ok,
            resolver=example.Records({"closed.internal": ["127.0.0.1"]}),
            dialer=example.UpstreamDialer(upstream.address),
        )
    )
    front.start()
    try:
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))  # bound, never listening: refused
            refused = tunnel(front, f"closed.internal:{unused.getsockname()[1]}")
        assert refused.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
        assert b"error=connection_refused" in refused
        unknown = tunnel(front, "other.internal:443")
        assert b"error=dns_error" in unknown
    finally:
        front.stop(timeout=1)
        upstream.stop(timeout=1)


# --- the server's life: start once, stop once, from anywhere ------------------------------


def open_echo(proxy: ProxyServer, port: int) -> socket.socket:
    """A tunnel through ``proxy`` to the echo origin, checked with one exchange."""
    sock = socket.create_connection(proxy.address, timeout=5)
    sock.sendall(HEAD.format(f"127.0.0.1:{port}").encode() + b"ping")
    reply = b""
    while not reply.endswith(b"ping"):
        chunk = sock.recv(4096)
        assert chunk, reply
        reply += chunk
    assert reply == ESTABLISHED + b"ping"
    return sock


@pytest.mark.parametrize("engine", ["native", "python"])
def test_stop_from_a_hook_finishes_and_refuses_that_request(
    origin, engine: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An application may stop the proxy from a hook: the stop runs to its end (the other
    tunnel closed at its deadline, serve_forever returns), and the request whose hook it
    was gets a 503 rather than a 200 and a dropped tunnel."""
    if engine == "native" and native_engine_error():
        pytest.skip(native_engine_error())
    box: dict[str, Any] = {}

    def authorize(request: Any, client: Any) -> None:
        box["calls"] = box.get("calls", 0) + 1
        if box["calls"] == 2:
            box["proxy"].stop(timeout=0.5)

    proxy = box["proxy"] = ProxyServer(loopback_config(engine=engine, authorize=authorize))
    proxy.start()
    server = gevent.spawn(proxy.serve_forever)
    other = open_echo(proxy, origin.server_port)
    with caplog.at_level(logging.INFO, logger="splicegate"):
        reply = tunnel(proxy, f"127.0.0.1:{origin.server_port}")
    try:
        assert reply.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), reply
        assert b'details="proxy stopping"' in reply
        server.join(timeout=5)
        assert server.dead  # serve_forever returned: the stop finished
        assert other.recv(16) == b""  # closed by the stop, at its deadline
        assert proxy.engine is not None and proxy.engine.stats()["active"] == 0
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    finally:
        other.close()
        server.kill()


def test_hurry_from_a_hook_ends_the_drain(origin) -> None:
    """hurry() from the hook of a request still in flight while stop() drains: hurry()
    returns in the hook, and the drain ends now."""
    box: dict[str, Any] = {"draining": Event()}

    def authorize(request: Any, client: Any) -> None:
        box["calls"] = box.get("calls", 0) + 1
        if box["calls"] == 2:
            box["draining"].wait(5)
            box["proxy"].hurry()
            box["returned"] = True

    proxy = box["proxy"] = ProxyServer(loopback_config(authorize=authorize))
    proxy.start()
    other = open_echo(proxy, origin.server_port)
    late = gevent.spawn(tunnel, proxy, f"127.0.0.1:{origin.server_port}")
    gevent.sleep(0.1)  # its hook waits for the drain
    started = time.monotonic()
    stopping = gevent.spawn(proxy.stop, 3600)
    try:
        gevent.sleep(0.1)
        box["draining"].set()
        stopping.join(timeout=5)
        assert stopping.dead and time.monotonic() - started < 5  # not the hour
        assert box.get("returned")
        assert other.recv(16) == b""  # closed by the hurried stop
        late.join(timeout=5)
        assert late.dead
    finally:
        other.close()
        stopping.kill()
        late.kill()


def test_a_stopped_server_stays_stopped(origin) -> None:
    """start() after stop() refuses; serve_forever() returns; a serve_forever() spawned
    before a stop() that ran first binds nothing."""
    proxy = ProxyServer(loopback_config())
    proxy.start()
    address = proxy.address
    proxy.stop(timeout=1)
    with pytest.raises(RuntimeError, match="has been stopped; make a new one"):
        proxy.start()
    done = gevent.spawn(proxy.serve_forever)
    done.join(timeout=5)
    assert done.dead and done.successful()
    with pytest.raises(OSError):
        socket.create_connection(address, timeout=1)
    never = ProxyServer(loopback_config())
    late = gevent.spawn(never.serve_forever)  # runs only after the stop below
    never.stop(timeout=1)
    late.join(timeout=5)
    assert late.dead and never.addresses == [] and never.engine is None
    started = ProxyServer(loopback_config())
    started.start()
    try:
        with pytest.raises(RuntimeError, match="already started"):
            started.start()
    finally:
        started.stop(timeout=1)


@pytest.mark.parametrize("engine", ["native", "python"])
def test_a_second_stop_waits_for_the_first(origin, engine: str) -> None:
    """Both engines alike: a second stop() does not cut the first one's drain short (that
    is hurry()'s job); it returns when the first does."""
    if engine == "native" and native_engine_error():
        pytest.skip(native_engine_error())
    proxy = ProxyServer(loopback_config(engine=engine))
    proxy.start()
    sock = open_echo(proxy, origin.server_port)
    first = gevent.spawn(proxy.stop, 1.0)
    gevent.sleep(0.1)
    second = gevent.spawn(proxy.stop, 1.0)
    gevent.sleep(0.3)
    sock.sendall(b"still")  # the first stop's drain still runs: the tunnel works
    assert sock.recv(16) == b"still"
    assert not second.dead
    gevent.joinall([first, second], timeout=5)
    assert first.dead and second.dead
    assert sock.recv(16) == b""
    sock.close()


def test_a_failed_start_keeps_nothing() -> None:
    """A start that cannot bind gives back its engine's descriptors and names no address."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        config = Config(listen=["127.0.0.1:0", f"127.0.0.1:{port}"])
        ProxyServer(config)  # what a server holds before start: not counted below
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(10):
            proxy = ProxyServer(config)
            with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
                proxy.start()
            assert proxy.addresses == [] and proxy.engine is None
        assert len(os.listdir("/proc/self/fd")) == before


def test_the_package_names_what_it_imports_when_asked() -> None:
    """Its exports are imported when first asked for (the command's entry point must run
    before them): dir() still lists them, and a submodule is found as an attribute."""
    code = (
        "import splicegate\n"
        "assert {'Config', 'ProxyServer', 'TunnelRecord'} <= set(dir(splicegate))\n"
        "assert splicegate.dial.dial and splicegate.errors.DnsError\n"
        "assert splicegate.ProxyServer.__name__ == 'ProxyServer'\n"
        "try:\n"
        "    splicegate.no_such_thing\n"
        "except AttributeError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n"
    )
    out = run_code(code)
    assert out.returncode == 0, out.stderr
