"""Basic proxy authentication: the password file, the check, ``splicegate passwd``, and the
407 flow end to end with raw sockets, curl --proxy-user and requests.

Unit tests use cheap scrypt parameters (N=16) so that they run in milliseconds; the proxy
processes use the defaults, as a user's file would.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
import pytest
import requests
import trustme

from proxyproc import (
    WAIT,
    Origin,
    ProxyProcess,
    connect_head,
    open_tunnel,
    origin,
    read_reply,
    recv_exactly,
    request,
    run_code,
)
from splicegate import auth
from splicegate.config import Config
from splicegate.errors import AuthOverloaded, AuthRequired, render
from splicegate.metrics import cause_label
from splicegate.request import Request, parse_head

CHEAP = auth.Params(16, 1, 1)
LOOPBACK_OK = ("--allow-dest", "127.0.0.0/8", "--allow-port", "any")


def basic(user: str | bytes, password: str | bytes) -> str:
    raw = (user if isinstance(user, bytes) else user.encode()) + b":"
    raw += password if isinstance(password, bytes) else password.encode()
    return "Basic " + base64.b64encode(raw).decode()


def connect(*fields: str) -> Request:
    """A parsed CONNECT with these field lines besides Host."""
    return parse_head("\r\n".join(["CONNECT a.example:443 HTTP/1.1", "Host: a", *fields]).encode())


def with_auth(value: str) -> Request:
    return connect(f"Proxy-Authorization: {value}")


@pytest.fixture
def users(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    auth.set_password(str(path), "alice", "wonderland", CHEAP)
    auth.set_password(str(path), "bob", "builder:with:colons", CHEAP)
    return path


@pytest.fixture
def authenticator(users: Path) -> auth.Authenticator:
    return auth.Authenticator(str(users), realm="test realm")


# --- the file ----------------------------------------------------------------------------------


def test_record_round_trip_and_format() -> None:
    text = auth.hash_password("pw", CHEAP)
    scheme, n, r, p, salt, key = text.split("$")
    assert (scheme, n, r, p) == ("scrypt", "16", "1", "1")
    assert len(base64.b64decode(salt)) == auth.SALT_BYTES
    assert len(base64.b64decode(key)) == auth.KEY_BYTES
    record = auth.parse_record(text)
    assert record.params == CHEAP and record.text == text
    assert auth.hash_password("pw", CHEAP) != text  # a fresh salt each time


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ("md5$abc", "scrypt$N$r$p$salt$hash"),
        ("scrypt$16$1$1$c2FsdA==", "scrypt$N$r$p$salt$hash"),
        ("scrypt$x$1$1$c2FsdA==$" + "A" * 44, "must be numbers"),
        ("scrypt$15$1$1$c2FsdA==$" + "A" * 44, "power of two"),
        ("scrypt$16$0$1$c2FsdA==$" + "A" * 44, "power of two"),
        ("scrypt$1048576$8$1$c2FsdA==$" + "A" * 44, "MiB"),
        ("scrypt$16$1$1$c2FsdA!!$" + "A" * 44, "salt is not base64"),
        ("scrypt$16$1$1$c2FsdA==$AAA", "hash is not base64"),
        ("scrypt$16$1$1$c2FsdA==$AAAA", "shorter than 16 bytes"),
    ],
)
def test_bad_records_are_refused(record: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("$", r"\$")):
        auth.parse_record(record)


def test_file_comments_blank_lines_and_errors_with_line_numbers() -> None:
    good = auth.hash_password("pw", CHEAP)
    users = auth.parse_users(f"# users\n\n  alice:{good}  \n\tbob:{good}\n")
    assert sorted(users) == ["alice", "bob"]
    for text, where in [
        (f"alice:{good}\nalice:{good}\n", "line 2: user 'alice' is listed twice"),
        (f"# x\nalice {good}\n", "line 2: a line is user:scrypt"),
        (f":{good}\n", "line 1: '' is not a user name"),
        ("alice:scrypt$16\n", "line 1: the password must be stored"),
    ]:
        with pytest.raises(ValueError, match=where.replace("$", r"\$")):
            auth.parse_users(text, "users.txt")


def test_every_character_splitlines_splits_at_is_refused_in_a_name() -> None:
    """The file is read line by line: a name holding any of them would end its line."""
    breaks = [chr(c) for c in range(0x110000) if len(f"a{chr(c)}b".splitlines()) > 1]
    assert "\u2028" in breaks and "\x85" in breaks
    for char in breaks:
        with pytest.raises(ValueError, match=f"U\\+{ord(char):04X}"):
            auth.check_user_name(f"al{char}ice")


#: Line breaks (except "\n", which ends a line in the file too) and invisible characters of
#: categories Cc, Cf and Zs.
HIDDEN = ["\r", "\x0b", "\x1e", "\x85", "\u2028", "\u2029", "\xa0", "\u3000", "\u200b"]
HIDDEN += ["\u200e", "\u2066", "\ufeff"]


@pytest.mark.parametrize("char", HIDDEN, ids=lambda c: f"U+{ord(c):04X}")
def test_a_file_with_such_a_name_is_refused_at_its_line(char: str) -> None:
    """Not "line 1: a line is user:scrypt..." for the halves str.splitlines made of it."""
    good = auth.hash_password("pw", CHEAP)
    with pytest.raises(
        ValueError,
        match=rf"users, line 2: 'al.*ice' is not a user name \(it holds U\+{ord(char):04X}",
    ):
        auth.parse_users(f"bob:{good}\nal{char}ice:{good}\ncarol:{good}\n", "users")


def test_names_may_be_any_other_utf8() -> None:
    good = auth.hash_password("pw", CHEAP)
    names = ["ålice", "Zoë", "用户", "a.b-c_d@example", "🦊"]
    assert list(auth.parse_users("".join(f"{n}:{good}\r\n" for n in names))) == names


def test_a_byte_order_mark_first_is_not_part_of_the_first_name(users: Path) -> None:
    """Editors on Windows save UTF-8 with a BOM: alice must still be alice, to the proxy and
    to passwd, which changes her line (no duplicate) and keeps the BOM where it was."""
    users.write_bytes(b"\xef\xbb\xbf" + users.read_bytes())
    authenticator = auth.Authenticator(str(users))
    assert authenticator.users == {"alice", "bob"}
    assert authenticator.check(with_auth(basic("alice", "wonderland"))) == "alice"
    assert auth.set_password(str(users), "alice", "changed", CHEAP) is False
    text = users.read_bytes().decode()
    assert text.startswith("\ufeffalice:") and text.count("alice:") == 1
    assert sorted(auth.read_users(str(users))) == ["alice", "bob"]
    users.write_bytes(b"\xef\xbb\xbf")
    assert auth.set_password(str(users), "carol", "pw", CHEAP) is True
    assert users.read_bytes().decode().startswith("\ufeffcarol:")


def test_config_checks_the_file_and_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text("alice:nothing-hashed\n")
    with pytest.raises(ValueError, match=r"auth-file: .*users, line 1: the password must be"):
        Config(auth_file=str(path))
    with pytest.raises(ValueError, match="auth-file: cannot read"):
        Config(auth_file=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="auth-realm"):
        Config(auth_realm='a "quoted"\n realm')
    assert Config().auth_file == "" and Config().auth_realm == "splicegate"


# --- the check ---------------------------------------------------------------------------------


def test_good_credentials_give_the_user(authenticator: auth.Authenticator) -> None:
    assert authenticator.check(with_auth(basic("alice", "wonderland"))) == "alice"
    # the password may hold colons: only the first one separates it from the user
    assert authenticator.check(with_auth(basic("bob", "builder:with:colons"))) == "bob"
    # the scheme is case-insensitive (RFC 9110 §11.1), extra spaces before the token too
    token = basic("alice", "wonderland").split()[1]
    assert authenticator.check(with_auth(f"bAsIc   {token}")) == "alice"


MALFORMED = {
    "absent": None,
    "empty": "",
    "scheme only": "Basic",
    "scheme and space": "Basic ",
    "bad base64": "Basic !!!notbase64!!!",
    "bad padding": "Basic YWxpY2U6d29uZGVybGFuZA",
    "no colon": "Basic " + base64.b64encode(b"alicewonderland").decode(),
    "empty user": basic("", "wonderland"),
    "not UTF-8": basic(b"\xff\xfe", "wonderland"),
    "control in user": basic("ali\x01ce", "wonderland"),
    "line separator in user": basic("ali\u2028ce", "wonderland"),
    "bearer": "Bearer " + base64.b64encode(b"alice:wonderland").decode(),
    "digest": 'Digest username="alice", realm="test realm", nonce="x", response="y"',
    "token too long": "Basic " + "A" * 8000,
    "two tokens": basic("alice", "wonderland") + " " + basic("alice", "wonderland"),
}


@pytest.mark.parametrize("value", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_credentials_are_407(authenticator: auth.Authenticator, value: str) -> None:
    request = connect() if value is None else with_auth(value)
    with pytest.raises(AuthRequired) as caught:
        authenticator.check(request)
    assert caught.value.status == 407
    response = render(caught.value).decode()
    assert 'Proxy-Authenticate: Basic realm="test realm", charset="UTF-8"\r\n' in response
    assert "Proxy-Status: splicegate\r\n" in response
    # told apart: nothing sent, or something sent that is not a Basic credential
    hint = "send Basic credentials" if value is None else "not one Basic credential"
    assert hint in caught.value.message


def test_two_authorization_fields_are_407(authenticator: auth.Authenticator) -> None:
    good = f"Proxy-Authorization: {basic('alice', 'wonderland')}"
    with pytest.raises(AuthRequired) as caught:
        authenticator.check(connect(good, good))
    assert "not one Basic credential" in caught.value.message


def test_http10_without_fields_is_407(authenticator: auth.Authenticator) -> None:
    request = parse_head(b"CONNECT a.example:443 HTTP/1.0")
    assert request.fields == ()
    with pytest.raises(AuthRequired) as caught:
        authenticator.check(request)
    assert "send Basic credentials" in caught.value.message


def test_wrong_password_and_unknown_user_look_alike(authenticator: auth.Authenticator) -> None:
    answers = []
    for user, password in (("alice", "wrong"), ("mallory", "wonderland"), ("alice", "")):
        with pytest.raises(AuthRequired) as caught:
            authenticator.check(with_auth(basic(user, password)))
        answers.append(render(caught.value))
    assert answers[0] == answers[1] == answers[2]


def test_unknown_user_costs_a_hash_like_a_known_one(
    authenticator: auth.Authenticator, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[auth.Params, int]] = []
    real = auth._scrypt

    def counting(password: bytes, salt: bytes, params: auth.Params, length: int) -> bytes:
        calls.append((params, length))
        return real(password, salt, params, length)

    monkeypatch.setattr(auth, "_scrypt", counting)
    for user in ("alice", "mallory"):
        with pytest.raises(AuthRequired):
            authenticator.check(with_auth(basic(user, "wrong")))
    assert calls == [(CHEAP, auth.KEY_BYTES)] * 2


def test_success_is_cached_as_an_hmac_never_the_password(
    authenticator: auth.Authenticator, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed: list[bytes] = []
    real = auth._scrypt

    def counting(password: bytes, *args: object) -> bytes:
        hashed.append(password)
        return real(password, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(auth, "_scrypt", counting)
    good = with_auth(basic("alice", "wonderland"))
    for _ in range(5):
        assert authenticator.check(good) == "alice"
    assert len(hashed) == 1
    # wrong passwords are never cached: each one costs a hash
    for _ in range(3):
        with pytest.raises(AuthRequired):
            authenticator.check(with_auth(basic("alice", "guess")))
    assert len(hashed) == 4
    (mac, _expires), *_ = authenticator._cache.values()
    assert len(mac) == 32 and b"wonderland" not in mac
    assert b"wonderland" not in repr(authenticator.__dict__).encode()
    # expired: hashed again
    authenticator.cache_seconds = 0
    authenticator._cache.clear()
    authenticator.check(good)
    authenticator.check(good)
    assert len(hashed) == 6


def test_hashing_runs_off_the_hub(users: Path) -> None:
    """While a slow hash runs, other greenlets run: the hub is never blocked by scrypt."""
    path = users.parent / "slow"
    auth.set_password(str(path), "alice", "pw", auth.Params(1 << 15, 8, 1))  # ~0.1-0.3 s
    slow = auth.Authenticator(str(path))
    order: list[str] = []

    def check() -> None:
        slow.check(with_auth(basic("alice", "pw")))
        order.append("hash done")

    def other() -> None:
        order.append("other ran")

    checker = gevent.spawn(check)
    gevent.sleep(0)  # the checker starts and waits on the pool
    gevent.spawn(other).join(WAIT)
    checker.join(WAIT)
    assert order == ["other ran", "hash done"]


def test_a_flooded_hashing_pool_answers_503_not_an_endless_queue(
    authenticator: auth.Authenticator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flood of guesses (each an expensive hash) must not queue requests without end:
    past ``hash_wait`` the request gets a 503 with Retry-After, and the queued job skips
    its hash when its turn comes, so the flood costs nothing more once it has given up."""
    pool = auth._hash_pool()
    release = threading.Event()
    # every thread busy and the one queued slot taken: a new job cannot even be queued
    blockers = [pool.spawn(release.wait, WAIT) for _ in range(pool.maxsize + 1)]
    hashed: list[bytes] = []
    real_scrypt = auth._scrypt

    def counting_scrypt(*args: Any) -> bytes:
        hashed.append(args[0])
        return real_scrypt(*args)

    monkeypatch.setattr(auth, "_scrypt", counting_scrypt)
    monkeypatch.setattr(authenticator, "hash_wait", 0.3)
    try:
        started = time.monotonic()
        with pytest.raises(AuthOverloaded) as refused:
            authenticator.check(with_auth(basic("alice", "guess")))
        assert time.monotonic() - started < 10 * 0.3  # by hash_wait, not by the blockers
        assert (refused.value.status, refused.value.proxy_status_error) == (
            503,
            "proxy_internal_response",
        )
        assert refused.value.headers() == [("Retry-After", "1")]
        assert "overloaded" in str(refused.value)
        # its own cause in splicegate_refusals_total, apart from the connection caps'
        assert cause_label(refused.value) == "auth_overloaded"
    finally:
        release.set()
        gevent.joinall(blockers, timeout=WAIT)
    # the pool is free again: the same user gets in, and the abandoned guess was never hashed
    assert authenticator.check(with_auth(basic("alice", "wonderland"))) == "alice"
    assert hashed == [b"wonderland"]


def test_reload_rereads_only_a_changed_file(
    users: Path, authenticator: auth.Authenticator, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = with_auth(basic("alice", "wonderland"))
    assert authenticator.check(good) == "alice"  # now cached
    assert authenticator.reload() is False  # unchanged: not even read
    auth.set_password(str(users), "alice", "new password", CHEAP)
    auth.set_password(str(users), "carol", "c", CHEAP)
    assert authenticator.reload() is True
    with pytest.raises(AuthRequired):
        authenticator.check(good)  # the cached old password no longer opens anything
    assert authenticator.check(with_auth(basic("alice", "new password"))) == "alice"
    assert authenticator.users == {"alice", "bob", "carol"}
    # a broken file is refused and the users stay as they were
    users.write_text(users.read_text() + "broken line\n")
    with pytest.raises(ValueError, match="line 4"):
        authenticator.reload()
    assert authenticator.check(with_auth(basic("carol", "c"))) == "carol"


def test_configure_keeps_the_authenticator_for_the_same_file(
    users: Path, authenticator: auth.Authenticator
) -> None:
    same, _ = auth.configure(authenticator, str(users), "test realm")
    assert same is authenticator
    other, _ = auth.configure(authenticator, str(users), "another realm")
    assert other is not authenticator and other is not None and other.realm == "another realm"
    assert auth.configure(authenticator, "", "x")[0] is None


def test_a_changed_file_is_read_at_once_and_put_in_force_only_when_applied(
    users: Path, authenticator: auth.Authenticator
) -> None:
    auth.set_password(str(users), "alice", "new password", CHEAP)
    same, apply = auth.configure(authenticator, str(users), "test realm")
    assert same is authenticator
    assert authenticator.check(with_auth(basic("alice", "wonderland"))) == "alice"  # old, yet
    apply()
    with pytest.raises(AuthRequired):
        authenticator.check(with_auth(basic("alice", "wonderland")))
    assert authenticator.check(with_auth(basic("alice", "new password"))) == "alice"


def test_server_configure_rebuilds_auth_from_the_settings(users: Path) -> None:
    """The reload path: ProxyServer._configure with new settings turns auth on, re-reads the
    file, and off again; a broken file raises before anything changes."""
    from splicegate.server import ProxyServer

    server = ProxyServer(Config(listen=["127.0.0.1:0"]))
    assert server.authenticator is None
    server._configure(Config(auth_file=str(users)))
    first = server.authenticator
    assert first is not None and first.users == {"alice", "bob"}
    auth.set_password(str(users), "dave", "d", CHEAP)
    server._configure(Config(auth_file=str(users)))
    assert server.authenticator is first and first.users == {"alice", "bob", "dave"}
    policy = server.policy
    checked = Config(auth_file=str(users), allow_port=["any"])
    users.write_text("not a user line\n")  # broken after Config checked it
    with pytest.raises(ValueError, match="line 1"):
        server._configure(checked)
    assert server.authenticator is first and server.policy is policy
    # A good new file, but the reload fails later (a log path that cannot be opened): the
    # old users stay in force, as does everything else.
    auth.set_password(str(users.with_name("fresh")), "erin", "e", CHEAP)
    users.write_text(users.with_name("fresh").read_text())
    unopenable = str(users.with_name("no such dir") / "access.log")
    with pytest.raises(OSError):
        server._configure(Config(auth_file=str(users), allow_port=["any"], access_log=unopenable))
    assert server.authenticator is first and server.policy is policy
    assert first.users == {"alice", "bob", "dave"}
    server._configure(Config(auth_file=str(users)))  # the same file, now applied
    assert first.users == {"erin"}
    server._configure(Config())
    assert server.authenticator is None
    server.resolver.close()


# --- splicegate passwd -------------------------------------------------------------------------


def passwd(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "splicegate", "passwd", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=WAIT,
    )


def test_passwd_adds_and_changes_users_from_stdin(tmp_path: Path) -> None:
    path = tmp_path / "users"
    out = passwd(str(path), "alice", stdin="first password\n")
    assert out.returncode == 0, out.stderr
    assert f"added user alice in {path}" in out.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text("# the proxy's users\n" + path.read_text())
    assert passwd(str(path), "bob", stdin="bob's\n").returncode == 0
    old_bob = path.read_text().splitlines()[2]
    out = passwd(str(path), "alice", stdin="second password\r\n")
    assert "changed user alice" in out.stderr
    lines = path.read_text().splitlines()
    assert lines[0] == "# the proxy's users" and lines[2] == old_bob and len(lines) == 3
    assert "password" not in path.read_text()
    users = auth.Authenticator(str(path))
    assert users.check(with_auth(basic("alice", "second password"))) == "alice"
    with pytest.raises(AuthRequired):
        users.check(with_auth(basic("alice", "first password")))


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (["alice"], "\n", "the password is empty"),
        (["al:ice"], "pw\n", "is not a user name"),
        (["al ice"], "pw\n", "is not a user name"),
        (["al\u2028ice"], "pw\n", "(it holds U+2028 LINE SEPARATOR)"),
        (["al\x85ice"], "pw\n", "(it holds U+0085)"),
        (["al\xa0ice"], "pw\n", "(it holds U+00A0 NO-BREAK SPACE)"),
        (["al\u200bice"], "pw\n", "(it holds U+200B ZERO WIDTH SPACE)"),
    ],
)
def test_passwd_refuses_clearly(tmp_path: Path, args: list[str], stdin: str, message: str) -> None:
    out = passwd(str(tmp_path / "users"), *args, stdin=stdin)
    assert out.returncode == 1
    assert message in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "users").exists()


def test_passwd_prompts_twice_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = iter(["secret", "secret", "one", "other"])
    monkeypatch.setattr(auth.getpass, "getpass", lambda prompt: next(answers))
    assert auth.read_password(sys.stdin, prompt=True) == "secret"
    with pytest.raises(ValueError, match="differ"):
        auth.read_password(sys.stdin, prompt=True)


def test_passwd_keeps_a_broken_file_untouched(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text("garbage\n")
    out = passwd(str(path), "alice", stdin="pw\n")
    assert out.returncode == 1 and "line 1" in out.stderr
    assert path.read_text() == "garbage\n"


root_only = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="giving a file away needs root"
)


@root_only
def test_passwd_as_root_keeps_the_owner_group_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "users"
    auth.set_password(str(path), "alice", "wonderland", CHEAP)
    os.chown(path, 65534, 65533)
    path.chmod(0o640)
    out = passwd(str(path), "zed", stdin="pw\n")
    assert out.returncode == 0, out.stderr
    st = path.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, 65533, 0o640)
    assert [line.partition(":")[0] for line in path.read_text().splitlines()] == ["alice", "zed"]
    assert [p.name for p in tmp_path.iterdir()] == ["users"]


@root_only
@pytest.mark.parametrize(
    ("owner", "group", "refused"),
    [
        (65534, 65534, False),  # the caller's own file: written as before
        (65533, 65533, True),  # someone else's: the caller cannot give it back
        (65534, 0, True),  # the caller's, in a group the caller is not in
    ],
)
def test_passwd_refuses_a_file_whose_owner_it_cannot_keep(
    owner: int, group: int, refused: bool
) -> None:
    # Not tmp_path: the caller here is uid 65534, which cannot reach pytest's directories.
    directory = Path(tempfile.mkdtemp())
    try:
        directory.chmod(0o777)
        path = directory / "users"
        auth.set_password(str(path), "alice", "wonderland", CHEAP)
        os.chown(path, owner, group)
        path.chmod(0o666)
        before = path.read_text()
        # Imported as root, then run with uid and gid 65534 and no capabilities (which
        # cannot read this interpreter's standard library, here under /root).
        code = (
            "import locale, os, sys\n"
            "from splicegate import auth\n"
            "os.setgroups([]); os.setegid(65534); os.seteuid(65534)\n"
            "sys.exit(auth.passwd_main(sys.argv[1:]))\n"
        )
        out = run_code(code, str(path), "zed", stdin="pw\n")
        st = path.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (owner, group, 0o666)
        assert [p.name for p in directory.iterdir()] == ["users"]
        if refused:
            assert out.returncode == 1 and "Traceback" not in out.stderr
            assert f"belongs to uid {owner}, gid {group}" in out.stderr
            assert "left unchanged" in out.stderr
            assert path.read_text() == before
        else:
            assert out.returncode == 0, out.stderr
            assert "added user zed" in out.stderr
    finally:
        shutil.rmtree(directory)


def test_passwd_writes_through_a_symlink_to_its_target(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "links").mkdir()
    target = tmp_path / "etc" / "users2"
    auth.set_password(str(target), "alice", "wonderland", CHEAP)
    target.chmod(0o640)
    link = tmp_path / "links" / "userslink"
    link.symlink_to("../etc/users2")
    out = passwd(str(link), "zed2", stdin="pw\n")
    assert out.returncode == 0, out.stderr
    assert f"added user zed2 in {link}" in out.stderr
    assert link.is_symlink() and os.readlink(link) == "../etc/users2"
    assert [line.partition(":")[0] for line in target.read_text().splitlines()] == [
        "alice",
        "zed2",
    ]
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    # The temporary file went beside the target, and nothing is left of it.
    assert [p.name for p in (tmp_path / "etc").iterdir()] == ["users2"]
    assert [p.name for p in (tmp_path / "links").iterdir()] == ["userslink"]
    # A link to a file not there yet creates the file, as a new file: the owner's alone.
    dangling = tmp_path / "links" / "newlink"
    dangling.symlink_to("../etc/new")
    assert passwd(str(dangling), "bob", stdin="pw\n").returncode == 0
    assert dangling.is_symlink()
    assert (tmp_path / "etc" / "new").read_text().startswith("bob:scrypt$")
    assert stat.S_IMODE((tmp_path / "etc" / "new").stat().st_mode) == 0o600


# --- end to end: the 407 flow ------------------------------------------------------------------

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def user_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "users"
    auth.set_password(str(path), "alice", PASSWORD)  # the default parameters
    return path


@pytest.fixture(scope="module")
def proxy(user_file: Path) -> Iterator[ProxyProcess]:
    proc = ProxyProcess(*LOOPBACK_OK, "--auth-file", str(user_file), "--auth-realm",
                        "splicegate test", "--log-level", "debug")  # fmt: skip
    yield proc
    assert proc.stop() == 0


def assert_407(reply) -> None:
    assert reply.status == 407, (reply.status, reply.body)
    assert reply.reason == "Proxy Authentication Required"
    assert reply.fields["proxy-authenticate"] == 'Basic realm="splicegate test", charset="UTF-8"'
    assert reply.fields["proxy-status"] == "splicegate"
    assert reply.fields["connection"] == "close"


def test_407_without_credentials_then_close(proxy: ProxyProcess) -> None:
    assert_407(request(proxy.address, connect_head("127.0.0.1:9")))  # request() checks close


def test_the_client_check_comes_before_auth_and_auth_before_the_port(user_file: Path) -> None:
    """DESIGN.md's order: client allowed, then authentication, then the port. A client
    that may not use the proxy hears 403, not an invitation to log in; a port check
    answers only someone who has logged in, so ports do not leak to strangers."""
    proc = ProxyProcess(
        "--allow-dest",
        "127.0.0.0/8",
        "--auth-file",
        str(user_file),
        "--auth-realm",
        "splicegate test",
        "--allow-client",
        "127.0.0.2/32",
    )  # fmt: skip  (the default ports: 443 only)
    try:
        refused = request(proc.address, connect_head("127.0.0.1:80"))
        assert refused.status == 403 and "proxy-authenticate" not in refused.fields
        assert "client 127.0.0.1 may not use this proxy" in refused.body.decode()
        with socket.socket() as other:  # an allowed client, without credentials
            other.settimeout(WAIT)
            other.bind(("127.0.0.2", 0))
            other.connect(proc.address)
            other.sendall(connect_head("127.0.0.1:80"))
            assert_407(read_reply(other))
        with socket.socket() as other:  # the same, logged in: now the port counts
            other.settimeout(WAIT)
            other.bind(("127.0.0.2", 0))
            other.connect(proc.address)
            extra = f"Proxy-Authorization: {basic('alice', PASSWORD)}\r\n"
            other.sendall(connect_head("127.0.0.1:80", extra=extra))
            reply = read_reply(other)
            assert reply.status == 403 and "port 80 is not allowed" in reply.body.decode()
    finally:
        assert proc.stop() == 0


def test_http10_without_any_field_is_407(proxy: ProxyProcess) -> None:
    assert_407(request(proxy.address, b"CONNECT 127.0.0.1:9 HTTP/1.0\r\n\r\n"))


@pytest.mark.parametrize(
    "value", [v for v in MALFORMED.values() if v is not None], ids=list(MALFORMED)[1:]
)
def test_malformed_credentials_are_407_on_the_wire(proxy: ProxyProcess, value: str) -> None:
    head = connect_head("127.0.0.1:9", extra=f"Proxy-Authorization: {value}\r\n")
    assert_407(request(proxy.address, head))


@pytest.mark.parametrize(("user", "password"), [("alice", "wrong"), ("mallory", PASSWORD)])
def test_wrong_password_and_unknown_user_on_the_wire(
    proxy: ProxyProcess, user: str, password: str
) -> None:
    extra = f"Proxy-Authorization: {basic(user, password)}\r\n"
    assert_407(request(proxy.address, connect_head("127.0.0.1:9", extra=extra)))


def test_every_connect_is_checked_and_nothing_leaks_into_the_log(proxy: ProxyProcess) -> None:
    good = f"Proxy-Authorization: {basic('alice', PASSWORD)}\r\n"
    with origin() as server:
        target = f"127.0.0.1:{server.port}"
        for _ in range(3):  # the cache answers the second and third
            with socket.create_connection(proxy.address, timeout=WAIT) as sock:
                sock.sendall(connect_head(target, extra=good) + b"early")
                assert recv_exactly(sock, 39) == b"HTTP/1.1 200 Connection established\r\n\r\n"
                assert recv_exactly(sock, 5) == b"early"
            # the same client right after, without credentials: no trust by address
            assert_407(request(proxy.address, connect_head(target)))
            assert_407(request(proxy.address, f"CONNECT {target} HTTP/1.0\r\n\r\n".encode()))
    proxy.wait_for_log(r"tunnel 127\.0\.0\.1:\d+ user alice -> 127\.0\.0\.1:\d+ .* closed")
    text = proxy.log()
    assert "refused 127.0.0.1" in text and ": 407 " in text
    for secret in (PASSWORD, basic("alice", PASSWORD).split()[1], basic("alice", "wrong")):
        assert secret not in text
    assert "mallory" not in text  # names of failed attempts stay out of the log too


# --- real clients: curl --proxy-user and requests ----------------------------------------------

BODY = b"hello, authenticated\n"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_origin(ca: trustme.CA) -> Iterator[Origin]:
    def serve(conn: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 65536:
            chunk = conn.recv(4096)
            if not chunk:
                return
            head += chunk
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                     % (len(BODY), BODY))  # fmt: skip

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    with origin(serve, tls=context) as server:
        yield server


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def curl(proxy: ProxyProcess, ca_file: Path, port: int, *extra: str):
    return subprocess.run(
        ["curl", "-sS", "--max-time", "10", "-p", "-x", f"http://127.0.0.1:{proxy.address[1]}",
         "--cacert", str(ca_file), *extra, f"https://localhost:{port}/"],
        capture_output=True, timeout=WAIT,
    )  # fmt: skip


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_proxy_user(proxy: ProxyProcess, tls_origin: Origin, ca_file: Path) -> None:
    out = curl(proxy, ca_file, tls_origin.port, "--proxy-user", f"alice:{PASSWORD}")
    assert out.returncode == 0, out.stderr
    assert out.stdout == BODY
    out = curl(proxy, ca_file, tls_origin.port, "--proxy-user", "alice:wrong")
    assert out.returncode != 0
    assert b"407" in out.stderr
    out = curl(proxy, ca_file, tls_origin.port)
    assert out.returncode != 0 and b"407" in out.stderr


def test_requests_with_proxy_credentials(
    proxy: ProxyProcess, tls_origin: Origin, ca_file: Path
) -> None:
    def get(userinfo: str) -> requests.Response:
        url = f"http://{userinfo}127.0.0.1:{proxy.address[1]}"
        return requests.get(f"https://localhost:{tls_origin.port}/", timeout=10,
                            proxies={"https": url}, verify=str(ca_file))  # fmt: skip

    quoted = PASSWORD.replace(" ", "%20")
    assert get(f"alice:{quoted}@").content == BODY
    for userinfo in ("alice:wrong@", "", "nobody:x@"):
        with pytest.raises(requests.exceptions.ProxyError, match="407"):
            get(userinfo)


def test_auth_file_missing_is_a_clean_error(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "splicegate", "--auth-file", str(tmp_path / "none")],
        capture_output=True, text=True, timeout=WAIT,
    )  # fmt: skip
    assert out.returncode == 2
    assert "--auth-file: cannot read" in out.stderr and "Traceback" not in out.stderr


def test_default_params_verify(tmp_path: Path) -> None:
    """The default cost: a record made by hash_password verifies (16 MiB within maxmem)."""
    path = tmp_path / "u"
    path.write_text(f"eve:{auth.hash_password('x')}\n")
    assert auth.Authenticator(str(path)).check(with_auth(basic("eve", "x"))) == "eve"
    assert os.path.getsize(path) < 200


def test_sighup_rereads_the_password_file(tmp_path: Path) -> None:
    """A changed password and a new user take effect on SIGHUP, without a restart; a file
    broken meanwhile is refused by the reload and the users stay as they were."""
    path = tmp_path / "users"
    auth.set_password(str(path), "alice", "old", CHEAP)
    proc = ProxyProcess(*LOOPBACK_OK, "--auth-file", str(path))

    def status(user: str, password: str) -> int:
        extra = f"Proxy-Authorization: {basic(user, password)}\r\n"
        sock, reply = open_tunnel(proc.address, f"127.0.0.1:{server.port}", extra=extra)
        sock.close()
        return reply.status

    try:
        with origin() as server:
            assert status("alice", "old") == 200
            auth.set_password(str(path), "alice", "new", CHEAP)
            auth.set_password(str(path), "carol", "c", CHEAP)
            proc.proc.send_signal(signal.SIGHUP)
            proc.wait_for_log(r"INFO reloaded")
            assert status("alice", "old") == 407  # its cache entry no longer matches
            assert status("alice", "new") == 200 and status("carol", "c") == 200
            path.write_text(path.read_text() + "broken\n")
            proc.proc.send_signal(signal.SIGHUP)
            proc.wait_for_log(r"reload refused, the running settings stay: .*line 3")
            assert status("carol", "c") == 200
    finally:
        assert proc.stop() == 0
