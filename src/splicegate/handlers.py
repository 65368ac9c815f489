"""Connection handlers in greenlets that are kept and reused.

A greenlet per connection is gevent's model, but a fresh one per CONNECT costs more than it
seems: its Python frame stack is mapped when it starts and unmapped when it ends, and an
munmap in a process with running relay threads is a TLB shoot-down on every core. A
handler's greenlet here parks when its connection is handed off or refused and takes the
next one; only beyond ``keep`` idle greenlets do they end. It has the part of gevent's
``Pool`` interface that the Acceptor and ``ProxyServer.stop`` use: ``spawn``, ``join`` and
``kill``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import gevent
from gevent.event import Event
from gevent.hub import Waiter


class _Runner:
    """One reusable greenlet: runs a job, then waits for the next."""

    __slots__ = ("greenlet", "job", "pool", "waiter")

    def __init__(self, pool: HandlerPool) -> None:
        self.pool = pool
        self.job: tuple[Callable[..., Any], tuple[Any, ...]] | None = None
        self.waiter: Waiter | None = None
        self.greenlet = gevent.spawn(self._run)

    def give(self, job: tuple[Callable[..., Any], tuple[Any, ...]] | None) -> None:
        """Hand over a job, or None to end the greenlet."""
        self.job = job
        waiter, self.waiter = self.waiter, None
        if waiter is None:
            return  # a new greenlet: it finds the job when it starts
        hub = gevent.get_hub()
        if gevent.getcurrent() is hub:  # the Acceptor accepts in the hub
            waiter.switch(None)
        else:
            hub.loop.run_callback(waiter.switch, None)

    def _run(self) -> None:
        pool = self.pool
        while True:
            job, self.job = self.job, None
            if job is None:  # woken without work: the pool is closing
                return
            fn, args = job
            try:
                fn(*args)
            except Exception:
                gevent.get_hub().handle_error(self.greenlet, *sys.exc_info())
            finally:
                pool.done(self)
            if not pool.park(self):
                return
            self.waiter = Waiter()
            self.waiter.get()


class HandlerPool:
    """Spawns handlers on reused greenlets; at most ``keep`` of them wait idle."""

    def __init__(self, keep: int = 256) -> None:
        self.keep = keep
        self._idle: list[_Runner] = []
        self._busy: set[_Runner] = set()
        self._empty = Event()
        self._empty.set()
        self._closed = False

    def spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        runner = self._idle.pop() if self._idle else _Runner(self)
        self._busy.add(runner)
        self._empty.clear()
        runner.give((fn, args))

    def done(self, runner: _Runner) -> None:
        self._busy.discard(runner)
        if not self._busy:
            self._empty.set()

    def park(self, runner: _Runner) -> bool:
        """Whether the runner should wait for more work rather than end."""
        if self._closed or len(self._idle) >= self.keep:
            return False
        self._idle.append(runner)
        return True

    def join(self, timeout: float | None = None) -> bool:
        """Wait until no handler runs; False when ``timeout`` came first. A handler that
        calls this (ProxyServer.stop() from a hook) is not waited for, nor killed after: it
        would wait for itself, and a kill would end the stop it is running."""
        me = gevent.getcurrent()
        mine = next((r for r in self._busy if r.greenlet is me), None)
        if mine is not None:
            self.done(mine)
        return self._empty.wait(timeout)

    def kill(self, block: bool = True, timeout: float | None = None) -> None:
        """End every handler still running, and the idle greenlets with them."""
        self._closed = True
        idle, self._idle = self._idle, []
        for runner in idle:
            runner.give(None)
        busy = [runner.greenlet for runner in self._busy]
        gevent.killall(busy, block=block, timeout=timeout)
