"""Smoke test for an installed splicegate: the native engine loads and one tunnel works.

A wheel that imports is not yet a wheel that works: the engine could be missing (the
install silently fell back to pure Python), or it could load and still fail at its first
splice. So this runs what a user runs, the ``splicegate`` console script, with
``--engine native`` (which refuses to start without the extension), and pushes bytes both
ways through one CONNECT tunnel to an echo origin, then checks the half-close and a clean
SIGTERM exit.

wheels/build.sh runs it in a fresh venv holding only the repaired wheel; cibuildwheel runs
it as its test-command. Standard library only; loopback only; every wait has a deadline,
and the whole run is bounded by DEADLINE.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

DEADLINE = 60.0  # seconds for the whole smoke test; emulated aarch64 in CI is slow
PAYLOAD = 4 * 1024 * 1024  # enough to need many splice calls through a 64 KiB pipe
CHUNK = 64 * 1024


class SmokeError(Exception):
    """The installed splicegate failed a check; the message says which."""


def remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise SmokeError("out of time")
    return left


def splicegate_command() -> list[str]:
    """The console script the wheel installed (its entry point is part of what we test).

    Looked up beside the interpreter first, so that a venv that is not activated still
    finds its own script rather than another installation's on PATH.
    """
    beside = Path(sys.executable).parent / "splicegate"
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("splicegate")
    if found is None:
        raise SmokeError("no splicegate console script beside the interpreter or on PATH")
    return [found]


def check_version(cmd: list[str], deadline: float) -> str:
    """``--engine native --version`` must name the native engine (and exit 0)."""
    out = subprocess.run(
        [*cmd, "--engine", "native", "--version"],
        capture_output=True,
        text=True,
        timeout=remaining(deadline),
        check=False,
    )
    if out.returncode != 0 or "engine: native" not in out.stdout:
        raise SmokeError(
            f"--version does not report the native engine (exit {out.returncode}):\n"
            f"{out.stdout}{out.stderr}"
        )
    return out.stdout


class EchoOrigin:
    """A loopback origin that echoes one connection, then half-closes after the client's EOF."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            self.listener.settimeout(DEADLINE)
            conn, _ = self.listener.accept()
            with conn:
                conn.settimeout(DEADLINE)
                while data := conn.recv(CHUNK):
                    conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)
        except BaseException as exc:  # reported by the main thread
            self.error = exc
        finally:
            self.listener.close()


class Proxy:
    """``splicegate`` on 127.0.0.1:0 with the native engine; stopped by its own pid only."""

    def __init__(self, cmd: list[str], origin_port: int, deadline: float) -> None:
        self.log_file = tempfile.NamedTemporaryFile(prefix="splicegate-smoke-", suffix=".log")  # noqa: SIM115
        flags = ["--listen", "127.0.0.1:0", "--engine", "native", "--log-level", "debug",
                 "--allow-port", str(origin_port), "--allow-dest", "127.0.0.1/32"]  # fmt: skip
        self.proc = subprocess.Popen(
            [*cmd, *flags], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=self.log_file,
        )  # fmt: skip
        match = self.wait_for_log(r"listening on 127\.0\.0\.1:(\d+)\n", deadline)
        self.port = int(match.group(1))

    def log(self) -> str:
        return Path(self.log_file.name).read_text(encoding="utf-8", errors="replace")

    def wait_for_log(self, pattern: str, deadline: float) -> re.Match[str]:
        while True:
            match = re.search(pattern, self.log())
            if match:
                return match
            if self.proc.poll() is not None:
                raise SmokeError(f"splicegate exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise SmokeError(f"{pattern!r} never logged:\n{self.log()}")
            time.sleep(0.02)

    def stop(self) -> int:
        """SIGTERM, then SIGKILL if it does not drain in time; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()
        return self.proc.returncode


def read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """The proxy's answer head and any bytes that came after it."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(CHUNK)
        if not data:
            raise SmokeError(f"proxy closed before answering: {buf!r}")
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def one_tunnel(proxy_port: int, origin_port: int, deadline: float) -> None:
    """CONNECT, PAYLOAD bytes up while reading the echo down, EOF both ways; same digest."""
    payload = os.urandom(PAYLOAD)
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=remaining(deadline)) as c:
        target = f"127.0.0.1:{origin_port}"
        c.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        head, echoed = read_head(c)
        if head != b"HTTP/1.1 200 Connection established":
            raise SmokeError(f"CONNECT refused: {head!r}")

        def send_all() -> None:
            for i in range(0, len(payload), CHUNK):
                c.sendall(payload[i : i + CHUNK])
            c.shutdown(socket.SHUT_WR)  # must reach the origin as EOF

        sender = threading.Thread(target=send_all, daemon=True)
        sender.start()
        down = hashlib.sha256(echoed)
        received = len(echoed)
        while True:  # EOF here means the origin's half-close came back through the tunnel
            c.settimeout(remaining(deadline))
            data = c.recv(CHUNK)
            if not data:
                break
            down.update(data)
            received += len(data)
        sender.join(remaining(deadline))
    if received != len(payload) or down.digest() != hashlib.sha256(payload).digest():
        raise SmokeError(f"echo mismatch: sent {len(payload)} B, got {received} B back")


def main() -> int:
    deadline = time.monotonic() + DEADLINE
    started = time.monotonic()
    try:
        cmd = splicegate_command()
        print(check_version(cmd, deadline), end="")
        origin = EchoOrigin()
        proxy = Proxy(cmd, origin.port, deadline)
        try:
            proxy.wait_for_log(r"relay engine: native", deadline)
            one_tunnel(proxy.port, origin.port, deadline)
            origin.thread.join(remaining(deadline))
            if origin.error is not None:
                raise SmokeError(f"echo origin failed: {origin.error!r}")
            record = proxy.wait_for_log(r"tunnel .* closed: .*\n", deadline)
            print(f"smoke: {record.group(0).split(' splicegate DEBUG ')[-1]}", end="")
        finally:
            code = proxy.stop()
        if code != 0:
            raise SmokeError(f"splicegate exited with {code} on SIGTERM")
    except (SmokeError, OSError, subprocess.TimeoutExpired) as exc:
        print(f"smoke: FAILED: {exc}", file=sys.stderr)
        return 1
    print(f"smoke: ok, {PAYLOAD} B echoed through the native engine in "
          f"{time.monotonic() - started:.1f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
