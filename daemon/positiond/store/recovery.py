"""Store functions for recovery and operator ops: queries, adoption, resolution, orphans, prune.

Each runs inside the writer's batch transaction (:func:`positiond.store.writes.apply_batch`),
so it is ordered with everything else the daemon writes and is acknowledged only after the
commit. :func:`read_legs` and :func:`leg_dict` are the same reads for a read-only connection
(posctl), so posctl and a recovering strategy see the same legs.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import orjson

from positiond.ops import (
    LIVE_SESSION_STATUSES,
    FencedOp,
    LegRow,
    OrphanResolveOp,
    OrphansOp,
    PruneOp,
    QueryOp,
    ResolveOp,
    Result,
)
from positiond.store import protection
from positiond.store.schema import iso, trail_level_sql

__all__ = [
    "LIVE_LEG_STATUSES",
    "MAX_QUERY_ROWS",
    "ORPHAN_RESOLUTIONS",
    "UNRESOLVED_ORPHAN_STATUSES",
    "fenced",
    "leg_dict",
    "orphans",
    "prune",
    "query",
    "read_legs",
    "resolve",
    "resolve_orphan",
]

# Legs that still hold (or may hold) a position at the broker.
LIVE_LEG_STATUSES = ("ACTIVE", "CRASHED", "NEEDS_REVIEW")
MAX_QUERY_ROWS = 10_000
# An orphan resolution's action -> the record's status.
ORPHAN_RESOLUTIONS = {"acknowledge": "ACKNOWLEDGED", "adopt": "ADOPTED", "close": "CLOSED"}
# Records a new verification does not repeat: open, or known and accepted by a human. A CLOSED
# one was flat; the same position seen again is a new one.
UNRESOLVED_ORPHAN_STATUSES = ("ORPHANED",)
_KEPT_ORPHAN_STATUSES = ("ORPHANED", "ACKNOWLEDGED", "ADOPTED")

_LEG_COLUMNS = """
    p.position_id, p.position_key, p.session_id, s.strategy_name, p.symbol, p.exchange,
    p.product, p.leg_type, p.side, p.quantity, p.entry_price, p.entry_time, p.current_price,
    p.stop_price, p.highest_price, {trail_level}, p.state, p.status, p.was_crashed,
    s.crash_timestamp, s.crash_reason, p.review_reason, s.status AS session_status
"""


def _leg_columns(cur: sqlite3.Cursor) -> str:
    """The leg columns for this database's schema (posctl also reads older ones, read-only)."""
    version = int(cur.execute("PRAGMA user_version").fetchone()[0])
    return _LEG_COLUMNS.format(trail_level=trail_level_sql("p", version))


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def leg_dict(row: sqlite3.Row) -> dict[str, Any]:
    """A leg row as the wire and posctl give it: ``state`` decoded, ``was_crashed`` a bool."""
    leg = dict(row)
    leg.pop("session_key", None)  # read to check ownership; not a field of a leg on the wire
    leg["state"] = orjson.loads(leg["state"]) if leg.get("state") else {}
    leg["was_crashed"] = bool(leg["was_crashed"])
    return leg


def _event(
    cur: sqlite3.Cursor, position_id: int, session_id: int, kind: str, when: str, payload: Any
) -> None:
    cur.execute(
        "INSERT INTO position_events (position_id, session_id, event_type, event_time, payload) "
        "VALUES (?, ?, ?, ?, ?)",
        (position_id, session_id, kind, when, _json(payload)),
    )


def query(cur: sqlite3.Cursor, op: QueryOp, now: str) -> Result:
    """``crashed``: the seed's recovery query, newest crash first; ``open``: every live leg."""
    params: list[Any] = []
    if op.what == "crashed":
        where = "p.status = 'CRASHED' AND p.was_crashed = true"
        order = "s.crash_timestamp DESC, p.position_id"
    else:
        where = f"p.status IN {LIVE_LEG_STATUSES!r}"
        order = "p.position_id"
    if op.strategy is not None:
        where += " AND s.strategy_name = ?"
        params.append(op.strategy)
    rows = cur.execute(
        f"SELECT {_leg_columns(cur)} FROM strategy_positions p "
        f"JOIN strategy_sessions s ON s.id = p.session_id WHERE {where} ORDER BY {order} "
        f"LIMIT {MAX_QUERY_ROWS + 1}",
        params,
    ).fetchall()
    legs = [leg_dict(r) for r in rows[:MAX_QUERY_ROWS]]
    shown = protection.protections(cur, (leg["position_id"] for leg in legs))
    for leg in legs:
        leg["protection"] = shown.get(leg["position_id"])
    return Result(True, {"legs": legs, "truncated": len(rows) > MAX_QUERY_ROWS})


def read_legs(conn: sqlite3.Connection, what: str, strategy: str | None) -> dict[str, Any]:
    """:func:`query` on any connection (a read-only one too): ``{"legs", "truncated"}``."""
    return query(conn.cursor(), QueryOp(None, None, None, "", what, strategy), "").data


def _leg_row(cur: sqlite3.Cursor, key: str) -> sqlite3.Row | None:
    row: sqlite3.Row | None = cur.execute(
        f"SELECT {_leg_columns(cur)}, s.session_key "
        "FROM strategy_positions p JOIN strategy_sessions s ON s.id = p.session_id "
        "WHERE p.position_key = ?",
        (key,),
    ).fetchone()
    return row


def _stranded(leg: sqlite3.Row) -> bool:
    """ACTIVE in a session that is over (ended with the leg open, or crashed): its owner can
    never exit it, so it is resolved like a crashed leg."""
    return bool(leg["status"] == "ACTIVE" and leg["session_status"] not in LIVE_SESSION_STATUSES)


def resolve(cur: sqlite3.Cursor, op: ResolveOp, now: str) -> Result:
    """Adopt, close, flag or requeue one leg that is not live in any session.

    A leg still ACTIVE in a session that is over (``end_session`` with legs open) is stranded:
    it can be closed, flagged, requeued (CRASHED, for the strategy's next run to adopt) or
    adopted, like a crashed leg.
    """
    leg = _leg_row(cur, op.key)
    if leg is None:
        return Result.error("UNKNOWN_LEG", f"no leg {op.key!r}")
    status, pid = leg["status"], leg["position_id"]
    audit = {"by": op.by, "reason": op.reason, "from_status": status}
    if op.action == "adopt":
        return _adopt(cur, op, leg, now, audit)
    stranded = _stranded(leg)
    if status == "ACTIVE" and not stranded:
        return Result.error(
            "BAD_STATE",
            f"leg {op.key!r} is ACTIVE in live session {leg['session_id']}: its owner exits it",
        )
    if op.action == "close":
        if status == "CLOSED":
            return Result(True, {"position_id": pid, "status": "CLOSED", "duplicate": True})
        cur.execute(
            "UPDATE strategy_positions SET status = 'CLOSED', exit_price = ?, exit_time = ?, "
            "exit_reason = ?, updated_at = ? WHERE position_id = ?",
            (op.exit_price, iso(op.time), op.exit_reason, now, pid),
        )
        audit |= {"exit_price": op.exit_price, "exit_reason": op.exit_reason}
        _event(cur, pid, leg["session_id"], "EXIT", iso(op.time), audit)
        # Closed: an outstanding protective order is cancelled by the protect worker.
        cur.execute(
            "UPDATE protective_orders SET release = 'CANCEL', updated_at = ? "
            "WHERE position_id = ? AND state IN ('PLANNED', 'PLACED') AND release IS NULL",
            (now, pid),
        )
        return Result(True, {"position_id": pid, "status": "CLOSED", "duplicate": False})
    if status not in ("CRASHED", "NEEDS_REVIEW") and not stranded:
        return Result.error("BAD_STATE", f"leg {op.key!r} is {status}")
    if stranded:
        audit["session_status"] = leg["session_status"]
    if op.action == "review":
        cur.execute(
            "UPDATE strategy_positions SET status = 'NEEDS_REVIEW', review_reason = ?, "
            "updated_at = ? WHERE position_id = ?",
            (op.reason, now, pid),
        )
        _event(cur, pid, leg["session_id"], "NEEDS_REVIEW", now, audit)
        return Result(True, {"position_id": pid, "status": "NEEDS_REVIEW"})
    # requeue: a reviewed leg is ready to be adopted again
    if status == "CRASHED":
        return Result(True, {"position_id": pid, "status": "CRASHED", "duplicate": True})
    cur.execute(
        "UPDATE strategy_positions SET status = 'CRASHED', was_crashed = TRUE, updated_at = ? "
        "WHERE position_id = ?",
        (now, pid),
    )
    _event(cur, pid, leg["session_id"], "REQUEUED", now, audit)
    return Result(True, {"position_id": pid, "status": "CRASHED", "duplicate": False})


def _adopt(
    cur: sqlite3.Cursor, op: ResolveOp, leg: sqlite3.Row, now: str, audit: dict[str, Any]
) -> Result:
    if op.session_key is None:
        return Result.error("NO_SESSION", "adopting a leg needs the session that takes it")
    adopter = cur.execute(
        "SELECT id, status FROM strategy_sessions WHERE session_key = ?", (op.session_key,)
    ).fetchone()
    if adopter is None or adopter["status"] not in LIVE_SESSION_STATUSES:
        return Result.error("SESSION_CLOSED", "only a RUNNING session can adopt a leg")
    pid = leg["position_id"]
    if leg["session_key"] == op.session_key and leg["status"] == "ACTIVE":
        data = leg_dict(leg)
        data["protection"] = protection.protections(cur, [pid]).get(pid)
        return Result(
            True, {"position_id": pid, "status": "ACTIVE", "duplicate": True, "leg": data}
        )
    if leg["status"] != "CRASHED" and not _stranded(leg):
        return Result.error(
            "BAD_STATE",
            f"leg {op.key!r} is {leg['status']}: only a CRASHED leg, or one left open by a "
            "session that is over, can be adopted",
        )
    if leg["session_status"] in LIVE_SESSION_STATUSES:
        return Result.error("FENCED", f"leg {op.key!r} belongs to live session {leg['session_id']}")
    cur.execute(
        "UPDATE strategy_positions SET session_id = ?, status = 'ACTIVE', updated_at = ? "
        "WHERE position_id = ?",
        (adopter["id"], now, pid),
    )
    audit |= {"from_session": leg["session_id"], "from_strategy": leg["strategy_name"]}
    # Its protective order (if any) is handed to the adopter: cancelled, or left live for it.
    how = "KEEP" if op.keep_protection else "CANCEL"
    released = protection.release(cur, [pid], how, adopter["id"], now)
    if released:
        audit["protection"] = how
    _event(cur, pid, adopter["id"], "RECOVERY", now, audit)
    data = leg_dict(leg) | {
        "status": "ACTIVE", "session_id": adopter["id"], "session_status": adopter["status"],
        "protection": protection.protections(cur, [pid]).get(pid),
    }  # fmt: skip
    row = LegRow(op.key, op.session_key, leg["stop_price"], leg["last_trail_level"])
    return Result(
        True,
        {"position_id": pid, "status": "ACTIVE", "duplicate": False, "leg": data},
        legs=[row],
        released=released,
    )


def orphans(cur: sqlite3.Cursor, op: OrphansOp, now: str) -> Result:
    """Record broker positions nobody explains; an identical record still open, acknowledged or
    adopted is not repeated (a human already knows it)."""
    recorded = 0
    for row in op.rows:
        key = (row["symbol"], row["exchange"], row["product"])
        seen = cur.execute(
            "SELECT 1 FROM broker_orphans WHERE symbol = ? AND exchange = ? AND product = ? AND "
            f"broker_quantity = ? AND known_quantity = ? AND status IN {_KEPT_ORPHAN_STATUSES!r}",
            (*key, row["broker_quantity"], row["known_quantity"]),
        ).fetchone()
        if seen:
            continue
        cur.execute(
            "INSERT INTO broker_orphans (detected_at, symbol, exchange, product, broker_quantity, "
            "known_quantity, detected_by, row) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (iso(op.time), *key, row["broker_quantity"], row["known_quantity"], op.by,
             _json(row.get("row", {}))),
        )  # fmt: skip
        recorded += 1
    return Result(True, {"recorded": recorded, "already_recorded": len(op.rows) - recorded})


def resolve_orphan(cur: sqlite3.Cursor, op: OrphanResolveOp, now: str) -> Result:
    """Acknowledge, adopt (by a named strategy) or close one recorded orphan, keeping who and why.

    An open (ORPHANED) record takes any decision; an ACKNOWLEDGED or ADOPTED one can still be
    closed (or re-decided); the earlier decision stays in the reason. CLOSED is final. The same
    decision again is a duplicate, not an error.
    """
    row = cur.execute(
        "SELECT id, status, resolved_by, resolution_reason, adopted_by FROM broker_orphans "
        "WHERE id = ?",
        (op.orphan_id,),
    ).fetchone()
    if row is None:
        return Result.error("UNKNOWN_ORPHAN", f"no orphan record {op.orphan_id}")
    target = ORPHAN_RESOLUTIONS[op.action]
    adopted_by = None
    if op.action == "adopt":
        if not op.strategy:
            return Result.error("BAD_FIELD", "adopting an orphan needs the strategy taking it")
        adopted_by = op.strategy
        if op.adopt_session is not None:
            session = cur.execute(
                "SELECT strategy_name FROM strategy_sessions WHERE id = ?", (op.adopt_session,)
            ).fetchone()
            if session is None or session[0] != op.strategy:
                return Result.error(
                    "UNKNOWN_SESSION",
                    f"no session {op.adopt_session} of strategy {op.strategy!r}",
                )
            adopted_by = f"{op.strategy} (session {op.adopt_session})"
    data = {"id": op.orphan_id, "status": target}
    if row["status"] == target and (adopted_by is None or row["adopted_by"] == adopted_by):
        return Result(True, data | {"duplicate": True})
    if row["status"] == "CLOSED":
        return Result.error(
            "BAD_STATE", f"orphan {op.orphan_id} is CLOSED ({row['resolution_reason']})"
        )
    reason = op.reason
    if row["status"] != "ORPHANED":
        before = f"{row['status']} by {row['resolved_by']}: {row['resolution_reason']}"
        reason = f"{reason} (before: {before})"[:2000]
    cur.execute(
        "UPDATE broker_orphans SET status = ?, resolved_at = ?, resolved_by = ?, "
        "resolution_reason = ?, adopted_by = ? WHERE id = ?",
        (target, iso(op.time), op.by, reason, adopted_by, op.orphan_id),
    )
    return Result(True, data | {"duplicate": False})


def fenced(cur: sqlite3.Cursor, op: FencedOp, now: str) -> Result:
    """Keep a refused write in the leg's audit trail (an exit there is a fact at the broker)."""
    leg = cur.execute(
        "SELECT position_id, session_id FROM strategy_positions WHERE position_key = ?", (op.key,)
    ).fetchone()
    if leg is not None:
        _event(cur, leg[0], leg[1], "FENCED_WRITE", iso(op.time), {"by": op.by, **op.message})
    return Result(True, {})


_FINISHED = f"""
    SELECT s.id FROM strategy_sessions s
    WHERE s.status NOT IN {LIVE_SESSION_STATUSES!r}
      AND coalesce(s.end_time, s.crash_timestamp, s.start_time) < :before
      AND NOT EXISTS (SELECT 1 FROM strategy_positions p
                      WHERE p.session_id = s.id AND p.status IN {LIVE_LEG_STATUSES!r})
      AND NOT EXISTS (SELECT 1 FROM position_events e
                      JOIN strategy_positions p ON p.position_id = e.position_id
                      WHERE e.session_id = s.id AND p.session_id != s.id)
"""


def prune(cur: sqlite3.Cursor, op: PruneOp, now: str) -> Result:
    """Delete up to ``op.limit`` finished sessions older than the cutoff with their legs and
    events (and as many old orphan records); ``more`` says whether another call has work.

    Bounded so that one prune never holds the writer for long: a large history is pruned in
    many short transactions, interleaved with live traffic. Never touches a session with an
    ACTIVE, CRASHED or NEEDS_REVIEW leg, nor one whose events belong to a leg another session
    adopted.
    """
    page_size = cur.execute("PRAGMA page_size").fetchone()[0]
    free_before = cur.execute("PRAGMA freelist_count").fetchone()[0]
    before = iso(op.before)
    cur.execute("CREATE TEMP TABLE IF NOT EXISTS prune_ids (id INTEGER PRIMARY KEY)")
    cur.execute("DELETE FROM prune_ids")
    cur.execute(
        f"INSERT INTO prune_ids {_FINISHED} LIMIT :limit", {"before": before, "limit": op.limit}
    )
    events = cur.execute(
        "DELETE FROM position_events WHERE session_id IN (SELECT id FROM prune_ids) "
        "OR position_id IN (SELECT position_id FROM strategy_positions "
        "WHERE session_id IN (SELECT id FROM prune_ids))"
    ).rowcount
    positions = cur.execute(
        "DELETE FROM strategy_positions WHERE session_id IN (SELECT id FROM prune_ids)"
    ).rowcount
    sessions = cur.execute(
        "DELETE FROM strategy_sessions WHERE id IN (SELECT id FROM prune_ids)"
    ).rowcount
    orphan_rows = cur.execute(
        "DELETE FROM broker_orphans WHERE id IN "
        "(SELECT id FROM broker_orphans WHERE detected_at < ? LIMIT ?)",
        (before, op.limit),
    ).rowcount
    cur.execute("DELETE FROM prune_ids")
    more = sessions == op.limit or orphan_rows == op.limit
    if more:  # a full chunk: is anything left? (cheap: the first match ends the scan)
        left = cur.execute(f"{_FINISHED} LIMIT 1", {"before": before}).fetchone()
        left = left or cur.execute(
            "SELECT 1 FROM broker_orphans WHERE detected_at < ? LIMIT 1", (before,)
        ).fetchone()
        more = left is not None
    free_after = cur.execute("PRAGMA freelist_count").fetchone()[0]
    return Result(
        True,
        {
            "sessions": sessions,
            "positions": positions,
            "events": events,
            "orphans": orphan_rows,
            "freed_bytes": max(0, free_after - free_before) * page_size,
            "by": op.by,
            "more": more,
        },
    )
