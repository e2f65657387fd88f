"""A side connection of the daemon's workers (alert delivery, ...) on either backend.

The workers apart from the writer (:mod:`positiond.alerts.delivery`) run short statements on a
connection of their own, written against ``sqlite3``. On PostgreSQL that connection is a
:class:`~positiond.store.pgconn.PgConnection` (the same surface, the same ``sqlite3.Error``
subclasses), so each worker is one code for both backends. A worker that sees
:func:`broken` closes the connection and opens a new one at its next step.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import cast

from positiond.store.dsn import PgDsn

__all__ = ["broken", "connect_side"]


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
