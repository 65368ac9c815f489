"""The reusing handler pool: greenlets kept for the next connection, joined and killed."""

from __future__ import annotations

import gevent
import pytest

from splicegate.handlers import HandlerPool


def run_in_hub(pool: HandlerPool, fn, *args) -> None:
    """The Acceptor spawns from the hub; do the same."""
    gevent.get_hub().loop.run_callback(pool.spawn, fn, *args)


def test_a_finished_handler_greenlet_takes_the_next_job() -> None:
    pool = HandlerPool(keep=4)
    seen: list[object] = []
    for i in range(5):
        run_in_hub(pool, lambda i=i: seen.append((i, gevent.getcurrent())))
        gevent.sleep(0.01)
    assert pool.join(timeout=5)
    assert [i for i, _ in seen] == [0, 1, 2, 3, 4]
    assert len({g for _, g in seen}) == 1  # one greenlet served them all
    pool.kill()


def test_concurrent_handlers_and_the_idle_bound() -> None:
    pool = HandlerPool(keep=2)
    release = gevent.event.Event()
    running: list[int] = []

    def handler(i: int) -> None:
        running.append(i)
        release.wait(5)

    for i in range(6):
        pool.spawn(handler, i)
    gevent.sleep(0.05)
    assert sorted(running) == list(range(6))
    assert not pool.join(timeout=0.05)
    release.set()
    assert pool.join(timeout=5)
    gevent.sleep(0.01)
    assert len(pool._idle) == 2  # the rest ended
    pool.kill()


def test_a_failing_handler_does_not_lose_the_greenlet(capsys: pytest.CaptureFixture) -> None:
    pool = HandlerPool()
    done = gevent.event.Event()

    def boom() -> None:
        raise ValueError("handler bug")

    run_in_hub(pool, boom)
    gevent.sleep(0.01)
    run_in_hub(pool, done.set)
    assert done.wait(5)
    assert pool.join(timeout=5)
    assert "handler bug" in capsys.readouterr().err
    pool.kill()


def test_kill_ends_running_and_idle_greenlets() -> None:
    pool = HandlerPool()
    stuck = gevent.event.Event()
    pool.spawn(stuck.wait)
    pool.spawn(lambda: None)
    gevent.sleep(0.01)
    greenlets = [r.greenlet for r in [*pool._busy, *pool._idle]]
    assert len(greenlets) == 2
    pool.kill(block=True, timeout=5)
    gevent.sleep(0.01)
    assert all(g.dead for g in greenlets)
    assert pool.join(timeout=1)
