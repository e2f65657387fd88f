"""The alert outbox as SQL: what the delivery worker and ``posctl alerts`` read and write.

The alerts themselves are written by triggers (schema version 6, :mod:`positiond.store.schema`)
inside the transaction of the verdict that causes them. Here: one ``alert_deliveries`` row per
alert and sink that wants it (created by the worker, which knows the sinks), the due ones, and
each attempt's outcome. Every function is one short statement or transaction on its own
connection, so the daemon's writer never waits long for it.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from positiond.alerts.settings import SEVERITY, SinkConfig
from positiond.store.schema import iso

__all__ = [
    "BODY_SCHEMA",
    "Due",
    "body",
    "due",
    "enqueue",
    "first_recent",
    "recent",
    "record",
    "record_many",
]

BODY_SCHEMA = 1  # the "schema" field of every alert body (docs/PROTOCOL.md, "Alerts")


@dataclass(frozen=True, slots=True)
class Due:
    """One delivery to attempt: the alert (its body as sent) and the sink it goes to."""

    row: int  # alert_outbox.id
    sink: str
    attempts: int
    created_at: str
    body: bytes

    @property
    def created(self) -> float:
        """``created_at`` as epoch seconds."""
        return datetime.strptime(self.created_at, "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()


def body(alert_id: str, kind: str, created_at: str, stored: str) -> bytes:
    """The JSON sent to sinks: the stored snapshot under the stable envelope."""
    data: dict[str, Any] = {
        "schema": BODY_SCHEMA,
        "id": alert_id,
        "event": kind,
        "severity": SEVERITY.get(kind, "warning"),
        "time": created_at,
    }
    data.update(orjson.loads(stored))
    return orjson.dumps(data)


def first_recent(conn: sqlite3.Connection, since: float) -> int:
    """The highest outbox id created before ``since`` (deliveries start after it)."""
    row = conn.execute(
        "SELECT coalesce(max(id), 0) FROM alert_outbox WHERE created_at < ?", (iso(since),)
    ).fetchone()
    return int(row[0])


def enqueue(conn: sqlite3.Connection, sinks: tuple[SinkConfig, ...], after: int) -> int:
    """A PENDING delivery for each alert after id ``after`` and each sink that wants it;
    return the highest alert id seen (the next call's ``after``)."""
    rows = _new_alerts(conn, after)
    if not rows:
        return after
    conn.execute("BEGIN IMMEDIATE")  # one short transaction, however many rows
    try:
        conn.executemany(
            "INSERT OR IGNORE INTO alert_deliveries (alert_id, sink, state, next_attempt) "
            "VALUES (?, ?, 'PENDING', ?)",
            [(r[0], s.name, r[2]) for r in rows for s in sinks if s.wants(r[1])],
        )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return int(rows[-1][0])


def _new_alerts(conn: sqlite3.Connection, after: int) -> list[Any]:
    """The alerts after id ``after``. SQLite commits one writer at a time, in id order; on
    PostgreSQL the read waits for every transaction writing the outbox to end first
    (:data:`positiond.store.pgalerts.BARRIER`), so no smaller id can commit after it."""
    select = "SELECT id, kind, created_at FROM alert_outbox WHERE id > ? ORDER BY id"
    if isinstance(conn, sqlite3.Connection):
        return conn.execute(select, (after,)).fetchall()
    from positiond.store.pgalerts import BARRIER

    conn.execute("BEGIN")
    try:
        conn.execute(BARRIER)
        rows = conn.execute(select, (after,)).fetchall()
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return rows


def due(
    conn: sqlite3.Connection, now: float, sink: str, busy: set[int], limit: int
) -> list[Due]:
    """``sink``'s PENDING deliveries whose next attempt is due, oldest first, skipping the
    alerts in flight (``busy``)."""
    rows = conn.execute(
        "SELECT d.alert_id, d.sink, d.attempts, o.alert_id, o.kind, o.created_at, o.body "
        "FROM alert_deliveries d JOIN alert_outbox o ON o.id = d.alert_id "
        "WHERE d.state = 'PENDING' AND d.sink = ? AND d.next_attempt <= ? "
        "ORDER BY d.next_attempt LIMIT ?",
        (sink, iso(now), limit + len(busy)),
    ).fetchall()
    out = [
        Due(r[0], r[1], r[2], r[5], body(r[3], r[4], r[5], r[6])) for r in rows if r[0] not in busy
    ]
    return out[:limit]


def record(
    conn: sqlite3.Connection,
    item: Due,
    error: str | None,
    now: float,
    retry_at: float | None,
) -> str:
    """Keep the outcome of one attempt: DELIVERED, PENDING again (``retry_at``) or FAILED."""
    if error is None:
        state, next_at, done = "DELIVERED", iso(now), iso(now)
    elif retry_at is not None:
        state, next_at, done = "PENDING", iso(retry_at), None
    else:
        state, next_at, done = "FAILED", iso(now), iso(now)
    conn.execute(
        "UPDATE alert_deliveries SET state = ?, attempts = attempts + 1, next_attempt = ?, "
        "last_error = ?, done_at = ? WHERE alert_id = ? AND sink = ?",
        (state, next_at, None if error is None else error[:500], done, item.row, item.sink),
    )
    return state


def record_many(
    conn: sqlite3.Connection,
    outcomes: list[tuple[Due, float | None]],
    error: str | None,
    now: float,
) -> list[str]:
    """:func:`record` for each alert of one grouped message (with its own ``retry_at``), in
    one transaction: the whole group is recorded, or none of it (then it is sent again)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        states = [record(conn, item, error, now, retry_at) for item, retry_at in outcomes]
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return states


def recent(conn: sqlite3.Connection, limit: int = 50) -> list[dict[str, Any]]:
    """The latest alerts, newest first, each with its delivery state per sink (posctl)."""
    alerts = conn.execute(
        "SELECT id, alert_id, kind, created_at, body FROM alert_outbox ORDER BY id DESC LIMIT ?",
        (limit,),
    ).fetchall()
    out = []
    for row in alerts:
        data = orjson.loads(body(row[1], row[2], row[3], row[4]))
        deliveries = [
            {
                "sink": d[0],
                "state": d[1],
                "attempts": d[2],
                "next_attempt": d[3],
                "last_error": d[4],
                "done_at": d[5],
            }
            for d in conn.execute(
                "SELECT sink, state, attempts, next_attempt, last_error, done_at "
                "FROM alert_deliveries WHERE alert_id = ? ORDER BY sink",
                (row[0],),
            )
        ]
        out.append({**data, "deliveries": deliveries})
    return out
