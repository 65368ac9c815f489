"""SIGHUP and SIGUSR1 caught from the command's first line, before the third of a second of
imports that comes before the daemon's own handlers (daemon.Signals): their default action
kills the process, so a reload or a log reopen asked of a daemon just starting (logrotate's
postrotate, an operator's script) would have stopped it. What comes meanwhile is kept, and
Signals acts on it once its handlers are in place; the other commands (passwd,
check-config) get the default action back, and any signal kept is raised again.
"""

from __future__ import annotations

import signal
from types import FrameType

#: the signals whose default action would kill a daemon that is still starting
CAUGHT = (signal.SIGHUP, signal.SIGUSR1)

_pending: list[int] = []


def _keep(signum: int, _frame: FrameType | None) -> None:
    _pending.append(signum)


def catch() -> None:
    for signum in CAUGHT:
        signal.signal(signum, _keep)


def take() -> list[int]:
    """The signals kept so far, in order; none is kept once this has been called, as the
    caller's handlers replaced these."""
    taken = list(_pending)
    _pending.clear()
    return taken


def release() -> None:
    """For a command that is not a daemon: the default actions back, and what came
    meanwhile raised again."""
    for signum in CAUGHT:
        signal.signal(signum, signal.SIG_DFL)
    for signum in take():
        signal.raise_signal(signum)
