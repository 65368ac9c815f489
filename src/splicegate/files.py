"""Reading the files the settings name (the config file, the password file)."""

from __future__ import annotations

import errno
import os
import stat


def private_directory(path: str) -> bool:
    """A directory (not a link to one) of this user's that no one else may enter: where a
    supervisor keeps its workers' settings, checked by both sides."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return (
        stat.S_ISDIR(st.st_mode)
        and st.st_uid == os.geteuid()
        and not stat.S_IMODE(st.st_mode) & 0o077
    )


def read_regular(path: str) -> bytes:
    """The bytes of ``path``, which must be a regular file: a FIFO or a device named in the
    settings would block whoever reads it (a supervisor's whole loop, on a reload) until
    something writes to it. Raises OSError, its strerror saying what is wrong."""
    # O_NOCTTY: a terminal named by mistake must not become a session leader's.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        with open(fd, "rb", closefd=False) as f:  # O_NONBLOCK means nothing to a file
            return f.read()
    finally:
        os.close(fd)
