"""The store against real SQLite files: schema, idempotency, crash marking, faults."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import threading
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosqlite
import pytest

from positiond.ops import Batch, CrashOp, EndOp, EntryOp, ExitOp, Result, StartOp, SyncOp
from positiond.store import Store, open_store
from positiond.store.dbfile import (
    CorruptDatabase,
    DatabaseLocked,
    DatabaseLost,
    FileWatch,
    lock_database,
    lock_file_for,
)
from positiond.store.dsn import PgDsn
from positiond.store.schema import SCHEMA_VERSION, SchemaError
from positiond.store.sqlite import AIOSQLITE_VERSIONS, SQLiteStore, run_on_thread
from tests.helpers import rows
from tests.pg import both_backends


@pytest.fixture
async def store(db: Path | PgDsn) -> AsyncIterator[Store]:
    """The store on ``db``: SQLite, or PostgreSQL for the tests marked ``@both_backends``."""
    opened = await open_store(db, busy_timeout=0.1)
    yield opened
    await opened.close()


TOKEN = "c" * 32


def start(key: str = "s1", strategy: str = "expiry_blast", token: str = TOKEN) -> StartOp:
    return StartOp(b"r", 1, key, strategy, "host", 123, 0.5, 1.7e9, token=token)


def entry(key: str, session: str = "s1", **extra: Any) -> EntryOp:
    fields = {
        "symbol": "NIFTY28NOV2524000CE",
        "exchange": "NFO",
        "product": "MIS",
        "side": "BUY",
        "quantity": 75,
        "entry_price": 100.0,
        "stop_price": 90.0,
    }
    fields.update(extra)
    return EntryOp(b"r", 2, session, key, fields, 1.7e9)


async def apply(store: Store, *ops: Any, **kw: Any) -> list[Result]:
    return await store.apply(Batch(ops=list(ops), time=1.7e9, **kw))


def test_aiosqlite_still_offers_the_single_hop_we_rely_on() -> None:
    # run_on_thread runs a whole batch through aiosqlite's private _execute: fail loudly if it goes.
    assert callable(getattr(aiosqlite.Connection, "_execute", None))


def test_aiosqlite_is_a_release_the_single_hop_is_known_to_work_with() -> None:
    installed = tuple(int(part) for part in aiosqlite.__version__.split(".")[:2])
    low, high = AIOSQLITE_VERSIONS
    assert low <= installed < high, (
        f"aiosqlite {aiosqlite.__version__} is outside {AIOSQLITE_VERSIONS}: check that "
        "positiond.store.sqlite.run_on_thread still works with it, then widen the bound "
        "(here and in pyproject.toml)"
    )
    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    bound = f"aiosqlite>={low[0]}.{low[1]},<{high[0]}.{high[1]}"
    assert bound in project["project"]["dependencies"]


async def test_run_on_thread_runs_one_callable_on_the_connection_thread(workdir: Path) -> None:
    conn = await aiosqlite.connect(workdir / "t.db", isolation_level=None)
    try:

        def where(raw: sqlite3.Connection, n: int) -> tuple[int, int, bool]:
            one = int(raw.execute("SELECT ?", (n,)).fetchone()[0])
            return one, threading.get_ident(), isinstance(raw, sqlite3.Connection)

        value, thread, raw = await run_on_thread(conn, where, 7)
        assert (value, raw) == (7, True)
        assert thread != threading.get_ident()  # aiosqlite's worker, not the event loop's
    finally:
        await conn.close()


@both_backends
async def test_each_store_is_a_store(store: Store, backend: str) -> None:
    # One interface, two implementations (mypy checks open_store's return too).
    if backend == "sqlite":
        assert isinstance(store, SQLiteStore)
    else:
        assert type(store).__name__ == "PostgresStore"
    assert isinstance(store, Store)
    assert await store.migrate() == SCHEMA_VERSION
    assert await store.query("crashed") == {"legs": [], "truncated": False}


async def test_schema_is_versioned_wal_and_private(store: Store, workdir: Path) -> None:
    db = workdir / "positiond.db"  # the store fixture's file
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


async def test_newer_schema_is_refused(workdir: Path) -> None:
    db = workdir / "new.db"
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(SchemaError, match="newer"):
        await open_store(db)


@both_backends
async def test_entry_is_idempotent_by_key_and_conflicts_across_sessions(store: Store) -> None:
    _, first, again = await apply(store, start(), entry("ce"), entry("ce"))
    assert first.data == {"position_id": 1, "status": "ACTIVE", "duplicate": False}
    assert again.data == {"position_id": 1, "status": "ACTIVE", "duplicate": True}
    (_, conflict) = await apply(store, start("s2"), entry("ce", session="s2"))
    assert (conflict.ok, conflict.code) == (False, "KEY_CONFLICT")
    found = rows(store.path, "SELECT COUNT(*) AS n FROM strategy_positions")
    assert found[0]["n"] == 1


@both_backends
async def test_exit_applies_final_state_once(store: Store) -> None:
    await apply(store, start(), entry("ce"))
    exit_op = ExitOp(b"r", 3, "s1", "ce", 96.0, "STOP_HIT", 1.7e9, {"stop_price": 96.0})
    (done,) = await apply(store, exit_op)
    (again,) = await apply(store, exit_op)
    assert (done.data["duplicate"], again.data["duplicate"]) == (False, True)
    (unknown,) = await apply(store, ExitOp(b"r", 4, "s1", "zz", None, "X", 1.7e9))
    assert unknown.code == "UNKNOWN_LEG"
    leg = rows(store.path, "SELECT * FROM strategy_positions")[0]
    assert (leg["status"], leg["stop_price"], leg["exit_price"], leg["exit_reason"]) == (
        "CLOSED",
        96.0,
        96.0,
        "STOP_HIT",
    )
    exits = rows(store.path, "SELECT COUNT(*) AS n FROM position_events WHERE event_type='EXIT'")
    assert exits[0]["n"] == 1


@both_backends
async def test_crash_marks_open_legs_and_the_verdict_never_beats_an_end(store: Store) -> None:
    await apply(store, start(), entry("ce"), entry("pe"), start("s2"))
    await apply(store, ExitOp(b"r", 3, "s1", "pe", 80.0, "TARGET", 1.7e9))
    crash = CrashOp(
        None,
        None,
        "s1",
        "HEARTBEAT",
        "missed heartbeats",
        1.7e9,
        final_updates={"ce": {"stop_price": 97.0}},
    )
    (res,) = await apply(store, crash)
    assert res.data == {"session_id": 1, "status": "CRASHED", "legs": 1}
    legs = rows(
        store.path,
        "SELECT position_key, status, was_crashed, stop_price "
        "FROM strategy_positions ORDER BY position_id",
    )
    assert [tuple(r) for r in legs] == [("ce", "CRASHED", 1, 97.0), ("pe", "CLOSED", 0, 90.0)]
    # s2 ended cleanly; a late verdict about it changes nothing.
    await apply(store, EndOp(b"r", 5, "s2", 1.7e9, token=TOKEN))
    (late,) = await apply(store, CrashOp(None, None, "s2", "HEARTBEAT", "late", 1.7e9))
    assert late.data["duplicate"] is True
    sessions = rows(store.path, "SELECT status FROM strategy_sessions ORDER BY id")
    assert [r["status"] for r in sessions] == ["CRASHED", "COMPLETED"]


@both_backends
async def test_strategy_report_replaces_a_daemon_verdict_but_not_the_reverse(store: Store) -> None:
    await apply(store, start())
    await apply(store, CrashOp(None, None, "s1", "HEARTBEAT", "missed heartbeats", 1.7e9))
    await apply(store, CrashOp(b"r", 2, "s1", "CLIENT", "ValueError: boom", 1.7e9, token=TOKEN))
    await apply(store, CrashOp(None, None, "s1", "DISCONNECT", "process exited", 1.7e9))
    session = rows(store.path, "SELECT crash_reason, crash_source FROM strategy_sessions")[0]
    assert (session["crash_reason"], session["crash_source"]) == ("ValueError: boom", "CLIENT")
    (refused,) = await apply(store, start())
    assert refused.code == "SESSION_CLOSED"


@both_backends
async def test_start_revives_a_session_the_daemon_declared_dead(store: Store) -> None:
    await apply(store, start(), entry("ce"))
    await apply(store, CrashOp(None, None, "s1", "HEARTBEAT", "missed heartbeats", 1.7e9))
    (res,) = await apply(store, start())
    assert res.ok and res.data["revived"]["legs"] == ["ce"]
    assert [leg.key for leg in res.legs] == ["ce"]
    leg = rows(store.path, "SELECT status, was_crashed FROM strategy_positions")[0]
    assert (leg["status"], leg["was_crashed"]) == ("ACTIVE", 1)


@both_backends
async def test_one_bad_op_is_refused_while_the_rest_commits(store: Store) -> None:
    bad = entry("bad", side="SIDEWAYS")  # past the protocol, the CHECK constraint stops it
    results = await apply(store, start(), bad, entry("good"), SyncOp(b"r", 9, "s1"))
    assert [r.ok for r in results] == [True, False, True, True]
    assert results[1].code == "INTERNAL"
    keys = rows(store.path, "SELECT position_key FROM strategy_positions")
    assert [r["position_key"] for r in keys] == ["good"]


async def test_a_locked_database_fails_the_batch_and_commits_nothing(store: Store) -> None:
    await apply(store, start())
    other = sqlite3.connect(store.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # an operator holding the write lock
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            await apply(store, entry("ce"))
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert rows(store.path, "SELECT COUNT(*) AS n FROM strategy_positions")[0]["n"] == 0
    (res,) = await apply(store, entry("ce"))  # the retry goes through once the lock is gone
    assert res.ok


@both_backends
async def test_updates_touch_only_the_named_fields_of_active_legs(store: Store) -> None:
    await apply(store, start(), entry("ce", state={"atm": 1}), entry("pe"))
    await apply(store, ExitOp(b"r", 3, "s1", "pe", 1.0, "X", 1.7e9))
    updates = {
        "ce": {"current_price": 101.0, "last_trail_level": None},
        "pe": {"current_price": 5.0},
    }
    await apply(store, updates=updates)
    legs = rows(
        store.path,
        "SELECT position_key, current_price, stop_price, last_trail_level, "
        "state FROM strategy_positions ORDER BY position_id",
    )
    assert [tuple(r) for r in legs] == [
        ("ce", 101.0, 90.0, None, '{"atm":1}'),
        ("pe", 100.0, 90.0, None, "{}"),  # closed: the late update is not applied
    ]


async def test_concurrent_readers_do_not_block_the_writer(store: Store) -> None:
    await apply(store, start())
    reader = sqlite3.connect(f"file:{store.path}?mode=ro", uri=True)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT * FROM strategy_sessions").fetchall()
        (res,) = await asyncio.wait_for(apply(store, entry("ce")), 5)
        assert res.ok
    finally:
        reader.close()


@both_backends
async def test_only_the_token_holder_resumes_ends_or_crashes_a_session(store: Store) -> None:
    await apply(store, start())
    stored = rows(store.path, "SELECT token_hash FROM strategy_sessions")[0]["token_hash"]
    assert stored and TOKEN not in stored  # only a hash is kept
    thief = "d" * 32
    (resume,) = await apply(store, start(token=thief))
    (end,) = await apply(store, EndOp(b"r", 2, "s1", 1.7e9, token=thief))
    (crash,) = await apply(store, CrashOp(b"r", 3, "s1", "CLIENT", "x", 1.7e9, token=None))
    assert [r.code for r in (resume, end, crash)] == ["BAD_TOKEN"] * 3
    assert rows(store.path, "SELECT status FROM strategy_sessions")[0]["status"] == "RUNNING"
    (ok,) = await apply(store, start())
    assert ok.ok and ok.data["resumed"] is True


# ---- the database file: its lock, its identity, its integrity ---------------------------------


@pytest.mark.parametrize("how", ["symlink", "hard-link", "not-created-yet"])
def test_the_lock_holds_the_file_whatever_name_reaches_it(workdir: Path, how: str) -> None:
    db = workdir / "p.db"
    other = workdir / "other.db"
    if how == "not-created-yet":
        other.symlink_to(db)  # dangling until the first lock creates the database
        first = lock_database(other, create=True)
        assert db.is_file() and stat.S_IMODE(db.stat().st_mode) == 0o600
    else:
        first = lock_database(db, create=True)
        if how == "symlink":
            other.symlink_to(db)
        else:
            os.link(db, other)  # another path, another lock file name: the inode is the same
    try:
        with pytest.raises(DatabaseLocked):
            lock_database(other)
        with pytest.raises(DatabaseLocked):
            lock_database(db)
        if how != "hard-link":
            assert lock_file_for(other) == lock_file_for(db)
    finally:
        first.close()
    lock_database(other).close()  # free again once released


async def test_a_commit_into_a_deleted_database_is_never_reported_written(workdir: Path) -> None:
    db = workdir / "p.db"
    held = lock_database(db, create=True)
    store = await open_store(db, watch=FileWatch(db, held.fd))
    try:
        await apply(store, start())
        wal = db.with_name(db.name + "-wal")
        assert store.watch is not None and store.watch.check() is None
        wal.unlink()
        with pytest.raises(DatabaseLost) as lost:
            await apply(store, entry("ce"))  # committed into the unlinked WAL: not "written"
        assert lost.value.lost.file == "wal"
        assert "checkpointed" in await store.save(lost.value.lost)
        db.unlink()
        found = store.watch.check()
        assert found is not None and found.file == "db"
    finally:
        await store.close()
        held.close()


async def test_a_damaged_database_is_refused_at_open(workdir: Path) -> None:
    db = workdir / "p.db"
    db.write_bytes(b"not a database at all" * 1000)
    with pytest.raises(CorruptDatabase, match=r"is damaged or not a database.*restore"):
        await open_store(db)


async def test_the_integrity_check_at_open_is_bounded_in_time(
    workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = workdir / "p.db"
    opened = await open_store(db)
    await apply(opened, start(), *(entry(f"k{i}", state={"x": "y" * 2000}) for i in range(300)))
    await opened.close()
    # No time at all: the check stops at its first progress callback, and the open goes on.
    reopened = await open_store(db, check_seconds=1e-9)
    await reopened.close()
    assert "integrity check stopped" in caplog.text


@both_backends
async def test_a_read_that_fails_is_its_own_answer_and_never_holds_up_the_writes(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bug in reading a watcher's snapshot (on PostgreSQL the shim once lacked a cursor's
    # `description`): the writes of the same batch commit and are acknowledged; were the read
    # a write, the batch would be kept and retried instead.
    from positiond.ops import WatchOp
    from positiond.store import writes

    def broken(cur: Any, op: Any, now: str) -> Result:
        cur.execute("SELECT 1")
        raise RuntimeError("a bug in a read")

    monkeypatch.setitem(writes._APPLY, WatchOp, broken)
    results = await apply(store, start(), WatchOp(b"w", 3, None, "watcher"), entry("leg-1"))
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].code == "INTERNAL" and "a bug in a read" in results[1].reason
    assert [leg["position_key"] for leg in (await store.query("open"))["legs"]] == ["leg-1"]
