"""What a watcher sees first: the live state in the database, read in one statement set.

The daemon reads it on the writer's thread, in the writer's order (a
:class:`~positiond.ops.WatchOp` in a batch), so each change committed after it reaches the watcher
as a ``changes`` frame and nothing falls between the two (docs/PROTOCOL.md §4.14). ``posctl
watch`` reads the same snapshot from a read-only connection while the daemon is down.

Bounded: at most :data:`MAX_SESSIONS` sessions, :data:`MAX_LEGS` legs, :data:`MAX_ORPHANS` orphans
and the :data:`EVENTS` newest events, so the ack stays far below the message size limit.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from positiond.ops import Result, WatchOp
from positiond.store.schema import SCHEMA_VERSION, trail_level_sql

__all__ = ["EVENTS", "MAX_LEGS", "MAX_ORPHANS", "MAX_SESSIONS", "read_snapshot", "watch_snapshot"]

MAX_SESSIONS = 200
MAX_LEGS = 500
MAX_ORPHANS = 100
EVENTS = 20

# Legs a board shows: open, or waiting for someone (crashed, flagged for review).
LIVE_LEGS = ("ACTIVE", "CRASHED", "NEEDS_REVIEW")


def _dicts(cur: sqlite3.Cursor, sql: str, args: tuple[Any, ...]) -> list[dict[str, Any]]:
    rows = cur.execute(sql, args).fetchall()
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in rows]


def read_snapshot(
    cur: sqlite3.Cursor, strategy: str | None = None, version: int = SCHEMA_VERSION
) -> dict[str, Any]:
    """Sessions that are live or own a leg still open or crashed, those legs, the undecided
    orphans and the newest events; ``strategy``: only that strategy's (orphans have none)."""
    where, args = ("AND s.strategy_name = ?", (strategy,)) if strategy else ("", ())
    legs_in = ", ".join(f"'{s}'" for s in LIVE_LEGS)
    legs = _dicts(
        cur,
        "SELECT p.position_key AS key, s.session_key AS session, s.strategy_name AS strategy, "
        "p.symbol, p.exchange, p.product, p.side, p.quantity, p.entry_price, p.stop_price, "
        f"p.highest_price, {trail_level_sql('p', version)}, p.current_price, p.status, "
        "p.review_reason, p.updated_at FROM strategy_positions p "
        "JOIN strategy_sessions s ON s.id = p.session_id "
        f"WHERE p.status IN ({legs_in}) {where} ORDER BY p.position_id DESC LIMIT ?",
        (*args, MAX_LEGS),
    )
    sessions = _dicts(
        cur,
        "SELECT s.id, s.session_key AS session, s.strategy_name AS strategy, s.status, "
        "s.client_host AS host, s.client_pid AS pid, s.start_time, s.last_heartbeat, "
        "s.crash_timestamp, s.crash_reason FROM strategy_sessions s "
        "WHERE (s.status IN ('RUNNING', 'STALLED') OR EXISTS (SELECT 1 FROM strategy_positions "
        f"p WHERE p.session_id = s.id AND p.status IN ({legs_in}))) {where} "
        "ORDER BY s.id DESC LIMIT ?",
        (*args, MAX_SESSIONS),
    )
    orphans = _dicts(
        cur,
        "SELECT id, detected_at, symbol, exchange, product, broker_quantity, known_quantity "
        "FROM broker_orphans WHERE status = 'ORPHANED' ORDER BY id DESC LIMIT ?",
        (MAX_ORPHANS,),
    )
    events = _dicts(
        cur,
        "SELECT e.id, e.event_time AS time, e.event_type AS event, s.session_key AS session, "
        "s.strategy_name AS strategy, p.position_key AS key, p.symbol FROM position_events e "
        "JOIN strategy_sessions s ON s.id = e.session_id "
        "LEFT JOIN strategy_positions p ON p.position_id = e.position_id "
        f"WHERE TRUE {where} ORDER BY e.id DESC LIMIT ?",
        (*args, EVENTS),
    )
    events.reverse()  # oldest first, as they scroll
    return {"sessions": sessions, "legs": legs, "orphans": orphans, "events": events}


def watch_snapshot(cur: sqlite3.Cursor, op: WatchOp, now: str) -> Result:
    """The store's side of a ``watch``: the snapshot for its ack."""
    return Result(True, {"snapshot": read_snapshot(cur, op.strategy)})
