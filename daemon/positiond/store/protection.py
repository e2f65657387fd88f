"""The session side of protective stop orders in the store: what a leg's reply says of its
order, the hand-back (``release``), and closing a leg whose order filled.

The protect worker owns ``protective_orders`` (it plans, places, polls and cancels); the writer
only marks a live order ``release = 'CANCEL'`` or ``'KEEP'`` with ``release_session`` when the leg
is handed to a session (adoption, revival), in that very transaction, and closes a leg when the
worker reports that its order filled (:class:`~positiond.ops.ProtectCloseOp`). Everything here
runs inside the writer's batch transaction (:mod:`positiond.store.writes`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable
from typing import Any

import orjson

from positiond.ops import ProtectCloseOp, Result
from positiond.protect.notices import EXIT_REASON
from positiond.store.schema import iso

__all__ = [
    "EXIT_REASON",
    "HELD_STATES",
    "close_filled",
    "handed_to",
    "protections",
    "release",
]

# Orders that may still be live at the broker (at most one per leg: a partial unique index).
HELD_STATES = ("PLANNED", "PLACED")
# What a leg's reply shows: a live order, or one that filled (then the leg is closed).
_SHOWN_STATES = (*HELD_STATES, "TRIGGERED")
# protective_orders exists from schema version 7 (posctl may read an older database).
_SINCE_VERSION = 7


def _has_orders(cur: sqlite3.Cursor) -> bool:
    return int(cur.execute("PRAGMA user_version").fetchone()[0]) >= _SINCE_VERSION


def protections(cur: sqlite3.Cursor, position_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
    """position_id -> ``{id, state, order_id, trigger_price, pricetype, release}`` of the leg's
    newest order that is live (PLANNED, PLACED) or filled (TRIGGERED); legs without one are
    absent."""
    wanted = set(position_ids)
    if not wanted or not _has_orders(cur):
        return {}
    found: dict[int, dict[str, Any]] = {}
    ids = sorted(wanted)
    for start in range(0, len(ids), _CHUNK):  # the legs asked about, by the leg's index
        chunk = ids[start : start + _CHUNK]
        rows = cur.execute(
            "SELECT position_id, id, state, order_id, trigger_price, pricetype, release "
            f"FROM protective_orders WHERE state IN {_SHOWN_STATES!r} AND position_id IN "
            f"({', '.join('?' * len(chunk))}) ORDER BY id",
            chunk,
        ).fetchall()
        for row in rows:  # the newest last: it wins
            found[row[0]] = _shown(row)
    return found


_CHUNK = 500  # position ids in one IN list (SQLite allows 32,766 parameters, PostgreSQL 65,535)


def _shown(row: Any) -> dict[str, Any]:
    """A leg's ``protection`` from (key, id, state, order_id, trigger_price, pricetype,
    release)."""
    return {
        "id": row[1], "state": row[2], "order_id": row[3], "trigger_price": row[4],
        "pricetype": row[5], "release": row[6],
    }  # fmt: skip


def handed_to(cur: sqlite3.Cursor, session_id: int) -> dict[str, dict[str, Any]]:
    """position key -> the newest order handed to this session for that leg, in any state
    (``CANCELLED``, ``KEPT``: settled; ``PLACED``: not yet, or its cancel was refused;
    ``TRIGGERED``: it filled). What a client that missed the notices learns on its next start."""
    if not _has_orders(cur):
        return {}
    found: dict[str, dict[str, Any]] = {}
    rows = cur.execute(
        "SELECT p.position_key, o.id, o.state, o.order_id, o.trigger_price, o.pricetype, "
        "o.release FROM protective_orders o JOIN strategy_positions p "
        "ON p.position_id = o.position_id WHERE o.release_session = ? ORDER BY o.id",
        (session_id,),
    ).fetchall()
    for row in rows:
        found[row[0]] = _shown(row)
    return found


def release(
    cur: sqlite3.Cursor, position_ids: Iterable[int], how: str, session_id: int, now: str
) -> int:
    """Hand the live orders of these legs to ``session_id``: ``how`` is ``CANCEL`` or ``KEEP``.

    An order released before (its first holder died before the worker settled it) keeps its
    first ``release`` — the worker may be acting on it already — and follows the leg to the
    session holding it now (``release_session``), which the worker's report is for. Returns
    how many changed."""
    ids = list(position_ids)
    if not ids or not _has_orders(cur):
        return 0
    changed = 0
    for pid in ids:
        changed += cur.execute(
            "UPDATE protective_orders SET release = coalesce(release, ?), release_session = ?, "
            f"updated_at = ? WHERE position_id = ? AND state IN {HELD_STATES!r}",
            (how, session_id, now, pid),
        ).rowcount
    return changed


def close_filled(
    cur: sqlite3.Cursor, op: ProtectCloseOp, now: str, write_final: Callable[[], None]
) -> Result:
    """The leg's protective order filled: close it (``PROTECTIVE_STOP`` at the fill price).

    Only while the leg is still open and held by the session the order was handed to; a report
    about a leg closed already (duplicate) or now held by another session (stale) changes
    nothing. ``data["closed"]`` says whether this closed it. ``write_final`` writes the leg's
    last coalesced update (and its TRAIL_UPDATE) first, as an exit does.
    """
    leg = cur.execute(
        "SELECT position_id, session_id, status, exit_reason FROM strategy_positions "
        "WHERE position_key = ?",
        (op.key,),
    ).fetchone()
    if leg is None:
        return Result(True, {"closed": False, "why": "unknown leg"})
    pid, sid, status, exit_reason = leg
    if status == "CLOSED":
        # (exited otherwise first: by its strategy, or an operator — and its stop filled too)
        return Result(True, {"closed": False, "why": "already closed", "exit_reason": exit_reason})
    if sid != op.holder_id:
        return Result(True, {"closed": False, "why": f"the leg is held by session {sid}"})
    when = iso(op.time)
    write_final()
    cur.execute(
        "UPDATE strategy_positions SET status = 'CLOSED', exit_price = ?, exit_time = ?, "
        "exit_reason = ?, updated_at = ? WHERE position_id = ?",
        (op.fill_price, when, EXIT_REASON, now, pid),
    )
    payload = {
        "exit_price": op.fill_price,
        "exit_reason": EXIT_REASON,
        "from_status": status,
        "protect_id": op.protect_id,
        "order_id": op.order_id,
    }
    cur.execute(
        "INSERT INTO position_events (position_id, session_id, event_type, event_time, payload) "
        "VALUES (?, ?, 'EXIT', ?, ?)",
        (pid, sid, when, orjson.dumps(payload).decode()),
    )
    return Result(True, {"closed": True, "position_id": pid})
