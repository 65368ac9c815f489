"""splicegate against peer proxies, on loopback: ``python bench/peers.py``.

One run measures, for the direct path (client straight to the origin), splicegate with the
native and with the pure-Python engine, squid, tinyproxy, proxy.py and pproxy:

1. the CONNECT rate: 50 concurrent loops of connect, CONNECT, the proxy's 200, a 16-byte
   echo, close, for 10 s; tunnels/s and p50/p99 time-to-200 (direct: to the echo);
2. single-stream and 8-stream throughput each way, and the proxy's CPU seconds per GiB
   relayed (its whole process tree);
3. idle memory per tunnel: on a proxy started for it, (RSS with 2,000 idle tunnels - RSS at
   rest) / 2,000, as ``bench/run.py`` defines it;
4. (``--only errors``) what each proxy answers for a refused port, an NXDOMAIN name, a
   connect timeout, a malformed head, and early bytes sent with the CONNECT head.

Beside them, in parts 2 only, the splice floor (``bench/floor.c``, compiled for the run): a
relay that does nothing but blocking splice(2), a thread per direction. It is the yardstick
for "as fast as the kernel lets a relay be": its ratio to direct shows what a relay that
does nothing else reaches on this machine.

Every figure is the median of ``--runs`` runs, with its ratio to direct where that means
something. Within a run the columns take turns, part by part: in the table's order in run
1, then in an order shuffled with the run's number as seed. The report
(``bench/results/peers-<timestamp>.md``) describes the machine and how each proxy was
configured; the chart goes to ``bench/peers.png`` (``--chart``).

Nothing is installed silently: what is missing is named, with the commands that install it,
and ``--install`` runs those commands. A proxy that fails to start, or a measurement that
fails, is recorded as failed with the reason; the run goes on.

Loopback only: the proxies listen on 127.0.0.1 and every target is a loopback address. DNS
never leaves the machine: splicegate (``--nameserver``) and squid (``dns_nameservers``) are
pointed at a DNS server on ``--dns-host`` port 53 (``tests/dnsserver.py``'s server, which
answers NXDOMAIN for every name), and tinyproxy, proxy.py and pproxy, which can only use the
system resolver, run in a private mount namespace (``unshare --mount``) in which
``/etc/resolv.conf`` names that server alone.

Load generation, the origin and /proc accounting are ``loadgen.py``, ``origin.py`` and
``procs.py``, the same as ``run.py`` uses.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import ipaddress
import os
import pwd
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import IO, Protocol

import loadgen
import measure
from loadgen import ESTABLISHED_ENV, PAYLOAD
from measure import IDLE_SETTLE_S, fmt, median
from origin import Origin
from procs import (
    describe_machine,
    describe_source,
    engine_available,
    listening_ports,
    raise_open_file_limit,
    start_splicegate,
    tree_pids,
)
from streams import recv_exactly

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
TESTS = REPO / "tests"
FLOOR_SOURCE = BENCH / "floor.c"
MIB = 1024**2
Address = tuple[str, int]

DIRECT = "direct"
#: Every column, in the order measured and shown; ``--peers`` picks some.
PATHS = ("direct", "floor", "native", "python", "squid", "tinyproxy", "proxy.py", "pproxy")
#: The parts of a run; ``--only`` picks some.
PARTS = ("rate", "stream", "streams8", "idle", "errors")
#: The paths measured in some parts only (the rest are measured in all): the splice floor
#: is a yardstick for throughput, not a proxy.
PATH_PARTS = {"floor": ("stream", "streams8")}
#: The longest any proxy may take to start listening.
START_TIMEOUT = 30.0
#: The largest response head read from a proxy.
MAX_HEAD = 16384
#: The name asked for in the NXDOMAIN case, one per proxy (so the DNS server's count of its
#: queries shows whether that proxy's resolver reached it); the test server knows no name.
NXDOMAIN_NAME = "no-such-name-{key}.splicegate-peers.test"
#: Early bytes: what the client sends in the same write as the CONNECT head.
EARLY = b"early-bytes-before-the-200\n"

# (key, label, has a ratio to direct, decimals)
ROWS = [
    ("rate", "CONNECT rate (tunnels/s; direct: connections/s)", True, 0),
    ("p50", "time-to-200 p50 (ms; direct: to the echo)", False, 2),
    ("p99", "time-to-200 p99 (ms; direct: to the echo)", False, 2),
    ("rate_errors", "rate test: failed loops", False, 0),
    ("rate_cpu_proxy", "rate test: proxy CPU (% of one core)", False, 0),
    ("rate_cpu_tunnel", "rate test: proxy CPU per tunnel (µs)", False, 0),
    ("up", "single stream up, client → origin (Gbit/s)", True, 2),
    ("down", "single stream down, origin → client (Gbit/s)", True, 2),
    ("up8", "{streams} streams up, summed (Gbit/s)", True, 2),
    ("down8", "{streams} streams down, summed (Gbit/s)", True, 2),
    ("cpu_up", "proxy CPU per GiB, single stream up (s)", False, 3),
    ("cpu_down", "proxy CPU per GiB, single stream down (s)", False, 3),
    ("cpu_up8", "proxy CPU per GiB, {streams} streams up (s)", False, 3),
    ("cpu_down8", "proxy CPU per GiB, {streams} streams down (s)", False, 3),
    ("machine_up", "machine CPU per GiB, single stream up (s)", True, 3),
    ("machine_down", "machine CPU per GiB, single stream down (s)", True, 3),
    ("machine_up8", "machine CPU per GiB, {streams} streams up (s)", True, 3),
    ("machine_down8", "machine CPU per GiB, {streams} streams down (s)", True, 3),
    ("idle_kib", "idle memory per tunnel (KiB)", False, 2),
    ("idle_opened", "idle test: tunnels opened (of {tunnels})", False, 0),
    ("idle_rss_rest", "idle test: proxy RSS at rest (MiB)", False, 1),
    ("idle_rss_held", "idle test: proxy RSS with the tunnels (MiB)", False, 1),
    ("idle_sockets", "idle test: proxy sockets added per tunnel", False, 2),
]
#: Which part produces which figures (a failed part marks them all failed).
PART_KEYS = {
    "rate": ("rate", "p50", "p99", "rate_errors", "rate_cpu_proxy", "rate_cpu_tunnel"),
    "up": ("up", "cpu_up", "machine_up"),
    "down": ("down", "cpu_down", "machine_down"),
    "up8": ("up8", "cpu_up8", "machine_up8"),
    "down8": ("down8", "cpu_down8", "machine_down8"),
    "idle": ("idle_kib", "idle_opened", "idle_rss_rest", "idle_rss_held", "idle_sockets"),
}


# --- what the benchmark needs ---------------------------------------------------------------


def find_program(name: str) -> str | None:
    """A Debian program, also where /usr/sbin is not on PATH (squid lives there)."""
    found = shutil.which(name)
    if found:
        return found
    for folder in ("/usr/sbin", "/usr/bin", "/sbin"):
        path = Path(folder) / name
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return None


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


@dataclass(frozen=True)
class Need:
    what: str
    present: Callable[[], bool]
    kind: str  # "debian" or "pypi"
    package: str
    paths: tuple[str, ...]  # the columns (or "chart", "errors") that need it


NEEDS = [
    Need("squid", lambda: find_program("squid") is not None, "debian", "squid", ("squid",)),
    Need(
        "tinyproxy",
        lambda: find_program("tinyproxy") is not None,
        "debian",
        "tinyproxy",
        ("tinyproxy",),
    ),
    Need("a C compiler (cc)", lambda: find_program("cc") is not None, "debian", "gcc", ("floor",)),
    Need("proxy.py", lambda: has_module("proxy"), "pypi", "proxy.py", ("proxy.py",)),
    Need("pproxy", lambda: has_module("pproxy"), "pypi", "pproxy", ("pproxy",)),
    Need("matplotlib", lambda: has_module("matplotlib"), "pypi", "matplotlib", ("chart",)),
    # tests/dnsserver.py (dnspython, a splicegate dependency) and tests/proxyproc.py (pytest)
    Need("pytest", lambda: has_module("pytest"), "pypi", "pytest", ("errors",)),
]


def install_commands(missing: list[Need]) -> list[list[str]]:
    commands = []
    debian = [n.package for n in missing if n.kind == "debian"]
    pypi = [n.package for n in missing if n.kind == "pypi"]
    if debian:
        commands.append(["apt-get", "update"])
        commands.append(["apt-get", "install", "-y", *debian])
    if pypi:
        commands.append([sys.executable, "-m", "pip", "install", *pypi])
    return commands


def missing_needs(args: argparse.Namespace) -> list[Need]:
    wanted = set(args.paths)
    if args.chart:
        wanted.add("chart")
    if "errors" in args.parts:
        wanted.add("errors")
    return [n for n in NEEDS if wanted.intersection(n.paths) and not n.present()]


def check_needs(args: argparse.Namespace) -> int | None:
    """None when everything is there; else an exit status, after naming what is missing
    (or, with --install, after installing it)."""
    missing = missing_needs(args)
    if not missing:
        return None
    commands = install_commands(missing)
    names = ", ".join(n.what for n in missing)
    if not args.install:
        print(f"bench/peers.py needs: {names}. Install with:\n", file=sys.stderr)
        for command in commands:
            print("    " + shlex.join(command), file=sys.stderr)
        print(
            "\nor run `python bench/peers.py --install` to run exactly those commands "
            "(as root for apt-get); or leave peers out with --peers, the chart with --chart ''.",
            file=sys.stderr,
        )
        return 2
    for command in commands:
        print(f"running: {shlex.join(command)}", file=sys.stderr)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        done = subprocess.run(command, env=env, timeout=1800)
        if done.returncode != 0:
            print(f"failed ({done.returncode}): {shlex.join(command)}", file=sys.stderr)
            return 2
    importlib.invalidate_caches()
    still = missing_needs(args)
    if still:
        print(f"still missing after install: {', '.join(n.what for n in still)}", file=sys.stderr)
        return 2
    return None


# --- DNS on loopback --------------------------------------------------------------------------


def import_test_helpers() -> None:
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))


class Dns:
    """The loopback DNS every proxy is pointed at: tests/dnsserver.py's server, answering
    NXDOMAIN for every name, on ``host`` port 53 (resolv.conf and squid take no port).

    ``error`` says why it is not there (port 53 taken, not root); the proxies are pointed at
    ``host`` all the same, where their queries then fail on loopback.
    """

    def __init__(self, host: str) -> None:
        self.host = host
        self.port = 53
        self.error: str | None = None
        self.server: object | None = None
        try:
            import_test_helpers()
            from dnsserver import DnsServer

            class Port53(DnsServer):
                def _bind(self) -> None:  # the server's own picks a free port; 53 here
                    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    try:
                        udp.bind((self.host, 53))
                        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                        tcp.bind((self.host, 53))
                        tcp.listen(16)
                    except OSError:
                        udp.close()
                        tcp.close()
                        raise
                    udp.setblocking(False)
                    tcp.setblocking(False)
                    self._udp, self._tcp, self.port = udp, tcp, 53

            server = Port53(default="nxdomain")
            server.host = host
            server.start()
            self.server = server
        except Exception as exc:
            self.error = f"no DNS server on {host}:53 ({type(exc).__name__}: {exc})"

    @property
    def nameserver(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()  # type: ignore[attr-defined]


class Namespace:
    """Runs a command in a private mount namespace whose /etc/resolv.conf names only the
    loopback DNS, for proxies that use the system resolver. ``error`` says why not."""

    def __init__(self, tmp: Path, dns_host: str) -> None:
        self.resolv = tmp / "resolv.conf"
        self.resolv.write_text(
            "# bench/peers.py: every lookup goes to the loopback test DNS server\n"
            f"nameserver {dns_host}\noptions timeout:2 attempts:1\n"
        )
        self.resolv.chmod(0o644)
        self.error: str | None = None
        try:
            done = subprocess.run(
                self.wrap(["cat", "/etc/resolv.conf"]),
                capture_output=True,
                text=True,
                timeout=30,
            )
            if done.stdout != self.resolv.read_text():
                self.error = (
                    f"unshare --mount failed ({done.returncode}): "
                    f"{(done.stderr or done.stdout).strip()[-300:]}"
                )
        except (OSError, subprocess.SubprocessError) as exc:
            self.error = f"unshare --mount failed: {exc}"

    def wrap(self, command: list[str]) -> list[str]:
        """``unshare`` and ``sh`` exec in turn: the proxy keeps the pid started."""
        script = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'
        return [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            str(self.resolv),
            *command,
        ]


# --- the proxies ----------------------------------------------------------------------------


class Running(Protocol):
    """A started proxy: procs.Proxy (splicegate) or PeerProcess (the others)."""

    proc: subprocess.Popen[bytes]
    address: Address

    @property
    def pid(self) -> int: ...
    def log_text(self) -> str: ...
    def stop(self, timeout: float = ...) -> int: ...


@dataclass
class PeerProcess:
    """A peer proxy this benchmark started in its own session (so process group): stopped by
    SIGTERM to its pid, then SIGKILL to its group (proxy.py forks workers)."""

    proc: subprocess.Popen[bytes]
    address: Address
    log: IO[bytes]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # what is left of the group we made
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self.log.close()
        return self.proc.returncode if self.proc.returncode is not None else -9


def free_port() -> int:
    """A port the kernel would hand out now (a peer needs it in its config)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_peer(command: Callable[[int], list[str]], name: str, tries: int = 3) -> PeerProcess:
    """Start ``command(port)`` and wait until its process tree listens on ``port``."""
    last = ""
    for _ in range(tries):
        port = free_port()
        log = tempfile.TemporaryFile(prefix=f"peers-{name}-")  # noqa: SIM115 (closed by stop)
        proc = subprocess.Popen(
            command(port),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        peer = PeerProcess(proc, ("127.0.0.1", port), log)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            ports: set[int] = set()
            for pid in tree_pids(proc.pid):
                with contextlib.suppress(OSError):
                    ports.update(listening_ports(pid))
            if port in ports:
                return peer
            time.sleep(0.05)
        last = peer.log_text().strip()
        running = proc.poll() is None
        peer.stop()
        if running:
            raise RuntimeError(f"{name} did not listen on {port} within {START_TIMEOUT:g} s")
        if "in use" not in last:  # a port taken between free_port() and the bind: retry
            break
    tail = "; ".join(last.splitlines()[-4:])
    raise RuntimeError(f"{name} exited at start: {tail[-400:] or 'no output'}")


def version_of(command: list[str], pattern: str = "") -> str:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"
    for line in (out.stdout + out.stderr).splitlines():
        if pattern in line:
            return line.strip()
    return "unknown"


def dist_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


@dataclass
class Peer:
    """One column: how to start it, and what the report says about it."""

    key: str
    label: str
    version: str = ""
    config: str = ""  # how it is configured, for the report
    resolver: str = ""  # how its resolver reaches the loopback DNS
    dns_ok: bool = True  # whether an NXDOMAIN answer can be measured
    dns_note: str = ""
    start: Callable[[], Running] | None = None  # None: the direct path
    skipped: str | None = None  # why it is not measured at all
    parts: tuple[str, ...] = PARTS  # the parts it is measured in

    def takes(self, part: str) -> bool:
        return part in self.parts


def fill(lines: list[str], port: int | str, folder: Path | str) -> str:
    """A config file from its template lines."""
    return "\n".join(lines).replace("{port}", str(port)).replace("{dir}", str(folder)) + "\n"


def shown(lines: list[str]) -> str:
    """Config lines for the report, each in backticks."""
    return "; ".join(f"`{line}`" for line in fill(lines, "PORT", "DIR").splitlines())


class Peers:
    """Builds the Peer of each column; configs go to ``tmp``."""

    def __init__(self, tmp: Path, dns: Dns, ns: Namespace) -> None:
        self.tmp = tmp
        self.dns = dns
        self.ns = ns

    def build(self, key: str) -> Peer:
        return getattr(self, "peer_" + key.replace(".", "_"))()

    def _system_resolver(self, peer: Peer) -> None:
        peer.resolver = (
            f"system resolver (getaddrinfo); run in a private mount namespace whose "
            f"/etc/resolv.conf names only {self.dns.host} (port 53)"
        )
        if self.ns.error:
            peer.dns_ok = False
            peer.dns_note = f"its resolver could not be redirected: {self.ns.error}"
            peer.resolver = "system resolver; not redirected (targets are IP literals)"
        elif self.dns.error:
            peer.dns_ok = False
            peer.dns_note = self.dns.error

    def folder(self, name: str) -> Path:
        folder = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.tmp))
        folder.chmod(0o755)
        return folder

    def _wrap(self, command: list[str]) -> list[str]:
        return command if self.ns.error else self.ns.wrap(command)

    def peer_direct(self) -> Peer:
        return Peer(DIRECT, "direct", "loopback, no proxy", "-", "-")

    def _splicegate(self, engine: str) -> Peer:
        ok, detail = engine_available(engine)
        version = dist_version("splicegate")
        flags = ["--nameserver", self.dns.nameserver]
        peer = Peer(
            engine,
            f"splicegate {engine}",
            f"{version}, {detail}",
            "`splicegate --listen 127.0.0.1:0 --allow-dest 127.0.0.0/8 --allow-port any "
            f"--engine {engine} --log-level warning --nameserver {self.dns.nameserver}` "
            "(bench/procs.py's start_splicegate); other settings default",
            f"--nameserver {self.dns.nameserver}",
            start=lambda: start_splicegate(engine, flags),
        )
        if not ok:
            peer.skipped = f"engine not available: {detail}"
        if self.dns.error:
            peer.dns_ok, peer.dns_note = False, self.dns.error
        return peer

    def peer_floor(self) -> Peer:
        """bench/floor.c, compiled into the run's temp dir: the throughput yardstick."""
        exe = self.tmp / "floor"
        compiler = find_program("cc") or "cc"
        build = [compiler, "-O2", "-pthread", "-o", str(exe), str(FLOOR_SOURCE)]
        peer = Peer(
            "floor",
            "splice floor",
            version_of([compiler, "--version"], "") + ", -O2",
            "`bench/floor.c`: a thread per connection and per direction, blocking splice(2) "
            "through a 1 MiB pipe, IPv4-literal targets only; no policy, DNS, timeouts or "
            "accounting. Not a proxy: a yardstick for what a relay that does nothing else "
            "reaches on this machine, so measured in the throughput parts only",
            "none (IPv4 literals only)",
            start=lambda: start_peer(lambda port: [str(exe), str(port)], "floor"),
            parts=PATH_PARTS["floor"],
        )
        try:
            done = subprocess.run(build, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as exc:
            peer.skipped = f"not built: {short(exc, 200)}"
            return peer
        if done.returncode != 0:
            peer.skipped = f"not built ({shlex.join(build)}): {short(done.stderr, 300)}"
        return peer

    def peer_native(self) -> Peer:
        return self._splicegate("native")

    def peer_python(self) -> Peer:
        return self._splicegate("python")

    def peer_squid(self) -> Peer:
        exe = find_program("squid") or "squid"
        lines = [
            "# a minimal config: CONNECT from localhost to any port, nothing logged per",
            "# request, no cache; everything else squid's defaults",
            "http_port 127.0.0.1:{port}",
            "http_access allow localhost",
            "http_access deny all",
            "access_log none",
            "cache_store_log none",
            "cache_log {dir}/cache.log",
            "cache deny all",
            "pid_filename {dir}/squid.pid",
            "coredump_dir {dir}",
            "netdb_filename none",
            "logfile_rotate 0",
            "pinger_enable off",
            "shutdown_lifetime 1 seconds",
            f"dns_nameservers {self.dns.host}",
        ]

        def command(port: int) -> list[str]:
            folder = self.folder("squid")  # each instance its own: squid checks its pid file
            if os.geteuid() == 0:  # squid drops to its effective user ("proxy" on Debian)
                with contextlib.suppress(KeyError, OSError):
                    entry = pwd.getpwnam("proxy")
                    os.chown(folder, entry.pw_uid, entry.pw_gid)
            conf = folder / "squid.conf"
            conf.write_text(fill(lines, port, folder))
            return self._wrap([exe, "-N", "-f", str(conf)])

        peer = Peer(
            "squid",
            "squid",
            version_of([exe, "-v"], "Version"),
            "`squid -N -f squid.conf` (foreground, no daemon); squid.conf: "
            + shown(lines[2:])
            + " (DIR: a temp dir per instance). No CONNECT port restriction is written, so "
            "any port is allowed; no cache_dir, so no disk cache; cache_mem and all else default",
            f"dns_nameservers {self.dns.host} (port 53: squid takes no port)",
            start=lambda: start_peer(command, "squid"),
        )
        if self.dns.error:
            peer.dns_ok, peer.dns_note = False, self.dns.error
        return peer

    def peer_tinyproxy(self) -> Peer:
        exe = find_program("tinyproxy") or "tinyproxy"
        lines = [
            "Port {port}",
            "Listen 127.0.0.1",
            "LogLevel Critical",
            'LogFile "{dir}/tinyproxy.log"',
            'PidFile "{dir}/tinyproxy.pid"',
            "MaxClients 4096",
        ]

        def command(port: int) -> list[str]:
            conf = self.folder("tinyproxy") / "tinyproxy.conf"
            conf.write_text(fill(lines, port, conf.parent))
            return self._wrap([exe, "-d", "-c", str(conf)])

        peer = Peer(
            "tinyproxy",
            "tinyproxy",
            version_of([exe, "-v"], "tinyproxy"),
            "`tinyproxy -d -c tinyproxy.conf` (foreground); tinyproxy.conf: "
            + shown(lines)
            + " (DIR: a temp dir per instance). No ConnectPort line, so CONNECT to every port "
            "is allowed; no Allow line, so every client (it listens on loopback only); "
            "MaxClients raised from its default of 100, which would cap the idle test; one "
            "thread per connection; all else default",
            start=lambda: start_peer(command, "tinyproxy"),
        )
        self._system_resolver(peer)
        return peer

    def peer_proxy_py(self) -> Peer:
        def command(port: int) -> list[str]:
            return self._wrap(
                [
                    sys.executable,
                    "-m",
                    "proxy",
                    "--hostname",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--log-level",
                    "ERROR",
                ]
            )

        cpus = os.cpu_count() or 1
        peer = Peer(
            "proxy.py",
            "proxy.py",
            dist_version("proxy.py"),
            "`python -m proxy --hostname 127.0.0.1 --port PORT --log-level ERROR` (no "
            "access log); its defaults otherwise: threadless, --num-acceptors and "
            f"--num-workers = CPU count ({cpus}), --backlog 100, --timeout 10 (drops a "
            "connection idle that long), any CONNECT port",
            start=lambda: start_peer(command, "proxy.py"),
        )
        self._system_resolver(peer)
        return peer

    def peer_pproxy(self) -> Peer:
        def command(port: int) -> list[str]:
            return self._wrap([sys.executable, "-m", "pproxy", "-l", f"http://127.0.0.1:{port}"])

        loop = "uvloop" if has_module("uvloop") else "asyncio (uvloop is not installed)"
        peer = Peer(
            "pproxy",
            "pproxy",
            dist_version("pproxy"),
            f"`python -m pproxy -l http://127.0.0.1:PORT` (HTTP only; no -v, so no "
            f"per-connection output); event loop: {loop}; all else default",
            start=lambda: start_peer(command, "pproxy"),
        )
        self._system_resolver(peer)
        return peer


# --- the measurements -----------------------------------------------------------------------


def read_head(sock: socket.socket, deadline: float) -> tuple[str, bytes]:
    """A response head, byte by byte (nothing past it is consumed), until ``deadline``
    (``time.monotonic()``). Returns (outcome, bytes): head, eof, reset, timeout, toolong."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        if len(buf) > MAX_HEAD:
            return "toolong", buf
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "timeout", buf
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(1)
        except TimeoutError:
            return "timeout", buf
        except ConnectionResetError:
            return "reset", buf
        except OSError as exc:
            return f"error ({exc})", buf
        if not chunk:
            return "eof", buf
        buf += chunk
    return "head", buf


def learn_established(address: Address, echo: Address, timeout: float = 10.0) -> bytes:
    """The proxy's whole 200 for a tunnel to ``echo``, checked to work and to be the same
    bytes for two tunnels (the load generator then reads exactly those, as for splicegate)."""
    heads = []
    for _ in range(2):
        with socket.create_connection(address, timeout=timeout) as sock:
            sock.sendall(loadgen.connect_request(echo))
            outcome, head = read_head(sock, time.monotonic() + timeout)
            if outcome != "head":
                raise RuntimeError(f"no answer to a CONNECT ({outcome}): {head[:200]!r}")
            status_line = head.split(b"\r\n", 1)[0]
            if status_line.split(b" ")[1:2] != [b"200"]:
                raise RuntimeError(f"a CONNECT got {status_line!r}")
            sock.settimeout(timeout)
            sock.sendall(PAYLOAD)
            if recv_exactly(sock, len(PAYLOAD)) != PAYLOAD:
                raise RuntimeError("the tunnel did not echo what was sent")
            heads.append(head)
    if heads[0] != heads[1]:
        raise RuntimeError(f"its 200 differs between tunnels: {heads[0]!r}, {heads[1]!r}")
    return heads[0]


@contextlib.contextmanager
def expecting(head: bytes | None) -> Iterator[None]:
    """The load generator (this process, and those it starts) expects ``head`` as the 200."""
    if head is None:
        yield
        return
    old, old_env = loadgen.ESTABLISHED, os.environ.get(ESTABLISHED_ENV)
    loadgen.ESTABLISHED = head
    os.environ[ESTABLISHED_ENV] = head.hex()
    try:
        yield
    finally:
        loadgen.ESTABLISHED = old
        if old_env is None:
            os.environ.pop(ESTABLISHED_ENV, None)
        else:
            os.environ[ESTABLISHED_ENV] = old_env


def short(exc: BaseException | str, limit: int = 160) -> str:
    text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Bench:
    """The processes of one benchmark and every sample, keyed by (figure, column)."""

    def __init__(self, args: argparse.Namespace, origin: Origin, peers: list[Peer]) -> None:
        self.args = args
        self.origin = origin
        self.peers = peers
        self.samples: dict[tuple[str, str], list[float]] = defaultdict(list)
        self.failures: dict[tuple[str, str], list[str]] = defaultdict(list)
        self.status: dict[str, str] = {}  # column -> why it is not measured
        self.running: dict[str, Running] = {}
        self.heads: dict[str, bytes] = {}
        self.notes: list[str] = []

    # -- processes

    def start_all(self) -> None:
        for peer in self.peers:
            if peer.start is None or not any(peer.takes(p) for p in self.args.parts):
                continue
            if peer.skipped:
                self.status[peer.key] = peer.skipped
                continue
            try:
                running = peer.start()
            except Exception as exc:
                self.status[peer.key] = f"failed to start: {short(exc, 300)}"
                print(f"  {peer.key}: {self.status[peer.key]}", file=sys.stderr)
                continue
            self.running[peer.key] = running
            try:
                self.heads[peer.key] = learn_established(running.address, self.origin.echo)
            except Exception as exc:
                self.status[peer.key] = f"no working tunnel: {short(exc, 300)}"
                print(f"  {peer.key}: {self.status[peer.key]}", file=sys.stderr)
                self.stop(peer.key)

    def stop(self, key: str) -> None:
        running = self.running.pop(key, None)
        if running is not None:
            rc = running.stop()
            if rc not in (0, -signal.SIGTERM, 128 + signal.SIGTERM):
                self.notes.append(f"{key} exited with {rc} when stopped")

    def stop_all(self) -> None:
        for key in list(self.running):
            self.stop(key)

    def paths(self, part: str, run: int = 1) -> list[tuple[str, Running | None]]:
        """The columns measured in ``part``, with their running process (None: direct): in
        the table's order in run 1, shuffled in later runs (seeded by the run's number, so
        reproducible), so that no column always runs right after the same other one."""
        out: list[tuple[str, Running | None]] = []
        for peer in self.peers:
            if not peer.takes(part):
                continue
            if peer.start is None:
                out.append((peer.key, None))
            elif peer.key in self.running:
                out.append((peer.key, self.running[peer.key]))
        if run > 1:
            random.Random(run).shuffle(out)
        return out

    def attempt(self, part: str, key: str, proxy: Running | None, fn: Callable[[], str]) -> None:
        """One measurement; a failure is recorded with its reason, never raised."""
        print(f"  {part:<6} {key:<10} ", end="", file=sys.stderr, flush=True)
        began = time.monotonic()
        try:
            with expecting(self.heads.get(key)):
                text = fn()
            print(f"{text}  [{time.monotonic() - began:.1f} s]", file=sys.stderr)
        except Exception as exc:
            print(f"FAILED: {short(exc, 500)}", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
            self.notes.append(f"{part} via {key} failed: {short(exc, 1000)}")
            for i, figure in enumerate(PART_KEYS[part]):
                self.failures[figure, key].append("" if i else short(exc, 100))
        if proxy is not None and proxy.proc.poll() is not None:
            log = proxy.log_text()[-1500:]
            self.status[key] = f"exited ({proxy.proc.returncode}) during {part}"
            self.notes.append(
                f"{key} exited ({proxy.proc.returncode}) during {part}:\n\n```\n{log}\n```"
            )
            self.running.pop(key, None)

    # -- one measurement each

    def rate(self, key: str, proxy: Running | None) -> str:
        text, result = measure.rate(
            self.samples, self.notes, key, proxy, self.origin.echo, self.origin.pid, self.args
        )
        if not result.completed:
            raise RuntimeError(f"no loop completed; first error: {result.first_error}")
        return text

    def transfer(self, part: str, key: str, proxy: Running | None) -> str:
        return measure.transfer(self.samples, part, key, proxy, self.origin.stream, self.args)

    def idle(self, peer: Peer) -> str:
        """Memory per idle tunnel on a fresh instance of ``peer`` (bench/run.py's definition)."""
        args = self.args
        assert peer.start is not None
        proxy = peer.start()
        try:
            head = learn_established(proxy.address, self.origin.echo)
            with expecting(head):
                hold = measure.hold_idle(proxy, self.origin.echo, args)
            if proxy.proc.poll() is not None:
                raise RuntimeError(f"the fresh {peer.key} exited ({proxy.proc.returncode})")
        finally:
            proxy.stop()
        self.notes.extend(hold.notes(peer.key, args.idle_tunnels))
        opened, rest, held = hold.opened, hold.rest, hold.held
        if not opened.opened:
            raise RuntimeError(f"no idle tunnel opened: {opened.first_error}")
        per_tunnel = hold.per_tunnel
        add = self.samples
        add["idle_kib", peer.key].append(per_tunnel / 1024)
        add["idle_opened", peer.key].append(opened.opened)
        add["idle_rss_rest", peer.key].append(rest / MIB)
        add["idle_rss_held", peer.key].append(held / MIB)
        add["idle_sockets", peer.key].append(hold.sockets)
        return (
            f"{per_tunnel:8.0f} B/tunnel  RSS rest {rest / MIB:.1f}, with {opened.opened} "
            f"{held / MIB:.1f} MiB; opened in {opened.seconds:.1f} s"
        )

    def run(self) -> None:
        args = self.args
        perf = [p for p in args.parts if p != "errors"]
        if not perf:
            return
        if any(p != "idle" for p in perf):
            self.start_all()
        try:
            for i in range(1, args.runs + 1):
                print(f"run {i}/{args.runs}", file=sys.stderr)
                began = time.monotonic()
                if "rate" in perf:
                    for key, proxy in self.paths("rate", i):
                        self.attempt("rate", key, proxy, lambda k=key, p=proxy: self.rate(k, p))
                for part in ("stream", "streams8"):
                    if part not in perf:
                        continue
                    for direction in ("up", "down"):
                        name = direction + ("8" if part == "streams8" else "")
                        for key, proxy in self.paths(part, i):
                            self.attempt(
                                name,
                                key,
                                proxy,
                                lambda n=name, k=key, p=proxy: self.transfer(n, k, p),
                            )
                if "idle" in perf:
                    for peer in self.peers:
                        if peer.start is None or peer.skipped or not peer.takes("idle"):
                            continue
                        self.attempt("idle", peer.key, None, lambda p=peer: self.idle(p))
                took = time.monotonic() - began
                print(f"run {i}/{args.runs} took {took:.0f} s", file=sys.stderr)
        finally:
            self.stop_all()


# --- error behaviour ------------------------------------------------------------------------


@dataclass
class Answer:
    """What a proxy did with one request: its head, or how it failed to give one."""

    outcome: str  # head, eof, reset, timeout, toolong, error (...)
    head: bytes
    seconds: float
    wait: float
    origin_note: str = ""

    def field(self, name: str) -> str | None:
        for line in self.head.decode("latin-1").split("\r\n")[1:]:
            key, sep, value = line.partition(":")
            if sep and key.strip().lower() == name.lower():
                return value.strip()
        return None

    def status_line(self) -> str:
        return self.head.decode("latin-1").split("\r\n", 1)[0]

    def describe(self) -> str:
        if self.outcome == "head":
            text = f"`{self.status_line()}`"
            squid = self.field("X-Squid-Error")
            if squid:
                text += f" (X-Squid-Error: {squid})"
        elif self.outcome == "eof":
            text = "closed without answer" if not self.head else f"closed after {self.head!r}"
        elif self.outcome == "reset":
            text = "reset without answer" if not self.head else f"reset after {self.head!r}"
        elif self.outcome == "timeout":
            text = f"hangs: no answer in {self.wait:g} s"
            if self.head:
                text = f"hangs after a partial answer {self.head[:80]!r}"
        else:
            text = f"{self.outcome}: {self.head[:80]!r}"
        if self.outcome != "timeout":
            text += f", after {self.seconds:.2f} s"
        return text


def ask(proxy: Address, raw: bytes, wait: float) -> Answer:
    """Send ``raw`` in one write and read the answer's head, for at most ``wait`` s."""
    began = time.monotonic()
    try:
        sock = socket.create_connection(proxy, timeout=min(wait, 5.0))
    except OSError as exc:
        return Answer(f"error (connect: {exc})", b"", time.monotonic() - began, wait)
    with sock:
        try:
            sock.sendall(raw)
        except OSError as exc:
            return Answer(f"error (send: {exc})", b"", time.monotonic() - began, wait)
        outcome, head = read_head(sock, began + wait)
        return Answer(outcome, head, time.monotonic() - began, wait)


@dataclass
class Recording:
    """Bytes the recording origin got on each connection."""

    received: list[bytes] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def record_into(recording: Recording, expect: int) -> Callable[[socket.socket], None]:
    """A tests/proxyproc.py Origin behaviour: read until ``expect`` bytes and 0.3 s of quiet
    after them, or EOF, or 3 s; keep what came."""

    def behaviour(conn: socket.socket) -> None:
        data = b""
        deadline = time.monotonic() + 3.0
        with contextlib.suppress(OSError):
            while time.monotonic() < deadline:
                quiet = 0.3 if len(data) >= expect else deadline - time.monotonic()
                conn.settimeout(max(0.01, min(quiet, deadline - time.monotonic())))
                try:
                    chunk = conn.recv(65536)
                except TimeoutError:
                    if len(data) >= expect:
                        break
                    continue
                if not chunk:
                    break
                data += chunk
        with recording.lock:
            recording.received.append(data)

    return behaviour


#: (case, what is sent, as shown in the report)
CASES = [
    ("refused", "refused port", "CONNECT to 127.0.0.1:P, P bound but not listening"),
    (
        "nxdomain",
        "NXDOMAIN",
        f"CONNECT {NXDOMAIN_NAME.format(key='PROXY')}:443; the loopback DNS says NXDOMAIN",
    ),
    (
        "timeout",
        "connect timeout",
        "CONNECT to 127.0.0.1:P, a listener whose accept queue is full (SYNs dropped)",
    ),
    (
        "malformed",
        "malformed head",
        "a valid CONNECT to a live origin, but one header line has no colon: `Host 127.0.0.1`",
    ),
    (
        "early",
        "early bytes",
        f"CONNECT to a live origin and {len(EARLY)} bytes of tunnel data "
        "in the same write; does the origin get exactly them?",
    ),
]


def head_for(target: str, extra: str = "") -> bytes:
    return f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{extra}\r\n".encode()


class ErrorSuite:
    """Every case against every proxy, all at once (each waits at most its bound)."""

    def __init__(self, args: argparse.Namespace, peers: list[Peer], dns: Dns) -> None:
        self.args = args
        self.dns = dns
        self.peers = [p for p in peers if p.start is not None and p.takes("errors")]
        self.answers: dict[tuple[str, str], str] = {}
        self.status: dict[str, str] = {}
        self.notes: list[str] = []

    def run(self) -> None:
        import_test_helpers()
        from proxyproc import full_accept_queue, origin

        running: dict[str, Running] = {}
        recordings: dict[str, Recording] = {}
        try:
            for peer in self.peers:
                if peer.skipped:
                    self.status[peer.key] = peer.skipped
                    continue
                try:
                    running[peer.key] = peer.start()  # type: ignore[misc]
                except Exception as exc:
                    self.status[peer.key] = f"failed to start: {short(exc, 300)}"
            with contextlib.ExitStack() as stack:
                refused = stack.enter_context(socket.socket())
                refused.bind(("127.0.0.1", 0))
                refused_port = refused.getsockname()[1]
                blackhole_port = stack.enter_context(full_accept_queue())
                # per proxy, an origin for the malformed case (does the proxy connect at
                # all?) and one that records what the early-bytes tunnel delivers
                malformed, early = {}, {}
                for key in running:
                    recordings[key] = Recording()
                    malformed[key] = stack.enter_context(origin(record_into(Recording(), 1)))
                    early[key] = stack.enter_context(
                        origin(record_into(recordings[key], len(EARLY)))
                    )
                jobs = {}
                with ThreadPoolExecutor(max_workers=max(1, 5 * len(running))) as pool:
                    for key, proxy in running.items():
                        requests = {
                            "refused": (head_for(f"127.0.0.1:{refused_port}"), 10.0),
                            "nxdomain": (head_for(f"{self.nxdomain_name(key)}:443"), 10.0),
                            "timeout": (
                                head_for(f"127.0.0.1:{blackhole_port}"),
                                self.args.error_wait,
                            ),
                            "malformed": (
                                head_for(f"127.0.0.1:{malformed[key].port}", "Host 127.0.0.1\r\n"),
                                5.0,
                            ),
                            "early": (head_for(f"127.0.0.1:{early[key].port}") + EARLY, 5.0),
                        }
                        for case, (raw, wait) in requests.items():
                            jobs[case, key] = pool.submit(ask, proxy.address, raw, wait)
                    for (case, key), job in jobs.items():
                        try:
                            answer = job.result(timeout=self.args.error_wait + 30)
                        except Exception as exc:
                            self.answers[case, key] = f"failed: {short(exc)}"
                            continue
                        self.answers[case, key] = self.judge(case, key, answer)
                time.sleep(0.5)  # let the recording origins finish before reading them
                for key in running:
                    self.answers["early", key] = self.judge_early(
                        self.answers["early", key], recordings[key]
                    )
        finally:
            for key, proxy in running.items():
                if proxy.proc.poll() is not None:
                    self.notes.append(
                        f"{key} exited ({proxy.proc.returncode}) during the error cases"
                    )
                proxy.stop()

    @staticmethod
    def nxdomain_name(key: str) -> str:
        return NXDOMAIN_NAME.format(key=key.replace(".", "-"))

    def judge(self, case: str, key: str, answer: Answer) -> str:
        peer = next(p for p in self.peers if p.key == key)
        text = answer.describe()
        status = answer.field("Proxy-Status")
        if status:
            text += f"; Proxy-Status: `{status}`"
        if case == "nxdomain":
            if not peer.dns_ok:
                text += f" (not an NXDOMAIN answer: {peer.dns_note})"
            elif self.dns.server is not None:
                queries = self.dns.server.count(self.nxdomain_name(key))  # type: ignore[attr-defined]
                text += f"; the loopback DNS got {queries} quer{'y' if queries == 1 else 'ies'}"
        return text

    def judge_early(self, text: str, recording: Recording) -> str:
        with recording.lock:
            got = list(recording.received)
        if not got:
            return text + "; the origin got no connection"
        early = [g for g in got if g != b""]
        if any(g == EARLY for g in early):
            return text + f"; the origin got exactly the {len(EARLY)} early bytes"
        if any(EARLY in g for g in early):
            odd = next(g for g in early if EARLY in g)
            return text + f"; the origin got them with more around: {odd[:120]!r}"
        if len(got) > 1 or early:
            shown = [g[:60] for g in got]
            return text + f"; **the origin did not get them**; it got {shown!r}"
        return text + "; **the origin got a connection but no bytes**"


# --- the report -----------------------------------------------------------------------------


def cell(text: str) -> str:
    """Text fit for a Markdown table cell: one line, no bare pipe."""
    return " ".join(text.split()).replace("|", "\\|")


def figures_table(bench: Bench, args: argparse.Namespace) -> list[str]:
    columns = [p for p in bench.peers]
    head = ["figure", *(p.label for p in columns)]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * len(columns) + "|"]
    status = ["status"]
    for peer in columns:
        status.append(
            cell(f"not measured: {bench.status[peer.key]}") if peer.key in bench.status else "ok"
        )
    lines.append("| " + " | ".join(status) + " |")
    labels = {"streams": str(args.streams), "tunnels": f"{args.idle_tunnels:,}"}
    measured = {k for k, _ in bench.samples} | {k for k, _ in bench.failures}
    for key, label, has_ratio, decimals in ROWS:
        if key not in measured:
            continue
        row = [label.format(**labels)]
        direct = median(bench.samples.get((key, DIRECT), []))
        for peer in columns:
            values = bench.samples.get((key, peer.key), [])
            failed = bench.failures.get((key, peer.key), [])
            if not values:
                row.append(
                    cell(
                        f"failed: {failed[-1]}"
                        if failed and failed[-1]
                        else "failed"
                        if failed
                        else "-"
                    )
                )
                continue
            value = median(values)
            text = fmt(value, decimals)
            if has_ratio and peer.key != DIRECT and direct and value is not None:
                text += f" ({value / direct:.2f}x)"
            if failed:
                text += f" ({len(values)} of {len(values) + len(failed)} runs; see the notes)"
            row.append(text)
        lines.append("| " + " | ".join(row) + " |")
    return lines


def per_run_table(bench: Bench, args: argparse.Namespace) -> list[str]:
    labels = {"streams": str(args.streams), "tunnels": f"{args.idle_tunnels:,}"}
    lines = [
        "| figure | " + " | ".join(p.label for p in bench.peers) + " |",
        "|---" + "|---:" * len(bench.peers) + "|",
    ]
    for key, label, _, decimals in ROWS:
        if not any(bench.samples.get((key, p.key)) for p in bench.peers):
            continue
        cells = [
            ", ".join(fmt(v, decimals) for v in bench.samples.get((key, p.key), [])) or "-"
            for p in bench.peers
        ]
        lines.append(f"| {label.format(**labels)} | " + " | ".join(cells) + " |")
    return lines


def errors_table(suite: ErrorSuite) -> list[str]:
    lines = ["| case (what is sent) | proxy | answer |", "|---|---|---|"]
    for case, name, what in CASES:
        first = True
        for peer in suite.peers:
            if peer.key in suite.status:
                answer = cell(f"not measured: {suite.status[peer.key]}")
            else:
                answer = cell(suite.answers.get((case, peer.key), "-"))
            label = f"**{name}**: {what}" if first else ""
            lines.append(f"| {label} | {peer.label} | {answer} |")
            first = False
    return lines


def config_table(peers: list[Peer]) -> list[str]:
    lines = ["| path | version | how it runs | resolver |", "|---|---|---|---|"]
    for peer in peers:
        lines.append(
            f"| {peer.label} | {cell(peer.version)} | {cell(peer.config)} | "
            f"{cell(peer.resolver or '-')} |"
        )
    return lines


def report(
    args: argparse.Namespace,
    machine: dict[str, str],
    peers: list[Peer],
    bench: Bench | None,
    errors: ErrorSuite | None,
    started: datetime,
    chart: Path | None,
    dns: Dns,
) -> str:
    out = [f"# splicegate and peer proxies on loopback, {started:%Y-%m-%d %H:%M:%S} UTC", ""]
    out += [f"Reproduce: `{args.command}`", ""]
    out += ["| machine | |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in machine.items()]
    out.append(
        f"| settings | parts: {', '.join(args.parts)}; rate: {args.concurrency} loops x "
        f"{args.duration:g} s; throughput: 1 and {args.streams} streams, {args.seconds:g} s "
        f"window after {args.warmup:g} s warm-up, {args.file_mib} MiB sendfile file; idle: "
        f"{args.idle_tunnels:,} tunnels after a {args.idle_warmup:g} s warm-up; median of "
        f"{args.runs} run(s) |"
    )
    dns_text = dns.error or f"{dns.host}:53, tests/dnsserver.py, NXDOMAIN for every name"
    out.append(f"| loopback DNS | {dns_text} |")
    out.append("")
    if bench is not None and (bench.samples or bench.failures or bench.status):
        out += figures_table(bench, args)
        out += [
            "",
            "Medians of the runs; a figure like (0.50x) is its ratio to direct. Time-to-200: "
            "connect start to the last byte of the proxy's 200 (every proxy's whole 200 is "
            "read, whatever its length); on the direct path, connect start to the echo, the "
            "same shape answered by the origin under the same loop. CPU per GiB: utime+stime "
            "of the proxy's process tree over one transfer, warm-up and tail included, over "
            "every byte of it. Machine CPU per GiB: the busy time of every core (/proc/stat) "
            "over the same transfer, load "
            "generator and origin included: through a proxy each byte crosses loopback TCP "
            "twice, and the kernel work of a crossing lands on whichever process sends or "
            "acknowledges; its ratio to direct bounds the throughput ratio a relay can reach "
            "when the cores are the limit. Idle memory "
            "per tunnel: on a proxy started for it, (RSS with "
            f"{args.idle_tunnels:,} idle tunnels - RSS at rest) / tunnels opened, RSS summed "
            "over the process tree (pages shared between a tree's processes count once per "
            f"process); at rest is after {args.idle_warmup:g} s of tunnels one at a time and "
            f"{IDLE_SETTLE_S:g} s of quiet.",
        ]
        if chart is not None:
            shown_path = chart.resolve()
            if shown_path.is_relative_to(REPO):
                shown_path = shown_path.relative_to(REPO)
            out += ["", f"Chart: `{shown_path}`"]
    if errors is not None:
        out += ["", "## Error behaviour", ""]
        out += errors_table(errors)
        out += [
            "",
            "The answer's status line (plus squid's X-Squid-Error) and Proxy-Status (RFC "
            "9209) if any; or how the connection ended without one. Bounds: refused and "
            f"NXDOMAIN 10 s, connect timeout {args.error_wait:g} s, the others 5 s.",
        ]
    out += ["", "## How each proxy was run", ""]
    out += config_table(peers)
    notes = (bench.notes if bench else []) + (errors.notes if errors else [])
    if notes:
        out += ["", "Notes:", "", *(f"- {n}" for n in notes)]
    if bench is not None and args.runs > 1 and bench.samples:
        out += ["", "Every run:", "", *per_run_table(bench, args)]
    return "\n".join(out) + "\n"


# --- the chart ------------------------------------------------------------------------------


def draw_chart(
    bench: Bench, args: argparse.Namespace, machine: dict[str, str], started: datetime, path: Path
) -> None:
    """Four panels: throughput, CONNECT rate (with p99), proxy CPU per GiB, idle memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def value(key: str, peer: Peer) -> float | None:
        return median(bench.samples.get((key, peer.key), []))

    def missing(peer: Peer) -> str:
        return "n/a" if peer.key in bench.status else "failed"

    def axis(ax, cols: list[Peer], title: str, unit: str) -> None:
        ax.set_title(title)
        ax.set_ylabel(unit)
        ax.set_xticks(
            range(len(cols)), [p.label.replace("splicegate ", "splicegate\n") for p in cols]
        )
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="y", alpha=0.3)

    def grouped(ax, cols: list[Peer], keys: list[tuple[str, str]], title: str, unit: str):
        width = 0.8 / len(keys)
        for i, (key, name) in enumerate(keys):
            xs = [c - 0.4 + width * (i + 0.5) for c in range(len(cols))]
            vals = [value(key, p) for p in cols]
            ax.bar(xs, [v or 0.0 for v in vals], width, label=name)
            for x, v, peer in zip(xs, vals, cols, strict=True):
                if v is None:
                    ax.text(x, 0, missing(peer), rotation=90, ha="center", va="bottom", size=7)
        axis(ax, cols, title, unit)
        ax.legend(fontsize=8)

    def single(ax, cols: list[Peer], key: str, title: str, unit: str, label, color: str):
        vals = [value(key, p) for p in cols]
        bars = ax.bar(range(len(cols)), [v or 0.0 for v in vals], 0.6, color=color)
        for bar, v, peer in zip(bars, vals, cols, strict=True):
            text = missing(peer) if v is None else label(v, peer)
            x = bar.get_x() + bar.get_width() / 2
            ax.text(x, bar.get_height(), text, ha="center", va="bottom", size=7)
        axis(ax, cols, title, unit)

    everyone = bench.peers
    proxies = [p for p in everyone if p.key != DIRECT]
    n = str(args.streams)
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    grouped(
        axes[0][0],
        everyone,
        [("up", "1 stream up"), ("down", "1 stream down"), ("up8", f"{n} streams up"),
         ("down8", f"{n} streams down")],
        "Throughput (higher is better)",
        "Gbit/s",
    )  # fmt: skip

    def rate_label(v: float, peer: Peer) -> str:
        p99 = value("p99", peer)
        what = "echo" if peer.key == DIRECT else "200"
        return f"{v:,.0f}/s" + (f"\n{what} p99 {p99:.1f} ms" if p99 is not None else "")

    single(
        axes[0][1],
        [p for p in everyone if p.takes("rate")],
        "rate",
        f"CONNECT rate, {args.concurrency} loops (higher is better)",
        "tunnels/s (direct: connections/s)",
        rate_label,
        "tab:green",
    )
    grouped(
        axes[1][0],
        proxies,
        [("cpu_up", "1 up"), ("cpu_down", "1 down"), ("cpu_up8", f"{n} up"),
         ("cpu_down8", f"{n} down")],
        "Proxy CPU per GiB relayed, whole process tree (lower is better)",
        "CPU s / GiB",
    )  # fmt: skip
    single(
        axes[1][1],
        [p for p in proxies if p.takes("idle")],
        "idle_kib",
        f"Idle memory per tunnel, {args.idle_tunnels:,} tunnels (lower is better)",
        "KiB per tunnel",
        lambda v, _: f"{v:.1f}",
        "tab:purple",
    )
    fig.suptitle(
        f"splicegate and peer proxies on loopback, {started:%Y-%m-%d} — {machine['CPU']}, "
        f"{machine['cores']}; median of {args.runs} run(s), rate {args.duration:g} s, "
        f"throughput {args.seconds:g} s; load at start {machine['load average at start']}",
        fontsize=10,
    )
    fig.text(0.5, 0.005, f"reproduce: {args.command}", ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.02, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="splicegate against squid, tinyproxy, proxy.py and pproxy on loopback: "
        "CONNECT rate, single- and 8-stream throughput, proxy CPU per GiB, idle memory per "
        "tunnel (medians of --runs runs, ratios to direct), and each one's error behaviour.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--install",
        action="store_true",
        help="run the install commands for what is missing (apt-get, pip)",
    )
    parser.add_argument(
        "--peers", default=",".join(PATHS), help=f"columns, comma-separated, of: {','.join(PATHS)}"
    )
    parser.add_argument(
        "--only", default=",".join(PARTS), help=f"parts, comma-separated, of: {','.join(PARTS)}"
    )
    measure.add_measure_arguments(parser)
    parser.add_argument(
        "--error-wait",
        type=float,
        default=15.0,
        help="errors part: how long to wait for an answer to the connect "
        "timeout case before calling it a hang",
    )
    parser.add_argument(
        "--dns-host",
        default="127.0.0.153",
        help="loopback address for the test DNS server (port 53)",
    )
    parser.add_argument(
        "--results-dir", type=Path, default=BENCH / "results", help="where the Markdown report goes"
    )
    parser.add_argument(
        "--chart", default=str(BENCH / "peers.png"), help="where the PNG chart goes ('' for none)"
    )
    args = parser.parse_args(argv)
    args.command = shlex.join(
        ["python", "bench/peers.py", *_measuring(argv if argv is not None else sys.argv[1:])]
    )
    paths = [p.strip() for p in args.peers.split(",") if p.strip()]
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    if not paths or set(paths) - set(PATHS):
        parser.error(f"--peers takes some of {','.join(PATHS)}, not {args.peers!r}")
    if not parts or set(parts) - set(PARTS):
        parser.error(f"--only takes some of {','.join(PARTS)}, not {args.only!r}")
    measure.check_measure_arguments(parser, args)
    if not ipaddress.ip_address(args.dns_host).is_loopback:
        parser.error("--dns-host must be a loopback address")
    args.parts = [p for p in PARTS if p in parts]
    # A path only where it is measured: else the floor would be compiled (and cc needed)
    # for nothing, and show as a column of dashes.
    unmeasured = [p for p in paths if not set(PATH_PARTS.get(p, PARTS)) & set(args.parts)]
    paths = [p for p in paths if p not in unmeasured]
    if not paths:
        where = "; ".join(f"{p} only in {','.join(PATH_PARTS[p])}" for p in unmeasured)
        parser.error(f"nothing to measure with --only {args.only}: {where}")
    args.paths = [p for p in PATHS if p in paths]
    if args.parts == ["errors"]:
        args.chart = ""
    return args


def _measuring(argv: list[str]) -> list[str]:
    """The arguments that decide what is measured: not where the table and chart go, which
    a reproduce line would only send into someone else's directories."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--chart", "--results-dir"):
            skip = True
        elif not arg.startswith(("--chart=", "--results-dir=")):
            kept.append(arg)
    return kept


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    status = check_needs(args)
    if status is not None:
        return status
    started = datetime.now(UTC)
    machine = describe_machine()
    machine["source at start"] = describe_source(REPO)
    raise_open_file_limit()  # the proxies inherit it (squid and tinyproxy take what they get)

    tmp = Path(tempfile.mkdtemp(prefix="splicegate-peers-"))
    tmp.chmod(0o755)  # squid, as its own user, writes its pid file and log in here
    dns = Dns(args.dns_host)
    if dns.error:
        print(f"warning: {dns.error}", file=sys.stderr)
    origin: Origin | None = None
    bench: Bench | None = None
    errors: ErrorSuite | None = None
    chart: Path | None = None
    peers: list[Peer] = []
    try:
        ns = Namespace(tmp, args.dns_host)
        if ns.error:
            print(f"warning: {ns.error}", file=sys.stderr)
        builder = Peers(tmp, dns, ns)
        peers = [builder.build(key) for key in args.paths]
        if any(p != "errors" for p in args.parts):
            origin = Origin.start()
            bench = Bench(args, origin, peers)
            bench.run()
        if "errors" in args.parts:
            print("error behaviour", file=sys.stderr)
            errors = ErrorSuite(args, peers, dns)
            errors.run()
    finally:
        if origin is not None:
            origin.stop()
        dns.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    if bench is not None and args.chart and bench.samples:
        chart = Path(args.chart)
        try:
            draw_chart(bench, args, machine, started, chart)
        except Exception as exc:
            print(f"chart failed: {short(exc, 500)}", file=sys.stderr)
            bench.notes.append(f"the chart failed: {short(exc, 500)}")
            chart = None
    text = report(args, machine, peers, bench, errors, started, chart, dns)
    print(text)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"peers-{started:%Y%m%dT%H%M%SZ}.md"
    path.write_text(text)
    print(f"written to {path}" + (f" and {chart}" if chart else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
