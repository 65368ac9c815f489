"""Processes the benchmarks start and watch: the proxy under test, and /proc accounting.

CPU time is read from ``/proc/<pid>/stat`` rather than asked of the process, so a proxy is
measured as it runs in production, unmodified, whatever its engine does inside (threads of
its own count: a process's utime/stime include all its threads). The listening port of a
proxy started with ``--listen 127.0.0.1:0`` is read from ``/proc`` too, because at
``--log-level warning`` the proxy does not log it.

Memory is read the same way: ``rss_bytes_tree`` sums ``VmRSS`` over a process and its
descendants (a proxy with worker processes is measured whole; threads share their process's
memory and are not counted twice).

Reusable by other benchmarks: ``start_splicegate``, ``engine_available``,
``cpu_seconds_tree``, ``machine_busy_seconds``, ``rss_bytes_tree``, ``fd_kinds_tree``,
``raise_open_file_limit``, ``describe_machine``.
"""

from __future__ import annotations

import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import IO

CLK_TCK = os.sysconf("SC_CLK_TCK")

Address = tuple[str, int]


# --- /proc ----------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat from field 3 (state) on; the name may hold spaces and ')'."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(_stat_fields(int(entry))[1]) == pid:
                    found.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue  # exited while we looked
    return found


def cpu_seconds_tree(pid: int) -> float:
    """utime + stime of ``pid``, its live descendants, and the children it already reaped.

    Fields 14-17 of /proc/<pid>/stat (utime, stime, cutime, cstime), in clock ticks
    (usually 10 ms: measure over seconds, not milliseconds).
    """
    total = 0
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            fields = _stat_fields(current)
        except OSError:
            continue
        total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
        stack.extend(_children(current))
    return total / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine spent busy since boot (/proc/stat's first line:
    user, nice, system, irq, softirq; idle, iowait and steal are not work done here).

    A relay's own CPU is only part of what it costs: on loopback the kernel work of a TCP
    crossing lands on whichever process sends or acknowledges, so a proxy makes its client
    and origin busier too. The whole machine's busy time per GiB shows the full price.
    """
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:8]]
    user, nice, system, _idle, _iowait, irq, softirq = ticks
    return (user + nice + system + irq + softirq) / CLK_TCK


def tree_pids(pid: int) -> list[int]:
    """``pid`` and its live descendants (processes, not threads)."""
    pids = []
    stack = [pid]
    while stack:
        current = stack.pop()
        pids.append(current)
        stack.extend(_children(current))
    return pids


def rss_bytes_tree(pid: int) -> int:
    """Resident memory of ``pid`` and its live descendants, summed (``VmRSS``, in bytes).

    Pages shared between the processes of a tree (after ``fork``) count once per process, as
    ``ps`` and ``top`` show them; a single-process proxy has no such overlap.
    """
    total = 0
    for current in tree_pids(pid):
        try:
            with open(f"/proc/{current}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024  # the kernel writes kB (KiB)
                        break
        except OSError:
            continue  # exited while we looked
    return total


def fd_kinds_tree(pid: int) -> Counter[str]:
    """Open file descriptors of ``pid`` and its live descendants, by kind.

    The kind is what the fd's ``/proc`` link names before the colon (``socket``, ``pipe``,
    ``anon_inode``), or ``file`` for a path.
    """
    kinds: Counter[str] = Counter()
    for current in tree_pids(pid):
        fd_dir = f"/proc/{current}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            kinds["file" if link.startswith("/") else link.split(":", 1)[0]] += 1
    return kinds


def raise_open_file_limit(need: int = 0) -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; returns the new soft limit.

    Raises ``RuntimeError`` when even the hard limit is below ``need``.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass  # keep what we have; checked against the need below
    if soft < need:
        raise RuntimeError(f"open-file limit {soft} is below the {need} needed (hard: {hard})")
    return soft


def listening_ports(pid: int) -> list[int]:
    """TCP ports ``pid`` listens on (IPv4 and IPv6), from its fds and /proc/net/tcp*."""
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            link = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue
        if m := re.fullmatch(r"socket:\[(\d+)\]", link):
            inodes.add(m.group(1))
    ports = []
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                ports.append(int(cols[1].rsplit(":", 1)[1], 16))
    return sorted(ports)


# --- the proxy under test ----------------------------------------------------------------------


def splicegate_command() -> list[str]:
    exe = shutil.which("splicegate")
    return [exe] if exe else [sys.executable, "-m", "splicegate"]


def engine_available(engine: str, timeout: float = 60.0) -> tuple[bool, str]:
    """Whether ``splicegate --engine X --version`` succeeds; with its engine line or error."""
    try:
        done = subprocess.run(
            [*splicegate_command(), "--engine", engine, "--version"],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        return False, lines[-1] if lines else f"exit status {done.returncode}"
    engine_line = next(
        (line for line in done.stdout.splitlines() if line.startswith("engine:")), ""
    )
    return True, engine_line.removeprefix("engine:").strip() or done.stdout.strip()


@dataclass
class Proxy:
    """A running ``splicegate`` this benchmark started; stop it with ``stop()`` only."""

    engine: str
    proc: subprocess.Popen[bytes]
    address: Address
    stderr: IO[bytes]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")

    def stop(self, timeout: float = 45.0) -> int:
        """SIGTERM by pid (open tunnels get the drain timeout), SIGKILL if that runs out."""
        terminate(self.proc, timeout)
        self.stderr.close()
        return self.proc.returncode


def terminate(proc: subprocess.Popen[bytes], timeout: float, kill_wait: float = 10.0) -> None:
    """SIGTERM ``proc`` by pid if it still runs; SIGKILL if it outlives ``timeout`` s, then wait
    up to ``kill_wait`` s for it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(kill_wait)


def start_splicegate(engine: str, extra: list[str] | None = None, timeout: float = 30.0) -> Proxy:
    """Start ``splicegate`` on a kernel-chosen loopback port, allowed to reach loopback.

    Its stderr goes to an unlinked temp file, so that a chatty proxy can never block on a
    full pipe nobody reads, yet its log is there to show when something fails.
    """
    cmd = [
        *splicegate_command(),
        "--listen",
        "127.0.0.1:0",
        "--allow-dest",
        "127.0.0.0/8",
        "--allow-port",
        "any",
        "--engine",
        engine,
        "--log-level",
        "warning",
        *(extra or []),
    ]
    # Lives as long as the proxy; Proxy.stop() closes it.
    stderr = tempfile.TemporaryFile(prefix="splicegate-bench-log-")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr)
    proxy = Proxy(engine, proc, ("127.0.0.1", 0), stderr)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = proxy.log_text()
            proxy.stop()
            raise RuntimeError(f"splicegate --engine {engine} exited at start:\n{text}")
        try:
            ports = listening_ports(proc.pid)
        except OSError:
            ports = []
        if ports:
            proxy.address = ("127.0.0.1", ports[0])
            return proxy
        time.sleep(0.05)
    proxy.stop()
    raise RuntimeError(f"splicegate --engine {engine} did not listen within {timeout:g} s")


# --- the machine and the source ----------------------------------------------------------------


def describe_source(repo: Path) -> str:
    """The commit the proxy was built from, and whether its source had uncommitted changes.

    The benchmark measures whatever is installed from the working tree (``pip install -e``),
    which may differ from the commit; the report says so.
    """
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--", "src", "csrc"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.split("\n")  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    changed = [line[3:] for line in dirty if line.strip()]
    if not changed:
        return f"commit {head}"
    return f"commit {head} + uncommitted changes in {', '.join(changed)}"


def describe_machine() -> dict[str, str]:
    """CPU model, cores, kernel, Python, and the load when the run began (others' noise)."""
    model = "unknown"
    virtual = False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown":
                    model = value.strip()
                elif key.strip() == "flags" and " hypervisor" in value:
                    virtual = True
    except OSError:
        pass
    logical = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0))
    cores = f"{logical} logical" + (f" ({usable} usable)" if usable != logical else "")
    try:
        load = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        load = ["?"]
    return {
        "CPU": model + (" (virtual machine)" if virtual else ""),
        "cores": cores,
        "kernel": f"{platform.system()} {platform.release()} {platform.machine()}",
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "load average at start": " ".join(load),
    }
