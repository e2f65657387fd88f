"""The database file itself: who may write it.

**The lock.** One file can have several names: a symlink (to the file, or to a directory above
it) and a hard link. A lock taken on ``<path as spelled>.lock`` let a second daemon run on the
same database through another name, and the two wrote beside each other. :func:`lock_database`
locks what the names lead to instead, with two ``flock`` locks:

- ``<resolved path>.lock``: every symlink leads to the same resolved path; this is also the file
  earlier versions locked (``<db>.lock``), so a daemon and a posctl of different versions still
  exclude each other during an upgrade;
- the database file itself: every hard link is the same inode (its device and inode number).

Both the daemon (for its whole life) and posctl's direct write (while it writes) take it through
this one function, so both follow the same rule.

SQLite locks with ``fcntl`` (POSIX) locks, which Linux keeps apart from ``flock`` locks, but a
process loses its POSIX locks on a file when it closes *any* descriptor of that file: the
descriptor held here on the database must be closed only after SQLite's connection is.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DatabaseLock", "DatabaseLocked", "lock_database", "lock_file_for"]

Identity = tuple[int, int]  # (st_dev, st_ino)


class DatabaseLocked(Exception):
    """Another process (a running positiond, or posctl writing) holds the database's lock."""


def lock_file_for(db: Path) -> Path:
    """``<db>.lock`` beside the file every name of ``db`` leads to (symlinks resolved)."""
    real = db.resolve()
    return real.with_name(real.name + ".lock")


def _open(path: Path, create: bool) -> int:
    """Read-write (created 0600 if ``create``); read-only if we may not write: flock works on
    either, and an operator who may only read must still see the daemon's lock."""
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    try:
        return os.open(path, flags, 0o600)
    except PermissionError:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


@dataclass
class DatabaseLock:
    """Both locks, held until :meth:`close`; ``fd`` is a descriptor of the database itself."""

    path: Path
    lock_file: Path
    fd: int
    lock_fd: int
    closed: bool = field(default=False)

    @property
    def identity(self) -> Identity:
        """(device, inode) of the database file this lock holds."""
        st = os.fstat(self.fd)
        return st.st_dev, st.st_ino

    def close(self) -> None:
        """Release both locks (after the SQLite connection on this file is closed)."""
        if not self.closed:
            self.closed = True
            os.close(self.fd)
            os.close(self.lock_fd)


def lock_database(db: Path, *, create: bool = False) -> DatabaseLock:
    """Lock the database ``db`` leads to, or raise :class:`DatabaseLocked`.

    ``create``: make the database file (0600) and its directory (0700) if missing, as the daemon
    does at its first start. Otherwise a missing file raises FileNotFoundError; a file we may not
    even read raises PermissionError.
    """
    real = db.resolve()
    if create:
        real.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock_file = real.with_name(real.name + ".lock")
    lock_fd = _open(lock_file, True)
    try:
        fd = _open(real, create)
    except BaseException:
        os.close(lock_fd)
        raise
    held = DatabaseLock(db, lock_file, fd, lock_fd)
    try:
        for one in (lock_fd, fd):
            fcntl.flock(one, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        held.close()
        raise DatabaseLocked(f"the database {db} is locked by another process") from None
    except BaseException:
        held.close()
        raise
    return held
