"""The access log: one line per tunnel or refused request, written off the hub.

The hub only builds an :class:`Entry` and puts it on a queue; a native thread formats and
writes it. A disk that stalls (NFS, a full journal pipe) then costs lines, never latency: past
``max_pending`` waiting entries new ones are dropped and counted, like the diagnostic log's
queue in cli.py. The thread is started with the interpreter's original ``_thread`` even
where gevent has monkey-patched threading, so a slow ``write(2)`` blocks that thread alone.

A path is opened in append mode (``O_APPEND``): several worker processes can share one file,
each line reaching it whole. SIGUSR1 asks for :meth:`AccessLog.reopen` after logrotate has
moved the file away; the writer opens the path anew and closes the old descriptor.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from _queue import SimpleQueue  # the C queue: gevent's monkey-patching leaves it native
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import gevent
from gevent.monkey import get_original

from splicegate.request import show_address

if TYPE_CHECKING:
    from splicegate.relay import TunnelRecord
    from splicegate.server import Attempt

log = logging.getLogger("splicegate")

_start_new_thread, _allocate_lock = get_original("_thread", ["start_new_thread", "allocate_lock"])

FORMATS = ("text", "json")

#: writes to a pipe up to this size are atomic (POSIX PIPE_BUF on Linux), so lines from
#: several workers sharing stderr never interleave mid-line
_CHUNK = 4096


@dataclass(frozen=True, slots=True)
class Entry:
    """One access-log line: the fields, in the order the JSON object and the text line
    show them. None is JSON null (and ``-`` in text): a refused request has no dialled
    address, time to the 200, first closer or reason. Times are milliseconds; DNS and
    connect times are 0 when that step did not run (an IP literal needs no DNS)."""

    ts: str  # RFC 3339, UTC, when the line was made (the tunnel closed, the refusal sent)
    client: str
    client_port: int
    user: str | None
    method: str | None
    target: str | None
    dialled: str | None
    status: int
    error: str | None  # the Proxy-Status error token
    dns_ms: float
    connect_ms: float
    established_ms: float | None  # from accept to the 200 written; None: no 200 was sent
    bytes_up: int  # client -> origin, delivered
    bytes_down: int  # origin -> client, delivered
    duration_ms: float  # from accept to the tunnel's close or the refusal
    first_closer: str | None  # client | origin | proxy
    reason: str | None  # eof | reset | idle | half_closed_timeout | lifetime | shutdown | error


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def format_json(entry: Entry) -> str:
    return json.dumps(asdict(entry), ensure_ascii=True, separators=(",", ":"))


def _text_value(value: Any) -> str:
    if value is None or value == "":
        return "-"
    text = str(value)
    # Client-chosen text (a target, a user name) is quoted when it could break the line
    # apart or fake a field; json.dumps escapes control characters.
    if any(c in text for c in ' "=\\') or not text.isprintable():
        return json.dumps(text)
    return text


def format_text(entry: Entry) -> str:
    """``key=value`` pairs (logfmt) with the JSON keys: readable, and still one grep away."""
    return " ".join(f"{key}={_text_value(value)}" for key, value in asdict(entry).items())


FORMATTERS = {"text": format_text, "json": format_json}

_REOPEN = object()
_STOP = object()


class AccessLog:
    """Writes entries to ``destination`` (a path, or ``-`` for stderr) in ``format``.

    Opening happens here, in the caller, so that a path that cannot be opened fails the
    start or the reload that asked for it, with the reason, instead of losing lines later.
    """

    #: entries waiting for the writer at most; more are dropped and counted in ``dropped``
    max_pending = 100_000

    def __init__(
        self,
        destination: str,
        format: str = "text",
        on_lost: Callable[[int], None] | None = None,
    ) -> None:
        if format not in FORMATTERS:
            raise ValueError(f"{format!r} is not one of {', '.join(FORMATS)}")
        self.destination = destination
        self.format = format
        self.dropped = 0  # counted in the hub: the queue was full
        self.failed = 0  # counted in the writer: write(2) failed
        #: told of every line lost, from the hub or the writer thread (a metric's inc())
        self.on_lost = on_lost
        self._fd = self._open()
        self._queue: SimpleQueue[Any] = SimpleQueue()
        self._finished = _allocate_lock()
        self._finished.acquire()
        self._closed = False
        _start_new_thread(self._run, ())

    def _open(self) -> int:
        if self.destination == "-":
            return 2
        try:
            return os.open(
                self.destination, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640
            )
        except OSError as exc:
            raise _cannot_open(self.destination, exc.errno) from None

    def matches(self, destination: str, format: str) -> bool:
        return (self.destination, self.format) == (destination, format)

    # --- the hub's side: never blocks -----------------------------------------------------

    def write(self, entry: Entry) -> None:
        if self._closed or self._queue.qsize() >= self.max_pending:
            self.dropped += 1
            self._lost(1)
            return
        self._queue.put(entry)

    def reopen(self) -> None:
        """Open the path anew (after logrotate moved it); the writer does it in turn."""
        if not self._closed:
            self._queue.put(_REOPEN)

    def close(self, *, wait: bool = True, timeout: float = 5.0) -> None:
        """Write what is queued, close the file and end the thread. With ``wait``, return
        once that is done or ``timeout`` passed, yielding to the hub meanwhile."""
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
        deadline = time.monotonic() + timeout
        while wait and time.monotonic() < deadline:  # bounded; polled, not a blocking wait
            if self._finished.acquire(False):
                self._finished.release()
                break
            gevent.sleep(0.005)
        if self.dropped or self.failed:  # the first failure was warned of; now the count
            log.warning(
                "access log %s: %d lines lost (%d dropped while the writer was behind, "
                "%d that could not be written)",
                self.destination,
                self.dropped + self.failed,
                self.dropped,
                self.failed,
            )

    def _lost(self, lines: int) -> None:
        if self.on_lost is not None:
            self.on_lost(lines)

    # --- the writer thread ----------------------------------------------------------------

    def _run(self) -> None:
        formatter = FORMATTERS[self.format]
        try:
            while True:
                item = self._queue.get()
                batch: list[str] = []
                while True:
                    if item is _STOP or item is _REOPEN:
                        self._flush(batch)
                        batch = []
                        if item is _STOP:
                            return
                        self._reopen()
                    else:
                        batch.append(formatter(item) + "\n")
                    if len(batch) >= 256 or self._queue.empty():
                        break
                    item = self._queue.get()
                self._flush(batch)
        finally:
            if self._fd != 2:
                os.close(self._fd)
            self._finished.release()

    def _flush(self, lines: list[str]) -> None:
        chunk = ""
        for line in lines:
            if chunk and len(chunk) + len(line) > _CHUNK:
                self._write(chunk)
                chunk = ""
            chunk += line
        if chunk:
            self._write(chunk)

    def _write(self, text: str) -> None:
        data = memoryview(text.encode("utf-8", "replace"))
        try:
            while data:
                data = data[os.write(self._fd, data) :]
        except OSError as exc:
            if not self.failed:
                log.warning("access log %s: cannot write: %s", self.destination, exc)
            # The lines not written in full: a write may have taken the first ones.
            lost = bytes(data).count(b"\n")
            self.failed += lost
            self._lost(lost)

    def _reopen(self) -> None:
        if self._fd == 2:
            return
        try:
            fd = self._open()
        except OSError as exc:
            log.warning("%s; writing on to the old file", exc.strerror)
            return
        os.close(self._fd)
        self._fd = fd
        log.info("access log %s reopened", self.destination)


def check_can_open(destination: str) -> None:
    """Raise the OSError that opening ``destination`` would, and create nothing: a check
    run as another user (root, for a daemon that runs as its own) must not leave a file
    behind that the daemon then cannot open. A missing file is judged by its directory."""
    if destination in ("", "-"):
        return
    try:
        # O_NONBLOCK: a FIFO with no reader is refused (ENXIO), where opening would hang.
        os.close(os.open(destination, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK | os.O_CLOEXEC))
    except FileNotFoundError:
        directory = os.path.dirname(destination) or "."
        if not os.path.isdir(directory):
            raise _cannot_open(destination, errno.ENOENT) from None
        if not os.access(directory, os.W_OK | os.X_OK):
            raise _cannot_open(destination, errno.EACCES) from None
    except OSError as exc:
        raise _cannot_open(destination, exc.errno) from None


def _cannot_open(destination: str, error: int) -> OSError:
    return OSError(error, f"cannot open the access log {destination}: {os.strerror(error)}")


def reuse_or_open(
    current: AccessLog | None,
    destination: str,
    format: str,
    on_lost: Callable[[int], None] | None = None,
) -> AccessLog | None:
    """The access log these settings ask for: ``current`` when it already is (a reload
    keeps its writer and file), a new one, or None when it is off ("")."""
    if current is not None and current.matches(destination, format):
        return current
    return AccessLog(destination, format, on_lost) if destination else None


def entry_for(attempt: Attempt, record: TunnelRecord | None) -> Entry:
    """The line for a request that ended: a tunnel closed (``record``) or a refusal."""
    host, port = attempt.client[0], attempt.client[1]
    return Entry(
        ts=now_rfc3339(),
        client=host,
        client_port=port,
        user=attempt.user or None,
        method=attempt.method or None,
        target=attempt.target or None,
        dialled=show_address(attempt.dialled) if attempt.dialled else None,
        status=attempt.status,
        error=attempt.error,
        dns_ms=round(attempt.dns_s * 1000, 3),
        connect_ms=round(attempt.connect_s * 1000, 3),
        established_ms=round(attempt.established_s * 1000, 3) if attempt.established_s else None,
        bytes_up=record.bytes_up if record else 0,
        bytes_down=record.bytes_down if record else 0,
        duration_ms=round((time.monotonic() - attempt.accepted) * 1000, 3),
        first_closer=record.first_closer if record else None,
        reason=record.reason if record else None,
    )
