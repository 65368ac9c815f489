"""SIGHUP and SIGUSR1 caught from the command's first line, before the third of a second of
imports that comes before the daemon's own handlers (daemon.Signals): their default action
kills the process, so a reload or a log reopen asked of a daemon just starting (logrotate's
postrotate, ``systemctl kill -s HUP`` reaching workers still importing) would have stopped
it. What comes meanwhile is kept, and Signals acts on it once its handlers are in place.
Anything else (passwd, check-config, --version, --help, a usage error) gets the handlers
it had back, and a signal kept is raised again, to do what it would have done.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

#: the signals whose default action would kill a daemon that is still starting
CAUGHT = (signal.SIGHUP, signal.SIGUSR1)

_pending: list[int] = []  # each signal once: Signals merges reloads (and reopens) anyway
_before: dict[int, Any] = {}  # the handlers replaced, while caught


def _keep(signum: int, _frame: FrameType | None) -> None:
    if signum not in _pending:
        _pending.append(signum)


def catch() -> None:
    """A signal ignored already (nohup) stays ignored."""
    for signum in CAUGHT:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            _before[signum] = signal.signal(signum, _keep)


def take() -> list[int]:
    """For Signals, whose handlers have replaced these: the signals kept, in order. The
    catch is over; release() then does nothing."""
    taken = list(_pending)
    _pending.clear()
    _before.clear()
    return taken


def release() -> None:
    """The handlers from before catch() back, and what came meanwhile raised again; nothing
    when nothing was caught (cli.main called by an application) or Signals took over."""
    for signum, handler in _before.items():
        signal.signal(signum, handler)
    _before.clear()
    for signum in _pending[:]:
        _pending.remove(signum)
        signal.raise_signal(signum)
