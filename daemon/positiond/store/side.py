"""A side connection of the daemon's workers (alert delivery, ...) on either backend.

The workers apart from the writer (:mod:`positiond.alerts.delivery`) run short statements on a
connection of their own, written against ``sqlite3``. On PostgreSQL that connection is a
:class:`~positiond.store.pgconn.PgConnection` (the same surface, the same ``sqlite3.Error``
subclasses), so each worker is one code for both backends. A worker that sees
:func:`broken` closes the connection and opens a new one at its next step.

Every use of a worker's connection, its close included, runs on one thread of its own
(:class:`SerialThread`): a caller cancelled mid-call (a daemon stopping) leaves the statement
running there, and the close queued behind it. Closing a connection from another thread while a
statement runs on it crashed the process (SIGSEGV at a stop).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar, cast

from positiond.store.dsn import PgDsn

__all__ = ["SerialThread", "broken", "connect_side"]

T = TypeVar("T")


class SerialThread:
    """One worker thread for a connection: calls run there one after another, in order."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._pool: ThreadPoolExecutor | None = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the thread; cancelling the caller does not stop it (it finishes
        there, before whatever was queued after it)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix=self.name)
        return await asyncio.get_running_loop().run_in_executor(self._pool, partial(fn, *args))

    async def close(self, conn: sqlite3.Connection | None) -> None:
        """Close ``conn`` on the thread, after every call queued before, and end the thread."""
        pool, self._pool = self._pool, None
        if pool is None:
            if conn is not None:
                conn.close()  # never used from a thread: nothing can be running on it
            return
        try:
            if conn is not None:
                await asyncio.get_running_loop().run_in_executor(pool, conn.close)
        finally:
            pool.shutdown(wait=False)


def connect_side(db: Path | PgDsn, busy_timeout: float) -> sqlite3.Connection:
    """An autocommit connection to ``db`` (the caller says BEGIN); ``sqlite3.OperationalError``
    when it cannot be made."""
    if not isinstance(db, PgDsn):
        conn = sqlite3.connect(
            db, timeout=busy_timeout, isolation_level=None, check_same_thread=False
        )
        conn.execute("PRAGMA journal_mode").fetchone()  # WAL, set by the store
        return conn
    import psycopg  # here: psycopg is the optional postgres extra

    from positiond.store.pgconn import PgConnection
    from positiond.store.postgres import connect

    try:
        raw = connect(db, busy_timeout)
    except psycopg.Error as exc:
        raise sqlite3.OperationalError(f"cannot connect to {db}: {exc}") from None
    return cast(sqlite3.Connection, PgConnection(raw))  # its surface: positiond.store.pgconn


def broken(conn: sqlite3.Connection) -> bool:
    """A PostgreSQL connection that was lost (a SQLite one never is)."""
    return bool(getattr(conn, "broken", False))
