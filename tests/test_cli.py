"""The command line: flags from the settings table, clean errors, --help and --version."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from proxyproc import WAIT, ProxyProcess, run_code
from splicegate.config import (
    MAX_DEFER_ACCEPT,
    MAX_PIPE_SIZE,
    MAX_PIPES,
    MAX_RELAY_THREADS,
    Config,
    cli_fields,
    parse_address,
)
from splicegate.limits import listening_socket
from splicegate.relay import PUREPYTHON_ENV, RelayTimeouts, create_engine, native_engine_error


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "splicegate", *args],
        capture_output=True,
        text=True,
        timeout=WAIT,
        env=None if env is None else {**os.environ, **env},
    )


def test_help_lists_every_setting_and_examples() -> None:
    out = run_cli("--help")
    assert out.returncode == 0
    for f in cli_fields():
        assert f"--{f.name.replace('_', '-')}" in out.stdout
    for name in set(Config.__dataclass_fields__) - {f.name for f in cli_fields()}:
        assert f"--{name.replace('_', '-')}" not in out.stdout  # objects, embedding only
    assert "examples:" in out.stdout and "curl -p -x http://127.0.0.1:3128" in out.stdout
    assert "(default: 127.0.0.1:3128)" in out.stdout


def test_version_names_the_engine() -> None:
    out = run_cli("--version")
    assert out.returncode == 0
    assert out.stdout.startswith("splicegate 0.")
    assert "engine: python" in out.stdout or "engine: native" in out.stdout


def test_engine_python_can_be_forced() -> None:
    out = run_cli("--engine", "python", "--version")
    assert "engine: python (recv/send copying)" in out.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--allow-port", "http"], "allow-port: 'http' is not a port"),
        (["--allow-port", "0"], "allow-port: '0': ports run from 1 to 65535"),
        (["--allow-dest", "10.0.0.1/8"], "allow-dest: '10.0.0.1/8' is not a network"),
        (["--listen", "::1:80"], "put an IPv6 address in brackets"),
        (["--listen", "localhost"], "has no port"),
        (["--header-timeout", "soon"], "header-timeout: 'soon' is not a number"),
        (["--workers", "2.5"], "workers: '2.5' is not a whole number"),
        (["--connect-timeout", "0"], "connect-timeout: '0' is too small"),
        (["--pipe-size", "100000000"], "pipe-size: '100000000' is too large; the most is"),
        (["--engine", "turbo"], "engine: 'turbo' is not one of auto, native, python"),
        # NaN and infinity would make a limit that never fires, a timeout that waits for ever
        (["--header-timeout", "nan"], "header-timeout: 'nan' is not a finite number; allowed:"),
        (["--connect-timeout", "inf"], "connect-timeout: 'inf' is not a finite number"),
        (["--dns-timeout", "1e400"], "dns-timeout: '1e400' is not a finite number"),
        (["--idle-timeout=-inf"], "idle-timeout: '-inf' is not a finite number"),
        (["--max-lifetime", "inf"], "'inf' is not a finite number; allowed: 0.001 or more (0 "),
        (["--max-connections", "inf"], "max-connections: 'inf' is not a finite number"),
        # what the engine or the kernel would refuse at start is refused as a setting
        (["--relay-threads", "100"], "relay-threads: '100' is too large; the most is 64"),
        (["--relay-threads=-1"], "the least is 1 (0 picks one per CPU, at most 4)"),
        (["--max-pipes", str(2**63)], f"max-pipes: '{2**63}' is too large; the most is"),
        (["--defer-accept", str(2**31)], "defer-accept: '2147483648' is too large; the most"),
        (["--nameserver", "127.0.0.1:0"], "'127.0.0.1:0': the port must be a number from 1 to"),
        (["--nameserver", "dns.example"], "nameserver: 'dns.example' is not an IP address"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_values_are_refused_clearly(args: list[str], message: str) -> None:
    out = run_cli(*args)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_listen_address_in_use_is_a_clean_error() -> None:
    first = ProxyProcess()
    try:
        out = run_cli("--listen", f"127.0.0.1:{first.address[1]}")
        assert out.returncode == 1
        assert f"cannot listen on 127.0.0.1:{first.address[1]}" in out.stderr
        assert "Traceback" not in out.stderr
    finally:
        first.stop()


def test_several_listeners_and_startup_log() -> None:
    proc = ProxyProcess(listen=["127.0.0.1:0", "[::1]:0", "127.0.0.2:0"])
    try:
        assert [host for host, _ in proc.addresses] == ["127.0.0.1", "::1", "127.0.0.2"]
        assert all(port > 0 for _, port in proc.addresses)
        assert "relay engine: " in proc.log()
    finally:
        assert proc.stop() == 0


def test_config_object_takes_cli_style_values() -> None:
    config = Config(listen=["[::1]:0"], allow_port=["443", "8000-8100"], idle_timeout="5")
    assert config.listen == (("::1", 0),)
    assert [str(p) for p in config.allow_port] == ["443", "8000-8100"]
    assert config.idle_timeout == 5.0
    assert config.relay_timeouts.idle == 5.0
    with pytest.raises(ValueError, match="max-header-bytes"):
        Config(max_header_bytes=10)
    with pytest.raises(ValueError, match=r"^header-timeout: nan is not a finite number"):
        Config(header_timeout=float("nan"))
    with pytest.raises(ValueError, match=r"^workers: inf is not a finite number"):
        Config(workers=float("inf"))  # int() of it overflowed: not a ValueError
    # Where 0 does something else than turn a setting off, the message says what.
    with pytest.raises(ValueError, match=r"^dns-max-ttl: -1 is too small; .* \(0 keeps no answ"):
        Config(dns_max_ttl=-1)
    with pytest.raises(ValueError, match=r"^header-timeout: True is not a number"):
        Config(header_timeout=True)  # float() would take it for 1 second
    # One (host, port) pair, as the socket API writes an address, is one address.
    assert Config(listen=("127.0.0.1", 0)).listen == (("127.0.0.1", 0),)
    assert Config(nameserver=("::1", 5353)).nameserver == (("::1", 5353),)
    assert Config(listen=[("127.0.0.1", 0), "[::1]:0"]).listen == (("127.0.0.1", 0), ("::1", 0))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        # A tuple is checked as the HOST:PORT string it stands for: bind() raised
        # OverflowError at start for these.
        ({"listen": [("127.0.0.1", 70000)]}, "listen: '127.0.0.1:70000': the port must be a "
         "number from 0 to 65535"),
        ({"listen": [("127.0.0.1", -1)]}, "listen: '127.0.0.1:-1': the port must be a number"),
        ({"listen": [("::1", 65536)]}, "listen: '[::1]:65536': the port must be a number"),
        ({"listen": [("127.0.0.1", 80.0)]}, "listen: '127.0.0.1:80.0': the port must be a"),
        ({"listen": [("", 80)]}, "listen: ':80' has no host; write HOST:PORT"),
        ({"listen": [(None, 80)]}, "listen: (None, 80) is not a (host, port) pair"),
        ({"listen": [("127.0.0.1", 80, 0)]}, "listen: ('127.0.0.1', 80, 0) is not a (host, "),
        ({"admin": ("127.0.0.1", 99999)}, "admin: '127.0.0.1:99999': the port must be a"),
        # Bytes that were not UTF-8 in an argument: no settings file could hold them.
        ({"access_log": "/var/log/\udcff"}, "access-log: '/var/log/\\udcff' is not UTF-8"),
        # The resolver sends to a nameserver's address: an IP address and a port not 0.
        ({"nameserver": [("127.0.0.1", 65536)]}, "nameserver: '127.0.0.1:65536': the port "
         "must be a number from 1 to 65535"),
        ({"nameserver": [("127.0.0.1", 0)]}, "nameserver: '127.0.0.1:0': the port must be a "
         "number from 1 to 65535"),
        ({"nameserver": ["127.0.0.1:0"]}, "nameserver: '127.0.0.1:0': the port must be a"),
        ({"nameserver": ["dns.example:53"]}, "nameserver: 'dns.example' is not an IP address; "
         "a nameserver is one, not a name"),
        # No listener: start() bound nothing and serve_forever() waited for ever.
        ({"listen": []}, "listen: no address given; at least one HOST:PORT is needed"),
        ({"listen": ()}, "listen: no address given; at least one HOST:PORT is needed"),
        # The native engine's bounds, and TCP_DEFER_ACCEPT's C int.
        ({"relay_threads": 65}, "relay-threads: 65 is too large; the most is 64"),
        ({"relay_threads": -1}, "relay-threads: -1 is too small; the least is 1 (0 picks one"),
        ({"max_pipes": 2**63}, f"max-pipes: {2**63} is too large; the most is {2**63 - 1}"),
        ({"max_pipes": -1}, "max-pipes: -1 is too small; the least is 1 (0 means what the "),
        ({"defer_accept": 2**31}, "defer-accept: 2147483648 is too large; the most is"),
    ],
)  # fmt: skip
def test_config_refuses_what_start_would(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as caught:
        Config(**settings)
    assert str(caught.value).startswith(message), str(caught.value)


@pytest.mark.parametrize(
    ("listen", "admin", "collide"),
    [
        (["127.0.0.1:3128"], "127.0.0.1:3128", True),
        (["127.0.0.1:3128"], "127.0.0.1:9128", False),
        (["127.0.0.1:3128"], "127.0.0.2:3128", False),
        (["0.0.0.0:3128"], "127.0.0.2:3128", True),
        (["127.0.0.1:3128"], "0.0.0.0:3128", True),
        (["[::1]:3128"], "127.0.0.1:3128", False),
        (["[::]:3128"], "[::1]:3128", True),
        (["[::]:3128"], "127.0.0.1:3128", True),  # dual-stack: it holds IPv4 too
        (["[::]:3128", "127.0.0.5:3128"], "127.0.0.1:3128", False),  # then IPv6-only
        (["127.0.0.1:3128"], "[::]:3128", True),  # the admin endpoint's is dual-stack
        (["localhost:3128"], "localhost:3128", True),
        (["127.0.0.1:0"], "127.0.0.1:0", False),  # each gets a port of its own
        (["127.0.0.1:3128"], "[::ffff:127.0.0.1]:3128", True),  # the same IPv4 address
        (["localhost:3128"], "0.0.0.0:3128", True),  # a name is bound as IPv4
        (["localhost:3128"], "[::]:3128", True),
        (["localhost:3128"], "127.0.0.1:3128", False),  # not known to be the same
        (["[::]:3128", "localhost:3128"], "127.0.0.1:3128", False),  # :: IPv6-only then
    ],
)
def test_the_admin_endpoint_cannot_take_a_listeners_port(
    listen: list[str], admin: str, collide: bool
) -> None:
    """As Linux judges two binds to one port with SO_REUSEADDR: the start would fail."""
    if not collide:
        assert Config(listen=listen, admin=admin).admin is not None
        return
    with pytest.raises(ValueError, match=r"^admin: .* would take the port --listen .* listens"):
        Config(listen=listen, admin=admin)


def test_config_takes_the_values_at_the_bounds() -> None:
    config = Config(
        listen=[("127.0.0.1", 0), ("::1", 65535), ("[::1]", "3128")],
        admin=("127.0.0.1", 0),
        nameserver=[("::1", 53), ("127.0.0.1", 65535), "[::1]", "127.0.0.1:1"],
        relay_threads=MAX_RELAY_THREADS,
        max_pipes=MAX_PIPES,
        defer_accept=MAX_DEFER_ACCEPT,
        pipe_size=MAX_PIPE_SIZE,
    )
    assert config.listen == (("127.0.0.1", 0), ("::1", 65535), ("::1", 3128))
    assert config.admin == ("127.0.0.1", 0)
    assert config.nameserver == (("::1", 53), ("127.0.0.1", 65535), ("::1", 53), ("127.0.0.1", 1))
    assert Config(relay_threads=0, max_pipes=0).relay_threads == 0  # 0: the engine's default


@pytest.mark.skipif(native_engine_error() is not None, reason="the native engine is not built")
def test_the_bounds_config_states_are_the_native_engines() -> None:
    """config.py states the engine's limits without importing it: they must agree."""
    at_bounds = Config(
        engine="native",
        relay_threads=MAX_RELAY_THREADS,
        pipe_size=MAX_PIPE_SIZE,
        max_pipes=MAX_PIPES,
    ).create_engine()
    at_bounds.shutdown(time.monotonic())
    for past in ({"threads": MAX_RELAY_THREADS + 1}, {"pipe_size": MAX_PIPE_SIZE + 1}):
        with pytest.raises(ValueError):
            create_engine("native", RelayTimeouts(), **past)
    with pytest.raises(OverflowError):
        create_engine("native", RelayTimeouts(), max_pipes=MAX_PIPES + 1)


def test_the_defer_accept_bound_is_what_setsockopt_takes() -> None:
    listening_socket(("127.0.0.1", 0), 16, defer_accept=MAX_DEFER_ACCEPT).close()
    with pytest.raises(TypeError):  # Python's setsockopt takes a larger int for a buffer
        listening_socket(("127.0.0.1", 0), 16, defer_accept=MAX_DEFER_ACCEPT + 1)


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:3128") == ("127.0.0.1", 3128)
    assert parse_address("[::1]:0") == ("::1", 0)
    assert parse_address("localhost:80") == ("localhost", 80)
    assert parse_address(("localhost", 80)) == ("localhost", 80)
    assert parse_address(("::1", 0)) == ("::1", 0)
    for bad in ("[::1", ":80", "host:99999", "host:x", ("host", 99999), ("host", -1), ("", 80)):
        with pytest.raises(ValueError):
            parse_address(bad)


# --- without the native engine ------------------------------------------------------------
# pip hides build warnings, so a proxy installed without its engine must say so itself. The
# extension is made missing with SPLICEGATE_PUREPYTHON (as msgpack's MSGPACK_PUREPYTHON), or
# with an import hook that fails the way a broken build does, so these run where it is built.

MISSING = {PUREPYTHON_ENV: "1"}


def test_engine_native_fails_clearly_when_missing() -> None:
    for args in (["--engine", "native", "--version"], ["--engine", "native"]):
        out = run_cli(*args, env=MISSING)
        assert out.returncode == 1
        assert "the native relay engine cannot be loaded: SPLICEGATE_PUREPYTHON is set" in (
            out.stderr
        )
        assert "Traceback" not in out.stderr


def test_version_says_the_fallback_runs_and_why() -> None:
    out = run_cli("--version", env=MISSING)
    assert out.returncode == 0
    assert "engine: python (recv/send copying)" in out.stdout
    assert "native engine unavailable: SPLICEGATE_PUREPYTHON is set" in out.stdout
    assert "unavailable" not in out.stderr  # said once, on stdout, not warned about as well


def test_startup_log_says_the_fallback_runs_and_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PUREPYTHON_ENV, "1")
    proc = ProxyProcess()
    try:
        proc.wait_for_log(r"relay engine: python \(copying\)")
        assert (
            "native relay engine unavailable (SPLICEGATE_PUREPYTHON is set); "
            "running the pure-Python engine" in proc.log()
        )
    finally:
        assert proc.stop() == 0


def test_a_failed_import_is_reported_with_its_reason(tmp_path: Path) -> None:
    """The reason shown is the ImportError's own text, as for a wheel built for another libc."""
    (tmp_path / "sitecustomize.py").write_text(
        "import importlib.abc, sys\n"
        "class NoEngine(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'splicegate._engine':\n"
        "            raise ImportError('_engine.so: cannot open shared object file')\n"
        "sys.meta_path.insert(0, NoEngine())\n"
    )
    path = [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])]
    out = run_cli("--version", env={"PYTHONPATH": os.pathsep.join(path), PUREPYTHON_ENV: ""})
    assert out.returncode == 0, out.stderr
    assert "engine: python" in out.stdout
    assert "native engine unavailable: _engine.so: cannot open shared object file" in out.stdout


def test_log_lines_dropped_while_stderr_is_stuck_are_counted_at_stop() -> None:
    """The hub never waits for stderr: while it is stuck, lines past the queue's 10,000
    are dropped, and the stop says how many, once the rest is written."""
    script = textwrap.dedent(
        """
        import logging, os, sys, threading
        from splicegate.cli import setup_logging
        read_end, write_end = os.pipe()
        sys.stderr = os.fdopen(write_end, "w")  # nobody reads it yet: it fills and blocks
        stop = setup_logging(logging.INFO)
        log = logging.getLogger("splicegate")
        for n in range(12_000):
            log.info("line %d %s", n, "x" * 100)
        chunks = []

        def drain():
            while chunk := os.read(read_end, 65536):
                chunks.append(chunk)

        reader = threading.Thread(target=drain)
        reader.start()
        stop()
        sys.stderr.close()
        reader.join(10)
        text = b"".join(chunks).decode()
        print(text.count(" line "), text.splitlines()[-1])
        """
    )
    done = run_code(script)
    assert done.returncode == 0, done.stderr
    written, last = done.stdout.split(" ", 1)
    dropped = 12_000 - int(written)
    assert dropped > 0  # the pipe (64 KiB) and the queue held the rest
    assert last.strip().endswith(
        f"WARNING {dropped} log lines were dropped while stderr did not keep up"
    )


def test_the_log_stop_gives_up_on_a_stderr_stuck_for_good() -> None:
    """Nobody ever reads stderr: the stop waits a while for the writer, then returns. (The
    script leaves with os._exit: Python's own flush of a stuck stderr at exit would wait.)"""
    script = textwrap.dedent(
        """
        import logging, os, sys, time
        from splicegate import cli
        cli._PatientQueueListener.stop_timeout = 0.5
        read_end, write_end = os.pipe()
        sys.stderr = os.fdopen(write_end, "w")  # never read: stuck for good
        stop = cli.setup_logging(logging.INFO)
        for n in range(2000):  # fills the pipe, far below the queue's 10,000
            logging.getLogger("splicegate").info("line %d %s", n, "x" * 100)
        started = time.monotonic()
        stop()
        print(round(time.monotonic() - started, 1), file=sys.__stdout__, flush=True)
        os._exit(0)
        """
    )
    done = run_code(script)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) < 3.0


KEPT_THEN = {
    # passwd and check-config are no daemon: a signal kept for one does what it would have
    "check-config": "sys.argv[1:] = ['check-config', '/nonexistent.toml']\nm.main()",
    # nor is a usage error (argparse exits), or --help
    "usage error": "sys.argv[1:] = ['--bogus']\nm.main()",
    "help": "sys.argv[1:] = ['--help']\nm.main()",
}


@pytest.mark.parametrize("then", list(KEPT_THEN), ids=list(KEPT_THEN))
def test_a_command_that_is_no_daemon_gets_the_signals_it_kept_raised_again(then: str) -> None:
    """A SIGUSR1 comes as the command starts (sent from within, right after the catch):
    kept for a daemon, it ends any other command as it would have, not silently."""
    code = (
        "import os, signal, sys\n"
        "import splicegate.__main__ as m\n"
        "from splicegate import _early\n"
        "catch = _early.catch\n"
        "def catch_then_signal():\n"
        "    catch()\n"
        "    os.kill(os.getpid(), signal.SIGUSR1)\n"
        "_early.catch = catch_then_signal\n" + KEPT_THEN[then]
    )
    out = run_code(code)
    assert out.returncode == -signal.SIGUSR1, out.stderr


def test_an_applications_own_handlers_survive_cli_main() -> None:
    """cli.main called by an application (no early catch) leaves its SIGHUP handler alone,
    and an ignored SIGHUP (nohup) stays ignored through the catch and its release."""
    code = (
        "import os, signal, sys\n"
        "from splicegate import _early, cli\n"
        "signal.signal(signal.SIGHUP, lambda *_: print('handled', flush=True))\n"
        "cli.main(['--version'])\n"
        "os.kill(os.getpid(), signal.SIGHUP)\n"
        "signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
        "_early.catch()\n"
        "os.kill(os.getpid(), signal.SIGHUP)\n"
        "_early.release()\n"
        "print(signal.getsignal(signal.SIGHUP) is signal.SIG_IGN)\n"
    )
    out = run_code(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-2:] == ["handled", "True"]
