"""The proxy inside a gevent application that monkey-patches, as most do first thing.

``monkey.patch_all()`` swaps or removes module attributes (it removes ``select.epoll``, it
replaces ``os.close`` and ``os.fork``, the socket classes, ``time.sleep``), and an engine that
reaches for one of them at the wrong moment fails only there: the Python engine once lost
every tunnel with early data and aborted the process under concurrency. The test session
itself must not be patched, so each run is a child that patches before it imports
splicegate, embeds a ProxyServer on the engine under test and drives tunnels through it;
the verdict comes back as a JSON line and an exit status.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from splicegate.relay import PUREPYTHON_ENV, native_engine_error

TESTS_DIR = Path(__file__).resolve().parent

CHILD = r"""
from gevent import monkey

monkey.patch_all()  # before splicegate, as an application's first line does it

import json
import select
import sys

import gevent
from gevent import socket
from gevent.server import StreamServer

from relayrig import WAIT, abort, randbytes, together, wait_until
from splicegate import Config, ProxyServer

ROUNDS, TUNNELS = 3, 24


def echo_then_count(sock, _address):
    # Echoes up to the client's EOF, then says how much it got: bytes still go down a
    # tunnel whose client has half-closed.
    total = 0
    while data := sock.recv(65536):
        sock.sendall(data)
        total += len(data)
    sock.sendall(b"|%d" % total)


reset_seen = []


def await_reset(sock, _address):
    # Reads to the client's EOF, answers once, then waits for the client's abort, which
    # only the proxy's watch of a half-closed socket can pass on (no read or write finds
    # it there): an error on this socket, well before any relay timeout.
    while sock.recv(65536):
        pass
    sock.sendall(b"k")
    reset_seen.append(
        wait_until(
            lambda: sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR), "the abort passed on"
        )
    )


echo, resetter = StreamServer(("127.0.0.1", 0), echo_then_count), StreamServer(
    ("127.0.0.1", 0), await_reset
)
echo.start()
resetter.start()
server = ProxyServer(
    Config(
        listen=["127.0.0.1:0"],
        allow_port=["any"],
        allow_dest=["127.0.0.0/8"],
        engine=sys.argv[1],
        half_closed_timeout=5 * WAIT,  # a missed reset would show as a wait_until failure
    )
)
server.start()


def open_tunnel(port, early):
    sock = socket.create_connection(server.address, timeout=WAIT)
    target = b"127.0.0.1:%d" % port
    sock.sendall(b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, target) + early)
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, f"the proxy closed after {head!r}"
        head += chunk
    head, rest = head.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200"), head
    return sock, rest


def send_and_half_close(sock, data):
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


def read_to_eof(sock, got):
    while chunk := sock.recv(65536):
        got += chunk
    return bytes(got)


def echoed(i):
    # Every other tunnel carries early bytes (the Python engine then watches the client's
    # socket for errors from the start), and every one half-closes.
    early = randbytes(1 + 997 * i, i) if i % 2 == 0 else b""
    body = randbytes(40_000 + 3_001 * i, 1_000 + i)
    sock, rest = open_tunnel(echo.server_port, early)
    try:
        _, got = together((send_and_half_close, sock, body), (read_to_eof, sock, bytearray(rest)))
    finally:
        sock.close()
    sent = early + body
    return got == sent + b"|%d" % len(sent)


def reset_after_half_close():
    sock, rest = open_tunnel(resetter.server_port, b"early")
    send_and_half_close(sock, b"last")
    assert (rest or sock.recv(1)) == b"k"
    abort(sock)


ok = 0
for _ in range(ROUNDS):
    results = together(
        *[(echoed, i) for i in range(TUNNELS)], (reset_after_half_close,), timeout=3 * WAIT
    )
    ok += sum(1 for r in results[:TUNNELS] if r)
wait_until(lambda: len(reset_seen) == ROUNDS, "every abort passed on")
wait_until(lambda: server.engine.stats()["active"] == 0, "every tunnel closed")
stats = server.engine.stats()
server.stop(WAIT)
print(json.dumps({
    "epoll_removed": not hasattr(select, "epoll"),
    "engine": server.engine.name,
    "echoed_exactly": ok,
    "tunnels": ROUNDS * TUNNELS,
    "resets": reset_seen,
    "stats": stats,
}))
"""


def run_child(engine: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    path = os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-c", CHILD, engine],
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, **env, "PYTHONPATH": path},
        check=False,
    )


@pytest.mark.parametrize(
    ("engine", "env", "expected"),
    [
        pytest.param("python", {}, "python", id="python"),
        # The fallback where no extension loads.
        pytest.param("auto", {PUREPYTHON_ENV: "1"}, "python", id="auto-fallback"),
        pytest.param(
            "native",
            {},
            "native",
            id="native",
            marks=pytest.mark.skipif(
                native_engine_error() is not None, reason="the native engine is not built here"
            ),
        ),
    ],
)
def test_tunnels_under_monkey_patch_all(engine: str, env: dict[str, str], expected: str) -> None:
    """Concurrent tunnels, with and without early bytes, each half-closed, one per round
    reset after its half-close: every byte arrives exactly, every reset is passed on, no
    tunnel is left, and the process exits cleanly (the failure this guards against was a
    SIGABRT from libev, or tunnels the engine refused after the client had its 200)."""
    proc = run_child(engine, {PUREPYTHON_ENV: "", **env})
    assert proc.returncode == 0, f"child exited with {proc.returncode}:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "did not take the tunnel" not in proc.stderr, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["epoll_removed"]  # the child really ran patched
    assert result["engine"] == expected
    assert result["echoed_exactly"] == result["tunnels"]
    assert len(result["resets"]) == 3
    # A reset in CLOSE_WAIT (the origin had read its EOF) may read as EPIPE.
    assert all(code in (errno.ECONNRESET, errno.EPIPE) for code in result["resets"])
    assert result["stats"]["active"] == 0
