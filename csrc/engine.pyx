# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The native relay engine: tunnels' bytes move with splice(2), outside the GIL.

Each engine owns a few native threads (pthreads, never gevent's patched ``threading``), each
running its own epoll loop over many tunnels. Every tunnel starts on the first thread, so
that short tunnels wake one; bulk transfers are spread over all of them (``spill``). A
tunnel's two sockets are registered edge-triggered, for both directions; an event only sets
readiness flags and pumps the tunnel. Per direction, bytes go socket -> pipe -> socket with
splice(); the pipe comes from a capped per-thread pool only while bytes are in flight, so an
idle tunnel holds no pipe and no buffer. Where no pipe is to be had (the pool is at its cap,
the pipe quota is spent) or splice refuses the socket, the same direction copies through a
64 KiB buffer with recv/send instead, one chunk at a time, so nothing is lost or reordered.

Relay threads ask for SCHED_BATCH (``scheduling="batch"``, the default): a woken relay thread
then waits for the running task's slice instead of preempting it, so under load it handles
several events per wake-up rather than paying a context switch for each.

Nothing on the loop touches a Python object: every function there is ``noexcept nogil`` and
reports failures as return codes. Finished tunnels are queued with their record and an
eventfd wakes a gevent io watcher, which drains the queue in the hub and calls each
``on_done``. Threads start lazily, in the process that first submits a tunnel (safe across
fork), and are stopped and joined at shutdown and at interpreter exit.
"""

from libc.stdint cimport int64_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcpy

from system cimport *

import atexit
import logging
import os
import time

import gevent
from gevent.event import Event

from splicegate.relay import (
    SCHEDULING, RelayTimeouts, TunnelRecord, forget_in_forked_child, pipe_share, report_done,
    run_each, usable_pipe_size,
)

log = logging.getLogger("splicegate")

cdef extern from "<errno.h>":
    enum:
        EAGAIN
        EINTR
        EINVAL
        ENOSYS
        ENOMEM
        EPIPE
        EIO
        ECONNRESET
        ENOTCONN

cdef extern from "<math.h>" nogil:
    double INFINITY
    double ceil(double x)

include "constants.pxi"

REASONS = ("eof", "reset", "idle", "half_closed_timeout", "lifetime", "shutdown", "error")
CLOSERS = ("client", "origin", "proxy")
MAX_THREADS = 4


cdef struct Pipe:
    int rfd
    int wfd
    size_t size
    Pipe* next


cdef struct Dir:
    Pipe* pipe          # held only while bytes are in it
    size_t in_pipe
    char* buf           # the copy path (and early_up): one chunk at a time
    size_t buf_len
    size_t buf_off
    bint eof            # the source sent FIN
    bint shut           # FIN passed on to the destination
    bint nosplice       # splice refused this source: copy from now on
    int64_t delivered


cdef struct Tunnel:
    int fd[2]           # CLIENT, ORIGIN
    bint readable[2]
    bint writable[2]
    Dir dir[2]          # UP (client -> origin), DOWN
    uint64_t id
    double started
    double last_activity
    double first_eof    # 0 until one side sends FIN
    double ended
    double timer_at     # the heap key: no deadline can come before it
    double looked_at    # when the send queues were last looked at (see peer_reads)
    int64_t outq[2]     # CLIENT, ORIGIN: their send queues then
    Py_ssize_t heap_index
    int first_closer    # -1 until known
    int reason
    int err
    bint done
    bint queued         # on the worker's ready list
    int bulk            # directions (1 << UP, 1 << DOWN) in bulk: see mark_bulk
    double moved_at     # when spill() last moved it to another thread
    int errors_seen     # sides (1 << side) with an EPOLLERR not yet looked into
    Tunnel* next        # inbox, graveyard and completion lists
    Tunnel* ready_next


cdef struct Worker


cdef struct Core:
    double idle
    double idle_look
    double half_closed
    double lifetime
    size_t pipe_size
    int64_t max_pipes
    int pool_keep           # empty pipes each thread may keep: a share of max_pipes
    int64_t pipes_total     # pipes that exist: in use or pooled
    int64_t pipes_in_use
    int64_t bytes_up
    int64_t bytes_down
    Worker* workers         # as many as were asked for
    int nworkers            # those whose threads run, from the first: 0 until they do
    pthread_mutex_t done_lock
    Tunnel* done_head
    int done_fd


cdef struct Worker:
    Core* core
    int64_t bulk            # its tunnels in bulk: the others read it, and spill moves counts
    bint closing            # told to close all or exit: takes no tunnel from another thread
    int epfd
    int wake_fd
    pthread_t thread
    bint running
    pthread_mutex_t lock    # guards inbox, command and closing
    Tunnel* inbox
    int command
    Tunnel** heap           # every tunnel of this worker, by timer_at
    Py_ssize_t heap_len
    Py_ssize_t heap_cap
    Pipe* free_pipes
    int free_count
    Tunnel* ready           # tunnels that used their budget and have more to move
    Tunnel* graveyard       # finished in this batch, handed to the hub after it


# --- pipes ------------------------------------------------------------------------------

cdef Pipe* get_pipe(Worker* w) noexcept nogil:
    """A pipe from this thread's pool, or a new one below the cap; NULL means copy."""
    cdef Pipe* p = w.free_pipes
    cdef int fds[2]
    cdef int size
    if p != NULL:
        w.free_pipes = p.next
        w.free_count -= 1
        sg_add(&w.core.pipes_in_use, 1)
        return p
    # Reserved before it is made: threads that read the count and added to it afterwards
    # could pass the cap together. Every failure below gives the reservation back.
    if sg_add(&w.core.pipes_total, 1) > w.core.max_pipes:
        sg_add(&w.core.pipes_total, -1)
        return NULL
    if pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0:
        sg_add(&w.core.pipes_total, -1)
        return NULL
    # Past the per-user pipe quota this fails with EPERM and the pipe keeps a small size:
    # use what we got rather than nothing.
    size = fcntl(fds[1], F_SETPIPE_SZ, <int>w.core.pipe_size)  # the size it got
    if size < 0:
        size = fcntl(fds[1], F_GETPIPE_SZ)
    p = <Pipe*>malloc(sizeof(Pipe))
    if size <= 0 or p == NULL:
        close(fds[0])
        close(fds[1])
        free(p)
        sg_add(&w.core.pipes_total, -1)
        return NULL
    p.rfd = fds[0]
    p.wfd = fds[1]
    p.size = size
    p.next = NULL
    sg_add(&w.core.pipes_in_use, 1)
    return p


cdef void destroy_pipe(Worker* w, Pipe* p) noexcept nogil:
    close(p.rfd)
    close(p.wfd)
    free(p)
    sg_add(&w.core.pipes_total, -1)


cdef void put_pipe(Worker* w, Pipe* p, bint holds_data) noexcept nogil:
    """Back to the pool when empty and the pool is not full; a pipe still holding bytes
    can only be destroyed. The pool stays small: a burst of transfers must not leave
    hundreds of idle pipes (two fds and kernel memory each) behind it."""
    sg_add(&w.core.pipes_in_use, -1)
    if holds_data or w.free_count >= w.core.pool_keep:
        destroy_pipe(w, p)
    else:
        p.next = w.free_pipes
        w.free_pipes = p
        w.free_count += 1


# --- moving bytes ---------------------------------------------------------------------------

cdef inline bint pending(Dir* d) noexcept nogil:
    return d.in_pipe > 0 or d.buf_off < d.buf_len


cdef ssize_t fill(Worker* w, Dir* d, int src, int* err) noexcept nogil:
    """Read from the source into the pipe, or into a copy buffer where there is no pipe."""
    cdef ssize_t n
    cdef int e
    if d.buf != NULL:
        return NO_ROOM  # a copied chunk is still on its way
    if d.pipe == NULL and not d.nosplice:
        d.pipe = get_pipe(w)
    if d.pipe != NULL:
        if d.nosplice or d.in_pipe >= d.pipe.size:
            return NO_ROOM  # full, or splice refused: flush what it holds first
        while True:
            n = splice(src, NULL, d.pipe.wfd, NULL, d.pipe.size - d.in_pipe,
                       SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
            if n > 0:
                d.in_pipe += n
                return n
            if n == 0:
                return AT_EOF
            e = sg_errno()
            if e == EINTR:
                continue
            if e == EAGAIN:
                # Ambiguous: with bytes in the pipe it may be the pipe that is full (its
                # slots hold partial pages), so only an empty pipe proves the socket drained.
                if d.in_pipe > 0:
                    return NO_ROOM
                # Drained, and the pipe is empty: back to the pool, so that an idle tunnel
                # holds no pipe (else every direction that ever read would keep one).
                put_pipe(w, d.pipe, False)
                d.pipe = NULL
                return WOULD_BLOCK
            if e == EINVAL or e == ENOSYS:
                d.nosplice = True
                if d.in_pipe > 0:
                    return NO_ROOM  # flush what the pipe holds before copying
                put_pipe(w, d.pipe, False)
                d.pipe = NULL
                break
            err[0] = e
            return FAILED
    d.buf = <char*>malloc(COPY_SIZE)
    if d.buf == NULL:
        err[0] = ENOMEM
        return FAILED
    while True:
        n = recv(src, d.buf, COPY_SIZE, 0)
        if n > 0:
            d.buf_len = n
            d.buf_off = 0
            return n
        e = sg_errno()
        if n < 0 and e == EINTR:
            continue
        break
    free(d.buf)
    d.buf = NULL
    if n == 0:
        return AT_EOF
    if e == EAGAIN:
        return WOULD_BLOCK
    err[0] = e
    return FAILED


cdef ssize_t flush(Worker* w, Dir* d, int dst, int* err) noexcept nogil:
    """Write what the pipe or the copy buffer holds; give the pipe back once it is empty."""
    cdef ssize_t n
    cdef int e
    while True:
        if d.in_pipe > 0:
            n = splice(d.pipe.rfd, NULL, dst, NULL, d.in_pipe, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
            if n > 0:
                d.in_pipe -= n
                if d.in_pipe == 0:
                    put_pipe(w, d.pipe, False)
                    d.pipe = NULL
                return n
        elif d.buf != NULL:
            n = send(dst, d.buf + d.buf_off, d.buf_len - d.buf_off, MSG_NOSIGNAL)
            if n > 0:
                d.buf_off += n
                if d.buf_off == d.buf_len:
                    free(d.buf)
                    d.buf = NULL
                    d.buf_len = d.buf_off = 0
                return n
        else:
            return WOULD_BLOCK
        e = sg_errno()
        if n < 0 and e == EINTR:
            continue
        if n < 0 and e == EAGAIN:
            return WOULD_BLOCK
        err[0] = e if n < 0 else EPIPE
        return FAILED


# --- tunnel lifecycle -----------------------------------------------------------------------

cdef double next_deadline(Core* c, Tunnel* t, int* reason) noexcept nogil:
    cdef double best = INFINITY
    cdef double at
    if c.idle > 0:
        # Halfway, a look at the send queues, which the deadline compares with (peer_reads).
        if t.looked_at > t.last_activity:
            best = t.last_activity + c.idle
        else:
            best = t.last_activity + c.idle_look
        reason[0] = R_IDLE
    if c.half_closed > 0 and t.first_eof > 0:
        at = t.first_eof + c.half_closed
        if at < best:
            best = at
            reason[0] = R_HALF_CLOSED
    if c.lifetime > 0:
        at = t.started + c.lifetime
        if at < best:
            best = at
            reason[0] = R_LIFETIME
    return best


cdef void heap_swap(Worker* w, Py_ssize_t i, Py_ssize_t j) noexcept nogil:
    cdef Tunnel* a = w.heap[i]
    w.heap[i] = w.heap[j]
    w.heap[j] = a
    w.heap[i].heap_index = i
    w.heap[j].heap_index = j


cdef void heap_up(Worker* w, Py_ssize_t i) noexcept nogil:
    cdef Py_ssize_t parent
    while i > 0:
        parent = (i - 1) // 2
        if w.heap[parent].timer_at <= w.heap[i].timer_at:
            return
        heap_swap(w, i, parent)
        i = parent


cdef void heap_down(Worker* w, Py_ssize_t i) noexcept nogil:
    cdef Py_ssize_t child
    while True:
        child = 2 * i + 1
        if child >= w.heap_len:
            return
        if child + 1 < w.heap_len and w.heap[child + 1].timer_at < w.heap[child].timer_at:
            child += 1
        if w.heap[i].timer_at <= w.heap[child].timer_at:
            return
        heap_swap(w, i, child)
        i = child


cdef int heap_push(Worker* w, Tunnel* t) noexcept nogil:
    cdef Tunnel** grown
    if w.heap_len == w.heap_cap:
        grown = <Tunnel**>realloc(w.heap, (w.heap_cap * 2 + 64) * sizeof(Tunnel*))
        if grown == NULL:
            return -1
        w.heap = grown
        w.heap_cap = w.heap_cap * 2 + 64
    t.heap_index = w.heap_len
    w.heap[w.heap_len] = t
    w.heap_len += 1
    heap_up(w, t.heap_index)
    return 0


cdef void heap_remove(Worker* w, Tunnel* t) noexcept nogil:
    cdef Py_ssize_t i = t.heap_index
    if i < 0:
        return
    w.heap_len -= 1
    if i != w.heap_len:
        heap_swap(w, i, w.heap_len)
        heap_up(w, i)
        heap_down(w, i)
    t.heap_index = -1


cdef void unqueue(Worker* w, Tunnel* t) noexcept nogil:
    cdef Tunnel** link = &w.ready
    while link[0] != NULL:
        if link[0] == t:
            link[0] = t.ready_next
            break
        link = &link[0].ready_next
    t.queued = False


cdef void finish(Worker* w, Tunnel* t, int reason, int closer, int err, bint abort_client,
                 bint abort_origin, double now) noexcept nogil:
    """Close both sockets exactly once and queue the record for the hub.

    The records count bytes delivered, so what a socket has not even sent when its stream
    ends abortively is taken back off the direction that wrote it: an abort (SO_LINGER 0)
    throws it away, and so did the peer's reset on the socket a reset came from. Bytes
    sent and not yet acknowledged stay counted: they travel ahead of the reset, and the
    peer may read them (or has, and its ACK was delayed). A clean FIN close still
    delivers its queue, which stays counted."""
    cdef linger abort
    cdef int side
    cdef bint aborted
    cdef int64_t lost
    cdef Dir* d
    abort.l_onoff = 1
    abort.l_linger = 0
    for side in range(2):
        # Out of epoll before close: a later fd with the same number must never inherit it.
        epoll_ctl(w.epfd, EPOLL_CTL_DEL, t.fd[side], NULL)
        aborted = abort_client if side == CLIENT else abort_origin
        if aborted or reason == R_RESET:
            d = &t.dir[1 - side]  # the direction writing to this side (CLIENT: DOWN)
            # Unsent bytes are the stream's end, and may reach back past what the engine
            # wrote (to the control plane's 200): never below nothing delivered.
            lost = min(sg_unsent(t.fd[side]), d.delivered)
            d.delivered -= lost
            sg_add(&w.core.bytes_down if side == CLIENT else &w.core.bytes_up, -lost)
        if aborted:
            setsockopt(t.fd[side], SOL_SOCKET, SO_LINGER, &abort, sizeof(abort))
        close(t.fd[side])
        t.fd[side] = -1
        d = &t.dir[side]
        if d.pipe != NULL:
            put_pipe(w, d.pipe, d.in_pipe > 0)
            d.pipe = NULL
            d.in_pipe = 0
        free(d.buf)
        d.buf = NULL
    heap_remove(w, t)
    if t.queued:
        unqueue(w, t)
    if t.bulk:
        sg_add(&w.bulk, -1)
        t.bulk = 0
    t.done = True
    t.reason = reason
    t.first_closer = closer
    t.err = err
    t.ended = now
    t.next = w.graveyard
    w.graveyard = t


cdef void fail(Worker* w, Tunnel* t, int side, int err, double now) noexcept nogil:
    """A socket error from ``side``: a reset is passed on as a reset, anything else aborts
    both sides, since the stream is broken either way."""
    if err == ECONNRESET or err == EPIPE or err == ENOTCONN:
        finish(w, t, R_RESET, t.first_closer if t.first_closer >= 0 else side, err,
               side == ORIGIN, side == CLIENT, now)
    else:
        finish(w, t, R_ERROR, PROXY, err, True, True, now)


cdef void expire(Worker* w, Tunnel* t, int reason, double now) noexcept nogil:
    """The proxy ends the tunnel: a clean FIN to each side, except a side still owed bytes
    the proxy holds, which gets an abort so that a cut stream never looks complete. The
    first closer is the side whose FIN came first, if one did, as after a reset: the
    reason already says that the proxy ended it. Only a tunnel neither side closed names
    the proxy."""
    finish(w, t, reason, t.first_closer if t.first_closer >= 0 else PROXY, 0,
           pending(&t.dir[DOWN]), pending(&t.dir[UP]), now)


cdef void saw_eof(Worker* w, Tunnel* t, int side, double now) noexcept nogil:
    if t.first_closer < 0:
        t.first_closer = side
    if t.first_eof == 0:
        t.first_eof = now
        if w.core.half_closed > 0 and now + w.core.half_closed < t.timer_at:
            t.timer_at = now + w.core.half_closed
            heap_up(w, t.heap_index)


cdef inline void mark_bulk(Worker* w, Tunnel* t, int which, bint bulk) noexcept nogil:
    """A direction is in bulk while its turns spend their whole budget with more to read:
    the relay is what holds it back, and another thread would move it faster. A turn that
    ends otherwise (the source ran dry or ended, or the destination takes no more) ends
    it. A tunnel with a direction in bulk counts in its thread's ``bulk``, which spill()
    evens out; so a long-lived tunnel that once carried a large file (a browser's, say), or
    one a slow reader holds back, does not weigh on its thread."""
    cdef int was = t.bulk
    if bulk:
        t.bulk |= 1 << which
    else:
        t.bulk &= ~(1 << which)
    if was and not t.bulk:
        sg_add(&w.bulk, -1)
    elif t.bulk and not was:
        sg_add(&w.bulk, 1)


cdef int pump_dir(Worker* w, Tunnel* t, int which, double now) noexcept nogil:
    """Move bytes one way until both ends would block or the budget is spent.
    Returns 1 when the tunnel ended."""
    cdef Dir* d = &t.dir[which]
    cdef int src = which              # UP reads the client, DOWN the origin
    cdef int dst = 1 - which
    cdef int err = 0
    cdef ssize_t n
    cdef ssize_t budget = PUMP_BUDGET
    cdef bint progress
    while True:
        progress = False
        if t.writable[dst] and pending(d):
            n = flush(w, d, t.fd[dst], &err)
            if n > 0:
                progress = True
                d.delivered += n
                sg_add(&w.core.bytes_up if which == UP else &w.core.bytes_down, n)
                budget -= n
                t.last_activity = now
            elif n == WOULD_BLOCK:
                t.writable[dst] = False
            else:
                fail(w, t, dst, err, now)
                return 1
        if t.readable[src] and not d.eof:
            n = fill(w, d, t.fd[src], &err)
            if n > 0:
                progress = True
                t.last_activity = now
            elif n == WOULD_BLOCK:
                t.readable[src] = False
            elif n == AT_EOF:
                d.eof = True
                saw_eof(w, t, src, now)
            elif n == FAILED:
                fail(w, t, src, err, now)
                return 1
        if not progress:
            break
        if budget <= 0:
            if not t.queued:
                t.queued = True
                t.ready_next = w.ready
                w.ready = t
            break
    mark_bulk(w, t, which, budget <= 0 and t.readable[src] and not d.eof)
    if d.eof and not d.shut and not pending(d):
        if d.pipe != NULL:
            put_pipe(w, d.pipe, False)
            d.pipe = NULL
        if shutdown(t.fd[dst], SHUT_WR) < 0:
            fail(w, t, dst, sg_errno(), now)
            return 1
        d.shut = True
        if t.dir[1 - which].shut:
            finish(w, t, R_EOF, t.first_closer, 0, False, False, now)
            return 1
    return 0


cdef void peer_error(Worker* w, Tunnel* t, int side, double now) noexcept nogil:
    """An error reported on a side (a reset, mostly) that the pump just run did not meet
    ends the tunnel with it. Reads and writes find it only if one comes:
    not after the side's EOF was read (even in the same event), nor while the direction
    from it waits for the other peer, nor while that peer is silent. What the proxy still
    holds for that peer then goes with the abort, as a reset drops a socket's send queue."""
    cdef int err = 0
    cdef socklen_t errlen = sizeof(err)
    if getsockopt(t.fd[side], SOL_SOCKET, SO_ERROR, &err, &errlen) == 0 and err != 0:
        fail(w, t, side, err, now)


cdef void pump(Worker* w, Tunnel* t, double now) noexcept nogil:
    cdef int side
    if pump_dir(w, t, UP, now) == 0:
        pump_dir(w, t, DOWN, now)
    # Bytes that came before a reset are read and passed on first (Linux keeps them
    # readable); an error the pump could not reach is looked into once the tunnel has
    # nothing left to move now. Not while it waits on the ready list: epoll reports an
    # edge once, so the error stays noted until the tunnel's last turn.
    if t.errors_seen and not t.done and not t.queued:
        for side in range(2):
            if t.errors_seen & (1 << side) and not t.done:
                peer_error(w, t, side, now)
        t.errors_seen = 0


# --- the worker thread ------------------------------------------------------------------

cdef void adopt(Worker* w, Tunnel* t, double now) noexcept nogil:
    """Register a new tunnel, or one moved here by spill(); edge-triggered ADD reports
    what is already ready.

    Its sockets are made non-blocking here, before the first read or write, rather than in
    submit: that keeps submit, in the hub, at one system call per fd, and one FIONBIO needs
    no look at the flags first (gevent's sockets already are non-blocking; a caller's may
    not be). A refused switch ends the tunnel like a refused ADD."""
    cdef epoll_event ev
    cdef int side
    cdef int reason = 0
    cdef int on = 1
    t.timer_at = next_deadline(w.core, t, &reason)
    if heap_push(w, t) < 0:
        finish(w, t, R_ERROR, PROXY, ENOMEM, True, True, now)
        return
    # A connected socket is writable until a write says otherwise. Waiting for each side's
    # first EPOLLOUT instead left bytes read from the other side in the pipe whenever both
    # came in one batch, and a reset right behind them then dropped them.
    t.writable[CLIENT] = t.writable[ORIGIN] = True
    for side in range(2):
        ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
        ev.data.u64 = <uint64_t><uintptr_t>t | <uint64_t>side
        if (ioctl(t.fd[side], FIONBIO, &on) < 0
                or epoll_ctl(w.epfd, EPOLL_CTL_ADD, t.fd[side], &ev) < 0):
            finish(w, t, R_ERROR, PROXY, sg_errno(), True, True, now)
            return


cdef int take_inbox(Worker* w, double now) noexcept nogil:
    cdef uint64_t count
    cdef Tunnel* t
    cdef Tunnel* nxt
    cdef int command
    read(w.wake_fd, &count, sizeof(count))
    pthread_mutex_lock(&w.lock)
    t = w.inbox
    w.inbox = NULL
    command = w.command
    w.command = CMD_RUN  # a command is carried out once
    pthread_mutex_unlock(&w.lock)
    while t != NULL:
        nxt = t.next
        t.next = NULL
        adopt(w, t, now)
        t = nxt
    return command


cdef void close_all(Worker* w, int reason, double now) noexcept nogil:
    while w.heap_len > 0:
        expire(w, w.heap[0], reason, now)


cdef void deliver(Worker* w, Tunnel* t) noexcept nogil:
    """Into a thread's inbox; called with its lock held, which this releases. Only the first
    tunnel of a batch wakes the thread, which takes the whole inbox: under load that saves
    a write(2) per CONNECT. Decided under the lock: once it is released the thread may
    already own t."""
    cdef uint64_t one = 1
    cdef bint wake = w.inbox == NULL
    t.next = w.inbox
    w.inbox = t
    pthread_mutex_unlock(&w.lock)
    if wake:
        write(w.wake_fd, &one, sizeof(one))


cdef bint spill(Worker* w, Tunnel* t, double now) noexcept nogil:
    """Move a bulk tunnel to the thread with the fewest, when that evens the counts out.

    Tunnels all start on the first thread: a short one (a CONNECT, a request, a close) then
    wakes no other thread, which on two cores cost a fifth of the CONNECT rate when tunnels
    were dealt out in turn. Tunnels in bulk (mark_bulk) are spread so that each thread
    carries as many as the others, give or take one, and the threads share the cores when
    transfers need them; a thread may be the first. Counts change with every turn, so a
    tunnel moves at most once in MOVE_PAUSE seconds: no tunnel bounces to and fro at the
    rate of its turns. A moved tunnel leaves this thread's epoll and heap and joins the
    other's inbox, whose adopt registers it anew (edge-triggered ADD reports what is
    ready), its pipes and held bytes going with it.
    Returns True when it moved: then it is no longer this thread's to touch."""
    cdef Worker* target = NULL
    cdef Worker* other
    cdef int i, side
    cdef int64_t least = 0
    cdef int64_t load
    if not t.bulk or now - t.moved_at < MOVE_PAUSE:  # ran dry since queued, or just moved
        return False
    for i in range(w.core.nworkers):
        other = &w.core.workers[i]
        if other != w:
            load = sg_load(&other.bulk)
            if target == NULL or load < least:
                target, least = other, load
    if target == NULL or sg_load(&w.bulk) <= least + 1:
        return False
    pthread_mutex_lock(&target.lock)
    if target.closing:  # it would never adopt it, or close it too late
        pthread_mutex_unlock(&target.lock)
        return False
    for side in range(2):
        epoll_ctl(w.epfd, EPOLL_CTL_DEL, t.fd[side], NULL)
    heap_remove(w, t)
    sg_add(&w.bulk, -1)
    sg_add(&target.bulk, 1)
    t.moved_at = now
    deliver(target, t)
    return True


cdef void run_ready(Worker* w, double now) noexcept nogil:
    cdef Tunnel* t = w.ready
    cdef Tunnel* nxt
    w.ready = NULL
    while t != NULL:
        nxt = t.ready_next
        t.queued = False
        if not t.done and not spill(w, t, now):
            pump(w, t, now)
        t = nxt


cdef bint peer_reads(Core* c, Tunnel* t, double now) noexcept nogil:
    """At an idle time's halfway point and at its deadline: False when the tunnel is idle.

    A peer draining a large send buffer slowly gives the engine no room to write for
    seconds, so the engine moves no byte, yet the tunnel is not idle. Halfway through the
    idle time the engine notes both send queues; at the deadline, a queue that changed
    since means a peer reads, and the idle time starts again. The look is taken anew in
    each idle time, after the last byte the engine moved, so an old one never counts.
    Two ioctls per look, none while bytes move (RelayTimeouts.idle_look)."""
    cdef int64_t client = sg_unacked(t.fd[CLIENT])
    cdef int64_t origin = sg_unacked(t.fd[ORIGIN])
    if t.looked_at <= t.last_activity:  # halfway: the look the deadline compares with
        t.outq[CLIENT] = client
        t.outq[ORIGIN] = origin
        t.looked_at = now
        return True
    if client == t.outq[CLIENT] and origin == t.outq[ORIGIN]:
        return False
    t.last_activity = now
    return True


cdef void run_timers(Worker* w, double now) noexcept nogil:
    """Deadlines are checked lazily: traffic only stamps last_activity, and a timer that
    fires early is pushed to the tunnel's real deadline. Idle tunnels cost nothing."""
    cdef Tunnel* t
    cdef int reason = 0
    cdef double at
    while w.heap_len > 0 and w.heap[0].timer_at <= now:
        t = w.heap[0]
        at = next_deadline(w.core, t, &reason)
        if at <= now and reason == R_IDLE and peer_reads(w.core, t, now):
            at = next_deadline(w.core, t, &reason)  # the deadline after a look, or idle anew
        if at <= now:
            expire(w, t, reason, now)
        else:
            t.timer_at = at
            heap_down(w, 0)


cdef void hand_over(Worker* w) noexcept nogil:
    """Give this batch's finished tunnels to the hub and wake its watcher."""
    cdef Tunnel* t = w.graveyard
    cdef Tunnel* nxt
    cdef uint64_t one = 1
    cdef bint wake
    if t == NULL:
        return
    w.graveyard = NULL
    pthread_mutex_lock(&w.core.done_lock)
    wake = w.core.done_head == NULL  # else the hub has a wake-up pending for the queue
    while t != NULL:
        nxt = t.next
        t.next = w.core.done_head
        w.core.done_head = t
        t = nxt
    pthread_mutex_unlock(&w.core.done_lock)
    if wake:
        write(w.core.done_fd, &one, sizeof(one))


cdef int wait_timeout(Worker* w, double now) noexcept nogil:
    cdef double wait
    if w.ready != NULL:
        return 0
    if w.heap_len == 0 or w.heap[0].timer_at == INFINITY:
        return -1
    wait = (w.heap[0].timer_at - now) * 1000.0
    if wait <= 0:
        return 0
    return <int>ceil(wait) if wait < 3600000.0 else 3600000


cdef void* worker_main(void* arg) noexcept nogil:
    cdef Worker* w = <Worker*>arg
    cdef epoll_event events[BATCH]
    cdef int n, i, side, command
    cdef uint32_t mask
    cdef uint64_t data
    cdef Tunnel* t
    cdef double now = sg_monotonic()
    cdef bint exiting = False
    while not exiting:
        n = epoll_wait(w.epfd, events, BATCH, wait_timeout(w, now))
        now = sg_monotonic()
        if n < 0:
            if sg_errno() == EINTR:
                continue
            # The epoll fd itself failed: nothing can move. Closing, so that neither
            # submit nor spill gives this thread another tunnel; those already in its
            # inbox end with the rest.
            pthread_mutex_lock(&w.lock)
            w.closing = True
            pthread_mutex_unlock(&w.lock)
            take_inbox(w, now)
            close_all(w, R_ERROR, now)
            hand_over(w)
            break
        for i in range(n):
            data = events[i].data.u64
            if data == 0:
                command = take_inbox(w, now)
                if command == CMD_CLOSE_ALL:
                    close_all(w, R_SHUTDOWN, now)
                elif command == CMD_EXIT:
                    # EXIT may have replaced a CLOSE_ALL not yet taken: close what is left,
                    # so every fd is closed and every on_done runs.
                    close_all(w, R_SHUTDOWN, now)
                    exiting = True
                continue
            t = <Tunnel*><uintptr_t>(data & ~(<uint64_t>1))
            if t.done:
                continue  # ended earlier in this batch
            side = <int>(data & 1)
            mask = events[i].events
            if mask & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
                t.readable[side] = True
            if mask & (EPOLLOUT | EPOLLHUP | EPOLLERR):
                t.writable[side] = True
            if mask & EPOLLERR:
                t.errors_seen |= 1 << side
            pump(w, t, now)
        run_ready(w, now)
        run_timers(w, now)
        hand_over(w)
    return NULL


cdef void forget_tunnel(Tunnel* t) noexcept nogil:
    """A parent's tunnel, in a forked child: close this process's copies of its fds, without
    a word to either peer (the parent still relays it). Nothing is freed: the fork may have
    caught a relay thread mid-change (a tunnel at two heap slots during a swap, a pipe both
    pooled and still a tunnel's), and a double free would abort the child; the copies are
    the child's to leak."""
    cdef int side
    for side in range(2):
        close(t.fd[side])
        if t.dir[side].pipe != NULL:
            close(t.dir[side].pipe.rfd)
            close(t.dir[side].pipe.wfd)


# --- the engine, in the hub ---------------------------------------------------------------

# Engines whose threads run hold a strong reference here: the threads use memory the engine
# object owns, so it must not be collected before they are joined, at the latest at exit.
_running = set()


def _default_threads():
    return max(1, min(MAX_THREADS, os.cpu_count() or 2))


cdef class NativeEngine:
    """The native engine; see :class:`splicegate.relay.Engine` for the contract."""

    cdef Core core
    cdef bint threads_started
    cdef bint closing
    cdef bint closed
    cdef uint64_t next_id
    cdef object callbacks
    cdef object watcher
    cdef object drained
    cdef object stopped         # set when a shutdown() call has finished its work
    cdef int allocated          # workers allocated; core.nworkers may be fewer if threads failed
    cdef bint batch             # relay threads are put under SCHED_BATCH
    cdef object __weakref__

    name = "native"
    splices = True

    def __cinit__(self):
        self.core.done_fd = -1
        pthread_mutex_init(&self.core.done_lock, NULL)

    def __init__(self, timeouts=None, threads=None, pipe_size=None, max_pipes=None,
                 processes=1, scheduling="batch"):
        cdef int i
        timeouts = timeouts or RelayTimeouts()
        pipe_size = int(pipe_size or DEFAULT_PIPE_SIZE)
        if not 4096 <= pipe_size <= 64 * 1024 * 1024:
            raise ValueError("pipe_size must be from 4096 to 67108864 bytes")
        threads = int(threads or _default_threads())
        if not 1 <= threads <= 64:
            raise ValueError("threads must be from 1 to 64")
        if scheduling not in SCHEDULING:
            raise ValueError(f"scheduling must be one of {', '.join(SCHEDULING)}")
        self.batch = scheduling == "batch"
        self.core.idle = timeouts.idle
        self.core.idle_look = timeouts.idle_look
        self.core.half_closed = timeouts.half_closed
        self.core.lifetime = timeouts.lifetime
        self.core.pipe_size = usable_pipe_size(pipe_size)
        # The cap is the whole server's: --workers processes share the one user's quota, so
        # each engine takes its share.
        self.core.max_pipes = pipe_share(self.core.pipe_size,
                                         int(max_pipes) if max_pipes else None, int(processes))
        # Idle pools may hold a quarter of the cap between them, so that pipes one thread
        # keeps for later never push another thread's live transfer onto the copy path.
        self.core.pool_keep = max(1, min(POOL_KEEP, self.core.max_pipes // (4 * threads)))
        self.callbacks = {}
        self.core.workers = <Worker*>calloc(threads, sizeof(Worker))
        if self.core.workers == NULL:
            raise MemoryError()
        self.allocated = threads
        for i in range(threads):
            self.core.workers[i].core = &self.core
            self.core.workers[i].epfd = -1
            self.core.workers[i].wake_fd = -1
            pthread_mutex_init(&self.core.workers[i].lock, NULL)
        self._open_done_channel()
        forget_in_forked_child(self)

    def __dealloc__(self):
        # While threads run they use the workers and the locks. Once they are joined (shut
        # down), or if they never started, no thread can hold a lock, and the hub takes
        # none once the engine is unreachable. Here rather than at shutdown: every engine
        # comes here, also one whose threads never started or whose shutdown never ran.
        cdef int i
        if self.closed or not self.threads_started:
            if self.core.workers != NULL:
                for i in range(self.allocated):
                    pthread_mutex_destroy(&self.core.workers[i].lock)
                free(self.core.workers)
                self.core.workers = NULL
            pthread_mutex_destroy(&self.core.done_lock)

    cdef _open_done_channel(self):
        self.core.done_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.core.done_fd < 0:
            raise OSError(sg_errno(), "eventfd failed")
        self.watcher = gevent.get_hub().loop.io(self.core.done_fd, 1)
        self.watcher.ref = False  # an idle engine must not keep the hub alive
        self.watcher.start(self._on_done_ready)

    cdef _start_threads(self):
        cdef int i
        cdef int started = 0
        cdef Worker* w
        cdef epoll_event ev
        cdef sigset_t all_signals, old
        for i in range(self.allocated):
            w = &self.core.workers[i]
            w.epfd = epoll_create1(EPOLL_CLOEXEC)
            w.wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
            ev.events = EPOLLIN
            ev.data.u64 = 0
            if (w.epfd < 0 or w.wake_fd < 0
                    or epoll_ctl(w.epfd, EPOLL_CTL_ADD, w.wake_fd, &ev) < 0):
                error = OSError(sg_errno(), "cannot set up a relay thread's epoll and eventfd")
                self._close_worker_fds(0)  # a later submit tries again from nothing
                raise error
        # Engine threads take no signals: splice has no MSG_NOSIGNAL, so a write into a reset
        # socket raises SIGPIPE, which must not kill an application that restored SIG_DFL.
        sigfillset(&all_signals)
        pthread_sigmask(SIG_SETMASK, &all_signals, &old)
        try:
            while started < self.allocated:
                if pthread_create(&self.core.workers[started].thread, NULL, worker_main,
                                  &self.core.workers[started]) != 0:
                    break
                self.core.workers[started].running = True
                started += 1
        finally:
            pthread_sigmask(SIG_SETMASK, &old, NULL)
        if self.batch:
            self._schedule_batch(started)
        # Fewer threads than asked for: tunnels go only to the ones that run.
        self._close_worker_fds(started)
        if started == 0:
            raise OSError(EAGAIN, "cannot start a relay thread")
        for i in range(started):
            sg_name_thread(self.core.workers[i].thread, i)
        self.core.nworkers = started
        self.threads_started = True
        _running.add(self)

    cdef _schedule_batch(self, int started):
        """SCHED_BATCH (see the module docstring): on 2 cores it took 20-25 % off the CPU a
        CONNECT costs. Set from here rather than by each thread, so that a refusal (a
        seccomp filter) is known and said; the threads then keep the policy they inherited
        and relay the same."""
        cdef int i
        cdef int err = 0
        for i in range(started):
            err = sg_batch_thread(self.core.workers[i].thread) or err
        if err:
            log.warning("relay threads keep their inherited scheduling policy: SCHED_BATCH "
                        "was refused (%s)", os.strerror(err))

    cdef _close_worker_fds(self, int first):
        """Close the epoll and eventfd of the workers from ``first`` on, whose threads do
        not run."""
        cdef int i
        cdef Worker* w
        for i in range(first, self.allocated):
            w = &self.core.workers[i]
            if w.epfd >= 0:
                close(w.epfd)
            if w.wake_fd >= 0:
                close(w.wake_fd)
            w.epfd = w.wake_fd = -1

    def submit(self, int client_fd, int origin_fd, bytes early_up, on_done):
        cdef Tunnel* t
        cdef Worker* w
        cdef int side
        cdef int fds[2]
        cdef int sotype
        cdef socklen_t solen = sizeof(sotype)
        if self.closing:
            raise RuntimeError("the relay engine is shutting down")
        if not self.threads_started:
            self._start_threads()
        fds[0] = client_fd
        fds[1] = origin_fd
        # When submit raises, the caller still owns both fds, and neither may have been
        # touched (not even made non-blocking): submit only looks, and the relay thread
        # makes them non-blocking once they are the engine's (adopt). A socket, as the
        # Python engine's socket objects require: a pipe or a file is refused here
        # (ENOTSOCK), not in the middle of a tunnel; a closed fd fails the same call (EBADF).
        for side in range(2):
            if getsockopt(fds[side], SOL_SOCKET, SO_TYPE, &sotype, &solen) < 0:
                raise OSError(sg_errno(), "not a usable socket")
        t = <Tunnel*>calloc(1, sizeof(Tunnel))
        if t == NULL:
            raise MemoryError()
        if early_up:
            t.dir[UP].buf = <char*>malloc(len(early_up))
            if t.dir[UP].buf == NULL:
                free(t)
                raise MemoryError()
            memcpy(t.dir[UP].buf, <char*>early_up, len(early_up))
            t.dir[UP].buf_len = len(early_up)
        self.next_id += 1
        t.id = self.next_id
        t.fd[CLIENT] = client_fd
        t.fd[ORIGIN] = origin_fd
        t.first_closer = -1
        t.heap_index = -1
        t.started = t.last_activity = sg_monotonic()
        self.callbacks[t.id] = on_done  # a tunnel is active until its on_done has run
        w = &self.core.workers[0]  # every tunnel starts there; bulk ones move on (spill)
        pthread_mutex_lock(&w.lock)
        if w.closing:  # its epoll failed, and the thread is gone (worker_main)
            pthread_mutex_unlock(&w.lock)
            del self.callbacks[t.id]
            free(t.dir[UP].buf)
            free(t)
            raise OSError(EIO, "the relay thread stopped: its epoll instance failed")
        deliver(w, t)

    def _on_done_ready(self):
        """In the hub: drain every finished tunnel at once and report each."""
        cdef uint64_t count
        cdef Tunnel* head
        cdef Tunnel* t
        finished = []
        read(self.core.done_fd, &count, sizeof(count))
        pthread_mutex_lock(&self.core.done_lock)
        head = self.core.done_head
        self.core.done_head = NULL
        pthread_mutex_unlock(&self.core.done_lock)
        while head != NULL:
            t = head
            head = t.next
            record = TunnelRecord(
                bytes_up=t.dir[UP].delivered,
                bytes_down=t.dir[DOWN].delivered,
                duration_s=max(0.0, t.ended - t.started),
                first_closer=CLOSERS[t.first_closer],
                reason=REASONS[t.reason],
                errno=t.err,
            )
            on_done = self.callbacks.pop(t.id, None)
            free(t)  # every one, before any on_done runs: one may raise an exit
            if on_done is not None:
                finished.append((on_done, record))
        try:
            run_each(finished, lambda pair: report_done(*pair))
        finally:
            if self.drained is not None and not self.callbacks:
                self.drained.set()

    def _bulk_counts(self):
        """Per running relay thread, its tunnels in bulk: for tests, and a look when
        debugging how transfers are spread."""
        return [sg_load(&self.core.workers[i].bulk) for i in range(self.core.nworkers)]

    @property
    def pipe_cap(self):
        """The pipes this engine may hold at once: its share of the server's cap."""
        return self.core.max_pipes

    def stats(self):
        return {
            # counted in the hub, not by the relay threads: a scrape (or a drain) never
            # sees a tunnel gone whose on_done has not run yet
            "active": len(self.callbacks),
            "pipes_in_use": sg_load(&self.core.pipes_in_use),
            "bytes_up": sg_load(&self.core.bytes_up),
            "bytes_down": sg_load(&self.core.bytes_down),
            "tunnels_total": self.next_id,
            "threads": self.core.nworkers,
        }

    cdef _command(self, int command):
        cdef int i
        cdef uint64_t one = 1
        for i in range(self.core.nworkers):
            pthread_mutex_lock(&self.core.workers[i].lock)
            self.core.workers[i].command = command
            self.core.workers[i].closing = True
            pthread_mutex_unlock(&self.core.workers[i].lock)
            write(self.core.workers[i].wake_fd, &one, sizeof(one))

    cdef _join_threads(self):
        cdef int i
        self._command(CMD_EXIT)
        for i in range(self.core.nworkers):
            if self.core.workers[i].running:
                with nogil:
                    pthread_join(self.core.workers[i].thread, NULL)
                self.core.workers[i].running = False
        _running.discard(self)

    def shutdown(self, double deadline):
        """Stop taking tunnels; active ones get until ``deadline`` (time.monotonic()).
        Called again while the first call waits, it closes what is left at once and waits
        for the first call to finish."""
        self.closing = True
        if self.closed:
            return
        if self.stopped is not None:  # another greenlet's shutdown waits: cut it short
            if self.callbacks and self.threads_started:
                self._command(CMD_CLOSE_ALL)
            self.stopped.wait(timeout=30)
            return
        self.stopped = Event()
        escaped = None
        try:
            if self.threads_started:
                self.drained = Event()
                if self.callbacks:
                    self.drained.wait(timeout=max(0.0, deadline - time.monotonic()))
                if self.callbacks:
                    self._command(CMD_CLOSE_ALL)
                    self.drained.wait(timeout=10)
                self._join_threads()
                try:
                    self._on_done_ready()
                except BaseException as exc:  # an exit from an on_done: raised once closed
                    escaped = exc
                self._release_worker_resources()
            self.closed = True
            self.watcher.stop()
            self.watcher.close()
            close(self.core.done_fd)
            self.core.done_fd = -1
            if escaped is not None:
                raise escaped
        finally:
            # Killed while waiting (a caller's timeout): a later call starts over.
            self.stopped.set()
            self.stopped = None

    cdef _release_worker_resources(self):
        cdef int i
        cdef Worker* w
        cdef Pipe* p
        for i in range(self.core.nworkers):
            w = &self.core.workers[i]
            while w.free_pipes != NULL:
                p = w.free_pipes
                w.free_pipes = p.next
                destroy_pipe(w, p)
            w.free_count = 0
            close(w.epfd)
            close(w.wake_fd)
            w.epfd = w.wake_fd = -1
            free(w.heap)
            w.heap = NULL
            w.heap_len = w.heap_cap = 0

    def _stop_at_exit(self):
        """Threads must be joined before the interpreter finalizes. A submit after it (an
        atexit hook of the application's, say) is refused as after shutdown: no thread is
        left to take the tunnel."""
        self.closing = True
        if self.threads_started and not self.closed:
            self._join_threads()

    def _forget_after_fork(self):
        """In a forked child: the threads did not survive the fork, and every fd the parent's
        tunnels hold must be closed here, or the parent's closes would never reach peers."""
        cdef int i
        cdef Worker* w
        cdef Tunnel* t
        cdef Pipe* p
        pthread_mutex_init(&self.core.done_lock, NULL)
        self.core.nworkers = 0  # the child starts as many threads as were asked for, anew
        for i in range(self.allocated):
            w = &self.core.workers[i]
            pthread_mutex_init(&w.lock, NULL)
            w.running = False
            while w.heap_len > 0:
                w.heap_len -= 1
                forget_tunnel(w.heap[w.heap_len])
            while w.inbox != NULL:
                t = w.inbox
                w.inbox = t.next
                forget_tunnel(t)
            while w.free_pipes != NULL:
                p = w.free_pipes
                w.free_pipes = p.next
                close(p.rfd)
                close(p.wfd)
            w.free_count = 0
            w.bulk = 0
            w.closing = False
            # The parent's tunnels on these lists are gone here: never pump or report them.
            w.ready = NULL
            w.graveyard = NULL
            w.command = CMD_RUN
        self._close_worker_fds(0)
        self.threads_started = False
        _running.discard(self)
        self.core.pipes_total = self.core.pipes_in_use = 0
        self.core.done_head = NULL
        self.callbacks.clear()
        # A shutdown() caught waiting by the fork goes on in the child too: it has no tunnel
        # left to wait for, and finishes its work on the child's copy of the engine.
        if self.drained is not None:
            self.drained.set()
        if not self.closed:
            self.watcher.stop()
            close(self.core.done_fd)
            self._open_done_channel()


def _stop_all_at_exit():
    for engine in list(_running):
        engine._stop_at_exit()


atexit.register(_stop_all_at_exit)
