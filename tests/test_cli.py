"""The command line: flags from the settings table, clean errors, --help and --version."""

from __future__ import annotations

import subprocess
import sys

import pytest

from proxyproc import WAIT, ProxyProcess
from splicegate.config import Config, cli_fields, parse_address
from splicegate.relay import native_engine_error


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "splicegate", *args], capture_output=True, text=True, timeout=WAIT
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
        (["--header-timeout", "soon"], "header-timeout: 'soon' is not a float"),
        (["--connect-timeout", "0"], "connect-timeout: '0' is too small"),
        (["--engine", "turbo"], "engine: 'turbo' is not one of auto, native, python"),
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


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:3128") == ("127.0.0.1", 3128)
    assert parse_address("[::1]:0") == ("::1", 0)
    assert parse_address("localhost:80") == ("localhost", 80)
    for bad in ("[::1", ":80", "host:99999", "host:x"):
        with pytest.raises(ValueError):
            parse_address(bad)


@pytest.mark.skipif(native_engine_error() is None, reason="the native engine is built here")
def test_engine_native_fails_clearly_when_missing() -> None:
    for args in (["--engine", "native", "--version"], ["--engine", "native"]):
        out = run_cli(*args)
        assert out.returncode == 1
        assert "the native relay engine cannot be loaded" in out.stderr
        assert "Traceback" not in out.stderr
