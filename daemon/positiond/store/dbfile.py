"""The database file itself: who may write it, whether it is still the database, is it sound.

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
descriptor held here on the database must be closed only after SQLite's connection is. (On
NFS, Linux emulates ``flock`` with ``fcntl`` locks and this lock would block other processes'
readers; WAL mode needs a local filesystem anyway: its shared memory does not work over a network.)

**The watch.** :class:`FileWatch` says whether the files SQLite has open are still the ones at
the database's paths. A database unlinked or replaced while open keeps taking writes into a file
nobody will find again; a WAL unlinked keeps them until the process ends. Checked after every
commit (before its acks) and on a timer; each check is three ``stat`` calls and one ``fstat``
(8-16 us on the 2-core test machine, against ~100 us for committing an empty batch).

**Integrity.** A file that is not a database, or a damaged one, is refused at open with one line
that says what to do (:func:`open_error`), after a time-bounded ``PRAGMA quick_check``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from positiond.store.dsn import PgDsn

__all__ = [
    "CorruptDatabase",
    "DatabaseLock",
    "DatabaseLocked",
    "DatabaseLost",
    "Fenced",
    "FileWatch",
    "Lost",
    "StoreError",
    "backup",
    "is_corruption",
    "lock_database",
    "lock_file_for",
    "open_error",
    "quick_check",
    "restore_advice",
]

log = logging.getLogger(__name__)

Identity = tuple[int, int]  # (st_dev, st_ino)


class DatabaseLocked(Exception):
    """Another process (a running positiond, or posctl writing) holds the database's lock."""


class Fenced(Exception):
    """PostgreSQL, several hosts: this daemon's lease is no longer its own (it expired, or
    another daemon took it over); the batch was rolled back and nothing of it is acknowledged
    (positiond.store.lease)."""


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


def _identity(path: Path) -> Identity | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


@dataclass(frozen=True)
class Lost:
    """A file SQLite writes is no longer at its path: ``file`` is "db", "wal" or "shm"."""

    file: str
    message: str


class FileWatch:
    """Are the database, its ``-wal`` and its ``-shm`` still the files SQLite has open?

    ``fd`` is a descriptor of the database (the lock's); :meth:`arm` records the WAL and
    shared-memory files once SQLite has opened them.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd
        real = path.resolve()  # SQLite names the WAL and -shm after the resolved path
        self.wal = real.with_name(real.name + "-wal")
        self.shm = real.with_name(real.name + "-shm")
        st = os.fstat(fd)
        self.db_identity: Identity = (st.st_dev, st.st_ino)
        self.wal_identity: Identity | None = None
        self.shm_identity: Identity | None = None

    def arm(self) -> None:
        """Record the WAL and -shm files (call after the connection has opened them)."""
        self.wal_identity = _identity(self.wal)
        self.shm_identity = _identity(self.shm)

    def check(self) -> Lost | None:
        """None while every file is in place; else which one is gone and what happened."""
        if os.fstat(self.fd).st_nlink == 0:
            return Lost("db", f"the database {self.path} was deleted while positiond had it open")
        if _identity(self.path) != self.db_identity:
            return Lost("db", f"the database {self.path} was deleted, moved or replaced while open")
        for which, name, path, known in (
            ("wal", "WAL", self.wal, self.wal_identity),
            ("shm", "shared-memory file", self.shm, self.shm_identity),
        ):
            if known is not None and _identity(path) != known:
                return Lost(
                    which, f"the database's {name} {path} was deleted or replaced while open"
                )
        return None


# ---- integrity --------------------------------------------------------------------------------

_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26


class StoreError(RuntimeError):
    """The database cannot be opened or used; the message says why and what to do."""


class CorruptDatabase(StoreError):
    """The file is not a database, or SQLite found it damaged (SQLITE_NOTADB, SQLITE_CORRUPT)."""


class DatabaseLost(StoreError):
    """A file SQLite writes is no longer at its path (:meth:`FileWatch.check`).

    Raised after a batch's commit and before its acks: what it wrote went into a file nobody
    will find again, so nothing in it may be acknowledged.
    """

    def __init__(self, lost: Lost) -> None:
        super().__init__(lost.message)
        self.lost = lost


def is_corruption(exc: BaseException) -> bool:
    """SQLITE_CORRUPT or SQLITE_NOTADB (or a failed quick_check): retrying cannot help."""
    if isinstance(exc, CorruptDatabase):
        return True
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)


def restore_advice(path: Path | PgDsn) -> str:
    """What an operator does with a damaged database (one clause, for a log line)."""
    return (
        f"stop positiond, move {path} and its -wal and -shm files aside, and restore the latest "
        "backup (docs/DEPLOY.md, 'Back up the database')"
    )


def open_error(path: Path | PgDsn, exc: BaseException) -> StoreError:
    """The one-line error for a database that could not be opened."""
    if is_corruption(exc):
        return CorruptDatabase(
            f"the database {path} is damaged or not a database ({exc}): {restore_advice(path)}"
        )
    return StoreError(f"cannot open the database {path}: {exc}")


def quick_check(conn: sqlite3.Connection, seconds: float) -> None:
    """``PRAGMA quick_check``; raise :class:`CorruptDatabase` on a finding.

    Abandoned with a warning after ``seconds`` (a large database from a cold disk): what was not
    checked is still checked as it is read, and damage found then stops the writes
    (:func:`is_corruption`).
    """
    deadline = time.monotonic() + seconds
    conn.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)
    try:
        found = [str(row[0]) for row in conn.execute("PRAGMA quick_check(10)")]
    except sqlite3.OperationalError as exc:
        if "interrupted" not in str(exc):
            raise
        log.warning(
            "integrity check stopped after %.0fs (a large database): the rest is checked as it is "
            "used",
            seconds,
        )
        return
    finally:
        conn.set_progress_handler(None, 0)
    if found != ["ok"]:
        raise CorruptDatabase("quick_check: " + "; ".join(" ".join(f.split()) for f in found))


def backup(conn: sqlite3.Connection, target: Path) -> None:
    """Copy the database ``conn`` reads to a new file ``target`` (0600; never overwrites)."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    os.close(fd)
    dst = sqlite3.connect(target)
    try:
        conn.backup(dst)
        # One self-contained file (no -wal beside it) to move into place; WAL again once opened.
        dst.execute("PRAGMA journal_mode = DELETE")
    finally:
        dst.close()
