"""One batch as SQL: the strategies' durable ops, coalesced updates, heartbeats, in one
transaction.

:func:`apply_batch` runs on the writer's thread (:mod:`positiond.store.sqlite`) or in posctl's
direct write; it commits once (group commit). Every durable op runs inside its own SAVEPOINT, so
one op that violates a constraint is answered with an error while the rest of the batch
commits; an operational fault (busy, disk full, read-only) aborts the whole batch, which the
caller retries — nothing in it was acknowledged. The recovery and operator ops are in
:mod:`positiond.store.recovery`.
"""

from __future__ import annotations

import hmac
import logging
import sqlite3
from collections.abc import Callable
from typing import Any

import orjson

from positiond.ops import (
    CLIENT,
    LIVE_SESSION_STATUSES,
    REVIVABLE,
    Batch,
    CrashOp,
    EndOp,
    EntryOp,
    ExitOp,
    FencedOp,
    LegRow,
    LiveSession,
    Op,
    OrphanResolveOp,
    OrphansOp,
    ProtectCloseOp,
    PruneOp,
    QueryOp,
    ResolveOp,
    Result,
    StallOp,
    StartOp,
    SyncOp,
    TrailEvent,
    WatchOp,
    token_hash,
)
from positiond.store import protection, recovery
from positiond.store.schema import is_int, iso, trail_level_sql
from positiond.store.snapshot import watch_snapshot

__all__ = ["apply_batch", "load_live"]

log = logging.getLogger(__name__)

_PRICE_FIELDS = ("current_price", "stop_price", "highest_price", "last_trail_level")

# Absent fields keep their stored value, present ones (null included) replace it: each field is
# a (present?, value) pair so one statement serves every shape of update in one executemany.
_UPDATE_SQL = """
UPDATE strategy_positions SET
    current_price    = CASE WHEN ?1 THEN ?2 ELSE current_price END,
    stop_price       = CASE WHEN ?3 THEN ?4 ELSE stop_price END,
    highest_price    = CASE WHEN ?5 THEN ?6 ELSE highest_price END,
    last_trail_level = CASE WHEN ?7 THEN ?8 ELSE last_trail_level END,
    state            = CASE WHEN ?9 THEN ?10 ELSE state END,
    updated_at       = ?11,
    last_trail_level_is_int = CASE WHEN ?7 THEN ?13 ELSE last_trail_level_is_int END
WHERE position_key = ?12 AND status = 'ACTIVE'
"""

_EVENT_SQL = """
INSERT INTO position_events (position_id, session_id, event_type, event_time, payload)
VALUES (?, ?, ?, ?, ?)
"""

_LEG_EVENT_SQL = """
INSERT INTO position_events (position_id, session_id, event_type, event_time, payload)
SELECT position_id, session_id, ?, ?, ? FROM strategy_positions WHERE position_key = ?
"""


# A leg's last update, written by its exit or its session's crash or end, records its move only
# where that update was written: an ACTIVE leg (the update statement skips the others).
_FINAL_TRAIL_SQL = _LEG_EVENT_SQL + " AND status = 'ACTIVE'"


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def _trail_row(event: TrailEvent, when: str) -> tuple[str, str, str, str]:
    payload = {
        "stop_price": [event.before[0], event.after[0]],
        "last_trail_level": [event.before[1], event.after[1]],
        "price": event.price,
    }
    return ("TRAIL_UPDATE", when, _json(payload), event.key)


def _write_final_trail(cur: sqlite3.Cursor, events: list[TrailEvent], when: str) -> None:
    """The TRAIL_UPDATE events of final updates, right after they are written."""
    if events:
        cur.executemany(_FINAL_TRAIL_SQL, [_trail_row(e, when) for e in events])


def _update_row(key: str, upd: dict[str, Any], now: str) -> tuple[Any, ...]:
    row: list[Any] = []
    for name in _PRICE_FIELDS:  # the flags are booleans: PostgreSQL's CASE WHEN needs one
        if name in upd:
            row += (True, upd[name])
        else:
            row += (False, None)
    if "state" in upd:
        row += (True, _json(upd["state"]))
    else:
        row += (False, None)
    row += (now, key, is_int(upd.get("last_trail_level")))
    return tuple(row)


def _write_updates(cur: sqlite3.Cursor, updates: dict[str, dict[str, Any]], now: str) -> None:
    if updates:
        cur.executemany(_UPDATE_SQL, [_update_row(k, u, now) for k, u in updates.items()])


def _session(cur: sqlite3.Cursor, session_key: str) -> sqlite3.Row | None:
    row: sqlite3.Row | None = cur.execute(
        "SELECT id, status, strategy_name, crash_source, crash_timestamp, crash_reason, "
        "token_hash FROM strategy_sessions WHERE session_key = ?",
        (session_key,),
    ).fetchone()
    return row


def _leg(cur: sqlite3.Cursor, key: str) -> sqlite3.Row | None:
    row: sqlite3.Row | None = cur.execute(
        "SELECT p.position_id, p.status, p.session_id, s.session_key, p.exit_reason "
        "FROM strategy_positions p JOIN strategy_sessions s ON s.id = p.session_id "
        "WHERE p.position_key = ?",
        (key,),
    ).fetchone()
    return row


def _open_legs(cur: sqlite3.Cursor, session_id: int, session_key: str) -> list[LegRow]:
    rows = cur.execute(
        f"SELECT p.position_key, p.stop_price, {trail_level_sql('p')} "
        "FROM strategy_positions p WHERE p.session_id = ? AND p.status = 'ACTIVE'",
        (session_id,),
    ).fetchall()
    return [LegRow(r[0], session_key, r[1], r[2]) for r in rows]


def _event(
    cur: sqlite3.Cursor,
    position_id: int | None,
    session_id: int,
    kind: str,
    when: str,
    payload: dict[str, Any],
) -> None:
    cur.execute(_EVENT_SQL, (position_id, session_id, kind, when, _json(payload)))


def _token_refused(row: sqlite3.Row, token: str | None) -> Result | None:
    stored = row["token_hash"]
    if stored is None:  # a session from before tokens existed
        return None
    if token is None or not hmac.compare_digest(stored, token_hash(token)):
        return Result.error("BAD_TOKEN", "this session belongs to another client (token mismatch)")
    return None


def _start(cur: sqlite3.Cursor, op: StartOp, now: str) -> Result:
    row = _session(cur, op.session_key)
    if row is None:
        cur.execute(
            "INSERT INTO strategy_sessions (session_key, strategy_name, status, start_time, "
            "last_heartbeat, client_host, client_pid, peer_uid, peer_pid, heartbeat_interval, "
            "token_hash, progress_deadline, protect) "
            "VALUES (?, ?, 'RUNNING', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                op.session_key,
                op.strategy,
                iso(op.time),
                now,
                op.host,
                op.pid,
                op.peer_uid,
                op.peer_pid,
                op.heartbeat_interval,
                token_hash(op.token),
                op.progress_deadline,
                op.protect,
            ),
        )
        sid = cur.lastrowid
        assert sid is not None
        _event(cur, None, sid, "SESSION_START", now, {"host": op.host, "pid": op.pid})
        new = {"session_id": sid, "status": "RUNNING", "resumed": False, "token": op.token}
        return Result(True, new)
    sid = row["id"]
    if row["strategy_name"] != op.strategy:
        return Result.error(
            "BAD_FIELD", f"session {op.session_key!r} belongs to strategy {row['strategy_name']!r}"
        )
    refused = _token_refused(row, op.token)
    if refused is not None:
        return refused
    released = 0
    data: dict[str, Any] = {
        "session_id": sid,
        "status": "RUNNING",
        "resumed": True,
        "token": op.token,
    }
    if row["status"] in LIVE_SESSION_STATUSES:
        data["status"] = row["status"]
        _event(cur, None, sid, "SESSION_RESUMED", now, {"peer_pid": op.peer_pid})
        # A client that was away may have missed notices about orders handed to it.
        handed = protection.handed_to(cur, sid)
        if handed:
            data["protection"] = handed
    elif row["status"] == "CRASHED" and row["crash_source"] in REVIVABLE:
        crashed = cur.execute(
            "SELECT position_key, position_id FROM strategy_positions "
            "WHERE session_id = ? AND status = 'CRASHED'",
            (sid,),
        ).fetchall()
        revived = [r[0] for r in crashed]
        # The legs come back to their own strategy: their protective orders are cancelled
        # (never two stops live for one leg), and the ack says which it had.
        released = protection.release(cur, [r[1] for r in crashed], "CANCEL", sid, now)
        shown = protection.handed_to(cur, sid)
        cur.execute(
            "UPDATE strategy_positions SET status = 'ACTIVE', updated_at = ? "
            "WHERE session_id = ? AND status = 'CRASHED'",
            (now, sid),
        )
        cur.execute(
            "UPDATE strategy_sessions SET status = 'RUNNING', crash_timestamp = NULL, "
            "crash_reason = NULL, crash_source = NULL WHERE id = ?",
            (sid,),
        )
        data["revived"] = {
            "crash_timestamp": row["crash_timestamp"],
            "crash_reason": row["crash_reason"],
            "legs": revived,
        }
        if shown:
            data["revived"]["protection"] = shown
        _event(cur, None, sid, "REVIVED", now, data["revived"])
    else:
        return Result.error(
            "SESSION_CLOSED",
            f"session {op.session_key!r} is {row['status']}"
            + (f" ({row['crash_reason']})" if row["crash_reason"] else "")
            + "; start a new session",
        )
    cur.execute(
        "UPDATE strategy_sessions SET last_heartbeat = ?, peer_uid = coalesce(?, peer_uid), "
        "peer_pid = coalesce(?, peer_pid), token_hash = coalesce(token_hash, ?), "
        "progress_deadline = ?, protect = ? WHERE id = ?",
        (now, op.peer_uid, op.peer_pid, token_hash(op.token), op.progress_deadline, op.protect,
         sid),
    )  # fmt: skip
    legs = _open_legs(cur, sid, op.session_key)
    return Result(True, data, legs=legs, released=released)


def _entry(cur: sqlite3.Cursor, op: EntryOp, now: str) -> Result:
    leg = _leg(cur, op.key)
    if leg is not None:
        if leg["session_key"] != op.session_key:
            return Result.error(
                "KEY_CONFLICT",
                f"position key {op.key!r} already belongs to session {leg['session_id']}",
            )
        return Result(
            True, {"position_id": leg["position_id"], "status": leg["status"], "duplicate": True}
        )
    session = _session(cur, op.session_key)
    if session is None:
        return Result.error("UNKNOWN_SESSION", f"no session {op.session_key!r}")
    if session["status"] not in LIVE_SESSION_STATUSES:
        return Result.error("SESSION_CLOSED", f"session is {session['status']}")
    f = op.fields
    entry_time = iso(op.time)
    cur.execute(
        "INSERT INTO strategy_positions (position_key, session_id, symbol, exchange, product, "
        "leg_type, side, quantity, entry_price, entry_time, current_price, stop_price, "
        "highest_price, last_trail_level, state, status, updated_at, last_trail_level_is_int) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'ACTIVE', ?, ?)",
        (
            op.key,
            session["id"],
            f["symbol"],
            f["exchange"],
            f["product"],
            f.get("leg_type"),
            f["side"],
            f["quantity"],
            f["entry_price"],
            entry_time,
            f["entry_price"],
            f.get("stop_price"),
            f.get("highest_price", f["entry_price"]),
            f.get("last_trail_level"),
            _json(f.get("state", {})),
            now,
            is_int(f.get("last_trail_level")),
        ),
    )
    position_id = cur.lastrowid
    _event(cur, position_id, session["id"], "ENTRY", entry_time, f)
    return Result(True, {"position_id": position_id, "status": "ACTIVE", "duplicate": False})


def _exit(cur: sqlite3.Cursor, op: ExitOp, now: str) -> Result:
    leg = _leg(cur, op.key)
    if leg is None:
        return Result.error("UNKNOWN_LEG", f"no leg {op.key!r}")
    if leg["session_key"] != op.session_key:
        return Result.error("FENCED", f"leg {op.key!r} belongs to session {leg['session_id']}")
    data = {"position_id": leg["position_id"], "status": "CLOSED"}
    if leg["status"] == "CLOSED":
        if leg["exit_reason"] == protection.EXIT_REASON and op.exit_reason != leg["exit_reason"]:
            # Not a resend of this exit: the leg's protective stop closed it at the broker. An
            # exit the strategy placed too would be a second one there: say so.
            return Result.error(
                "LEG_CLOSED",
                f"leg {op.key!r} was closed at the broker by its protective stop order "
                f"({protection.EXIT_REASON})",
            )
        return Result(True, {**data, "duplicate": True})
    exit_time = iso(op.time)
    if op.final_update:
        _write_updates(cur, {op.key: op.final_update}, now)
        _write_final_trail(cur, op.trail_events, exit_time)
    cur.execute(
        "UPDATE strategy_positions SET status = 'CLOSED', exit_price = ?, exit_time = ?, "
        "exit_reason = ?, updated_at = ? WHERE position_id = ?",
        (op.exit_price, exit_time, op.exit_reason, now, leg["position_id"]),
    )
    _event(
        cur,
        leg["position_id"],
        leg["session_id"],
        "EXIT",
        exit_time,
        {"exit_price": op.exit_price, "exit_reason": op.exit_reason, "from_status": leg["status"]},
    )
    return Result(True, {**data, "duplicate": False})


def _crash(cur: sqlite3.Cursor, op: CrashOp, now: str) -> Result:
    session = _session(cur, op.session_key)
    if session is None:
        return Result.error("UNKNOWN_SESSION", f"no session {op.session_key!r}")
    if op.rid is not None and (refused := _token_refused(session, op.token)) is not None:
        return refused
    sid, status = session["id"], session["status"]
    _write_updates(cur, op.final_updates, now)
    _write_final_trail(cur, op.trail_events, iso(op.time))
    # The strategy's own report is final and beats an earlier verdict of the daemon's; the
    # daemon's verdicts never overwrite a COMPLETED session or the strategy's report.
    takes = status in LIVE_SESSION_STATUSES or (
        status == "CRASHED" and op.source == CLIENT and session["crash_source"] != CLIENT
    )
    if not takes:
        if status == "COMPLETED" and op.source == CLIENT:
            return Result.error("SESSION_CLOSED", "session already ended (COMPLETED)")
        return Result(True, {"session_id": sid, "status": status, "duplicate": True})
    when = iso(op.time)
    cur.execute(
        "UPDATE strategy_sessions SET status = 'CRASHED', crash_timestamp = ?, "
        "crash_reason = ?, crash_source = ? WHERE id = ?",
        (when, op.reason, op.source, sid),
    )
    legs = cur.execute(
        "SELECT position_id FROM strategy_positions WHERE session_id = ? AND status = 'ACTIVE'",
        (sid,),
    ).fetchall()
    cur.execute(
        "UPDATE strategy_positions SET status = 'CRASHED', was_crashed = TRUE, updated_at = ? "
        "WHERE session_id = ? AND status = 'ACTIVE'",
        (now, sid),
    )
    payload = {**op.payload, "reason": op.reason, "source": op.source}
    _event(cur, None, sid, "CRASH", when, payload)
    leg_payload = _json({"reason": op.reason, "source": op.source})
    cur.executemany(_EVENT_SQL, [(r[0], sid, "CRASH", when, leg_payload) for r in legs])
    return Result(True, {"session_id": sid, "status": "CRASHED", "legs": len(legs)})


def _end(cur: sqlite3.Cursor, op: EndOp, now: str) -> Result:
    session = _session(cur, op.session_key)
    if session is None:
        return Result.error("UNKNOWN_SESSION", f"no session {op.session_key!r}")
    if (refused := _token_refused(session, op.token)) is not None:
        return refused
    sid, status = session["id"], session["status"]
    _write_updates(cur, op.final_updates, now)
    _write_final_trail(cur, op.trail_events, iso(op.time))
    # A strategy the daemon declared dead that says it is done was alive after all: its end
    # counts. Its legs keep their status (CRASHED legs still need recovery).
    live = status in LIVE_SESSION_STATUSES or (
        status == "CRASHED" and session["crash_source"] in REVIVABLE
    )
    if not live:
        return Result(True, {"session_id": sid, "status": status, "duplicate": True})
    when = iso(op.time)
    open_legs = [
        r[0]
        for r in cur.execute(
            "SELECT position_key FROM strategy_positions "
            "WHERE session_id = ? AND status = 'ACTIVE'",
            (sid,),
        )
    ]
    cur.execute(
        "UPDATE strategy_sessions SET status = 'COMPLETED', end_time = ?, last_heartbeat = ?, "
        "crash_timestamp = NULL, crash_reason = NULL, crash_source = NULL WHERE id = ?",
        (when, now, sid),
    )
    _event(cur, None, sid, "SESSION_END", when, {"open_legs": open_legs})
    # The keys are in the event; the ack only counts them (a session may hold thousands).
    return Result(True, {"session_id": sid, "status": "COMPLETED", "open_legs": len(open_legs)})


def _protect_close(cur: sqlite3.Cursor, op: ProtectCloseOp, now: str) -> Result:
    def write_final() -> None:
        if op.final_update:
            _write_updates(cur, {op.key: op.final_update}, now)
            _write_final_trail(cur, op.trail_events, iso(op.time))

    return protection.close_filled(cur, op, now, write_final)


def _sync(cur: sqlite3.Cursor, op: SyncOp, now: str) -> Result:
    return Result(True, {})


def _stall(cur: sqlite3.Cursor, op: StallOp, now: str) -> Result:
    session = _session(cur, op.session_key)
    if session is None:
        return Result(True, {})
    before, after, kind = (
        ("RUNNING", "STALLED", "STALLED") if op.stalled else ("STALLED", "RUNNING", "PROGRESS")
    )
    changed = cur.execute(
        "UPDATE strategy_sessions SET status = ? WHERE id = ? AND status = ?",
        (after, session["id"], before),
    ).rowcount
    if changed:
        _event(cur, None, session["id"], kind, iso(op.time), op.payload)
    return Result(True, {})


_APPLY: dict[type, Callable[[sqlite3.Cursor, Any, str], Result]] = {
    SyncOp: _sync,
    StallOp: _stall,
    QueryOp: recovery.query,
    ResolveOp: recovery.resolve,
    OrphansOp: recovery.orphans,
    OrphanResolveOp: recovery.resolve_orphan,
    PruneOp: recovery.prune,
    FencedOp: recovery.fenced,
    StartOp: _start,
    EntryOp: _entry,
    ExitOp: _exit,
    CrashOp: _crash,
    EndOp: _end,
    ProtectCloseOp: _protect_close,
    WatchOp: watch_snapshot,
}


def _apply_op(cur: sqlite3.Cursor, op: Op, now: str) -> Result:
    cur.execute("SAVEPOINT op")
    try:
        result = _APPLY[type(op)](cur, op, now)
    except (
        sqlite3.IntegrityError,
        sqlite3.InterfaceError,
        sqlite3.ProgrammingError,
        TypeError,  # orjson cannot write a value
        ValueError,
        OverflowError,
    ) as exc:
        # This op alone is bad (a constraint, a value SQLite cannot bind): drop it, keep the rest.
        cur.execute("ROLLBACK TO op")
        log.error("%s for %s refused by the database: %s", type(op).__name__, op.session_key, exc)
        result = Result.error("INTERNAL", f"the database refused this message: {exc}")
    except Exception as exc:
        if type(op) not in _READS:
            raise  # a write: the batch is kept and retried (nothing acked, nothing lost)
        # A read (a watcher's snapshot, a recovery query) writes nothing: its failure is its
        # own answer and must never hold up the acks of the writes beside it.
        cur.execute("ROLLBACK TO op")
        log.exception("%s failed; answered with an error", type(op).__name__)
        result = Result.error("INTERNAL", f"could not read the database: {exc}")
    cur.execute("RELEASE op")
    return result


_READS = (WatchOp, QueryOp)  # ops that only read: a failure is their own answer


def apply_batch(conn: sqlite3.Connection, batch: Batch) -> list[Result]:
    """Write a whole batch in one transaction (runs on the writer thread)."""
    now = iso(batch.time)
    cur = conn.cursor()
    cur.execute("BEGIN IMMEDIATE")
    try:
        results = [_apply_op(cur, op, now) for op in batch.ops]
        _write_updates(cur, batch.updates, now)
        if batch.trail_events:
            cur.executemany(_LEG_EVENT_SQL, [_trail_row(e, now) for e in batch.trail_events])
        if batch.heartbeats:
            cur.executemany(
                "UPDATE strategy_sessions SET last_heartbeat = ? "
                "WHERE session_key = ? AND status IN ('RUNNING', 'STALLED')",
                [(iso(w), k) for k, w in batch.heartbeats.items()],
            )
        cur.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return results


def load_live(
    conn: sqlite3.Connection, host: str | None = None
) -> tuple[list[LiveSession], list[LegRow]]:
    """RUNNING/STALLED sessions and their ACTIVE legs, as the daemon found them at start
    (``host``: only the sessions of that host id, PostgreSQL's several daemons)."""
    mine, args = ("", ()) if host is None else (" AND s.host_id = ?", (host,))
    sessions = [
        LiveSession(*r)
        for r in conn.execute(
            "SELECT session_key, id, strategy_name, token_hash, progress_deadline, status, "
            "heartbeat_interval FROM strategy_sessions s WHERE status IN ('RUNNING', 'STALLED')"
            + mine,
            args,
        )
    ]
    legs = [
        LegRow(r[0], r[1], r[2], r[3])
        for r in conn.execute(
            f"SELECT p.position_key, s.session_key, p.stop_price, {trail_level_sql('p')} "
            "FROM strategy_positions p JOIN strategy_sessions s ON s.id = p.session_id "
            "WHERE p.status = 'ACTIVE' AND s.status IN ('RUNNING', 'STALLED')" + mine,
            args,
        )
    ]
    return sessions, legs
