"""Basic proxy authentication (RFC 7617, RFC 9110 §11.7): the password file, the check on
every CONNECT, and the ``splicegate passwd`` command that writes the file.

The file (``--auth-file``) holds one user per line, ``#`` comments and blank lines aside::

    alice:scrypt$16384$8$1$<salt>$<hash>

``scrypt$N$r$p$salt$hash``: the scrypt cost (N, a power of two), block size (r) and
parallelism (p), then the salt and the derived key in standard base64 with padding. The user
name is UTF-8 without ``:``, spaces, line breaks (U+2028 and U+0085 too), control or other
invisible characters (see ``_NOT_IN_NAMES``). ``splicegate passwd FILE USER`` adds or changes
a line; nothing else needs to write the file, and it never holds a password.

Why it is built this way:

- scrypt is slow on purpose (tens of milliseconds and 16 MiB per check at the defaults), so
  it runs in a small thread pool of its own, never in the hub, and never in the hub's
  thread pool either, where it would starve name resolution.
- A success is remembered for :attr:`Authenticator.cache_seconds` as an HMAC of user,
  password and stored record under a key that lives only in this process: the cache never
  holds a password, an entry for a changed record cannot match, and the rate with auth on
  stays near the rate with it off. A wrong password is never cached, so each guess costs a
  full hash.
- An unknown user is hashed against a dummy record with the file's usual parameters, so the
  time taken does not tell whether a name exists; every comparison is constant-time.
- Whatever the client sends, missing, malformed or wrong, the answer is the same 407, never
  a 400 or a crash, and nothing of the credentials is logged: the log gets the user name of
  a successful check only (a password typed into the user field stays out of the log).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import collections
import contextlib
import getpass
import hashlib
import hmac
import logging
import os
import re
import stat
import string
import sys
import tempfile
import threading
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

from splicegate.errors import AuthOverloaded, AuthRequired
from splicegate.files import read_regular
from splicegate.request import Request

if TYPE_CHECKING:  # gevent is imported where used: `splicegate passwd` runs without it
    from gevent.threadpool import ThreadPool

log = logging.getLogger("splicegate")

#: Parameters for new passwords: N=2^14, r=8, p=1 (16 MiB, tens of ms); RFC 7914's
#: interactive-login example and what Python's ``hashlib.scrypt`` memory default allows.
SCRYPT_N = 1 << 14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
KEY_BYTES = 32
#: Largest memory one stored record may ask scrypt for (128 * N * r bytes): a file that
#: asks for more is refused when it is read, not when a client makes the proxy hash.
MAX_SCRYPT_MEMORY = 256 * 1024 * 1024

_SCHEME = "scrypt"
#: Unicode categories no user name may hold: controls (C0 and C1), format characters (zero
#: width space, BOM, bidi marks), surrogates (undecodable bytes in argv), and every space and
#: line or paragraph separator. They cannot be told apart from their neighbours on screen,
#: and the line breaks among them would split the name's line in two when the file is read.
_NOT_IN_NAMES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp", "Zs"})
_B64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")


@dataclass(frozen=True, slots=True)
class Params:
    """scrypt's cost parameters."""

    n: int
    r: int
    p: int

    @property
    def memory(self) -> int:
        return 128 * self.n * self.r


DEFAULT_PARAMS = Params(SCRYPT_N, SCRYPT_R, SCRYPT_P)


@dataclass(frozen=True, slots=True)
class Record:
    """One user's stored verifier: never the password, only what scrypt made of it."""

    params: Params
    salt: bytes
    key: bytes
    text: str  # the record as written in the file, part of the cache's HMAC


def _scrypt(password: bytes, salt: bytes, params: Params, length: int) -> bytes:
    return hashlib.scrypt(
        password,
        salt=salt,
        n=params.n,
        r=params.r,
        p=params.p,
        maxmem=params.memory * 2 + (1 << 20),  # OpenSSL wants a little over 128*N*r
        dklen=length,
    )


def _scrypt_by(deadline: float, password: bytes, target: Record, length: int) -> bytes | None:
    """The hash, unless the request has given up waiting for it by now."""
    if time.monotonic() > deadline:
        return None
    return _scrypt(password, target.salt, target.params, length)


def hash_password(password: str, params: Params = DEFAULT_PARAMS) -> str:
    """A new record for ``password``: ``scrypt$N$r$p$salt$hash`` with a fresh salt."""
    salt = os.urandom(SALT_BYTES)
    key = _scrypt(password.encode("utf-8"), salt, params, KEY_BYTES)
    b64 = base64.b64encode
    return f"{_SCHEME}${params.n}${params.r}${params.p}${b64(salt).decode()}${b64(key).decode()}"


def parse_record(text: str) -> Record:
    """Read ``scrypt$N$r$p$salt$hash``; ValueError says what is wrong with it."""
    parts = text.split("$")
    if len(parts) != 6 or parts[0] != _SCHEME:
        raise ValueError("the password must be stored as scrypt$N$r$p$salt$hash")
    try:
        n, r, p = (int(x) for x in parts[1:4])
    except ValueError:
        raise ValueError("scrypt's N, r and p must be numbers") from None
    if n < 2 or n & (n - 1) or r < 1 or p < 1:
        raise ValueError("scrypt's N must be a power of two above 1, r and p at least 1")
    params = Params(n, r, p)
    if params.memory > MAX_SCRYPT_MEMORY:
        raise ValueError(f"scrypt's N and r ask for more than {MAX_SCRYPT_MEMORY >> 20} MiB")
    decoded = []
    for what, b64 in (("salt", parts[4]), ("hash", parts[5])):
        if not _B64.fullmatch(b64):
            raise ValueError(f"the {what} is not base64")
        try:
            decoded.append(base64.b64decode(b64, validate=True))
        except binascii.Error:
            raise ValueError(f"the {what} is not base64") from None
    salt, key = decoded
    if not salt or len(key) < 16:
        raise ValueError("the salt is empty or the hash shorter than 16 bytes")
    return Record(params, salt, key, text)


def _bad_in_name(name: str) -> str | None:
    """Why ``name`` is not a user name, or None when it is one: the one rule for names, on
    every line of the file, for ``passwd`` and for the user a client sends."""
    if not name:
        return "it is empty"
    if ":" in name:
        return "it holds ':'"
    for char in name:
        if unicodedata.category(char) in _NOT_IN_NAMES:
            return f"it holds U+{ord(char):04X} {unicodedata.name(char, '')}".rstrip()
    return None


def check_user_name(name: str) -> str:
    why = _bad_in_name(name)
    if why is not None:
        raise ValueError(
            f"{name!r} is not a user name ({why}): it must be non-empty, without ':', spaces, "
            "line breaks, control or other invisible characters"
        )
    return name


def _file_lines(text: str) -> list[str]:
    """The lines of a password file, split at "\n" (or "\r\n") only, as an editor shows
    them: str.splitlines would also split at U+2028, U+0085 and the like inside a line, and
    the error would then name a line that is not there."""
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if lines[-1] == "":
        lines.pop()  # the end of the last line, not a line
    return lines


def parse_users(text: str, source: str = "the password file") -> dict[str, Record]:
    """Every user of a password file's text; ValueError names the line at fault."""
    users: dict[str, Record] = {}
    for number, raw in enumerate(_file_lines(text), 1):
        line = raw.strip(string.whitespace)  # ASCII only: a U+00A0 at the edge is refused
        if not line or line.startswith("#"):
            continue
        name, sep, record = line.partition(":")
        try:
            if not sep:
                raise ValueError("a line is user:scrypt$N$r$p$salt$hash")
            check_user_name(name)
            if name in users:
                raise ValueError(f"user {name!r} is listed twice")
            users[name] = parse_record(record)
        except ValueError as exc:
            raise ValueError(f"{source}, line {number}: {exc}") from None
    return users


def read_users(path: str) -> dict[str, Record]:
    """Read and check a password file; ValueError (with the path) for any problem."""
    try:
        # -sig: a BOM that an editor put first is not part of the first user's name
        text = read_regular(path).decode("utf-8-sig")
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    return parse_users(text, path)


def _file_identity(path: str) -> tuple[int, int, int, int]:
    """What changes when the file is replaced or rewritten: a reload re-reads it only then."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


# --- the hashing pool -----------------------------------------------------------------------

_pool_lock = threading.Lock()
_pool: tuple[int, ThreadPool] | None = None  # (pid, its pool)


def _hash_pool() -> ThreadPool:
    """The process's scrypt pool, made on first use (so after any fork into workers): as
    many threads as CPUs, at most 4, which bounds both the CPU and the memory (16 MiB per
    hash at the defaults) that a flood of wrong passwords can take."""
    global _pool
    from gevent.threadpool import ThreadPool

    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid():
            _pool = (os.getpid(), ThreadPool(max(1, min(4, os.cpu_count() or 1))))
        return _pool[1]


# --- checking a request -----------------------------------------------------------------------


class Authenticator:
    """Checks ``Proxy-Authorization`` against the password file, for every CONNECT.

    Built by :meth:`splicegate.server.ProxyServer._configure`; a server's reload calls
    :meth:`prepare_reload`, which re-reads the file only when it changed (inode, size or
    mtime). A file that changed empties the cache, so a removed user's credentials are
    never taken from it; an unchanged one keeps it.
    """

    #: how long a successful credential is remembered (as a keyed HMAC)
    cache_seconds = 60.0
    #: most credentials remembered; the oldest go first
    cache_size = 10_000
    #: longest a request waits for the hashing pool (queue and hash): past it, a 503
    hash_wait = 5.0
    #: warn when the file lists no users; off in a --workers worker, whose file is the
    #: supervisor's copy: the supervisor says it once, naming the operator's file
    warn_when_empty = True

    def __init__(self, path: str, realm: str = "splicegate") -> None:
        self.path = path
        self.realm = realm
        self._key = os.urandom(32)  # the cache's HMAC key: never leaves this process
        self._cache: collections.OrderedDict[str, tuple[bytes, float]] = collections.OrderedDict()
        self._identity: tuple[int, int, int, int] | None = None
        self._users: dict[str, Record] = {}
        self._dummy: Record  # set by the first reload(), which always reads the file
        self.reload()

    @property
    def users(self) -> frozenset[str]:
        return frozenset(self._users)

    def reload(self) -> bool:
        """Re-read the file if it changed; True when it did. A bad file raises ValueError
        and leaves the users as they were, so a reload can refuse it and keep serving."""
        apply = self.prepare_reload()
        if apply is None:
            return False
        apply()
        return True

    def prepare_reload(self) -> Callable[[], None] | None:
        """The changed file read and checked, and what puts it in force: a server's reload
        calls that only once every other new setting has been built, so a reload refused
        for another reason keeps the old users too. None when the file has not changed; a
        bad file raises ValueError."""
        try:
            identity = _file_identity(self.path)
        except OSError as exc:
            raise ValueError(f"cannot read {self.path}: {exc}") from None
        if identity == self._identity:
            return None
        users = read_users(self.path)
        common = collections.Counter(r.params for r in users.values()).most_common(1)
        params = common[0][0] if common else DEFAULT_PARAMS
        # A record no password matches, with the file's usual cost: an unknown user is
        # hashed against it, so it takes as long as a known one.
        dummy = Record(params, os.urandom(SALT_BYTES), os.urandom(KEY_BYTES), "")

        def apply() -> None:
            self._dummy, self._users, self._identity = dummy, users, identity
            self._cache.clear()
            if not users and self.warn_when_empty:
                warn_no_users(self.path)

        return apply

    def check(self, request: Request) -> str:
        """The authenticated user name, or AuthRequired (407) for anything else."""
        values = [v for name, v in request.fields if name == b"proxy-authorization"]
        if not values:
            raise self._required("proxy authentication required: send Basic credentials")
        credentials = self._credentials(values)
        if credentials is None:
            raise self._required(
                "proxy authentication required: the Proxy-Authorization field is not one "
                "Basic credential (base64 of user:password, the user in UTF-8)"
            )
        user, password = credentials
        record = self._users.get(user)
        mac = hmac.new(
            self._key,
            b"\0".join((user.encode(), password, (record.text if record else "").encode())),
            hashlib.sha256,
        ).digest()
        if record is not None and self._cached(user, mac):
            return user
        target = record or self._dummy
        deadline = time.monotonic() + self.hash_wait
        job = None
        # spawn() itself waits, without end, for a slot once the pool's queue is full: the
        # one deadline bounds that wait too (this Timeout ends only this block; a caller's
        # own Timeout passes through).
        from gevent import Timeout  # here, as _hash_pool's import: `passwd` needs no gevent

        with Timeout(max(0.0, deadline - time.monotonic()), False):
            job = _hash_pool().spawn(_scrypt_by, deadline, password, target, len(target.key))
        if job is not None:
            # wait() rather than get(timeout): a gevent.Timeout a caller set around check()
            # must reach that caller, not turn into a 503 here.
            job.wait(timeout=max(0.0, deadline - time.monotonic()))
        key = job.get() if job is not None and job.ready() else None
        if key is None:
            # A flood of guesses fills the pool: refuse as over capacity rather than queue
            # without end; the job, when its turn comes, sees the deadline and skips the hash.
            raise AuthOverloaded(
                "proxy authentication is overloaded; try again shortly",
                details="password hashing queue full",
            )
        # Both branches compare, so an unknown user does the same work as a known one.
        matches = hmac.compare_digest(key, target.key)
        if record is None or not matches:
            raise self._required("proxy authentication failed: wrong user name or password")
        self._remember(user, mac)
        return user

    def _required(self, message: str) -> AuthRequired:
        return AuthRequired(message, realm=self.realm)

    def _credentials(self, values: Sequence[bytes]) -> tuple[str, bytes] | None:
        """User and password from the one Proxy-Authorization field, or None when it is
        repeated or malformed: the answer is a 407 in every case. The caller collects the
        values, having to tell "nothing sent" apart anyway, so the fields are read once."""
        if len(values) != 1:
            return None
        scheme, _, token = values[0].strip().partition(b" ")
        if scheme.lower() != b"basic":
            return None
        token = token.strip(b" \t")
        if not token or len(token) > 4096:
            return None
        try:
            decoded = base64.b64decode(token, validate=True)
            user_text, sep, password = decoded.partition(b":")
            user = user_text.decode("utf-8")
        except (binascii.Error, ValueError):
            return None
        if not sep or _bad_in_name(user) is not None:
            return None
        return user, password

    def _cached(self, user: str, mac: bytes) -> bool:
        entry = self._cache.get(user)
        if entry is None:
            return False
        remembered, expires = entry
        if time.monotonic() >= expires:
            del self._cache[user]
            return False
        return hmac.compare_digest(remembered, mac)

    def _remember(self, user: str, mac: bytes) -> None:
        self._cache[user] = (mac, time.monotonic() + self.cache_seconds)
        self._cache.move_to_end(user)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)


def configure(
    previous: Authenticator | None, path: str, realm: str
) -> tuple[Authenticator | None, Callable[[], None]]:
    """The authenticator for these settings, and what to call once the rest of a reload has
    been built: the previous one, with a changed file read but not yet in force, when it is
    for the same file and realm (a reload keeps its cache and re-reads only a changed file);
    else a new one; None when auth is off."""
    if not path:
        return None, _nothing
    if previous is not None and (previous.path, previous.realm) == (path, realm):
        return previous, previous.prepare_reload() or _nothing
    return Authenticator(path, realm), _nothing


def warn_no_users(path: str) -> None:
    log.warning("%s lists no users: every request will get 407", path)


def _nothing() -> None:
    pass


# --- splicegate passwd FILE USER --------------------------------------------------------------


def read_password(stdin: TextIO, *, prompt: bool) -> str:
    """From a terminal: asked twice, without echo, the two must match. Otherwise: the first
    line of stdin (so scripts can pipe it in), without its line ending."""
    if prompt:
        first = getpass.getpass("Password: ")
        if first != getpass.getpass("Password again: "):
            raise ValueError("the two passwords differ")
        password = first
    else:
        password = stdin.readline().rstrip("\r\n")
    if not password:
        raise ValueError("the password is empty")
    return password


def set_password(path: str, user: str, password: str, params: Params = DEFAULT_PARAMS) -> bool:
    """Add ``user`` or change its password, keeping every other line; True if it was added.

    Written to a temporary file beside it and renamed over it, so a reader (a reload) sees
    the old file or the new one, never half of one. A symlink is followed: its target is
    what gets replaced (the temporary file goes in the target's directory, where the rename
    is atomic), and the link stays. A new file is made readable by its owner only; an
    existing one keeps its mode, owner and group, as htpasswd keeps them, so that a root
    operator's edit does not leave the proxy's user unable to read its own file. When they
    cannot be kept (a caller that is not root and not the owner, or not in the file's
    group), :class:`PermissionError` is raised and the file is left as it was.
    """
    check_user_name(user)
    target = os.path.realpath(path)
    try:
        with open(target, encoding="utf-8") as f:
            text = f.read()
            old: os.stat_result | None = os.fstat(f.fileno())
    except FileNotFoundError:
        text, old = "", None
    # A BOM an editor put first stays first, and stays out of the first user's name.
    bom = "\ufeff" if text.startswith("\ufeff") else ""
    lines = _file_lines(text.removeprefix(bom))
    mode = 0o600 if old is None else stat.S_IMODE(old.st_mode)
    parse_users("\n".join(lines), path)  # refuse to rewrite a file that is already broken
    entry = f"{user}:{hash_password(password, params)}"
    added = True
    for i, line in enumerate(lines):
        if line.strip().partition(":")[0] == user and not line.lstrip().startswith("#"):
            lines[i] = entry
            added = False
            break
    else:
        lines.append(entry)
    fd, tmp = tempfile.mkstemp(prefix=".splicegate-passwd-", dir=os.path.dirname(target))
    try:
        if old is not None:
            _keep_owner(fd, old, path)
        os.fchmod(fd, mode)  # after the chown, which may clear set-id bits
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(bom + "\n".join(lines) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return added


def _keep_owner(fd: int, old: os.stat_result, path: str) -> None:
    """Give the new file (open as ``fd``) the old file's owner and group, or refuse.

    Refusing beats writing the file under the caller's name: the proxy, running as the
    file's owner, would be unable to read it, and the failure would show only at the next
    reload or restart. Nothing is done when the new file already has them (the caller owns
    the file), so that case works wherever chown does not.
    """
    new = os.fstat(fd)
    if (new.st_uid, new.st_gid) == (old.st_uid, old.st_gid):
        return
    try:
        os.fchown(fd, old.st_uid, old.st_gid)
    except PermissionError:
        raise PermissionError(
            f"{path} belongs to uid {old.st_uid}, gid {old.st_gid}, and uid {os.geteuid()} "
            "cannot give the new file that owner and group, so the file is left unchanged: "
            "run this as root, or as the file's owner in its group"
        ) from None


def passwd_main(argv: Sequence[str]) -> int:
    """``splicegate passwd FILE USER``."""
    parser = argparse.ArgumentParser(
        prog="splicegate passwd",
        description="Add a user to a password file for --auth-file, or change its password. "
        "The password is asked twice on a terminal, or read as one line from stdin.",
    )
    parser.add_argument("file", metavar="FILE", help="the password file (created if missing)")
    parser.add_argument("user", metavar="USER", help="the user name")
    args = parser.parse_args(argv)
    try:
        check_user_name(args.user)
        password = read_password(sys.stdin, prompt=sys.stdin.isatty())
        added = set_password(args.file, args.user, password)
    except (ValueError, OSError) as exc:
        print(f"splicegate passwd: error: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, EOFError):
        print(file=sys.stderr)
        return 1
    print(f"{'added' if added else 'changed'} user {args.user} in {args.file}", file=sys.stderr)
    return 0
