"""The pure-Python relay engine: the fallback where the native one is missing, and the
reference the native one is tested against.

It runs entirely inside the gevent hub, driven by loop watchers rather than greenlets: an
open tunnel costs four io watchers, one timer and two socket objects, not two greenlet
stacks, so ten thousand idle tunnels stay cheap. Callbacks run in the hub, so none of them
may block; the sockets are the C-level ``_socket.socket`` (not gevent's cooperative one) in
non-blocking mode, and every ``recv``/``send`` either makes progress or raises
``BlockingIOError``.

Memory per tunnel is bounded: each direction holds at most one chunk of 64 KiB, and reads
from its source only while that chunk is empty, so a slow reader stalls its writer through
TCP flow control instead of growing a buffer. An idle tunnel holds no buffer at all.
"""

from __future__ import annotations

import _socket
import contextlib
import errno
import fcntl
import functools
import logging
import os
import select
import socket
import struct
import termios
import time
from collections.abc import Callable
from typing import Any

import gevent
from gevent.event import Event
from gevent.monkey import get_original

from splicegate.relay import (
    Closer,
    OnDone,
    Reason,
    RelayTimeouts,
    TunnelRecord,
    forget_in_forked_child,
    report_done,
    run_each,
)

log = logging.getLogger("splicegate")

CHUNK = 64 * 1024
_READ = 1
_WRITE = 2
# A peer that aborted shows up as ECONNRESET on recv or send, as EPIPE on a send after the
# reset was already reported, and as ENOTCONN on shutdown() of a connection the reset tore down.
_RESET_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN})
_LINGER_ABORT = struct.pack("ii", 1, 0)
# <linux/sockios.h>'s ioctls for the bytes a TCP socket holds: not acknowledged by its peer
# (sent or not; TIOCOUTQ's number), and not sent yet. The socket module names neither.
_SIOCOUTQ = termios.TIOCOUTQ
_SIOCOUTQNSD = 0x894B
# A send to a reset peer must fail with EPIPE, not kill the process, even when the
# embedding application has restored the default SIGPIPE action.
_SEND_FLAGS = socket.MSG_NOSIGNAL
# The real epoll class, also in an application that called gevent's monkey.patch_all(): that
# removes select.epoll (a blocking poller, to keep other code off it), yet the error watch only
# ever polls with a timeout of 0, from a hub io watcher. The rest this module uses of select,
# socket, time and os is left alone by patch_all: constants, _socket's own sockets,
# time.monotonic, os.get_blocking/set_blocking/strerror/register_at_fork (gevent's patched
# os.fork still calls the original fork, which runs the at-fork hooks).
_new_epoll = get_original("select", "epoll")


def _queued(sock: _socket.socket, request: int) -> int:
    """Bytes ``sock`` holds, as the ioctl ``request`` counts them; 0 where it cannot tell.
    A system call: for the rare moments that need it, never for each transfer."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), request, bytes(4)))[0]
    except OSError:
        return 0


def _ends_its_tunnel_on_a_bug(callback: Callable[[Any], None]) -> Callable[[Any], None]:
    """A hub callback of a tunnel that raises (a bug) ends that tunnel, both peers aborted,
    reason ``error``, with one traceback logged. Left to the loop, the exception would be
    printed and the watcher kept: a level-triggered one fires again at once, spinning the
    hub, and the tunnel would never end."""

    @functools.wraps(callback)
    def guarded(self: Any) -> None:
        try:
            callback(self)
        except Exception:
            tunnel: _Tunnel = getattr(self, "tunnel", self)
            log.exception("relay callback failed; ending its tunnel")
            if tunnel in tunnel.engine._tunnels:
                tunnel.end("error", "proxy", 0, abort_client=True, abort_origin=True)

    return guarded


class _Direction:
    """One way through a tunnel: bytes read from ``src`` are written to ``dst``.

    Exactly one of the two watchers is active while the direction is open: the reader while
    the buffer is empty, the writer while it holds bytes ``dst`` has not taken yet. That
    alternation is the backpressure.
    """

    __slots__ = (
        "buf",
        "delivered",
        "done",
        "dst",
        "dst_side",
        "reader",
        "src",
        "src_side",
        "tunnel",
        "writer",
    )

    def __init__(
        self,
        tunnel: _Tunnel,
        src: _socket.socket,
        dst: _socket.socket,
        src_side: Closer,
        dst_side: Closer,
        loop: Any,
    ) -> None:
        self.tunnel = tunnel
        self.src = src
        self.dst = dst
        self.src_side = src_side
        self.dst_side = dst_side
        self.buf: memoryview | None = None
        self.delivered = 0
        self.done = False
        self.reader = loop.io(src.fileno(), _READ)
        self.writer = loop.io(dst.fileno(), _WRITE)

    def start(self, first: bytes) -> None:
        if first:
            self.buf = memoryview(first)
            self.writer.start(self._on_writable)
            self._watch_src()
        else:
            self.reader.start(self._on_readable)

    def _watch_src(self) -> None:
        """The reader no longer looks at src (it waits for dst, or src is at EOF): from now
        on the engine's error epoll does, so a reset from src is not missed."""
        self.tunnel.engine._errors.add(self)

    @_ends_its_tunnel_on_a_bug
    def _on_readable(self) -> None:
        try:
            data = self.src.recv(CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:
            self.tunnel.fail(exc, self.src_side)
            return
        if not data:  # an EOF is no activity: idle means no byte either way
            self.reader.stop()
            self._propagate_eof()
            return
        self.tunnel.last_activity = time.monotonic()
        # Try the write at once: a destination that keeps up then costs no watcher changes.
        try:
            sent = self.dst.send(data, _SEND_FLAGS)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.tunnel.fail(exc, self.dst_side)
            return
        self.delivered += sent
        if sent < len(data):
            self.buf = memoryview(data)[sent:]
            self.reader.stop()
            self.writer.start(self._on_writable)
            self._watch_src()

    @_ends_its_tunnel_on_a_bug
    def _on_writable(self) -> None:
        buf = self.buf
        assert buf is not None  # the writer only runs while bytes are pending
        try:
            sent = self.dst.send(buf, _SEND_FLAGS)
        except BlockingIOError:
            return
        except OSError as exc:
            self.tunnel.fail(exc, self.dst_side)
            return
        self.tunnel.last_activity = time.monotonic()
        self.delivered += sent
        if sent < len(buf):
            self.buf = buf[sent:]
            return
        self.buf = None
        self.writer.stop()
        self.reader.start(self._on_readable)

    def _propagate_eof(self) -> None:
        # The buffer is empty here (reads only happen then), so everything before the EOF
        # has been delivered and the FIN can follow at once.
        self.tunnel.saw_eof(self.src_side)
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self.tunnel.fail(exc, self.dst_side)
            return
        self.done = True
        if not self.tunnel.direction_done():  # the other way goes on
            self._watch_src()

    def close_watchers(self) -> None:
        for watcher in (self.reader, self.writer):
            watcher.stop()
            watcher.close()


class _ErrorWatch:
    """Errors (resets, mostly) on sockets no reader looks at.

    The io watchers see a reset only when a read or a write comes: not on a socket whose EOF
    is in (it stays readable for good, so its reader is stopped), nor while the direction
    from it waits for the other peer, nor while that peer is silent; the tunnel would then
    end at a timeout as if both had finished. epoll reports EPOLLERR and EPOLLHUP whatever
    the mask, so a socket registered with no events (edge triggered) reports only those,
    and one already pending at once: a direction puts its source here when its reader stops
    (and leaves it until the tunnel ends), one epoll for them all, watched from the hub.
    """

    def __init__(self, loop: Any) -> None:
        self._loop = loop
        self._epoll: select.epoll | None = None
        self._watcher: Any = None
        self._watched: dict[int, _Direction] = {}  # by its source's fd
        self._skipped: set[int] = set()  # errors seen while the reader ran

    def add(self, direction: _Direction) -> None:
        """Watch a direction's source. Where epoll refuses (out of memory or of
        max_user_watches), the tunnel goes on without: its reads and writes still find an
        error when one comes."""
        fd = direction.src.fileno()
        try:
            if fd in self._watched:
                if fd in self._skipped and self._epoll is not None:
                    # An error came while the reader ran, and the reader stopped before it
                    # met it: re-armed, the edge is reported again.
                    self._skipped.discard(fd)
                    self._epoll.modify(fd, select.EPOLLET)
                return
            if self._epoll is None:
                self._epoll = _new_epoll()
                self._watcher = self._loop.io(self._epoll.fileno(), _READ)
                self._watcher.ref = False  # it must not keep an embedding hub running
                self._watcher.start(self._on_ready)
            self._epoll.register(fd, select.EPOLLET)
        except OSError as exc:
            log.debug("tunnel socket not watched for errors: %s", exc)
            return
        self._watched[fd] = direction

    def remove(self, sock: _socket.socket) -> None:
        """Before the socket closes: a later socket may get its number. Not left to the
        close, which drops the registration only with the last fd on the socket's open
        file: a copy left by a fork (or held by a subprocess until its exec) keeps it, and
        it would then report under that number and be out of reach of any unregister."""
        fd = sock.fileno()
        self._skipped.discard(fd)
        if self._watched.pop(fd, None) is not None and self._epoll is not None:
            with contextlib.suppress(OSError):
                self._epoll.unregister(fd)

    def _on_ready(self) -> None:
        assert self._epoll is not None  # the watcher runs only once the epoll exists
        run_each(self._epoll.poll(0), self._check)

    def _check(self, event: tuple[int, int]) -> None:
        fd, events = event
        direction = self._watched.get(fd)
        if direction is None or not events & select.EPOLLERR:
            return  # gone, or a hang-up alone: both ways shut, the reader ends it
        if direction.reader.active:
            self._skipped.add(fd)  # its reader reads what came first, then the error
            return
        code = direction.src.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            direction.tunnel.fail(OSError(code, os.strerror(code)), direction.src_side)

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher.close()
            self._watcher = None
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        self._watched.clear()
        self._skipped.clear()


class _Tunnel:
    """Two sockets, the two directions between them, and the one timer for their deadlines.

    The timer is armed for the earliest deadline and is not touched when bytes move: a
    transfer only stamps ``last_activity``. When the timer fires before a deadline has really
    passed (the idle deadline moved on since), it is armed again for the new earliest one, so
    a busy tunnel costs one timer per idle period rather than timer work per chunk.
    """

    __slots__ = (
        "client",
        "down",
        "engine",
        "first_closer",
        "first_eof",
        "last_activity",
        "looked_at",
        "on_done",
        "origin",
        "queued",
        "started",
        "timer",
        "timer_at",
        "up",
    )

    def __init__(
        self,
        engine: PythonEngine,
        client: _socket.socket,
        origin: _socket.socket,
        on_done: OnDone,
    ) -> None:
        loop = engine.loop
        self.engine = engine
        self.client = client
        self.origin = origin
        self.on_done = on_done
        self.up = _Direction(self, client, origin, "client", "origin", loop)
        self.down = _Direction(self, origin, client, "origin", "client", loop)
        self.started = self.last_activity = time.monotonic()
        self.first_eof: float | None = None
        self.first_closer: Closer | None = None
        self.timer: Any = None
        self.timer_at = float("inf")
        self.looked_at = 0.0  # when the send queues were last looked at (see _peer_reads)
        self.queued = (0, 0)  # client's and origin's send queues then

    def start(self, early_up: bytes) -> None:
        self.up.start(early_up)
        self.down.start(b"")
        self._arm()

    def _next_deadline(self) -> tuple[float, Reason] | None:
        timeouts = self.engine.timeouts
        deadlines: list[tuple[float, Reason]] = []
        if timeouts.idle:
            # Halfway, a look at the send queues, which the deadline compares with.
            wait = timeouts.idle if self.looked_at > self.last_activity else timeouts.idle_look
            deadlines.append((self.last_activity + wait, "idle"))
        if timeouts.half_closed and self.first_eof is not None:
            deadlines.append((self.first_eof + timeouts.half_closed, "half_closed_timeout"))
        if timeouts.lifetime:
            deadlines.append((self.started + timeouts.lifetime, "lifetime"))
        return min(deadlines, default=None)

    def _arm(self) -> None:
        self._drop_timer()
        deadline = self._next_deadline()
        if deadline is None:
            return
        self.timer_at = deadline[0]
        self.timer = self.engine.loop.timer(max(0.0, self.timer_at - time.monotonic()))
        self.timer.start(self._on_timer)

    def _drop_timer(self) -> None:
        if self.timer is not None:
            self.timer.stop()
            self.timer.close()
            self.timer = None
            self.timer_at = float("inf")

    @_ends_its_tunnel_on_a_bug
    def _on_timer(self) -> None:
        deadline = self._next_deadline()
        assert deadline is not None  # the timer is only armed when a deadline exists
        now = time.monotonic()
        if now >= deadline[0] and not (deadline[1] == "idle" and self._peer_reads(now)):
            self.expire(deadline[1])
        else:
            self._arm()

    def _peer_reads(self, now: float) -> bool:
        """At an idle time's halfway point and at its deadline: False when it is idle.

        A peer draining a large send buffer slowly gives the engine no room to write for
        seconds, so the engine moves no byte, yet the tunnel is not idle. Halfway through
        the idle time the engine notes both send queues; at the deadline, a queue that
        changed since means a peer reads, and the idle time starts again. The look is taken
        anew in each idle time, after the last byte the engine moved, so an old one never
        counts. Two ioctls per look, none while bytes move (``RelayTimeouts.idle_look``).
        """
        queued = (_queued(self.client, _SIOCOUTQ), _queued(self.origin, _SIOCOUTQ))
        if self.looked_at <= self.last_activity:  # halfway: what the deadline compares with
            self.queued = queued
            self.looked_at = now
            return True
        if queued == self.queued:
            return False
        self.last_activity = now
        return True

    def saw_eof(self, side: Closer) -> None:
        if self.first_closer is None:
            self.first_closer = side
        if self.first_eof is None:
            self.first_eof = time.monotonic()
            half_closed = self.engine.timeouts.half_closed
            if half_closed and self.first_eof + half_closed < self.timer_at:
                self._arm()

    def direction_done(self) -> bool:
        """Whether that ended the tunnel: the caller's socket is then closed, and must not
        be watched."""
        if not (self.up.done and self.down.done):
            return False
        assert self.first_closer is not None  # set by the first EOF
        self.end("eof", self.first_closer, 0, abort_client=False, abort_origin=False)
        return True

    def fail(self, exc: OSError, side: Closer) -> None:
        """End the tunnel on a socket error from ``side``.

        A reset is passed on as a reset: the other peer must see an abort, not a clean end of
        a stream that was cut short. Any other error breaks the stream just as much, so both
        sides are aborted.
        """
        code = exc.errno or 0
        if code in _RESET_ERRNOS:
            self.end(
                "reset",
                self.first_closer or side,
                code,
                abort_client=side == "origin",
                abort_origin=side == "client",
            )
        else:
            self.end("error", "proxy", code, abort_client=True, abort_origin=True)

    def expire(self, reason: Reason) -> None:
        """Close both sides because the proxy ends the tunnel (a timeout or shutdown).

        Like Squid and HAProxy, the proxy closes gracefully (FIN) when it ends a tunnel: an
        idle tunnel has nothing in flight, and a client reconnects as after any server-side
        close. The one exception is a direction still holding bytes the proxy accepted but
        could not deliver: its receiver gets an abort instead, because a FIN there would
        present a truncated stream as complete (the kernel does the same when a socket is
        closed with unread data).

        The first closer is the side whose FIN came first, if one did, as after a reset:
        the reason already says that the proxy ended it. Only a tunnel neither side closed
        names the proxy.
        """
        self.end(
            reason,
            self.first_closer or "proxy",
            0,
            abort_client=self.down.buf is not None,
            abort_origin=self.up.buf is not None,
        )

    def end(
        self,
        reason: Reason,
        first_closer: Closer,
        code: int,
        *,
        abort_client: bool,
        abort_origin: bool,
    ) -> None:
        """Close both sockets and report the record.

        The record counts bytes delivered, so what a socket has not even sent when its
        stream ends abortively is taken back off the direction that wrote it: an abort
        (SO_LINGER 0) throws it away, and so did the peer's reset on the socket a reset came
        from. Bytes sent and not yet acknowledged stay counted: they travel ahead of the
        reset, and the peer may read them (or has, and its ACK was delayed). A clean FIN
        close still delivers its queue, which stays counted.
        """
        # Watchers go before their fds: libev must never watch a closed (maybe reused) fd,
        # nor the engine's epoll of errors.
        self._unwatch()
        for sock, abort, towards in (
            (self.client, abort_client, self.down),
            (self.origin, abort_origin, self.up),
        ):
            if abort or reason == "reset":
                # Unsent bytes are the stream's end, and may reach back past what the engine
                # wrote (to the control plane's 200): never below nothing delivered.
                towards.delivered -= min(_queued(sock, _SIOCOUTQNSD), towards.delivered)
            # close() releases the fd even when it reports an error, so errors here change
            # nothing for the tunnel's outcome; they must not stop the other close.
            if abort:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
            with contextlib.suppress(OSError):
                sock.close()
        record = TunnelRecord(
            bytes_up=self.up.delivered,
            bytes_down=self.down.delivered,
            duration_s=time.monotonic() - self.started,
            first_closer=first_closer,
            reason=reason,
            errno=code,
        )
        self.engine._tunnel_finished(self, record)

    def _unwatch(self, *, errors: bool = True) -> None:
        """Every watcher and the timer stopped and closed, the buffers dropped, and (with
        ``errors``) both sockets off the error epoll."""
        self.up.close_watchers()
        self.down.close_watchers()
        if errors:
            self.engine._errors.remove(self.client)
            self.engine._errors.remove(self.origin)
        self._drop_timer()
        self.up.buf = self.down.buf = None

    def abandon(self) -> None:
        """Undo ``start`` (all of it or the part that ran) for a submit that failed: every
        watcher and the timer stopped and closed, both sockets off the error epoll, the
        tunnel out of the engine. Its sockets stay open: they go back to the caller."""
        self._unwatch()
        self.engine._tunnels.discard(self)

    def forget(self) -> None:
        """A parent's tunnel, in a forked child: close this process's copies of its fds,
        which sends nothing to either peer (the parent still holds the sockets and relays
        them), and stop its watchers, which a fork keeps: run in the child, they would read
        the parent's bytes. Not taken off the error epoll: its instance is the parent's too."""
        self._unwatch(errors=False)
        for sock in (self.client, self.origin):
            with contextlib.suppress(OSError):
                sock.close()


def _expire_at_shutdown(tunnel: _Tunnel) -> None:
    tunnel.expire("shutdown")


class PythonEngine:
    """The relay engine on the gevent hub; see :class:`splicegate.relay.Engine`.

    Every method must be called from a greenlet of the hub it was created in, and the
    watchers it installs belong to that hub's loop.
    """

    name = "python"
    splices = False

    def __init__(self, timeouts: RelayTimeouts) -> None:
        self.timeouts = timeouts
        self.loop = gevent.get_hub().loop
        self._tunnels: set[_Tunnel] = set()
        self._errors = _ErrorWatch(self.loop)
        self._closing = False
        self._drained: Event | None = None
        self._tunnels_total = 0
        # Bytes of finished tunnels; active ones are summed on demand in stats(), which
        # keeps the per-chunk work to one addition.
        self._bytes_up = 0
        self._bytes_down = 0
        forget_in_forked_child(self)

    def submit(self, client_fd: int, origin_fd: int, early_up: bytes, on_done: OnDone) -> None:
        """Take ownership of two connected sockets and relay between them.

        Ownership passes only when this returns: if it raises, the caller still owns (and
        must close) both fds, and neither has been touched. So a failure past the first
        socket object is undone whole: every watcher and the timer the tunnel started are
        stopped and closed (libev must not watch an fd the caller then closes: a watcher on
        a closed fd aborts the process), the tunnel is forgotten, and both fds are detached
        from their objects with the blocking modes they came with.
        """
        if self._closing:
            raise RuntimeError("the relay engine is shutting down")
        # Read before any socket object exists: setblocking changes the mode, and so does
        # the constructor itself under an application's default timeout. A closed fd is
        # refused here (EBADF), a pipe by its socket object (ENOTSOCK).
        blocking = (os.get_blocking(client_fd), os.get_blocking(origin_fd))
        built: list[_socket.socket] = []
        tunnel: _Tunnel | None = None
        try:
            built.append(_socket.socket(fileno=client_fd))
            built.append(_socket.socket(fileno=origin_fd))
            client, origin = built
            # Only where it changes something: the server's fds are non-blocking already,
            # and without a default timeout their objects then never wait (timeout -1, and
            # the fd answers EAGAIN). Under one, the objects would poll: set to 0.
            waits = _socket.getdefaulttimeout() is not None
            for sock, was in zip(built, blocking, strict=True):
                if was or waits:
                    sock.setblocking(False)
            tunnel = _Tunnel(self, client, origin, on_done)
            self._tunnels.add(tunnel)
            tunnel.start(early_up)
        except BaseException:
            # Nothing ran in the hub since the watchers started (submit never yields), so
            # no byte was read or written: stopping them leaves both sockets as they came.
            if tunnel is not None:
                tunnel.abandon()
            for sock, was in zip(built, blocking, strict=False):
                with contextlib.suppress(OSError):  # the caller's error is the one to see
                    os.set_blocking(sock.fileno(), was)
                sock.detach()
            raise
        self._tunnels_total += 1

    def stats(self) -> dict[str, int]:
        return {
            "active": len(self._tunnels),
            "pipes_in_use": 0,
            "bytes_up": self._bytes_up + sum(t.up.delivered for t in self._tunnels),
            "bytes_down": self._bytes_down + sum(t.down.delivered for t in self._tunnels),
            "tunnels_total": self._tunnels_total,
            "threads": 0,
        }

    def shutdown(self, deadline: float) -> None:
        """Stop taking tunnels, wait for the active ones until ``deadline``, close the rest.

        The closing happens in a hub timer, so each late tunnel's ``on_done`` runs in the hub
        like every other; this greenlet only waits for the last one.
        """
        self._closing = True
        if self._tunnels:
            if self._drained is None:
                self._drained = Event()
            # A second call (another greenlet, while the first waits) with an earlier
            # deadline gets its own timer: the rest close then, in the hub like every other.
            timer = self.loop.timer(max(0.0, deadline - time.monotonic()))
            timer.start(self._close_all)
            try:
                self._drained.wait()
            finally:
                timer.stop()
                timer.close()
        self._errors.close()

    def _close_all(self) -> None:
        run_each(list(self._tunnels), _expire_at_shutdown)

    def _forget_after_fork(self) -> None:
        """In a forked child: the parent's tunnels stay the parent's, never relayed, ended
        or reported here. The engine itself goes on working in the child."""
        for tunnel in self._tunnels:
            tunnel.forget()
        self._tunnels.clear()
        # Closing the child's copy of the error epoll leaves the parent's instance as it is,
        # where unregistering each socket would have taken them off the parent's watch.
        self._errors.close()
        # A shutdown() caught waiting by the fork goes on in the child too: nothing is left
        # for it to wait for. Dropped once set, so a later drain in the child waits anew.
        if self._drained is not None:
            self._drained.set()
            self._drained = None

    def _tunnel_finished(self, tunnel: _Tunnel, record: TunnelRecord) -> None:
        self._tunnels.remove(tunnel)
        self._bytes_up += record.bytes_up
        self._bytes_down += record.bytes_down
        try:
            report_done(tunnel.on_done, record)
        finally:  # an exit from on_done too: the drain must not wait for this tunnel
            if self._drained is not None and not self._tunnels:
                self._drained.set()
