"""The protect worker's SQL: its own connection, one short statement or transaction at a time.

Every state change of a ``protective_orders`` row and its PROTECT_* leg event are written in
one transaction (the event raises the alert, by trigger). A change names the states it may
leave (``WHERE state IN ...``): a row another writer moved meanwhile is left as it is.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from positiond.protect.plan import Order
from positiond.store.dsn import PgDsn
from positiond.store.recovery import read_legs
from positiond.store.side import connect_side

__all__ = [
    "LegWork",
    "change",
    "claimed",
    "connect",
    "insert",
    "leg_status",
    "live_rows",
    "new_work",
    "open_legs",
]

LegWork = dict[str, Any]

_NEW_WORK = """
SELECT p.position_id, p.position_key, p.session_id, p.symbol, p.exchange, p.product, p.side,
    p.quantity, p.stop_price, p.status, s.strategy_name, s.protect, e.id AS crash_event_id
FROM strategy_positions p
JOIN strategy_sessions s ON s.id = p.session_id
JOIN position_events e ON e.id = (
    SELECT max(x.id) FROM position_events x
    WHERE x.position_id = p.position_id AND x.event_type = 'CRASH')
WHERE p.status = 'CRASHED'
    AND NOT EXISTS (SELECT 1 FROM protective_orders o WHERE o.crash_event_id = e.id)
ORDER BY e.id
"""

_LIVE = """
SELECT o.*, p.position_key, p.status AS leg_status, p.session_id AS leg_session,
    s.status AS session_status
FROM protective_orders o
JOIN strategy_positions p ON p.position_id = o.position_id
JOIN strategy_sessions s ON s.id = p.session_id
WHERE o.state IN ('PLANNED', 'PLACED')
ORDER BY o.id
"""


def connect(db: Path | PgDsn, busy_timeout: float) -> sqlite3.Connection:
    """The worker's connection: SQLite, or PostgreSQL through the store's shim (its BEGIN
    IMMEDIATE takes the write lock SQLite's does: :mod:`positiond.store.pgconn`)."""
    conn = connect_side(db, busy_timeout)
    if isinstance(conn, sqlite3.Connection):  # PostgreSQL's rows read by name already
        conn.row_factory = sqlite3.Row
    return conn


def new_work(conn: sqlite3.Connection) -> list[LegWork]:
    """CRASHED legs whose latest crash has no protective_orders row yet."""
    return [dict(r) for r in conn.execute(_NEW_WORK).fetchall()]


def live_rows(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """PLANNED and PLACED rows, with their leg's key, status and session."""
    return [dict(r) for r in conn.execute(_LIVE).fetchall()]


def claimed(conn: sqlite3.Connection) -> set[str]:
    """Every broker order id a protective row holds (one order protects one leg)."""
    rows = conn.execute("SELECT order_id FROM protective_orders WHERE order_id IS NOT NULL")
    return {str(r[0]) for r in rows.fetchall()}


def leg_status(conn: sqlite3.Connection, position_id: int) -> tuple[str, str, int] | None:
    """(status, position_key, session_id) of the leg now."""
    row = conn.execute(
        "SELECT status, position_key, session_id FROM strategy_positions WHERE position_id = ?",
        (position_id,),
    ).fetchone()
    return None if row is None else (row[0], row[1], row[2])


def _event(
    cur: sqlite3.Cursor, position_id: int, kind: str, when: str, payload: Mapping[str, Any]
) -> None:
    cur.execute(
        "INSERT INTO position_events (position_id, session_id, event_type, event_time, payload) "
        "SELECT position_id, session_id, ?, ?, ? FROM strategy_positions WHERE position_id = ?",
        (kind, when, orjson.dumps(dict(payload)).decode(), position_id),
    )


def insert(
    conn: sqlite3.Connection,
    leg: Mapping[str, Any],
    *,
    state: str,
    mode: str,
    order: Order | None,
    pricetype: str,
    tag: str,
    reason: str | None,
    event: str,
    payload: Mapping[str, Any],
    now: str,
) -> int | None:
    """The row for one crash of one leg, and its event; None when the leg is no longer CRASHED
    or that crash already has a row (an earlier run planned it)."""
    action = order.action if order else ("SELL" if leg["side"] == "BUY" else "BUY")
    cur = conn.cursor()
    cur.execute("BEGIN IMMEDIATE")
    try:
        cur.execute(
            "INSERT OR IGNORE INTO protective_orders (position_id, session_id, crash_event_id, "
            "state, mode, symbol, exchange, product, action, quantity, pricetype, trigger_price, "
            "price, tag, planned_at, updated_at, reason) "
            "SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ? "
            "WHERE EXISTS (SELECT 1 FROM strategy_positions WHERE position_id = ? "
            "AND status = 'CRASHED')",
            (
                leg["position_id"], leg["session_id"], leg["crash_event_id"], state, mode,
                leg["symbol"], leg["exchange"], leg["product"], action, leg["quantity"],
                pricetype, order.trigger_price if order else None,
                order.price if order else None, tag, now, now, reason, leg["position_id"],
            ),
        )  # fmt: skip
        if cur.rowcount != 1:
            cur.execute("ROLLBACK")
            return None
        row_id = int(cur.lastrowid or 0)
        _event(cur, leg["position_id"], event, now, {"protect_id": row_id, **payload})
        cur.execute("COMMIT")
        return row_id
    except BaseException:
        if conn.in_transaction:
            cur.execute("ROLLBACK")
        raise


def change(
    conn: sqlite3.Connection,
    row_id: int,
    from_states: Sequence[str],
    fields: Mapping[str, Any],
    *,
    now: str,
    event: str | None = None,
    payload: Mapping[str, Any] | None = None,
) -> bool:
    """Set ``fields`` on the row if it is in one of ``from_states``, with its event; False when
    it was not (someone else moved it)."""
    values = {**fields, "updated_at": now}
    sets = ", ".join(f"{name} = ?" for name in values)
    marks = ", ".join("?" for _ in from_states)
    cur = conn.cursor()
    cur.execute("BEGIN IMMEDIATE")
    try:
        cur.execute(
            f"UPDATE protective_orders SET {sets} WHERE id = ? AND state IN ({marks})",
            (*values.values(), row_id, *from_states),
        )
        if cur.rowcount != 1:
            cur.execute("ROLLBACK")
            return False
        if event is not None:
            pid = cur.execute(
                "SELECT position_id FROM protective_orders WHERE id = ?", (row_id,)
            ).fetchone()[0]
            _event(cur, pid, event, now, {"protect_id": row_id, **(payload or {})})
        cur.execute("COMMIT")
        return True
    except BaseException:
        if conn.in_transaction:
            cur.execute("ROLLBACK")
        raise


def open_legs(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every open leg (ACTIVE, CRASHED, NEEDS_REVIEW) with its session's status."""
    found = read_legs(conn, "open", None)
    if found["truncated"]:
        raise ValueError("more open legs than one query returns: not judged")
    legs: list[dict[str, Any]] = found["legs"]
    return legs
