"""``--config FILE`` and ``splicegate check-config``: keys from the settings table, flags
over the file, and refusals that name the file, the key, the value and what is allowed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from proxyproc import WAIT, ProxyProcess, free_port
from splicegate.config import Config, cli_fields
from splicegate.configfile import ConfigError, check_files, load, render, restart_only_changes


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "splicegate", *args], capture_output=True, text=True, timeout=WAIT
    )


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "splicegate.toml"
    path.write_text(text)
    return str(path)


def test_file_values_and_flags_over_them(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'listen = ["127.0.0.1:3129", "[::1]:3129"]\n'
        'allow_port = ["443", "8000-8100"]\n'
        "connect_timeout = 3\n"
        'log_format = "json"\n'
        'admin = "127.0.0.1:9100"\n'
        "header_timeout = 2.5\n",
    )
    config = load(path)
    assert config.listen == (("127.0.0.1", 3129), ("::1", 3129))
    assert [str(p) for p in config.allow_port] == ["443", "8000-8100"]
    assert config.connect_timeout == 3.0 and config.header_timeout == 2.5
    assert config.log_format == "json" and config.admin == ("127.0.0.1", 9100)
    # A flag replaces the file's value; a repeatable one its whole list.
    config = load(path, {"allow_port": ["any"], "connect_timeout": "7", "listen": None})
    assert [str(p) for p in config.allow_port] == ["any"]
    assert config.connect_timeout == 7.0
    assert config.listen == (("127.0.0.1", 3129), ("::1", 3129))  # None: not given


def test_one_value_for_a_repeatable_key_is_a_list_of_one(tmp_path: Path) -> None:
    assert [str(p) for p in load(write(tmp_path, 'allow_port = "8443"\n')).allow_port] == ["8443"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            'allow-port = ["443"]\n',
            "unknown key 'allow-port' (did you mean allow_port?); the keys are the flags' "
            "names with _ for -: listen, ",
        ),
        ("colour = 1\n", "unknown key 'colour'; the keys are"),
        (
            'allow_port = ["http"]\n',
            "allow_port = [\"http\"]: 'http' is not a port, a range like 8000-8100, or 'any'",
        ),
        ("connect_timeout = 0\n", "connect_timeout = 0: 0 is too small; the least is 0.001"),
        ('engine = "turbo"\n', "engine = \"turbo\": 'turbo' is not one of auto, native, python"),
        ("idle_timeout = true\n", "idle_timeout = true: true/false is not allowed; expected S"),
        ('engine = ["auto"]\n', 'engine = ["auto"]: takes one value (auto|native|python), not'),
        ('listen = "localhost"\n', "'localhost' has no port; write HOST:PORT"),
        ('log_format = "xml"\n', "'xml' is not one of text, json"),
        ("workers = 0\n", "workers = 0: 0 is too small; the least is 1"),
        ("workers = 2.5\n", "workers = 2.5: 2.5 is not a whole number"),
        ("max_connections = 1.9\n", "max_connections = 1.9: 1.9 is not a whole number"),
        ("workers = 2.0\n", "workers = 2.0: 2.0 is not a whole number"),
        ("max_connections = 1e3\n", "max_connections = 1000.0: 1000.0 is not a whole number"),
        ("dns_min_ttl = 10\ndns_max_ttl = 5\n", "dns-min-ttl: 10 is above --dns-max-ttl 5"),
        (
            'workers = 2\nlisten = ["127.0.0.1:0"]\n',
            "workers: 2 processes share each listener's port, so it must be fixed; port 0",
        ),
        ("listen = [\n", "not valid TOML"),
        ("header_timeout = nan\n", "header_timeout = nan: nan is not a finite number; allowed: "),
        ("dns_timeout = -inf\n", "dns_timeout = -inf: -inf is not a finite number; allowed: "),
        # inf is not how to say "no limit": where there is one, the message says what is.
        ("max_lifetime = inf\n", "inf is not a finite number; allowed: 0.001 or more (0 turns"),
        ("max_connections = inf\n", "max_connections = inf: inf is not a finite number; "),
        ("max_connections = 1e400\n", "inf is not a finite number; allowed: 1 or more"),
        ("pipe_size = nan\n", "nan is not a finite number; allowed: from 4096 to 67108864"),
        # what start() refused, or waited for ever on (no listener), is refused as a setting
        ("listen = []\n", "listen: no address given; at least one HOST:PORT is needed"),
        ("relay_threads = 100\n", "relay_threads = 100: 100 is too large; the most is 64"),
        (f"max_pipes = {2**63}\n", f"max_pipes = {2**63}: {2**63} is too large; the most is"),
        ("defer_accept = 2147483648\n", "2147483648 is too large; the most is 2147483647"),
        (
            'nameserver = ["127.0.0.1:0"]\n',
            "nameserver = [\"127.0.0.1:0\"]: '127.0.0.1:0': the port must be a number from 1 ",
        ),
        ('nameserver = ["dns.example"]\n', "'dns.example' is not an IP address; a nameserver"),
    ],
)
def test_bad_files_are_refused_with_key_value_and_what_is_allowed(
    tmp_path: Path, text: str, message: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert message in str(caught.value)


def test_a_bad_flag_is_named_as_a_flag(tmp_path: Path) -> None:
    path = write(tmp_path, "connect_timeout = 3\n")
    with pytest.raises(ConfigError, match=r"^--connect-timeout: 'x' is not a number"):
        load(path, {"connect_timeout": "x"})


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read the config file .*No such file"):
        load(str(tmp_path / "absent.toml"))


NUMERIC = [f.name for f in cli_fields() if f.metadata["metavar"] in ("S", "N", "BYTES")]


@pytest.mark.parametrize("key", NUMERIC)
@pytest.mark.parametrize("written", ["nan", "inf", "-inf", "1e400", "'nan'", "'inf'"])
def test_no_numeric_key_takes_a_non_finite_value(tmp_path: Path, key: str, written: str) -> None:
    """A NaN or infinite limit is one that never fires (a timeout that waits for ever), and
    an infinite count overflowed int(): each key refuses them, as a value or a string."""
    path = write(tmp_path, f"{key} = {written}\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(path)}: {key} = .* is not a finite "):
        load(path)
    with pytest.raises(ConfigError, match=rf"^--{key.replace('_', '-')}: .* is not a finite "):
        load(None, {key: written.strip("'")})


def test_a_file_not_in_utf8_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'auth_realm = "caf\xe9"\n')
    with pytest.raises(ConfigError) as caught:
        load(str(path))
    assert str(caught.value) == (
        f"{path}: not valid TOML: a TOML file is UTF-8, and byte 0xe9 at offset 17 is not "
        "(invalid continuation byte)"
    )


def test_render_loads_back_to_the_same_settings(tmp_path: Path) -> None:
    config = Config(
        listen=["[::1]:3128", "127.0.0.1:3129"],
        allow_port=["443", "8000-8100"],
        allow_dest=["10.1.0.0/16"],
        nameserver=["127.0.0.1:5353"],
        admin="127.0.0.1:9100",
        access_log="/var/log/splicegate.log",
        idle_timeout=12.5,
    )
    text = render(config)
    for f in cli_fields():
        assert f"\n{f.name} = " in "\n" + text  # every key, written once
    assert load(write(tmp_path, text)) == config
    assert load(write(tmp_path, render(Config()))) == Config()


@pytest.mark.parametrize(
    "text", ["a \U0001f600 b", "del \x7f", 'quote " back \\', "tab\t nl\n sep\u2028", "é"]
)
def test_render_writes_any_text_toml_can_hold(tmp_path: Path, text: str) -> None:
    """Characters past U+FFFF once went in as JSON's surrogate pairs, DEL raw: TOML
    refuses both, and under --workers no worker could start."""
    config = Config(access_log=f"/var/log/{text}")
    assert load(write(tmp_path, render(config))) == config


def test_render_refuses_text_that_is_not_utf8_naming_the_key() -> None:
    """A value that was not UTF-8 (a $TMPDIR in other bytes, for a supervisor's copy of a
    password file) arrives with lone surrogates: no TOML can hold it. Config refuses such
    settings itself."""
    with pytest.raises(ConfigError, match=r"^auth_file: '/tmp/\\udcff/users' is not UTF-8"):
        render(Config(), {"auth_file": "/tmp/\udcff/users"})


def test_restart_only_changes() -> None:
    old = Config(listen=["127.0.0.1:3128"])
    new = Config(listen=["127.0.0.1:3129"], allow_port=["any"], workers=2, engine="python")
    assert restart_only_changes(old, new) == ["listen", "engine", "workers"]


def test_check_config_prints_the_effective_settings(tmp_path: Path) -> None:
    path = write(tmp_path, 'allow_port = ["8443"]\nlog_format = "json"\n')
    out = run_cli("check-config", path, "--connect-timeout", "4")
    assert out.returncode == 0, out.stderr
    assert 'allow_port = ["8443"]\n' in out.stdout
    assert 'log_format = "json"\n' in out.stdout
    assert "connect_timeout = 4.0\n" in out.stdout
    assert 'listen = ["127.0.0.1:3128"]\n' in out.stdout  # the defaults too


def test_check_config_refuses_a_bad_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'allow_port = ["443", "smtp"]\n')
    out = run_cli("check-config", path)
    assert out.returncode == 2
    assert f'{path}: allow_port = ["443", "smtp"]: \'smtp\' is not a port' in out.stderr
    assert out.stdout == "" and "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"header_timeout = nan\n", "header_timeout = nan: nan is not a finite number"),
        (b"max_connections = 1e400\n", "max_connections = inf: inf is not a finite number"),
        (b"\xff\xfe", "not valid TOML: a TOML file is UTF-8, and byte 0xff at offset 0"),
        (b"x = " + b"[" * 100_000, "not valid TOML: nested too deeply"),
        # Deep enough for the message's own rendering of the value to have recursed.
        (b"allow_port = " + b"[" * 400 + b"]" * 400, "allow_port = [[\u2026]]: a nested list"),
    ],
)
def test_check_config_and_the_daemon_refuse_what_once_was_a_traceback(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "splicegate.toml"
    path.write_bytes(content)
    for args in (["check-config", str(path)], ["--config", str(path)]):
        out = run_cli(*args)
        assert out.returncode == 2, out.stderr
        assert f"{path}: {message}" in out.stderr
        assert out.stdout == "" and "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("content", "flags", "message"),
    [
        ("listen = []\n", [], "listen: no address given; at least one HOST:PORT is needed"),
        ("", ["--relay-threads", "100"], "--relay-threads: '100' is too large; the most is 64"),
        ("relay_threads = 100\n", [], "relay_threads = 100: 100 is too large; the most is 64"),
    ],
)
def test_check_config_refuses_what_start_would(
    tmp_path: Path, content: str, flags: list[str], message: str
) -> None:
    """Once check-config's "all valid", then a ValueError from the engine at start (or, with
    no listener, a daemon serving no one); now exit 2 with the reason from both."""
    path = write(tmp_path, content)
    for args in (["check-config", path, *flags], ["--config", path, *flags]):
        out = run_cli(*args)
        assert out.returncode == 2, out.stderr
        assert message in out.stderr
        assert out.stdout == "" and "Traceback" not in out.stderr


def test_check_config_refuses_an_access_log_the_daemon_could_not_open(tmp_path: Path) -> None:
    """Once "all valid" for an access log in a directory that is not there, on which the
    daemon then would not start."""
    missing = tmp_path / "missing" / "file"
    path = write(tmp_path, f'access_log = "{missing}"\n')
    out = run_cli("check-config", path)
    assert out.returncode == 2, out.stderr
    assert str(missing) in out.stderr and "No such file or directory" in out.stderr
    assert out.stdout == "" and "Traceback" not in out.stderr
    daemon = run_cli("--config", path, "--listen", f"127.0.0.1:{free_port()}")
    assert daemon.returncode != 0 and str(missing) in daemon.stderr


def test_check_config_creates_no_access_log(tmp_path: Path) -> None:
    """Run as root for a daemon that runs as its own user, a check that created the file
    would leave one the daemon cannot open: a missing file is judged by its directory."""
    log = tmp_path / "access.log"
    out = run_cli("check-config", write(tmp_path, f'access_log = "{log}"\n'))
    assert out.returncode == 0, out.stderr
    assert not log.exists()


def test_check_config_does_not_hang_on_a_fifo_with_no_reader(tmp_path: Path) -> None:
    """Opening it for writing would wait for a reader: the daemon would hang at start."""
    fifo = tmp_path / "access.fifo"
    os.mkfifo(fifo)
    out = run_cli("check-config", write(tmp_path, f'access_log = "{fifo}"\n'))
    assert out.returncode == 2
    assert f"cannot open the access log {fifo}: No such device or address" in out.stderr


@pytest.mark.parametrize("what", ["config", "auth-file"])
def test_a_fifo_for_a_settings_file_is_refused_not_waited_on(tmp_path: Path, what: str) -> None:
    """Reading one waits for a writer: a supervisor's whole loop stood still on a reload."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    if what == "config":
        out = run_cli("check-config", str(fifo))
    else:
        out = run_cli("check-config", write(tmp_path, ""), "--auth-file", str(fifo))
    assert out.returncode == 2 and "not a regular file" in out.stderr, out.stderr


def test_a_reload_judges_an_access_log_whose_format_changed(tmp_path: Path) -> None:
    """The workers reopen their log for a new format as for a new path (reuse_or_open): a
    supervisor that judged only the path let each worker refuse the reload on its own."""
    missing = str(tmp_path / "moved-away" / "access.log")
    running = Config(access_log=missing)
    check_files(Config(access_log=missing), running)  # the same log: theirs is open
    with pytest.raises(ConfigError, match=r"^cannot open the access log"):
        check_files(Config(access_log=missing, log_format="json"), running)


def test_daemon_refuses_a_bad_file_at_start(tmp_path: Path) -> None:
    out = run_cli("--config", write(tmp_path, "bogus = 1\n"))
    assert out.returncode == 2
    assert "unknown key 'bogus'" in out.stderr and "Traceback" not in out.stderr


def test_workers_need_a_fixed_port_on_the_command_line() -> None:
    out = run_cli("--workers", "2", "--listen", "127.0.0.1:0")
    assert out.returncode == 2
    assert "port 0 in --listen 127.0.0.1:0 would give each its own" in out.stderr


def test_daemon_runs_from_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'allow_port = ["8443"]\n')
    proc = ProxyProcess("--config", path)
    try:
        assert proc.address[1] > 0  # --listen given as a flag beats the file's default
    finally:
        assert proc.stop() == 0


def test_reload_refuses_a_non_finite_value_or_a_file_not_in_utf8(tmp_path: Path) -> None:
    """SIGHUP reads the file as start does: each bad one is refused naming the file and the
    key, and the proxy runs on with its settings (an int() overflow once stopped it)."""
    path = write(tmp_path, "header_timeout = 2\n")
    proc = ProxyProcess("--config", path)
    try:
        bad = [
            (b"max_connections = inf\n", "max_connections = inf: inf is not a finite number"),
            (b"header_timeout = nan\n", "header_timeout = nan: nan is not a finite number"),
            (b"\xff\xfe", "not valid TOML: a TOML file is UTF-8, and byte 0xff at offset 0"),
            (b"x = " + b"[" * 100_000, "not valid TOML: nested too deeply"),
        ]
        for count, (content, message) in enumerate(bad, 1):
            Path(path).write_bytes(content)
            proc.proc.send_signal(signal.SIGHUP)
            proc.wait_for_log(
                rf"reload refused, the running settings stay: {re.escape(f'{path}: {message}')}"
            )
            assert proc.log().count("reload refused") == count
        Path(path).write_text("header_timeout = 3\n")
        proc.proc.send_signal(signal.SIGHUP)
        proc.wait_for_log("reloaded " + re.escape(path))
        assert "Traceback" not in proc.log()
    finally:
        assert proc.stop() == 0


def test_the_contrib_example_is_valid(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parent.parent / "contrib" / "splicegate.toml"
    # Its access log's directory is the package's to make, and not on this machine.
    out = run_cli("check-config", str(example), "--access-log", str(tmp_path / "access.log"))
    assert out.returncode == 0, out.stderr
    assert "workers = 2\n" in out.stdout and 'log_format = "json"\n' in out.stdout
