"""The delivery worker against a real SQLite file or PostgreSQL database, with time driven by
the test: retries with backoff, FAILED after ``retry_for``, never sent again once settled
(hypothesis), the outbox written atomically with its verdict, and the same alert bodies from
both backends' triggers for the same verdicts."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from positiond.alerts import outbox
from positiond.alerts.delivery import Delivery, backoff
from positiond.alerts.outbox import body
from positiond.alerts.settings import AlertsConfig, SinkConfig
from positiond.ctl.alerts import alert_records
from positiond.store.dsn import PgDsn
from positiond.store.schema import iso, migrate
from tests.helpers import rows, wait_for
from tests.pg import admin_dsn, both_backends, fresh_database

START = 1_764_324_000.0
PROPERTY = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def connect(db: Path | PgDsn) -> sqlite3.Connection:
    """An autocommit connection to a migrated database (PostgreSQL: through the store's shim)."""
    if isinstance(db, PgDsn):
        from positiond.store import postgres
        from positiond.store.pgconn import PgConnection

        raw = postgres.connect(db)
        postgres.migrate(raw)
        return cast(sqlite3.Connection, PgConnection(raw))
    conn = sqlite3.connect(db, isolation_level=None)
    migrate(conn)
    conn.row_factory = sqlite3.Row
    return conn


def crash(db: Path | PgDsn, when: float, rollback: bool = False) -> None:
    """A session with one leg, then its CRASH event (the verdict) in one transaction."""
    conn = connect(db)
    try:
        conn.execute("BEGIN IMMEDIATE")
        n = conn.execute("SELECT count(*) FROM strategy_sessions").fetchone()[0]
        sid = conn.execute(
            "INSERT INTO strategy_sessions (session_key, strategy_name, status, start_time, "
            "client_host, client_pid) VALUES (?, 'expiry_blast', 'CRASHED', ?, 'algo-1', 42)",
            (f"s-{n}", iso(when)),
        ).lastrowid
        conn.execute(
            "INSERT INTO strategy_positions (position_key, session_id, symbol, exchange, product, "
            "side, quantity, entry_price, entry_time, stop_price, highest_price, "
            "last_trail_level, last_trail_level_is_int, status, was_crashed, updated_at) "
            "VALUES (?, ?, 'NIFTY28NOV2524000CE', 'NFO', 'NRML', 'SELL', 75, 100.0, ?, 110.0, "
            "100.0, 3, TRUE, 'CRASHED', TRUE, ?)",
            (f"leg-{n}", sid, iso(when), iso(when)),
        )
        conn.execute(
            "INSERT INTO position_events (session_id, event_type, event_time, payload) "
            "VALUES (?, 'CRASH', ?, ?)",
            (sid, iso(when), '{"reason": "process exited", "source": "DISCONNECT"}'),
        )
        conn.execute("ROLLBACK" if rollback else "COMMIT")
    finally:
        conn.close()


class Scripted:
    """A sink at the edge: answers each attempt as scripted (True: delivered)."""

    def __init__(self, config: SinkConfig, outcomes: list[bool]) -> None:
        self.config = config
        self.outcomes = list(outcomes)
        self.bodies: list[bytes] = []

    async def send(self, body: bytes) -> str | None:
        self.bodies.append(body)
        ok = self.outcomes.pop(0) if self.outcomes else False
        return None if ok else "HTTP 500"

    async def aclose(self) -> None:
        return None


STATES = "SELECT state, attempts FROM alert_deliveries"


def state(db: Path | PgDsn) -> tuple[str, int]:
    row = rows(db, "SELECT state, attempts FROM alert_deliveries")[0]
    return (row[0], row[1])


async def drive(
    db: Path | PgDsn, outcomes: list[bool], retry_for: float, steps: list[float]
) -> Scripted:
    """Run the worker's steps at the given clock offsets; return the sink."""
    clock = [START]
    config = SinkConfig("hook", "command", command=("unused",))
    delivery = Delivery(db, AlertsConfig((config,), retry_for=retry_for), now=lambda: clock[0])
    sink = Scripted(config, outcomes)
    delivery.sinks = {"hook": sink}
    await delivery.open()
    try:
        for offset in steps:
            clock[0] = START + offset
            await delivery.step()
            await delivery.settle()
    finally:
        await delivery.close()
    return sink


def test_backoff_doubles_from_one_second_up_to_five_minutes() -> None:
    assert [backoff(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert backoff(30) == 300.0


@both_backends
async def test_failed_attempts_are_retried_with_backoff_then_failed(db: Path | PgDsn) -> None:
    crash(db, START)
    # Attempts at 0 (fails: next at 1), 0.5 (not due), 1 (fails: next at 3), 3 (fails: next at
    # 7 > retry_for 5: FAILED), 100 (settled: nothing).
    sink = await drive(db, [False] * 10, retry_for=5, steps=[0, 0.5, 1, 3, 100])
    assert len(sink.bodies) == 3
    assert state(db) == ("FAILED", 3)
    conn = connect(db)
    records = alert_records(conn, 10)
    conn.close()
    assert records[0]["deliveries"][0]["last_error"] == "HTTP 500"
    assert records[0]["legs"][0]["last_trail_level"] == 3  # sent as the strategy sent it


@both_backends
async def test_alerts_older_than_retry_for_are_not_sent_to_a_new_worker(
    db: Path | PgDsn,
) -> None:
    crash(db, START - 10)
    sink = await drive(db, [True], retry_for=5, steps=[0])
    assert sink.bodies == []


@both_backends
def test_a_verdict_rolled_back_leaves_no_alert(db: Path | PgDsn) -> None:
    crash(db, START, rollback=True)
    crash(db, START)
    assert rows(db, "SELECT count(*) FROM alert_outbox")[0][0] == 1


@PROPERTY
@given(
    outcomes=st.lists(st.booleans(), min_size=0, max_size=8),
    gaps=st.lists(st.floats(min_value=0, max_value=40), min_size=1, max_size=12),
)
def test_delivered_once_at_most_until_settled_and_never_after(
    tmp_path_factory: pytest.TempPathFactory, outcomes: list[bool], gaps: list[float]
) -> None:
    db = tmp_path_factory.mktemp("alerts") / "positiond.db"
    crash(db, START)
    steps, offset = [], 0.0
    for gap in gaps:
        offset += gap
        steps.append(offset)
    sink = asyncio.run(drive(db, outcomes, retry_for=60, steps=steps))
    settled, attempts = state(db)
    tried = len(sink.bodies)
    assert attempts == tried  # every attempt recorded
    assert len(set(sink.bodies)) <= 1  # the very same body every time (same id)
    answers = outcomes[:tried] + [False] * (tried - len(outcomes))
    if True in answers:  # delivered on the first success, never tried again
        assert answers.index(True) == tried - 1 and settled == "DELIVERED"
    elif settled == "FAILED":  # given up only once a retry would fall after retry_for
        assert tried >= 1
    else:
        assert settled == "PENDING"


def verdicts(db: Path | PgDsn) -> sqlite3.Connection:
    """One verdict of each kind that alerts (and two that do not); the connection, open."""
    crash(db, START)  # session 1: leg-0 CRASHED; one `crashed` alert
    conn = connect(db)
    conn.execute(
        "INSERT INTO strategy_positions (position_key, session_id, symbol, exchange, product, "
        "side, quantity, entry_price, entry_time, last_trail_level, last_trail_level_is_int, "
        "status, updated_at) "
        "VALUES ('leg-a', 1, 'X', 'NSE', 'MIS', 'BUY', 1, 10.0, 't', 2.5, FALSE, 'ACTIVE', 't')"
    )
    conn.execute(
        "INSERT INTO strategy_positions (position_key, session_id, symbol, exchange, product, "
        "side, quantity, entry_price, entry_time, current_price, last_trail_level, "
        "last_trail_level_is_int, status, review_reason, updated_at) "
        "VALUES ('leg-r', 1, 'Y', 'NSE', 'MIS', 'SELL', 5, 0.1, 't', 1e20, 12.0, FALSE, "
        "'NEEDS_REVIEW', 'broker shows 3', 't')"
    )
    events = [
        (None, "STALLED", '{"deadline": 30}'),
        (None, "REVIVED", '{"crash_reason": "x"}'),
        (2, "FENCED_WRITE", '{"by": "session 9"}'),
        (1, "CRASH", '{"reason": "per-leg record", "source": "DISCONNECT"}'),  # no alert
        (None, "PROGRESS", "{}"),  # no alert
        (None, "CRASH", '{"reason": "did not return", "source": "RESTART"}'),
        (3, "NEEDS_REVIEW", '{"broker_quantity": 3, "reason": null}'),  # the leg's reason
        (1, "PROTECT_PLACED", '{"reason": "stop at 110", "order_id": "A1", "nested": [1, 2.0]}'),
    ]
    for position_id, kind, payload in events:
        conn.execute(
            "INSERT INTO position_events (position_id, session_id, event_type, event_time, "
            "payload) VALUES (?, 1, ?, 't', ?)",
            (position_id, kind, payload),
        )
    conn.execute(
        "INSERT INTO broker_orphans (detected_at, symbol, exchange, product, broker_quantity, "
        "known_quantity, detected_by) VALUES ('t', 'BANKNIFTY', 'NFO', 'NRML', 30, 0, 'verify')"
    )
    return conn


@both_backends
def test_each_event_kind_makes_one_alert_with_the_legs_it_concerns(db: Path | PgDsn) -> None:
    conn = verdicts(db)
    records = list(reversed(alert_records(conn, 20)))
    conn.close()
    found = [(a["event"], sorted(leg["position_key"] for leg in a["legs"])) for a in records]
    assert found == [
        ("crashed", ["leg-0"]),
        ("stalled", ["leg-a"]),  # the open legs
        ("revived", ["leg-a"]),
        ("fenced", ["leg-a"]),  # that leg alone
        ("not_returned", ["leg-0"]),  # the crashed legs
        ("needs_review", ["leg-r"]),
        ("protect_placed", ["leg-0"]),
        ("orphan", []),
    ]
    assert records[5]["reason"] == "broker shows 3"  # JSON null in the payload: the leg's
    assert records[6]["reason"] == "stop at 110" and records[6]["detail"]["nested"] == [1, 2.0]
    assert records[7]["orphan"]["broker_quantity"] == 30
    assert "detected by verify" in records[7]["reason"]
    leg_r = records[5]["legs"][0]
    assert (leg_r["last_trail_level"], leg_r["current_price"]) == (12.0, 1e20)
    assert type(leg_r["last_trail_level"]) is float  # 12.0 stays a float
    assert type(records[0]["legs"][0]["last_trail_level"]) is int  # 3 stays an integer


def _outbox(db: Path | PgDsn) -> list[tuple[Any, ...]]:
    """Every alert as sent, its random id left out: (kind, time, event, session, body)."""
    import orjson

    out = []
    for row in rows(db, "SELECT alert_id, kind, created_at, event_id, session_id, body "
                        "FROM alert_outbox ORDER BY id"):  # fmt: skip
        data = orjson.loads(body(row[0], row[1], row[2], row[5]))
        assert data.pop("id") == row[0] and len(row[0]) == 32
        out.append((row[1], row[2], row[3], row[4], orjson.dumps(data)))  # order and types too
    return out


def test_both_backends_write_the_same_alert_bodies_for_the_same_verdicts(workdir: Path) -> None:
    dsn = admin_dsn()
    sqlite_db = workdir / "positiond.db"
    verdicts(sqlite_db).close()
    with fresh_database(dsn) as pg_db:
        verdicts(pg_db).close()
        got = _outbox(pg_db)
    expected = _outbox(sqlite_db)
    assert len(expected) == 8
    for theirs, ours in zip(expected, got, strict=True):
        assert theirs == ours


class Hanging(Scripted):
    """A sink that never answers."""

    async def send(self, body: bytes) -> str | None:
        self.bodies.append(body)
        await asyncio.Event().wait()
        return None


async def test_a_hanging_sink_does_not_hold_up_another_sink(tmp_path: Path) -> None:
    db = tmp_path / "positiond.db"
    for n in range(3):
        crash(db, START + n)
    hook = SinkConfig("a-hook", "command", command=("unused",), timeout=300)
    pager = SinkConfig("pager", "command", command=("unused",))
    delivery = Delivery(db, AlertsConfig((hook, pager), concurrency=1), now=lambda: START + 5)
    hanging, working = Hanging(hook, []), Scripted(pager, [True] * 3)
    delivery.sinks = {"a-hook": hanging, "pager": working}
    await delivery.open()
    try:
        async with asyncio.timeout(10):
            while len(working.bodies) < 3:
                await delivery.step()
                await asyncio.sleep(0.01)  # let the attempts run (the clock is the test's)
        assert len(hanging.bodies) == 1  # one at a time per sink, and that one hangs
    finally:
        await delivery.close()


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_a_lost_postgres_connection_is_made_again_and_the_alert_delivered(
    db: PgDsn,
) -> None:
    crash(db, START)
    config = SinkConfig("hook", "command", command=("unused",))
    delivery = Delivery(db, AlertsConfig((config,)), now=lambda: START + 1, poll=0.05)
    sink = Scripted(config, [True])
    delivery.sinks = {"hook": sink}
    await delivery.open()
    ended = rows(
        db,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = 'positiond' AND pid <> pg_backend_pid()",
    )
    assert [r[0] for r in ended] == [True]  # the worker's connection, cut under it
    task = asyncio.get_running_loop().create_task(delivery.run())
    delivered = [("DELIVERED", 1)]
    try:  # the worker runs on this loop: wait on a thread
        await asyncio.to_thread(
            wait_for, lambda: [tuple(r) for r in rows(db, STATES)] == delivered, 10, "delivery"
        )
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert len(sink.bodies) == 1


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_an_alert_committed_after_a_later_one_is_not_skipped(db: PgDsn) -> None:
    """PostgreSQL commits out of id order: the verdict's alert (id 2) still open while the
    reconciliation's drift (id 3) commits. The worker's read waits for the verdict, so it never
    moves past id 2 before seeing it."""
    crash(db, START)  # alert 1
    verdict, drift, reader = connect(db), connect(db), connect(db)
    try:
        verdict.execute("BEGIN")
        verdict.execute(
            "INSERT INTO position_events (session_id, event_type, event_time, payload) "
            "VALUES (1, 'STALLED', ?, '{}')",
            (iso(START),),
        )
        drift.execute(
            "INSERT INTO alert_outbox (alert_id, kind, created_at, body) "
            "VALUES (?, 'drift', ?, '{}')",
            (uuid.uuid4().hex, iso(START)),
        )
        hook = SinkConfig("hook", "command", command=("unused",))
        with ThreadPoolExecutor(1) as pool:
            read = pool.submit(outbox.enqueue, reader, (hook,), 0)
            waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            wait_for(lambda: rows(db, waiting)[0][0] == 1, 10, "the read waiting for the verdict")
            verdict.execute("COMMIT")
            assert read.result(timeout=10) == 3
    finally:
        for conn in (verdict, drift, reader):
            conn.close()
    assert [r[0] for r in rows(db, "SELECT alert_id FROM alert_deliveries ORDER BY 1")] == [1, 2, 3]


async def test_a_stop_mid_statement_closes_the_connection_only_after_it(tmp_path: Path) -> None:
    # The daemon stopping cancels the worker while a statement of its runs on a thread; closing
    # the connection from another thread under that statement crashed the process (SIGSEGV at
    # about 1 stop in 10 with an alert sink). The close now waits for it, on the same thread.
    import threading
    import time

    db = tmp_path / "positiond.db"
    conn = sqlite3.connect(db)
    migrate(conn)
    conn.close()
    delivery = Delivery(db, AlertsConfig((SinkConfig("hook", "command", command=("x",)),)))
    delivery.sinks = {}
    await delivery.open()
    started, outcome = threading.Event(), list[str]()

    def slow(c: sqlite3.Connection) -> None:
        started.set()
        time.sleep(0.3)
        try:
            c.execute("SELECT count(*) FROM alert_outbox").fetchone()
            outcome.append("still open")
        except sqlite3.Error as exc:
            outcome.append(f"closed under it: {exc}")

    task = asyncio.get_running_loop().create_task(delivery._db(slow))
    await asyncio.to_thread(started.wait, 5)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await delivery.close()
    assert outcome == ["still open"]
