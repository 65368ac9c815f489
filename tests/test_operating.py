"""Running it for real: the access log, /metrics and /healthz, drain on SIGTERM, reload on
SIGHUP, log reopening on SIGUSR1, systemd readiness and ``--workers``. Each test runs the
``splicegate`` command as a process on loopback and stops it by its pid."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from gevent.event import Event
from prometheus_client.parser import text_string_to_metric_families

import splicegate
from dnsserver import DnsServer
from proxyproc import (
    WAIT,
    Origin,
    ProxyProcess,
    connect_head,
    echo,
    free_port,
    ipv6_loopback,
    open_tunnel,
    origin,
    read_reply,
    recv_exactly,
    recv_until_eof,
    request,
)
from relayrig import wait_until
from splicegate.auth import Params, set_password
from splicegate.configfile import ConfigError
from splicegate.daemon import Signals

LOOPBACK = ("--allow-dest", "127.0.0.0/8")
ANY_PORT = ("--allow-port", "any")
#: scrypt as cheap as it goes: these tests are about the files, not the hashing
CHEAP = Params(16, 1, 1)

KEYS = [
    "ts", "client", "client_port", "user", "method", "target", "dialled", "status", "error",
    "dns_ms", "connect_ms", "established_ms", "bytes_up", "bytes_down", "duration_ms",
    "first_closer", "reason",
]  # fmt: skip


def log_lines(path: Path, count: int) -> list[str]:
    """The access log's lines, once there are ``count`` of them (never more)."""

    def read() -> list[str] | None:
        lines = path.read_text().splitlines() if path.exists() else []
        assert len(lines) <= count, lines
        return lines if len(lines) == count else None

    return wait_until(read, f"{count} access-log lines in {path}")


def upload_download(conn: socket.socket) -> None:
    """Origin: read to EOF, then send back 54321 bytes and close."""
    while conn.recv(65536):
        pass
    conn.sendall(b"d" * 54321)


# --- the access log -----------------------------------------------------------------------


def test_access_log_json_one_line_per_outcome_with_byte_counts(
    tmp_path: Path, engine_kind: str
) -> None:
    """Both engines report a closed tunnel in the hub (on_done): one line each way."""
    path = tmp_path / "access.log"
    proc = ProxyProcess(
        *LOOPBACK, *ANY_PORT, "--access-log", str(path), "--log-format", "json",
        "--engine", engine_kind,
    )  # fmt: skip
    try:
        with origin(upload_download) as srv:
            target = f"127.0.0.1:{srv.port}"
            sock, reply = open_tunnel(proc.address, target, early=b"early")
            assert reply.status == 200
            sock.sendall(b"u" * 100_000)
            sock.shutdown(socket.SHUT_WR)
            received = recv_until_eof(sock)
            sock.close()
            assert len(received) == 54321
            (line,) = log_lines(path, 1)
        entry = json.loads(line)
        assert list(entry) == KEYS
        assert entry["client"] == "127.0.0.1" and entry["client_port"] > 0
        assert entry["method"] == "CONNECT" and entry["target"] == target
        assert entry["dialled"] == target and entry["status"] == 200
        assert entry["error"] is None and entry["user"] is None
        assert entry["bytes_up"] == 5 + 100_000  # the early bytes and the upload
        assert entry["bytes_down"] == len(received)
        assert entry["first_closer"] in ("client", "origin") and entry["reason"] == "eof"
        assert entry["dns_ms"] == 0  # an IP literal: no lookup
        assert 0 < entry["connect_ms"] < entry["established_ms"] <= entry["duration_ms"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["ts"])

        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))  # bound, never listening: refused
            refused = request(proc.address, connect_head(f"127.0.0.1:{closed.getsockname()[1]}"))
        assert refused.status == 502
        assert request(proc.address, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").status == 405
        assert request(proc.address, b"CONNECT \xfcber.example HTTP/1.1\r\n\r\n").status == 400
        assert request(proc.address, b"\x16\x03\x01\x02\x00\r\n\r\n").status == 400
        lines = [json.loads(line) for line in log_lines(path, 5)]
        assert [(e["status"], e["error"]) for e in lines[1:]] == [
            (502, "connection_refused"),
            (405, "http_request_denied"),
            (400, "http_request_error"),
            (400, "http_request_error"),
        ]
        # A refused head says what its request line asked for, its bytes as sent (escaped
        # outside ASCII); None: no request line to show.
        assert [(e["method"], e["target"]) for e in lines[2:]] == [
            ("GET", "/"),
            ("CONNECT", "\\xfcber.example"),
            (None, None),
        ]
        for e in lines[1:]:
            assert (e["bytes_up"], e["bytes_down"], e["first_closer"], e["reason"]) == (
                0, 0, None, None,
            )  # fmt: skip
            assert e["established_ms"] is None  # no 200 was sent
    finally:
        assert proc.stop() == 0


def test_a_client_that_resets_mid_request_gets_a_499_line(tmp_path: Path) -> None:
    """No one is left to answer, but the line says someone asked, as nginx's 499 does."""
    path = tmp_path / "access.log"
    proc = ProxyProcess(*LOOPBACK, *ANY_PORT, "--access-log", str(path), "--log-format", "json")
    try:
        with socket.create_connection(proc.address, timeout=WAIT) as sock:
            sock.sendall(b"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: 127.0.0")  # no end of head
            time.sleep(0.2)  # the proxy has it, and waits for the rest
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        (line,) = log_lines(path, 1)
        entry = json.loads(line)
        assert (entry["status"], entry["error"]) == (499, None)
        assert (entry["method"], entry["target"]) == ("CONNECT", "127.0.0.1:9")
        assert entry["established_ms"] is None  # no 200 was sent
        assert entry["client"] == "127.0.0.1" and entry["bytes_up"] == 0
        assert 0 < entry["duration_ms"] < WAIT * 1000
        assert "left before the answer" in proc.log()
    finally:
        assert proc.stop() == 0


def test_access_log_text_and_reopen_on_sigusr1(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    proc = ProxyProcess(*LOOPBACK, *ANY_PORT, "--access-log", str(path))
    try:
        with origin(echo) as srv:
            sock, _ = open_tunnel(proc.address, f"127.0.0.1:{srv.port}", early=b"ping")
            assert recv_exactly(sock, 4) == b"ping"
            sock.close()
            (line,) = log_lines(path, 1)
            assert line.startswith("ts=")
            fields = dict(pair.split("=", 1) for pair in line.split(" "))
            assert list(fields) == KEYS
            assert fields["status"] == "200" and fields["user"] == "-"
            assert fields["bytes_up"] == "4" and fields["bytes_down"] == "4"
            assert fields["target"] == f"127.0.0.1:{srv.port}"

            rotated = tmp_path / "access.log.1"
            path.rename(rotated)  # what logrotate does, then it signals
            proc.proc.send_signal(signal.SIGUSR1)
            proc.wait_for_log(r"access log .* reopened")
            sock, _ = open_tunnel(proc.address, f"127.0.0.1:{srv.port}", early=b"pong")
            assert recv_exactly(sock, 4) == b"pong"
            sock.close()
            log_lines(path, 1)
        assert len(rotated.read_text().splitlines()) == 1
    finally:
        assert proc.stop() == 0


def test_text_line_quotes_what_the_client_chose() -> None:
    from splicegate.accesslog import Entry, format_text

    entry = Entry(
        ts="t", client="::1", client_port=1, user='a b"c', method="GET", target="/x=1",
        dialled=None, status=405, error="http_request_denied", dns_ms=0, connect_ms=0,
        established_ms=None, bytes_up=0, bytes_down=0, duration_ms=1.5, first_closer=None,
        reason=None,
    )  # fmt: skip
    text = format_text(entry)
    assert 'user="a b\\"c"' in text and 'target="/x=1"' in text and "dialled=-" in text
    assert "\n" not in text


def test_a_write_cut_short_counts_only_the_lines_it_did_not_finish(tmp_path: Path) -> None:
    """A file size limit (as a full disk) lets a write through in part: the lines it wrote
    in full are in the file, and only the others are counted lost."""
    script = textwrap.dedent(
        """
        import resource, signal, sys
        from splicegate.accesslog import AccessLog, Entry
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, not death, past the limit
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.RLIM_INFINITY))
        lost = []
        log = AccessLog(sys.argv[1], "json", lost.append)
        for n in range(20):
            log.write(Entry(
                ts="t", client="127.0.0.1", client_port=n, user=None, method="CONNECT",
                target="x:443", dialled=None, status=403, error="http_request_denied",
                dns_ms=0, connect_ms=0, established_ms=None, bytes_up=0, bytes_down=0,
                duration_ms=1.0, first_closer=None, reason=None,
            ))
        log.close()
        print(log.failed, sum(lost))
        """
    )
    path = tmp_path / "access.log"
    done = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=WAIT
    )
    assert done.returncode == 0, done.stderr
    failed, counted = map(int, done.stdout.split())
    data = path.read_bytes()
    assert len(data) == 1000  # the limit cut a line
    whole = data.count(b"\n")
    assert 0 < whole < 20
    assert failed == counted == 20 - whole


# --- metrics and health -------------------------------------------------------------------


def admin_address(proc: ProxyProcess) -> tuple[str, int]:
    match = proc.wait_for_log(r"admin on http://([\d.]+):(\d+)")
    return match.group(1), int(match.group(2))


def http_get(address: tuple[str, int], path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection(*address, timeout=WAIT)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def scrape(address: tuple[str, int]) -> dict[tuple[str, tuple], float]:
    status, text = http_get(address, "/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_access_log_lines_lost_are_counted_and_reported() -> None:
    """A log that cannot be written (a full disk: /dev/full) loses lines: /metrics counts
    them, and the stop says how many, beyond the first failure's warning."""
    proc = ProxyProcess(*LOOPBACK, *ANY_PORT, "--access-log", "/dev/full", "--admin", "127.0.0.1:0")
    try:
        admin = admin_address(proc)
        for _ in range(5):
            assert request(proc.address, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").status == 405
        wait_until(
            lambda: metric(scrape(admin), "splicegate_access_log_lines_lost_total") == 5,
            "five lines counted lost",
        )
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(timeout=WAIT) == 0
        log = proc.log()  # before stop(), which deletes the file
        assert log.count("cannot write: [Errno 28]") == 1
        assert "access log /dev/full: 5 lines lost (0 dropped while the writer was behind" in log
    finally:
        proc.stop()


@contextlib.contextmanager
def silent_dns_proxy(log: Path, *flags: str) -> Iterator[tuple[DnsServer, ProxyProcess]]:
    """A proxy logging JSON to ``log``, whose nameserver never answers for silent.test."""
    with DnsServer() as server:
        server.add("silent.test", mode="drop")
        proc = ProxyProcess(
            *LOOPBACK, *ANY_PORT, "--access-log", str(log), "--log-format", "json",
            "--nameserver", f"{server.host}:{server.port}", *flags,
        )  # fmt: skip
        try:
            yield server, proc
        finally:
            assert proc.stop() == 0


def test_a_client_that_resets_while_its_name_resolves_gets_a_499_line(tmp_path: Path) -> None:
    """Gone during the lookup, the client is not refused by the lookup's timeout after: the
    line says 499, not the 504 no one was there to read, and the log names that 504."""
    path = tmp_path / "access.log"
    with silent_dns_proxy(path, "--dns-timeout", "1") as (server, proc):
        with socket.create_connection(proc.address, timeout=WAIT) as sock:
            sock.sendall(b"CONNECT silent.test:443 HTTP/1.1\r\nHost: silent.test:443\r\n\r\n")
            wait_until(lambda: server.count("silent.test", "A") > 0, "the lookup started")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        (line,) = log_lines(path, 1)
        entry = json.loads(line)
        assert (entry["status"], entry["error"]) == (499, None)
        assert entry["target"] == "silent.test:443" and entry["dns_ms"] >= 900
        assert "left before the answer (silent.test:443): " in proc.log()
        assert "before its 504 dns_timeout" in proc.log()
        # Still there when the lookup times out: the 504, as before.
        assert request(proc.address, connect_head("silent.test:443")).status == 504
        (_, line) = log_lines(path, 2)
        assert (json.loads(line)["status"], json.loads(line)["error"]) == (504, "dns_timeout")


def test_requests_cut_off_by_the_drain_deadline_get_a_503_and_a_line(tmp_path: Path) -> None:
    """A request still being handled when the drain ends (waiting on DNS, or its head half
    sent) is answered 503 "proxy stopping", and the access log has its line."""
    path = tmp_path / "access.log"
    with silent_dns_proxy(
        path, "--dns-timeout", "60", "--header-timeout", "60", "--drain-timeout", "0.5"
    ) as (server, proc):
        waiting = socket.create_connection(proc.address, timeout=WAIT)
        waiting.sendall(connect_head("silent.test:443"))
        wait_until(lambda: server.count("silent.test", "A") > 0, "the lookup started")
        partial = socket.create_connection(proc.address, timeout=WAIT)
        partial.sendall(b"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: 127.0")
        time.sleep(0.2)  # the proxy has both
        proc.proc.send_signal(signal.SIGTERM)
        for sock in (waiting, partial):
            with sock:
                reply = read_reply(sock)
                assert reply.status == 503
                assert 'details="proxy stopping"' in reply.fields["proxy-status"]
        entries = [json.loads(line) for line in log_lines(path, 2)]
        assert sorted((e["status"], e["error"], e["target"]) for e in entries) == [
            (503, "proxy_internal_response", "127.0.0.1:9"),
            (503, "proxy_internal_response", "silent.test:443"),
        ]
        assert proc.proc.wait(timeout=WAIT) == 0


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    with DnsServer() as server:
        server.add("origin.test", a=["127.0.0.1"])
        yield server


def test_the_admin_log_names_an_ipv4_client_of_a_dual_stack_listener_as_ipv4() -> None:
    if not ipv6_loopback():
        pytest.skip("no IPv6 loopback")
    proc = ProxyProcess("--admin", "[::]:0")
    try:
        port = int(proc.wait_for_log(r"admin on http://\[::\]:(\d+)").group(1))
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as garbage:
            garbage.sendall(b"GARBAGE\r\n\r\n")
            assert garbage.recv(4096).startswith(b"HTTP/1.1 400 ")
        proc.wait_for_log(r"INFO admin: refused a request from 127\.0\.0\.1:\d+: ")
        assert "::ffff:" not in proc.log()
    finally:
        assert proc.stop() == 0


def test_bytes_relayed_never_count_a_byte_twice() -> None:
    """An engine's totals fall back when a tunnel ends abortively with bytes unsent (they
    count bytes delivered); the counter, which cannot fall, counts on only past the most
    it has seen, or the bytes moved after would be counted over again."""
    from splicegate.metrics import Metrics

    m = Metrics()
    for up in (4000, 1000, 3000, 5000):  # 3000 unsent at a cut, then 4000 moved
        m.observe_engine({"bytes_up": up})
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(m.render().decode())
        for s in family.samples
    }
    assert metric(samples, "splicegate_bytes_total", direction="up") == 5000


def test_metrics_move_as_tunnels_open_and_close(dns: DnsServer, engine_kind: str) -> None:
    proc = ProxyProcess(
        *LOOPBACK, "--allow-port", "1024-65535", "--admin", "127.0.0.1:0",
        "--nameserver", f"{dns.host}:{dns.port}", "--engine", engine_kind,
    )  # fmt: skip
    try:
        admin = admin_address(proc)
        assert http_get(admin, "/healthz") == (200, "serving\n")
        assert http_get(admin, "/nothing")[0] == 404
        conn = http.client.HTTPConnection(*admin, timeout=WAIT)
        try:
            conn.request("POST", "/healthz")
            answer = conn.getresponse()
            assert (answer.status, answer.getheader("Allow")) == (405, "GET, HEAD")
        finally:
            conn.close()
        with socket.create_connection(admin, timeout=WAIT) as garbage:
            garbage.sendall(b"GARBAGE\r\n\r\n")
            assert garbage.recv(4096).startswith(b"HTTP/1.1 400 ")
        proc.wait_for_log(r"INFO admin: refused a request from 127\.0\.0\.1:\d+: Invalid")
        assert "ERROR" not in proc.log()
        before = scrape(admin)
        assert metric(before, "splicegate_tunnels_active") == 0
        assert metric(before, "splicegate_connections_total") == 0
        with origin(echo) as srv:
            sock, reply = open_tunnel(proc.address, f"origin.test:{srv.port}", early=b"x" * 1000)
            assert reply.status == 200 and recv_exactly(sock, 1000) == b"x" * 1000
            opened = scrape(admin)
            assert metric(opened, "splicegate_tunnels_active") == 1
            assert metric(opened, "splicegate_connections_total") == 1
            assert metric(opened, "splicegate_dns_seconds_count") == 1
            assert metric(opened, "splicegate_connect_seconds_count") == 1
            assert metric(opened, "splicegate_time_to_established_seconds_count") == 1
            assert metric(opened, "splicegate_bytes_total", direction="up") == 1000
            assert metric(opened, "splicegate_tunnels_total", status="200", error="") == 0
            sock.sendall(b"y" * 2000)
            assert recv_exactly(sock, 2000) == b"y" * 2000
            sock.close()

            def closed() -> dict | None:
                now = scrape(admin)
                return now if metric(now, "splicegate_tunnels_active") == 0 else None

            after = wait_until(closed, "the tunnel counted as closed")
        assert metric(after, "splicegate_tunnels_total", status="200", error="") == 1
        assert metric(after, "splicegate_bytes_total", direction="up") == 3000
        assert metric(after, "splicegate_bytes_total", direction="down") == 3000
        assert ("splicegate_engine_pipes_in_use", ()) in after
        assert ("splicegate_engine_threads", ()) in after

        assert request(proc.address, connect_head("127.0.0.1:80")).status == 403
        refused = scrape(admin)
        assert metric(refused, "splicegate_refusals_total", cause="port_denied") == 1
        assert (
            metric(refused, "splicegate_tunnels_total", status="403", error="http_request_denied")
            == 1
        )
        assert metric(refused, "splicegate_connections_total") == 2
        # a refusal has no 200: the time to it is observed for tunnels only
        assert metric(refused, "splicegate_time_to_established_seconds_count") == 1
        # the name was asked of the nameserver once; the port refusal asked nothing
        assert metric(refused, "splicegate_dns_lookups_total", answer="resolver") == 1
        assert metric(refused, "splicegate_dns_lookups_total", answer="cache") == 0
        with origin(echo) as srv:
            for _ in range(2):  # the name again: from the cache
                sock, reply = open_tunnel(proc.address, f"origin.test:{srv.port}")
                assert reply.status == 200
                sock.close()
        cached = scrape(admin)
        assert metric(cached, "splicegate_dns_lookups_total", answer="resolver") == 1
        assert metric(cached, "splicegate_dns_lookups_total", answer="cache") == 2
        assert metric(cached, "splicegate_dns_cache_entries") == 1
        assert dns.count("origin.test", "A") == 1
    finally:
        assert proc.stop() == 0


# --- SIGTERM: drain -----------------------------------------------------------------------

BLOCK = os.urandom(1 << 20)
BIG = 64  # MiB


def send_big(conn: socket.socket) -> None:
    for _ in range(BIG):
        conn.sendall(BLOCK)
    conn.shutdown(socket.SHUT_WR)
    while conn.recv(65536):  # until the client closes
        pass


def test_sigterm_drains_an_active_64mib_transfer_byte_exact() -> None:
    proc = ProxyProcess(*LOOPBACK, *ANY_PORT, "--drain-timeout", "30", "--admin", "127.0.0.1:0")
    try:
        admin = admin_address(proc)
        with origin(send_big) as srv:
            sock, reply = open_tunnel(proc.address, f"127.0.0.1:{srv.port}")
            assert reply.status == 200
            digest = hashlib.sha256(recv_exactly(sock, 1 << 20))
            proc.proc.send_signal(signal.SIGTERM)
            proc.wait_for_log("stopping: no new connections")
            assert http_get(admin, "/healthz") == (503, "draining\n")

            def refused() -> bool:
                try:
                    socket.create_connection(proc.address, timeout=1).close()
                except ConnectionRefusedError:
                    return True
                return False

            wait_until(refused, "new connections refused while draining")
            rest = recv_until_eof(sock, limit=BIG << 20)
            sock.close()
            digest.update(rest)
            assert (1 << 20) + len(rest) == BIG << 20
            expected = hashlib.sha256()
            for _ in range(BIG):
                expected.update(BLOCK)
            assert digest.hexdigest() == expected.hexdigest()
            assert proc.proc.wait(WAIT) == 0
            assert "INFO stopped" in proc.log()
    finally:
        proc.stop()


def open_echo_tunnel(proc: ProxyProcess, srv: Origin) -> socket.socket:
    """A working tunnel to the echo origin ``srv``, idle after its first 4 bytes."""
    sock, reply = open_tunnel(proc.address, f"127.0.0.1:{srv.port}", early=b"open")
    assert reply.status == 200 and recv_exactly(sock, 4) == b"open"
    return sock


def assert_closed_at_exit(proc: ProxyProcess, sock: socket.socket) -> None:
    """The proxy exits 0 and closes the tunnel cleanly on its way out."""
    assert proc.proc.wait(WAIT) == 0
    sock.settimeout(WAIT)
    assert recv_until_eof(sock) == b""
    sock.close()


@pytest.mark.parametrize(
    ("drain", "sig"),
    [("0.5", signal.SIGTERM), ("3600", signal.SIGQUIT)],
    ids=["sigterm-at-the-drain-deadline", "sigquit-without-a-drain"],
)
def test_a_stop_closes_what_is_left(drain: str, sig: signal.Signals) -> None:
    """SIGTERM closes the tunnels still open at the drain deadline; SIGQUIT, as gunicorn's,
    closes them at once, however long the drain would have been. Either way the process
    exits 0."""
    proc = ProxyProcess(*LOOPBACK, *ANY_PORT, "--drain-timeout", drain)
    try:
        with origin(echo) as srv:
            sock = open_echo_tunnel(proc, srv)
            proc.proc.send_signal(sig)  # the tunnel stays open, idle
            assert_closed_at_exit(proc, sock)  # closed by the proxy
        if sig == signal.SIGQUIT:  # announced as what it does, not as a drain
            assert "stopping: no new connections; SIGQUIT: closing the open tunnels now" in (
                proc.log()
            )
            assert "open tunnels get" not in proc.log()
            assert "stop signal while draining" not in proc.log()
    finally:
        proc.stop()


# As root, a prefix that drops CAP_SYS_RESOURCE from the bounding set and execs the rest:
# what follows runs as an unprivileged process would for pipe sizes. prctl(PR_CAPBSET_DROP
# = 24, CAP_SYS_RESOURCE = 24).
WITHOUT_CAP_SYS_RESOURCE = [
    sys.executable,
    "-c",
    "import ctypes, os, sys; assert ctypes.CDLL(None).prctl(24, 24, 0, 0, 0) == 0; "
    "os.execv(sys.argv[1], sys.argv[1:])",
]


def test_a_pipe_size_past_the_limit_is_warned_of_once_not_per_worker() -> None:
    """The supervisor finds the size the kernel grants and gives it to the workers, so the
    warning is said once, and each worker's engine gets the limit without asking again."""
    pytest.importorskip("splicegate._engine", reason="the native engine is not built here")
    with open("/proc/sys/fs/pipe-max-size") as f:
        limit = int(f.read())
    prefix = WITHOUT_CAP_SYS_RESOURCE if os.geteuid() == 0 else []
    proc = ProxyProcess(*LOOPBACK, *ANY_PORT, "--workers", "2", "--pipe-size", str(2 * limit),
                        listen=[f"127.0.0.1:{free_port()}"], prefix=prefix)  # fmt: skip
    try:
        proc.wait_for_log("all 2 workers ready")
        with origin(echo) as srv:
            sock = open_echo_tunnel(proc, srv)  # a worker's engine makes its pipes
            sock.close()
        log = proc.log()
        assert log.count(f"is above fs.pipe-max-size ({limit})") == 1, log
    finally:
        assert proc.stop() == 0


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGUSR1], ids=["reload", "reopen"])
def test_a_signal_for_a_worker_still_starting_waits_until_it_is_up(signum: int) -> None:
    """A worker just restarted has no handlers yet: a reload or reopen passed on at once
    would kill it (the default action). The supervisor holds it until the worker is up."""
    proc = ProxyProcess(*LOOPBACK, *ANY_PORT, "--workers", "2",
                        listen=[f"127.0.0.1:{free_port()}"])  # fmt: skip
    try:
        proc.wait_for_log("all 2 workers ready")
        first = int(proc.wait_for_log(r"worker 1 started \(pid (\d+)\)").group(1))
        os.kill(first, signal.SIGKILL)
        again = proc.wait_for_log(r"worker 1 started \(pid (\d+)\)\n(?:.|\n)*worker 1 started")
        restarted = int(re.findall(r"worker 1 started \(pid (\d+)\)", proc.log())[-1])
        assert again and restarted != first
        proc.proc.send_signal(signum)  # while it starts: imports alone take longer
        time.sleep(2.0)
        log = proc.log()
        assert f"exited with signal {signal.Signals(signum).name}" not in log, log
        os.kill(restarted, 0)  # alive
        with origin(echo) as srv:
            for _ in range(4):  # whichever worker the kernel picks
                sock = open_echo_tunnel(proc, srv)
                sock.close()
    finally:
        assert proc.stop() == 0


#: Runs first, in the daemon's pid: SIGHUP and SIGUSR1 back to their default actions, as
#: systemd starts a service, then exec. A test run under nohup would otherwise hand the
#: daemon an ignored SIGHUP, which the early catch rightly leaves ignored (_early.py).
DEFAULT_SIGNALS_THEN_EXEC = (
    "import os, signal, sys\n"
    "for signum in (signal.SIGHUP, signal.SIGUSR1):\n"
    "    signal.signal(signum, signal.SIG_DFL)\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)


@contextlib.contextmanager
def starting_daemon(tmp_path: Path, *flags: str) -> Iterator[tuple[subprocess.Popen, Path]]:
    """splicegate started and handed over at once, still starting (ProxyProcess waits
    until it listens), with SIGHUP and SIGUSR1 at their defaults and the file its stderr
    goes to; killed by its pid if still running at the end."""
    log = tmp_path / "stderr"
    with open(log, "wb") as err:
        daemon = subprocess.Popen(
            [sys.executable, "-c", DEFAULT_SIGNALS_THEN_EXEC,
             sys.executable, "-P", "-m", "splicegate", *LOOPBACK, *flags,
             "--listen", f"127.0.0.1:{free_port()}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    try:
        yield daemon, log
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(WAIT)


def caught_signals(pid: int) -> set[int]:
    """The signals a process has a handler for (SigCgt in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            mask = int(line.split()[1], 16)
            return {n for n in range(1, 65) if mask >> (n - 1) & 1}
    return set()


def wait_for_early_catch(pid: int, signum: int, log: Path) -> None:
    """Wait until process ``pid`` catches ``signum`` but not yet SIGTERM, which its daemon's
    handlers catch too. A process that exits, or is past that window, fails the test with
    what it wrote to ``log``."""

    def seen() -> bool:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            status = ""
        assert "\nState:\tZ" not in status and status, f"{pid} exited:\n{log.read_text()}"
        caught = caught_signals(pid)
        assert signal.SIGTERM not in caught, f"{pid} is past its early catch:\n{log.read_text()}"
        return signum in caught

    wait_until(seen, "the early catch, before the daemon's handlers", poll=0.001)


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGUSR1], ids=["reload", "reopen"])
def test_a_reload_or_reopen_while_the_daemon_imports_is_kept_for_later(
    tmp_path: Path, signum: int
) -> None:
    """A third of a second of imports comes before the daemon's own handlers, and the
    default action of SIGHUP or SIGUSR1 kills: the command catches them first, and the
    daemon acts on them once it is up. The signal is sent while the command catches them
    but not yet SIGTERM, which the daemon's handlers catch too: only the early catch."""
    access = str(tmp_path / "access.log")
    with starting_daemon(tmp_path, "--access-log", access) as (daemon, log):
        wait_for_early_catch(daemon.pid, signum, log)
        daemon.send_signal(signum)
        what = "reloaded" if signum == signal.SIGHUP else f"access log {access} reopened"
        wait_until(lambda: what in log.read_text() and daemon.poll() is None, "up, and alive")
        assert log.read_text().index("listening on") < log.read_text().index(what)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(WAIT) == 0


def test_a_reopen_that_reaches_a_worker_still_importing_is_kept_for_later(tmp_path: Path) -> None:
    """``systemctl kill -s USR1`` signals every process of the service, workers still
    importing too: their default action ended one, and a daemon starting stopped."""
    with starting_daemon(tmp_path, "--workers", "2") as (daemon, log):
        found = wait_until(
            lambda: re.search(r"worker 2 started \(pid (\d+)\)", log.read_text()),
            "worker 2 started",
        )
        worker = int(found.group(1))
        wait_for_early_catch(worker, signal.SIGUSR1, log)
        os.kill(worker, signal.SIGUSR1)  # our child's child: started by this test
        wait_until(lambda: "all 2 workers ready" in log.read_text(), "the workers up")
        assert "exited with" not in log.read_text()
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(WAIT) == 0, log.read_text()


def test_readiness_counts_only_from_a_workers_own_pid() -> None:
    """A datagram naming a worker's pid, from another process, marks nothing ready; the
    worker's own does."""
    from splicegate.config import Config
    from splicegate.workers import Supervisor

    config = Config(workers=2, listen=[f"127.0.0.1:{free_port()}"])
    supervisor = Supervisor(config, lambda: config)
    supervisor._prepare()
    send = (
        "import socket, sys; sys.stdin.readline(); "
        "socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b'READY=1', chr(0) + sys.argv[1])"
    )
    stand_ins = [
        subprocess.Popen(
            [sys.executable, "-c", send, supervisor._notify_name],
            stdin=subprocess.PIPE,
        )
        for _ in supervisor.workers
    ]
    try:
        for worker, proc in zip(supervisor.workers, stand_ins, strict=True):
            worker.proc = proc  # type: ignore[assignment]  # only its pid is read
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as stranger:
            forged = f"READY=1\nWORKER_PID={stand_ins[0].pid}".encode()
            stranger.sendto(forged, "\0" + supervisor._notify_name)
        supervisor._readiness(0.3)
        assert [w.ready for w in supervisor.workers] == [False, False]
        stand_ins[0].communicate(b"go\n", timeout=WAIT)
        supervisor._readiness(1.0)
        assert [w.ready for w in supervisor.workers] == [True, False]
    finally:
        for proc in stand_ins:
            proc.kill()
            proc.wait(WAIT)
        supervisor._cleanup()


def test_a_supervisor_refuses_objects_it_cannot_hand_to_a_worker() -> None:
    """An application's resolver or hooks cannot go into a settings file: its workers
    would silently run without them."""
    from splicegate.config import Config
    from splicegate.workers import Supervisor

    config = Config(workers=2, listen=[f"127.0.0.1:{free_port()}"], authorize=lambda r, c: None)
    with pytest.raises(ConfigError, match=r"^workers: .* objects in authorize; run a ProxyServer"):
        Supervisor(config, lambda: config)


def test_the_supervisor_takes_readiness_only_from_its_workers() -> None:
    """Its readiness socket is abstract, so any local process can send to it: a datagram
    that is no worker's (here one claiming a worker's pid in a field, with a bad one
    beside) is ignored, and the supervisor goes on."""
    proc = ProxyProcess(*LOOPBACK, *ANY_PORT, "--workers", "2",
                        listen=[f"127.0.0.1:{free_port()}"])  # fmt: skip
    try:
        proc.wait_for_log("all 2 workers ready")
        with open("/proc/net/unix") as f:
            names = re.findall(rf"@(splicegate-{proc.pid}-\w+)", f.read())
        assert names, "the supervisor's readiness socket is not listed"
        worker_pid = int(proc.wait_for_log(r"worker 1 started \(pid (\d+)\)").group(1))
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as stranger:
            for forged in (b"READY=1\nWORKER_PID=oops", f"WORKER_PID={worker_pid}".encode()):
                stranger.sendto(forged, "\0" + names[0])
        time.sleep(2.5)  # the supervisor reads its socket every second
        assert proc.proc.poll() is None, proc.log()
        assert "Traceback" not in proc.log()
        with origin(echo) as srv:
            sock = open_echo_tunnel(proc, srv)
            sock.close()
    finally:
        assert proc.stop() == 0


def test_a_worker_killed_during_the_drain_is_named_in_the_log() -> None:
    """The daemon's exit status says the stop was not clean; the log says which worker."""
    proc = ProxyProcess(*LOOPBACK, *ANY_PORT, "--drain-timeout", "3600", "--workers", "2",
                        listen=[f"127.0.0.1:{free_port()}"])  # fmt: skip
    try:
        proc.wait_for_log("all 2 workers ready")
        first = int(proc.wait_for_log(r"worker 1 started \(pid (\d+)\)").group(1))
        with origin(echo) as srv:
            sock = open_echo_tunnel(proc, srv)  # some worker drains it for an hour
            proc.proc.send_signal(signal.SIGTERM)
            proc.wait_for_log("the workers stop accepting")
            os.kill(first, signal.SIGKILL)
            sock.close()  # the other worker, if it held the tunnel, ends its drain
            assert proc.proc.wait(timeout=WAIT) == 1
        assert f"worker 1 (pid {first}) ended its stop with signal SIGKILL" in proc.log()
    finally:
        proc.stop()


def test_sigquit_reaches_the_workers_as_sigquit() -> None:
    """Under --workers each worker closes its tunnels at once too, and none announces a
    drain it will not run."""
    proc = ProxyProcess(*LOOPBACK, *ANY_PORT, "--drain-timeout", "3600", "--workers", "2",
                        listen=[f"127.0.0.1:{free_port()}"])  # fmt: skip
    try:
        proc.wait_for_log("all 2 workers ready")
        with origin(echo) as srv:
            sock = open_echo_tunnel(proc, srv)
            proc.proc.send_signal(signal.SIGQUIT)
            assert_closed_at_exit(proc, sock)
        log = proc.log()
        assert "stopping: the workers stop accepting; SIGQUIT: closing the open tunnels now" in log
        assert log.count("stopping: no new connections; SIGQUIT: closing the open tunnels") == 2
        assert "open tunnels get" not in log and "stop signal while draining" not in log
    finally:
        proc.stop()


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])
def test_a_second_sigterm_ends_the_drain_at_once(workers: int) -> None:
    """An operator who will not wait out --drain-timeout signals again: the open tunnels
    close now (reason shutdown), and the process exits 0. Under --workers the supervisor
    passes the second signal on."""
    extra = ["--workers", str(workers)] if workers > 1 else []
    proc = ProxyProcess(
        *LOOPBACK,
        *ANY_PORT,
        "--drain-timeout",
        "3600",
        "--access-log",
        "-",
        *extra,
        listen=[f"127.0.0.1:{free_port()}"],
    )
    try:
        if workers > 1:
            proc.wait_for_log(f"all {workers} workers ready")
        with origin(echo) as srv:
            sock = open_echo_tunnel(proc, srv)
            proc.proc.send_signal(signal.SIGTERM)
            proc.wait_for_log("stop again to close them now")
            sock.sendall(b"still")  # the drain keeps the tunnel working
            assert recv_exactly(sock, 5) == b"still"
            proc.proc.send_signal(signal.SIGTERM)
            assert_closed_at_exit(proc, sock)
        log = proc.log()
        assert "closing the open tunnels now" in log
        assert "reason=shutdown" in log
    finally:
        proc.stop()


def test_ctrl_c_at_a_terminal_drains_the_workers() -> None:
    """A terminal's Ctrl-C sends SIGINT to the whole foreground process group. The workers
    have a group of their own, so they get one stop, from the supervisor, and drain; were
    they in the supervisor's group, the supervisor's SIGTERM would be their second stop."""
    proc = ProxyProcess(
        *LOOPBACK, *ANY_PORT, "--drain-timeout", "3600", "--workers", "2",
        listen=[f"127.0.0.1:{free_port()}"], prefix=["setsid"],
    )  # fmt: skip
    try:
        proc.wait_for_log("all 2 workers ready")
        with origin(echo) as srv:
            sock = open_echo_tunnel(proc, srv)
            os.killpg(proc.pid, signal.SIGINT)  # setsid made the proxy its group's leader
            wait_until(
                lambda: proc.log().count("stopping: no new connections") == 2,
                "both workers draining",
            )
            time.sleep(0.5)
            sock.sendall(b"still")  # drained, not cut: the tunnel works
            assert recv_exactly(sock, 5) == b"still"
            assert "closing the open tunnels now" not in proc.log()
            proc.proc.send_signal(signal.SIGTERM)  # the operator's second stop
            assert_closed_at_exit(proc, sock)
    finally:
        stop_with_workers(proc)


# --- SIGHUP: reload -----------------------------------------------------------------------


def test_sighup_applies_a_new_allow_list_and_keeps_open_tunnels(tmp_path: Path) -> None:
    config = tmp_path / "splicegate.toml"
    with origin(echo) as first, origin(echo) as second:
        config.write_text(f'allow_port = ["{first.port}"]\nallow_dest = ["127.0.0.0/8"]\n')
        proc = ProxyProcess("--config", str(config))
        try:
            tunnel, reply = open_tunnel(proc.address, f"127.0.0.1:{first.port}")
            assert reply.status == 200
            assert request(proc.address, connect_head(f"127.0.0.1:{second.port}")).status == 403

            config.write_text(f'allow_port = ["{second.port}"]\nallow_dest = ["127.0.0.0/8"]\n')
            proc.proc.send_signal(signal.SIGHUP)
            proc.wait_for_log("reloaded " + re.escape(str(config)))
            assert request(proc.address, connect_head(f"127.0.0.1:{first.port}")).status == 403
            ok, reply = open_tunnel(proc.address, f"127.0.0.1:{second.port}", early=b"new")
            assert reply.status == 200 and recv_exactly(ok, 3) == b"new"
            ok.close()
            for _ in range(3):  # the tunnel opened before the reload flows on
                tunnel.sendall(b"still here")
                assert recv_exactly(tunnel, 10) == b"still here"

            # A bad file: refused with the reason, the running settings kept.
            config.write_text('allow_port = ["smtp"]\n')
            proc.proc.send_signal(signal.SIGHUP)
            proc.wait_for_log(r"reload refused, the running settings stay: .*'smtp' is not a port")
            assert request(proc.address, connect_head(f"127.0.0.1:{first.port}")).status == 403
            ok, reply = open_tunnel(proc.address, f"127.0.0.1:{second.port}")
            assert reply.status == 200
            ok.close()
            tunnel.sendall(b"and still")
            assert recv_exactly(tunnel, 9) == b"and still"

            # A setting that needs a restart is reported and left alone.
            config.write_text(
                f'allow_port = ["{second.port}"]\nallow_dest = ["127.0.0.0/8"]\n'
                'engine = "python"\naccess_log = "-"\n'
            )
            proc.proc.send_signal(signal.SIGHUP)
            proc.wait_for_log("--engine changed, which needs a restart; ignored until then")
            proc.wait_for_log(r"reloaded .*\n(.|\n)*reloaded ")
            ok, reply = open_tunnel(proc.address, f"127.0.0.1:{second.port}")
            ok.close()
            # the access log, a setting a reload does change, now writes to stderr
            proc.wait_for_log(rf"ts=\S+ client=127\.0\.0\.1 .* target=127\.0\.0\.1:{second.port}")
            tunnel.close()
        finally:
            assert proc.stop() == 0


# --- systemd readiness ----------------------------------------------------------------------


def test_systemd_notifications(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(path)
        manager.settimeout(WAIT)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        proc = ProxyProcess()
        try:
            assert manager.recv(4096) == b"READY=1"
            proc.proc.send_signal(signal.SIGHUP)
            assert re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=\d+", manager.recv(4096))
            assert manager.recv(4096) == b"READY=1"
        finally:
            assert proc.stop() == 0
        assert manager.recv(4096) == b"STOPPING=1"


# --- workers ------------------------------------------------------------------------------


def worker_pids(proc: ProxyProcess) -> list[int]:
    return [int(pid) for pid in re.findall(r"worker \d started \(pid (\d+)\)", proc.log())]


def proc_args(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def served_by(proc: ProxyProcess) -> set[int]:
    """The pids whose debug line says they closed a tunnel."""
    return {int(pid) for pid in re.findall(r"splicegate\[(\d+)\] DEBUG tunnel ", proc.log())}


def one_tunnel(proc: ProxyProcess, port: int) -> bool:
    try:
        sock, reply = open_tunnel(proc.address, f"127.0.0.1:{port}", early=b"hi")
        with sock:
            return reply.status == 200 and recv_exactly(sock, 2) == b"hi"
    except OSError:
        return False  # a connection queued at a worker as it was killed


def stale_live_gauge(directory: Path, value: float) -> None:
    """What a run killed by SIGKILL leaves in a metrics directory: a live gauge file of a
    process that never marked itself dead."""
    code = (
        "from prometheus_client import Gauge\n"
        f"Gauge('splicegate_tunnels_active', 'x', multiprocess_mode='livesum').set({value!r})\n"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=WAIT)
    assert list(directory.glob("gauge_livesum_*.db"))


def test_an_inherited_metrics_directory_keeps_nothing_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PROMETHEUS_MULTIPROC_DIR set by the operator: a supervisor empties it of an earlier
    run's files first, and one process keeps its metrics in memory (its /metrics was empty)."""
    stale_live_gauge(tmp_path, 4)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    single = ProxyProcess(*LOOPBACK, *ANY_PORT, "--admin", "127.0.0.1:0")
    try:
        with origin(echo) as srv:
            sock = open_echo_tunnel(single, srv)
            admin = admin_address(single)
            assert metric(scrape(admin), "splicegate_tunnels_active") == 1  # not 1 + 4
            sock.close()
        wait_until(
            lambda: metric(scrape(admin), "splicegate_tunnels_active") == 0, "the tunnel closed"
        )
        assert metric(scrape(admin), "splicegate_connections_total") == 1
    finally:
        assert single.stop() == 0
    proc = ProxyProcess(*LOOPBACK, *ANY_PORT, "--workers", "2", "--admin", "127.0.0.1:0",
                        listen=[f"127.0.0.1:{free_port()}"])  # fmt: skip
    try:
        proc.wait_for_log("all 2 workers ready")
        assert metric(scrape(admin_address(proc)), "splicegate_tunnels_active") == 0
        assert "files of an earlier run removed" in proc.log()
    finally:
        assert proc.stop() == 0


def test_metrics_of_an_application_in_multiprocess_mode_are_rendered(tmp_path: Path) -> None:
    """An embedding application that set PROMETHEUS_MULTIPROC_DIR (it runs processes of its
    own) gets its proxy's metrics from the directory, not an empty page."""
    code = (
        "import sys\n"
        "from splicegate.metrics import Metrics\n"
        "m = Metrics()\n"
        "m.connections.inc(3)\n"
        "sys.stdout.write(m.render().decode())\n"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=WAIT
    )
    assert out.returncode == 0, out.stderr
    assert "splicegate_connections_total 3.0" in out.stdout


def test_two_workers_serve_and_survive_one_killed() -> None:
    port = free_port()
    proc = ProxyProcess(
        *LOOPBACK, *ANY_PORT, "--workers", "2", "--admin", "127.0.0.1:0", "--log-level", "debug",
        listen=[f"127.0.0.1:{port}"],
    )  # fmt: skip
    try:
        proc.wait_for_log("all 2 workers ready")
        admin = admin_address(proc)
        pids = worker_pids(proc)
        assert len(pids) == 2
        with origin(echo) as srv:
            for _ in range(40):  # bounded: SO_REUSEPORT hashes each connection to a worker
                assert one_tunnel(proc, srv.port)
                if served_by(proc) == set(pids):
                    break
            wait_until(lambda: served_by(proc) == set(pids), "both workers served")
            closed = wait_until(
                lambda: (m := scrape(admin)) and metric(m, "splicegate_tunnels_active") == 0 and m,
                "every tunnel closed",
            )  # one endpoint for the daemon: both workers' tunnels added up
            total = metric(closed, "splicegate_tunnels_total", status="200", error="")
            assert total == len(re.findall(r"DEBUG tunnel ", proc.log()))
            assert metric(closed, "splicegate_engine_threads") >= 0

            os.kill(pids[0], signal.SIGKILL)  # our child's child: started by this test
            proc.wait_for_log(rf"worker 1 \(pid {pids[0]}\) exited with signal SIGKILL")
            for _ in range(20):
                assert one_tunnel(proc, srv.port) or one_tunnel(proc, srv.port)
            proc.wait_for_log(r"worker 1 started \(pid \d+\)(.|\n)*worker 1 started")
            new = worker_pids(proc)[-1]
            assert new not in pids
            proc.wait_for_log(rf"splicegate\[{new}\] INFO listening on ")
            for _ in range(40):  # bounded, as above
                assert one_tunnel(proc, srv.port)
                if new in served_by(proc):
                    break
            wait_until(lambda: new in served_by(proc), "the new worker served")
    finally:
        assert proc.stop() == 0


def with_nofile(soft: int, hard: int) -> list[str]:
    """A command prefix that starts what follows with these open-file limits."""
    return [
        sys.executable, "-c",
        "import os, resource, sys; "
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard})); "
        "os.execv(sys.argv[1], sys.argv[1:])",
    ]  # fmt: skip


def open_files_limit(pid: int) -> tuple[int, int]:
    line = next(x for x in Path(f"/proc/{pid}/limits").read_text().splitlines()
                if x.startswith("Max open files"))  # fmt: skip
    soft, hard = line.split()[3:5]
    return int(soft), int(hard)


def test_the_open_file_limit_is_raised_to_the_hard_one() -> None:
    proc = ProxyProcess(*LOOPBACK, prefix=with_nofile(1024, 4096))
    try:
        assert open_files_limit(proc.pid) == (4096, 4096)
        # 4096 is still short of what --max-connections 10000 needs: said once, with the
        # number of tunnels that fit
        (fit,) = re.findall(r"open-file limit is 4096, below .* at most about (\d+) tunnels",
                            proc.log())  # fmt: skip
        assert 1000 < int(fit) < 2048
    finally:
        assert proc.stop() == 0


def test_a_low_open_file_limit_is_reported_once_for_all_workers() -> None:
    """The supervisor raises the limit and warns; the workers inherit it and say nothing."""
    proc = ProxyProcess(*LOOPBACK, "--workers", "2", listen=[f"127.0.0.1:{free_port()}"],
                        prefix=with_nofile(2048, 2048))  # fmt: skip
    try:
        proc.wait_for_log("all 2 workers ready")
        warnings = re.findall(r"open-file limit is 2048, below the (\d+)", proc.log())
        assert len(warnings) == 1, proc.log()
    finally:
        assert proc.stop() == 0


def test_workers_do_not_import_from_the_working_directory(tmp_path: Path) -> None:
    """A file in the daemon's working directory named like a module the proxy imports is
    not run by the workers (``-m`` alone would put the directory first on sys.path)."""
    planted = tmp_path / "planted-ran"
    (tmp_path / "dns.py").write_text(
        f"open({str(planted)!r}, 'w').close()\nraise SystemExit('the planted dns.py ran')\n"
    )
    proc = ProxyProcess(*LOOPBACK, "--workers", "2", listen=[f"127.0.0.1:{free_port()}"],
                        cwd=str(tmp_path))  # fmt: skip
    try:
        proc.wait_for_log("all 2 workers ready")
        assert not planted.exists(), proc.log()
    finally:
        assert proc.stop() == 0


def test_workers_run_the_supervisors_own_splicegate(tmp_path: Path) -> None:
    """Started as ``python -m splicegate`` from a directory that holds the package (an
    uninstalled checkout's src/), the supervisor imports that copy: so do its workers, not
    another splicegate installed elsewhere (nor none at all)."""
    copy = tmp_path / "splicegate"
    shutil.copytree(
        Path(splicegate.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__")
    )
    with (copy / "__init__.py").open("a") as init:  # each process that imports it says so
        init.write(
            "\nimport os as _os\n"
            "open(_os.path.join(_os.path.dirname(__file__), '..', f'imported-{_os.getpid()}'),"
            " 'w').close()\n"
        )
    proc = ProxyProcess(*LOOPBACK, "--workers", "2", listen=[f"127.0.0.1:{free_port()}"],
                        cwd=str(tmp_path), safe_path=False)  # fmt: skip
    try:
        proc.wait_for_log("all 2 workers ready")
        imported = {int(p.name.split("-")[1]) for p in tmp_path.glob("imported-*")}
        assert imported == {proc.pid, *worker_pids(proc)}, proc.log()
    finally:
        assert proc.stop() == 0


def test_workers_reload_and_reopen_pass_on(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "splicegate.toml"
    config.write_text('allow_port = ["443"]\n')
    proc = ProxyProcess(
        *LOOPBACK, "--workers", "2", "--config", str(config), listen=[f"127.0.0.1:{port}"]
    )
    try:
        proc.wait_for_log("all 2 workers ready")
        with origin(echo) as srv:
            assert request(proc.address, connect_head(f"127.0.0.1:{srv.port}")).status == 403
            config.write_text(f'allow_port = ["{srv.port}"]\n')
            proc.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: proc.log().count("reloaded") == 2, "both workers reloaded")
            for _ in range(6):
                assert one_tunnel(proc, srv.port)
            config.write_text("allow_port = 1\nbogus = 2\n")
            proc.proc.send_signal(signal.SIGHUP)
            proc.wait_for_log("reload refused, the running settings stay: .*unknown key 'bogus'")
            assert one_tunnel(proc, srv.port)
    finally:
        assert proc.stop() == 0


def kill_a_worker(proc: ProxyProcess) -> int:
    """SIGKILL worker 1 (our child's child: started by this test); the pid of the worker
    started in its place, once it listens."""
    started = re.compile(r"worker 1 started \(pid (\d+)\)")
    pids = started.findall(proc.log())
    os.kill(int(pids[-1]), signal.SIGKILL)
    proc.wait_for_log(rf"worker 1 \(pid {pids[-1]}\) exited with signal SIGKILL")
    wait_until(lambda: len(started.findall(proc.log())) > len(pids), "worker 1 restarted")
    new = int(started.findall(proc.log())[-1])
    proc.wait_for_log(rf"splicegate\[{new}\] INFO listening on ")
    return new


def test_workers_reload_reports_a_listen_change_once(tmp_path: Path) -> None:
    """--listen needs a restart: the supervisor's log says so once, not once more per
    worker, and a worker restarted since still listens where the others do, not where the
    file now says. The rest of a reload is the supervisor's to go by too: the drain it
    waits for at stop is the new --drain-timeout."""
    port, other = free_port(), free_port()
    config = tmp_path / "splicegate.toml"
    config.write_text(f'listen = ["127.0.0.1:{port}"]\n')
    proc = ProxyProcess(*LOOPBACK, "--workers", "2", "--config", str(config), listen=[])
    try:
        proc.wait_for_log("all 2 workers ready")
        config.write_text(f'listen = ["127.0.0.1:{other}"]\ndrain_timeout = 7\n')
        proc.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: proc.log().count("reloaded") == 2, "both workers reloaded")
        assert proc.log().count("--listen changed, which needs a restart") == 1
        new = kill_a_worker(proc)
        assert re.search(
            rf"splicegate\[{new}\] INFO listening on 127\.0\.0\.1:{port}\b", proc.log()
        )
        assert f":{other}" not in proc.log().split("reloaded")[-1]
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(WAIT) == 0
        assert "the workers stop accepting; open tunnels get 7 s" in proc.log()
    finally:
        proc.stop()


@pytest.mark.parametrize("bad", ["not-toml", "log-nowhere"])
def test_a_worker_restarted_after_a_refused_reload_runs_the_running_settings(
    tmp_path: Path, bad: str
) -> None:
    """Workers are started on the supervisor's copy of the settings it last accepted, not
    on the file as it is on disk: a worker that dies after a refused reload comes back and
    serves, where it would exit on the bad file at every restart, for ever. The supervisor
    refuses, once, an access log that no worker could open, as each worker would."""
    config = tmp_path / "splicegate.toml"
    with origin(echo) as srv:
        config.write_text(f'allow_port = ["{srv.port}"]\n')
        proc = ProxyProcess(*LOOPBACK, "--workers", "2", "--config", str(config),
                            listen=[f"127.0.0.1:{free_port()}"])  # fmt: skip
        try:
            proc.wait_for_log("all 2 workers ready")
            settings = Path(proc_args(worker_pids(proc)[0])[-1])
            assert settings != config and stat.S_IMODE(settings.parent.stat().st_mode) == 0o700
            if bad == "not-toml":
                config.write_text("allow_port = [\n")
            else:
                missing = tmp_path / "missing" / "access.log"
                config.write_text(f'allow_port = ["{srv.port}"]\naccess_log = "{missing}"\n')
            proc.proc.send_signal(signal.SIGHUP)
            proc.wait_for_log("reload refused, the running settings stay: ")
            kill_a_worker(proc)
            for _ in range(10):
                assert one_tunnel(proc, srv.port) or one_tunnel(proc, srv.port)
            assert proc.log().count("reload refused") == 1  # the supervisor's, for all
            assert "exited with code" not in proc.log()
        finally:
            assert proc.stop() == 0
    assert not settings.parent.exists()


def statuses(proc: ProxyProcess, port: int, user: str, password: str, tries: int) -> set[int]:
    """The answers to ``tries`` CONNECTs with these credentials: over enough of them,
    SO_REUSEPORT hands some to each worker."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    extra = f"Proxy-Authorization: Basic {token}\r\n"
    found = set()
    for _ in range(tries):
        sock, reply = open_tunnel(proc.address, f"127.0.0.1:{port}", extra=extra)
        sock.close()
        found.add(reply.status)
    return found


def test_workers_run_on_the_password_file_the_supervisor_accepted(tmp_path: Path) -> None:
    """A worker reads the password file as the last accepted reload found it, from the
    supervisor's copy: one restarted after an edit not reloaded yet does not know users
    the others do not, and one restarted after a refused reload does not exit on the
    broken file, for ever."""
    users = tmp_path / "users"
    set_password(str(users), "alice", "a", CHEAP)
    with origin(echo) as srv:
        proc = ProxyProcess(*LOOPBACK, "--workers", "2", "--auth-file", str(users),
                            "--allow-port", str(srv.port),
                            listen=[f"127.0.0.1:{free_port()}"])  # fmt: skip
        try:
            proc.wait_for_log("all 2 workers ready")
            set_password(str(users), "bob", "b", CHEAP)  # not reloaded
            kill_a_worker(proc)
            assert statuses(proc, srv.port, "bob", "b", 12) == {407}
            proc.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: proc.log().count("reloaded") == 2, "both workers reloaded")
            assert statuses(proc, srv.port, "bob", "b", 12) == {200}
            users.write_text(users.read_text() + "broken line\n")
            proc.proc.send_signal(signal.SIGHUP)
            proc.wait_for_log(rf"reload refused, the running settings stay: .*{users}, line 3")
            kill_a_worker(proc)
            assert statuses(proc, srv.port, "alice", "a", 12) == {200}
            assert statuses(proc, srv.port, "bob", "b", 12) == {200}
            assert "exited with code" not in proc.log()
        finally:
            assert proc.stop() == 0


def test_a_reload_leaves_the_workers_password_copy_alone_when_the_file_did_not_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker re-reads a password file that changed (its inode, size or mtime), and then
    empties its credential cache: a copy written anew at every reload cost every client a
    hash again after each SIGHUP, and said "lists no users" once more per worker."""
    from splicegate.config import Config
    from splicegate.workers import WorkerSettings

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    users = tmp_path / "users"
    set_password(str(users), "alice", "a", CHEAP)
    config = Config(workers=2, listen=[f"127.0.0.1:{free_port()}"], auth_file=str(users))
    settings = WorkerSettings({})
    copy = Path(settings.directory) / "users"
    settings.accept(config)
    first = copy.stat()
    settings.accept(config)
    assert (copy.stat().st_ino, copy.stat().st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    set_password(str(users), "bob", "b", CHEAP)
    settings.accept(config)
    assert copy.read_bytes() == users.read_bytes() and "bob:" in copy.read_text()


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])
def test_an_empty_password_file_is_warned_of_once_under_its_own_name(
    tmp_path: Path, workers: int
) -> None:
    """Under --workers each worker said it, naming the supervisor's private copy."""
    users = tmp_path / "users"
    users.write_text("")
    proc = ProxyProcess(*LOOPBACK, "--workers", str(workers), "--auth-file", str(users),
                        listen=[f"127.0.0.1:{free_port()}"])  # fmt: skip
    try:
        if workers > 1:
            proc.wait_for_log("all 2 workers ready")
        assert re.findall(r"WARNING (.*) lists no users", proc.log()) == [str(users)]
    finally:
        assert proc.stop() == 0


@pytest.mark.parametrize("planted", ["open-directory", "symlink"])
def test_workers_are_never_started_on_files_someone_else_put_at_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, planted: str
) -> None:
    """After a cleaner removed the private directory, what another user makes at its path
    is refused, not read by the next worker, and not removed at exit either."""
    from splicegate.config import Config
    from splicegate.workers import WorkerSettings

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    settings = WorkerSettings({})
    settings.accept(Config(workers=2, listen=[f"127.0.0.1:{free_port()}"]))
    directory = Path(settings.directory)
    shutil.rmtree(directory)
    if planted == "open-directory":
        directory.mkdir(mode=0o755)
        directory.chmod(0o755)
    else:
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir(mode=0o700)
        directory.symlink_to(elsewhere)
    (directory / "settings.toml").write_text('auth_file = ""\n')
    with pytest.raises(OSError, match="is no longer this supervisor's own"):
        settings.restore()
    settings.remove()
    assert (directory / "settings.toml").read_text() == 'auth_file = ""\n'


@pytest.mark.parametrize("mode", [0o700, 0o755])
def test_a_worker_reads_its_settings_only_from_a_private_directory(
    tmp_path: Path, mode: int
) -> None:
    """The supervisor checks its directory before a worker starts, and the worker again
    as it reads: between the two, a cleaner may remove it and another user make one."""
    directory = tmp_path / "settings"
    directory.mkdir()
    directory.chmod(mode)
    settings = directory / "settings.toml"
    settings.write_text('listen = ["127.0.0.1:1"]\nlog_level = "nonsense"\n')
    out = subprocess.run(
        [sys.executable, "-P", "-m", "splicegate", "--config", str(settings)],
        env={**os.environ, "SPLICEGATE_WORKER": str(os.getpid())},
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=WAIT,
    )  # fmt: skip
    assert out.returncode == 2
    if mode == 0o700:  # read: its (deliberately bad) settings are what it refuses
        assert "log_level" in out.stderr and "private" not in out.stderr, out.stderr
    else:
        assert f"{directory} is no longer the supervisor's private directory" in out.stderr


def test_a_stop_while_the_workers_start_is_a_clean_stop(tmp_path: Path) -> None:
    """A worker still importing has no handlers: SIGTERM's default action ends it. That
    was logged as an error, and the daemon exited 1 for "workers that did not start"."""
    with starting_daemon(tmp_path, "--workers", "2") as (daemon, log):
        wait_until(lambda: "worker 2 started" in log.read_text(), "both workers started")
        assert "listening on" not in log.read_text()  # their imports take a third of a second
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(WAIT) == 0, log.read_text()
        assert "ERROR" not in log.read_text()


def test_an_access_log_no_worker_could_open_is_said_once_at_start(tmp_path: Path) -> None:
    missing = tmp_path / "missing" / "access.log"
    out = subprocess.run(
        [sys.executable, "-P", "-m", "splicegate", "--workers", "2", "--access-log",
         str(missing), "--listen", f"127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=WAIT,
    )  # fmt: skip
    assert out.returncode == 1
    assert out.stderr.count(f"cannot open the access log {missing}") == 1, out.stderr
    assert "worker 1 started" not in out.stderr


def test_workers_settings_come_back_when_a_tmp_cleaner_removed_them(tmp_path: Path) -> None:
    """systemd-tmpfiles ages /tmp out (PrivateTmp too): the supervisor writes what it
    accepted again, at the same path, for a reload and for a worker it restarts."""
    config = tmp_path / "splicegate.toml"
    with origin(echo) as srv:
        config.write_text('allow_port = ["443"]\n')
        proc = ProxyProcess(*LOOPBACK, "--workers", "2", "--config", str(config),
                            listen=[f"127.0.0.1:{free_port()}"])  # fmt: skip
        try:
            proc.wait_for_log("all 2 workers ready")
            directory = Path(proc_args(worker_pids(proc)[0])[-1]).parent
            shutil.rmtree(directory)  # the supervisor is this test's child: its own files
            kill_a_worker(proc)
            config.write_text(f'allow_port = ["{srv.port}"]\n')
            shutil.rmtree(directory)
            proc.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: proc.log().count("reloaded") == 2, "both workers reloaded")
            for _ in range(6):
                assert one_tunnel(proc, srv.port)
            assert stat.S_IMODE(directory.stat().st_mode) == 0o700
            assert "exited with code" not in proc.log() and "ERROR" not in proc.log()
        finally:
            assert proc.stop() == 0


def test_workers_take_any_path_a_single_process_takes(tmp_path: Path) -> None:
    """The settings reach the workers as TOML: a character past U+FFFF once went in as a
    JSON surrogate pair, which TOML refuses, and no worker started."""
    directory = tmp_path / "logs \U0001f600\u2028\x7f"
    directory.mkdir()
    log = directory / "access.log"
    proc = ProxyProcess(*LOOPBACK, *ANY_PORT, "--workers", "2", "--access-log", str(log),
                        listen=[f"127.0.0.1:{free_port()}"])  # fmt: skip
    try:
        proc.wait_for_log("all 2 workers ready")
        with origin(echo) as srv:
            assert one_tunnel(proc, srv.port)
        wait_until(lambda: log.exists() and log.read_text().count("\n") == 1, "a line logged")
    finally:
        assert proc.stop() == 0


def test_signals_that_come_together_are_stops_counted_and_reloads_once() -> None:
    """Two SIGHUPs before the main loop looks are one reload, not one now and one left for
    whatever signal comes next (a logrotate SIGUSR1 hours later, say); two SIGTERMs are a
    stop and a second stop. The handlers are called directly: real signals that close
    together are merged by the kernel and by libev before they could show this."""
    signals = Signals.__new__(Signals)  # no handlers installed in the test process
    signals.pending = Counter()
    signals.wake = Event()
    for name in ("reload", "reload", "reopen", "reopen", "stop", "stop"):
        signals._flag(name)
    assert signals.stopping()
    assert signals.take("reload") and not signals.take("reload")
    assert signals.take("reopen") and not signals.take("reopen")
    assert signals.take("stop") and signals.take("stop") and not signals.take("stop")
    assert not signals.stopping()


def stop_with_workers(proc: ProxyProcess) -> None:
    """Stop the supervisor, and first kill the workers it started that are still there
    (only if the test failed: a passing one has stopped them)."""
    for pid in worker_pids(proc):
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)
    proc.stop()


def gone(pid: int) -> bool:
    """Exited (a zombie counts: its parent, the supervisor, is dead and cannot reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_workers_stop_when_the_supervisor_is_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where a killed supervisor leaves its files
    proc = ProxyProcess(*LOOPBACK, "--workers", "2", listen=[f"127.0.0.1:{free_port()}"])
    try:
        proc.wait_for_log("all 2 workers ready")
        pids = worker_pids(proc)
        proc.proc.kill()  # SIGKILL: no chance to pass anything on
        proc.proc.wait(WAIT)
        wait_until(lambda: all(gone(pid) for pid in pids), "the orphaned workers stopped")
        assert "the supervisor (pid " in proc.log()
    finally:
        stop_with_workers(proc)
