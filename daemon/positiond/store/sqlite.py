"""The SQLite store: one writer connection through aiosqlite, one transaction per batch.

:class:`SQLiteStore` is the :class:`positiond.store.Store` the daemon runs on today. Each
:class:`~positiond.ops.Batch` goes to SQLite as a single function call run on aiosqlite's
thread (:func:`run_on_thread`: one thread hop per batch, not one per statement) and commits
once (:func:`positiond.store.writes.apply_batch`). :func:`apply_direct` applies a batch with a
short-lived connection of its own: posctl's write when no daemon runs, under the daemon's lock.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import quote

import aiosqlite

from positiond.ops import Batch, LegRow, LiveSession, Result
from positiond.store import recovery
from positiond.store.dbfile import (
    CorruptDatabase,
    DatabaseLost,
    FileWatch,
    Lost,
    StoreError,
    backup,
    open_error,
    quick_check,
)
from positiond.store.schema import migrate
from positiond.store.writes import apply_batch, load_live

__all__ = [
    "AIOSQLITE_VERSIONS",
    "INTEGRITY_CHECK_SECONDS",
    "SQLiteStore",
    "Synchronous",
    "apply_direct",
    "connect_readonly",
    "prepare_file",
    "run_on_thread",
    "setup_connection",
]

log = logging.getLogger(__name__)
T = TypeVar("T")
Synchronous = Literal["NORMAL", "FULL"]

# PRAGMA quick_check at open, bounded: ~0.15 s for a 100 MB database in the page cache, ~1.5 s
# from a cold disk (measured on the 2-core test machine); past this the rest is left unchecked.
INTEGRITY_CHECK_SECONDS = 5.0

# The aiosqlite releases run_on_thread is known to work with: [first, past the last). The same
# bound is in pyproject.toml; tests/test_store.py fails loudly when the installed one is outside.
AIOSQLITE_VERSIONS = ((0, 20), (0, 23))


async def run_on_thread(conn: aiosqlite.Connection, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(sqlite3_connection, *args)`` on ``conn``'s thread: one hop, one result.

    aiosqlite has no public API to run a callable on its thread; ``_execute`` is what its own
    methods use (0.17 to 0.22 at least). This is the only place that touches it, and the
    dependency is bounded (:data:`AIOSQLITE_VERSIONS`).
    """
    raw = conn._conn
    result: T = await conn._execute(fn, raw, *args)  # type: ignore[no-untyped-call]
    return result


def prepare_file(path: Path) -> None:
    """Create the database file (and its directory) closed to other users: 0600 in 0700."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)


class SQLiteStore:
    """The daemon's single writer connection: a :class:`positiond.store.Store` on SQLite.

    Open with :meth:`open` (or :func:`positiond.store.open_store`), close with :meth:`close`.
    """

    def __init__(self, conn: aiosqlite.Connection, path: Path, watch: FileWatch | None) -> None:
        self._conn = conn
        self.path = path
        self.watch = watch

    @classmethod
    async def open(
        cls,
        path: Path,
        synchronous: Synchronous = "NORMAL",
        busy_timeout: float = 5.0,
        *,
        watch: FileWatch | None = None,
        check_seconds: float = INTEGRITY_CHECK_SECONDS,
    ) -> SQLiteStore:
        """Open (creating and migrating as needed) the database at ``path``.

        ``busy_timeout``: how long a write waits for another connection's lock before the
        batch fails (and is retried later, unacknowledged). ``watch``: checked after every
        commit, before the batch counts as written (:class:`DatabaseLost`). A file that is not
        a database or fails ``PRAGMA quick_check`` (given at most ``check_seconds``) raises
        :class:`CorruptDatabase`; any other failure to open it, :class:`StoreError`.
        """
        try:
            prepare_file(path)
            conn = await aiosqlite.connect(path, isolation_level=None)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open the database {path}: {exc}") from None
        store = cls(conn, path, watch)
        try:
            await store.call(setup_connection, synchronous, int(busy_timeout * 1000), check_seconds)
        except (sqlite3.Error, CorruptDatabase) as exc:
            await conn.close()
            raise open_error(path, exc) from None
        except BaseException:
            await conn.close()
            raise
        if watch is not None:
            watch.arm()
        return store

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(sqlite3_connection, *args)`` on the writer thread (:func:`run_on_thread`)."""
        return await run_on_thread(self._conn, fn, *args)

    async def migrate(self) -> int:
        """Bring the schema to this version's (done by :meth:`open` already); return it."""
        return await self.call(migrate)

    async def apply(self, batch: Batch) -> list[Result]:
        """Commit a batch; one :class:`Result` per durable op. Raises on storage faults, and
        :class:`DatabaseLost` when the files written are no longer the database's."""
        return await self.call(_apply_watched, batch, self.watch)

    async def query(self, what: str, strategy: str | None = None) -> dict[str, Any]:
        """``crashed`` legs (the seed's recovery query) or every ``open`` one, as posctl and
        a recovering strategy see them: ``{"legs": [...], "truncated": bool}``."""
        return await self.call(recovery.read_legs, what, strategy)

    async def load_live(self) -> tuple[list[LiveSession], list[LegRow]]:
        """RUNNING sessions and their ACTIVE legs."""
        return await self.call(load_live)

    async def save(self, lost: Lost) -> str:
        """Keep what the open connection still holds after ``lost``; say where it went.

        A WAL or -shm file gone: checkpoint the WAL into the database file, which is still in
        place. The database file gone: copy the whole database (SQLite's online backup, read
        through the open connection) to ``<db>.rescued-<time>`` beside the path.
        """
        if lost.file != "db":
            busy = await self.call(_checkpoint)
            if busy:
                raise sqlite3.OperationalError("the checkpoint was blocked by a reader")
            return f"the WAL was checkpointed into {self.path}"
        target = self.path.with_name(f"{self.path.name}.rescued-{time.strftime('%Y%m%dT%H%M%S')}")
        await self.call(backup, target)
        return f"a copy of the database as this daemon still sees it is in {target}"

    async def close(self) -> None:
        """Checkpoint the WAL and close the connection.

        A checkpoint that fails (a full disk) loses nothing: the WAL keeps every commit and the
        next start checkpoints it. One line in the log, then the connection is closed anyway.
        """
        try:
            await self.call(_checkpoint)
        except sqlite3.Error as exc:
            log.warning(
                "could not checkpoint the WAL into %s at stop (%s); nothing is lost: the WAL "
                "keeps every commit and the next start checkpoints it",
                self.path,
                exc,
            )
        finally:
            await self._conn.close()


def _apply_watched(conn: sqlite3.Connection, batch: Batch, watch: FileWatch | None) -> list[Result]:
    results = apply_batch(conn, batch)
    if watch is not None and (lost := watch.check()) is not None:
        raise DatabaseLost(lost)
    return results


def setup_connection(
    conn: sqlite3.Connection, synchronous: Synchronous, busy_ms: int, check_seconds: float = 0.0
) -> None:
    """Make ``conn`` a writer: WAL, ``synchronous``, busy timeout, foreign keys, the schema
    migrated (after a ``PRAGMA quick_check`` of at most ``check_seconds``, if > 0)."""
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
    if check_seconds > 0:
        quick_check(conn, check_seconds)
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode.lower() != "wal":
        raise sqlite3.OperationalError(f"could not switch the database to WAL (got {mode})")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA journal_size_limit = 67108864")
    migrate(conn)


def _checkpoint(conn: sqlite3.Connection) -> bool:
    """Copy the whole WAL into the database and empty it; True if a reader kept it busy."""
    busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
    return bool(busy)


def _uri(path: Path, mode: str) -> str:
    return f"file:{quote(str(path.absolute()), safe='/')}?mode={mode}"


def connect_readonly(path: Path, busy_timeout: float = 5.0) -> sqlite3.Connection:
    """A connection that can only read the existing database at ``path`` (posctl's reads: they
    work whether or not the daemon runs, and never block its writer); rows are sqlite3.Row."""
    conn = sqlite3.connect(_uri(path, "ro"), uri=True, timeout=busy_timeout, isolation_level=None)
    conn.row_factory = sqlite3.Row
    return conn


def apply_direct(path: Path, batch: Batch, busy_timeout: float = 5.0) -> list[Result]:
    """Apply one batch to the existing database at ``path`` with a connection of its own.

    For a writer that is not the daemon (posctl when no daemon runs): the caller holds the
    database's lock (:func:`positiond.store.dbfile.lock_database`). The file is never created
    here; an older schema is migrated as the daemon would. Raises ``sqlite3.Error`` and
    :class:`positiond.store.schema.SchemaError`.
    """
    conn = sqlite3.connect(_uri(path, "rw"), uri=True, timeout=busy_timeout, isolation_level=None)
    try:
        setup_connection(conn, "NORMAL", int(busy_timeout * 1000))
        return apply_batch(conn, batch)
    finally:
        conn.close()

