"""Shared test machinery: deadlines scaled by one env factor, a real daemon process, db reads."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from bench import launcher
from positiond.store.dsn import PgDsn
from tests.pg import pg_rows

T = TypeVar("T")

# Every deadline in the suite is a multiple of this unit (seconds), scaled for slow machines.
FACTOR = float(os.environ.get("POSITIOND_TEST_TIMEOUT_FACTOR", "1"))
UNIT = 1.0 * FACTOR


def wait_for(condition: Callable[[], T], timeout: float = 5.0, what: str = "condition") -> T:
    """Poll ``condition`` until it returns something truthy; fail (an AssertionError) after
    ``timeout`` units."""
    return launcher.poll(condition, timeout * UNIT, what)


def rows(db: Path | PgDsn, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
    """Read the database the way an operator would: a separate read-only connection (SQLite's
    placeholders, rows by index and name, on either backend)."""
    if isinstance(db, PgDsn):
        return pg_rows(db, sql, params)
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def session_status(db: Path | PgDsn, session_id: int) -> str | None:
    if isinstance(db, Path) and not db.exists():
        return None
    found = rows(db, "SELECT status FROM strategy_sessions WHERE id = ?", (session_id,))
    return found[0]["status"] if found else None


class DaemonProcess(launcher.DaemonProcess):
    """The shared launcher (bench.launcher) with the suite's defaults: a DEBUG log, a 3 s
    heartbeat timeout, every deadline scaled by UNIT. ``db``: the database (default: a SQLite
    file in ``workdir``), a PostgreSQL one too."""

    def __init__(
        self,
        workdir: Path,
        *extra: str,
        heartbeat_timeout: float = 3.0,
        db: Path | PgDsn | None = None,
    ) -> None:
        super().__init__(
            workdir, *extra, heartbeat_timeout=heartbeat_timeout, log_level="DEBUG", unit=UNIT
        )
        if db is not None:
            self.db = db  # type: ignore[assignment]  # launcher's db is a file; here either
            self.args[self.args.index("--db") + 1] = db.url if isinstance(db, PgDsn) else str(db)
