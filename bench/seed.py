"""The seed design's in-process persistence, written with the stdlib sqlite3.

The seed wrote from the strategy's own process: one commit per entry (position row + event
row), and updates appended to a list under a lock and flushed inline by the caller with one
executemany UPDATE + commit. :mod:`bench.seed_orm` does it through SQLAlchemy, as the seed did;
this module is the same SQL without the ORM: the fallback when SQLAlchemy is not installed
(``wal=False``: SQLite's defaults, as the ORM baseline) and, tuned (``wal=True``: WAL +
``synchronous=NORMAL``, like positiond), the fastest an in-process write can be.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

__all__ = ["BaselineStore", "SeedStore", "orm_available", "seed_store"]

_DDL = """
CREATE TABLE IF NOT EXISTS strategy_sessions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    strategy_name TEXT NOT NULL,
    status TEXT NOT NULL,
    start_time TEXT NOT NULL,
    end_time TEXT,
    last_heartbeat TEXT,
    crash_timestamp TEXT,
    crash_reason TEXT
);
CREATE TABLE IF NOT EXISTS strategy_positions (
    position_id INTEGER PRIMARY KEY AUTOINCREMENT,
    position_key TEXT NOT NULL UNIQUE,
    session_id INTEGER NOT NULL,
    symbol TEXT NOT NULL,
    exchange TEXT NOT NULL,
    product TEXT NOT NULL,
    leg_type TEXT,
    side TEXT NOT NULL,
    quantity INTEGER NOT NULL,
    entry_price REAL NOT NULL,
    entry_time TEXT NOT NULL,
    current_price REAL,
    stop_price REAL,
    highest_price REAL,
    last_trail_level REAL,
    state TEXT NOT NULL DEFAULT '{}',
    status TEXT NOT NULL,
    was_crashed BOOLEAN NOT NULL DEFAULT FALSE,
    exit_price REAL,
    exit_time TEXT,
    exit_reason TEXT,
    updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS strategy_positions_session ON strategy_positions(session_id, status);
CREATE TABLE IF NOT EXISTS position_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    position_id INTEGER,
    session_id INTEGER NOT NULL,
    event_type TEXT NOT NULL,
    event_time TEXT NOT NULL,
    payload TEXT NOT NULL DEFAULT '{}'
);
"""


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class SeedStore:
    """In-process writer in the bench's own thread; ``wal``: WAL + synchronous=NORMAL."""

    def __init__(self, path: Path, *, wal: bool = True) -> None:
        self.conn = sqlite3.connect(path)  # default isolation: implicit BEGIN before DML
        if wal:
            mode = self.conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise RuntimeError(f"baseline database is not in WAL mode ({mode})")
            self.conn.execute("PRAGMA synchronous = NORMAL")
        self.conn.executescript(_DDL)
        cur = self.conn.execute(
            "INSERT INTO strategy_sessions (strategy_name, status, start_time, last_heartbeat) "
            "VALUES ('bench-seed', 'RUNNING', ?, ?)",
            (_now(), _now()),
        )
        self.session_id = int(cur.lastrowid or 0)
        self.conn.commit()
        self._lock = threading.Lock()
        self._queue: list[tuple[float, float, float, str, str]] = []

    def save_position_entry(
        self,
        key: str,
        symbol: str,
        leg_type: str | None,
        entry_price: float,
        stop_price: float | None,
        quantity: int,
    ) -> int:
        """One position row + one ENTRY event + commit: the seed's durable entry."""
        now = _now()
        cur = self.conn.execute(
            "INSERT INTO strategy_positions (position_key, session_id, symbol, exchange, "
            "product, leg_type, side, quantity, entry_price, entry_time, current_price, "
            "stop_price, highest_price, state, status, updated_at) "
            "VALUES (?, ?, ?, 'NFO', 'MIS', ?, 'BUY', ?, ?, ?, ?, ?, ?, '{}', 'ACTIVE', ?)",
            (
                key,
                self.session_id,
                symbol,
                leg_type,
                quantity,
                entry_price,
                now,
                entry_price,
                stop_price,
                entry_price,
                now,
            ),
        )
        position_id = int(cur.lastrowid or 0)
        payload: dict[str, Any] = {
            "symbol": symbol,
            "leg_type": leg_type,
            "entry_price": entry_price,
            "stop_price": stop_price,
            "quantity": quantity,
        }
        self.conn.execute(
            "INSERT INTO position_events (position_id, session_id, event_type, event_time, "
            "payload) VALUES (?, ?, 'ENTRY', ?, ?)",
            (position_id, self.session_id, now, json.dumps(payload)),
        )
        self.conn.commit()
        return position_id

    def queue_position_update(
        self, key: str, current_price: float, stop_price: float, highest_price: float
    ) -> None:
        """The seed's update: append under a lock (the flush is the caller's business)."""
        with self._lock:
            self._queue.append((current_price, stop_price, highest_price, _now(), key))

    def flush(self) -> int:
        """Inline flush in the caller's thread: executemany UPDATE + commit."""
        with self._lock:
            queue, self._queue = self._queue, []
        if queue:
            self.conn.executemany(
                "UPDATE strategy_positions SET current_price = ?, stop_price = ?, "
                "highest_price = ?, updated_at = ? WHERE position_key = ?",
                queue,
            )
            self.conn.commit()
        return len(queue)

    def read_leg(self, key: str) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = self.conn.execute(
            "SELECT current_price, stop_price, highest_price FROM strategy_positions "
            "WHERE position_key = ?",
            (key,),
        ).fetchone()
        return row

    def close(self) -> None:
        self.conn.close()


class BaselineStore(Protocol):
    def save_position_entry(
        self,
        key: str,
        symbol: str,
        leg_type: str | None,
        entry_price: float,
        stop_price: float | None,
        quantity: int,
    ) -> int: ...

    def queue_position_update(
        self, key: str, current_price: float, stop_price: float, highest_price: float
    ) -> None: ...

    def flush(self) -> int: ...

    def read_leg(self, key: str) -> tuple[Any, ...] | None: ...

    def close(self) -> None: ...


def orm_available() -> bool:
    try:
        import sqlalchemy  # noqa: F401
    except ImportError:
        return False
    return True


def seed_store(path: Path) -> tuple[BaselineStore, str]:
    """The seed-style baseline and its label: the SQLAlchemy ORM, or the same SQL without it."""
    if orm_available():
        from bench.seed_orm import OrmSeedStore

        return OrmSeedStore(path), "SQLAlchemy ORM"
    return SeedStore(path, wal=False), "sqlite3 (SQLAlchemy not installed)"
