"""The database's counts for /metrics, read in the scrape thread on a read-only connection.

Sessions and legs by status and what needs attention live in the database, not in the daemon's
memory (a CRASHED session left memory when its verdict committed). They are read here, on a
connection of their own (SQLite read-only, or PostgreSQL through :mod:`positiond.store.side`),
in one short read-only transaction: neither SQLite in WAL mode nor PostgreSQL makes the writer
wait for a reader, and no query runs on the event loop. The counts are kept for ``max_age``
seconds, so several scrapers at once cost one read.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from positiond.store.dsn import PgDsn
from positiond.store.side import connect_side

__all__ = ["Counts", "DatabaseCounts"]

log = logging.getLogger(__name__)

# The same groups as ``posctl crashed`` (positiond.ctl.read.cmd_crashed) adds up.
_ATTENTION = """
SELECT
  (SELECT count(*) FROM strategy_positions WHERE status = 'CRASHED' AND was_crashed = true)
  + (SELECT count(*) FROM strategy_positions WHERE status = 'NEEDS_REVIEW')
  + (SELECT count(*) FROM strategy_positions p JOIN strategy_sessions s ON s.id = p.session_id
     WHERE p.status = 'ACTIVE' AND s.status IN ('COMPLETED', 'CRASHED'))
  + (SELECT count(*) FROM broker_orphans WHERE status = 'ORPHANED')
"""


@dataclass(frozen=True)
class Counts:
    sessions: dict[str, int] = field(default_factory=dict)  # every known status, from 0
    legs: dict[str, int] = field(default_factory=dict)
    attention: int = 0


def _by_status(conn: sqlite3.Connection, lookup: str, table: str) -> dict[str, int]:
    counts = {name: 0 for (name,) in conn.execute(f"SELECT name FROM {lookup}")}
    for status, n in conn.execute(f"SELECT status, count(*) FROM {table} GROUP BY status"):
        counts[status] = n
    return counts


class DatabaseCounts:
    """``get()`` -> the latest :class:`Counts` (None when the database cannot be read)."""

    def __init__(
        self,
        db: Path | PgDsn,
        *,
        max_age: float = 0.5,
        busy_timeout: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db, self.max_age, self.busy_timeout = db, max_age, busy_timeout
        self.monotonic = monotonic
        self._lock = threading.Lock()  # the HTTP server may run two scrapes at once
        self._conn: sqlite3.Connection | None = None
        self._cached: tuple[float, Counts | None] | None = None
        self._failing = False  # logged once per failure, not once per scrape

    def get(self) -> Counts | None:
        with self._lock:
            now = self.monotonic()
            if self._cached is not None and now - self._cached[0] < self.max_age:
                return self._cached[1]
            counts = self._read()
            self._cached = (now, counts)
            return counts

    def _read(self) -> Counts | None:
        try:
            if self._conn is None:
                self._conn = self._connect()
            conn = self._conn
            conn.execute("BEGIN" if isinstance(self.db, Path) else "BEGIN READ ONLY")
            try:
                counts = Counts(
                    _by_status(conn, "session_statuses", "strategy_sessions"),
                    _by_status(conn, "position_statuses", "strategy_positions"),
                    int(conn.execute(_ATTENTION).fetchone()[0]),
                )
            finally:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if not self._failing:
                log.warning("metrics: cannot read the database %s: %s", self.db, exc)
            self._failing = True
            self._drop()
            return None
        self._failing = False
        return counts

    def _connect(self) -> sqlite3.Connection:
        if isinstance(self.db, PgDsn):
            return connect_side(self.db, self.busy_timeout)
        return sqlite3.connect(
            f"file:{self.db}?mode=ro", uri=True, timeout=self.busy_timeout,
            isolation_level=None, check_same_thread=False,
        )  # fmt: skip

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def close(self) -> None:
        with self._lock:
            self._drop()
