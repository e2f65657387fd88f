"""``posctl migrate``: a SQLite database a real daemon wrote, copied into PostgreSQL
(daemon/positiond/store/pgcopy.py): every row the same, the seed's queries the same, the crashed
legs found by a daemon on PostgreSQL; a non-empty target and a failure midway write nothing."""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from positiond.store.dsn import PgDsn
from positiond_client import PositionPersistenceManager
from tests.helpers import DaemonProcess, rows, session_status, wait_for
from tests.pg import admin_dsn, fresh_database, pg_rows
from tests.test_ctl import posctl
from tests.test_daemon import SEED_CRASH_QUERY, SEED_RECOVERY_QUERY, Strategy

# Every data table of the schema, in the order a comparison reads them.
TABLES = {
    "strategy_sessions": "id",
    "strategy_positions": "position_id",
    "position_events": "id",
    "broker_orphans": "id",
    "alert_outbox": "id",
    "alert_deliveries": "alert_id, sink",
    "protective_orders": "id",
}
ORPHAN_BOOK = {
    "status": "success",
    "data": [
        {"symbol": "BANKNIFTY28NOV2552000CE", "exchange": "NFO", "product": "MIS",
         "quantity": "-30", "average_price": "100.0", "ltp": "101.0", "pnl": "0.0"}
    ],
}  # fmt: skip


@pytest.fixture
def pg() -> Iterator[PgDsn]:
    with fresh_database(admin_dsn()) as dsn:
        yield dsn


@pytest.fixture(scope="module")
def day_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A SQLite database after a day of a real daemon: a strategy killed -9 with two open legs
    (one closed before, trail levels 2 and 1 as integers), another that entered, updated (trail
    2.5), exited and ended; an orphan its recovery recorded; alerts delivered to a command sink.
    The daemon is stopped; each test copies the file."""
    import tempfile

    workdir = Path(tempfile.mkdtemp(prefix="pd-mig-", dir="/tmp"))  # short ipc path
    config = workdir / "positiond.toml"
    config.write_text(
        '[[alerts.sink]]\nname = "pager"\ntype = "command"\n'
        f"command = {json.dumps([sys.executable, '-c', 'pass'])}\n"
    )
    daemon = DaemonProcess(
        workdir, "--flush-interval", "0.05", "--config", str(config), heartbeat_timeout=1.0
    )
    daemon.start()
    strategy = Strategy(daemon.endpoint, "hold")
    try:
        sid = int(strategy.info()["session_id"])  # type: ignore[call-overload]
        strategy.proc.send_signal(signal.SIGKILL)
        wait_for(lambda: session_status(daemon.db, sid) == "CRASHED", 5, "CRASHED")
        pm = PositionPersistenceManager("theta_decay", endpoint=daemon.endpoint, ack_timeout=5)
        try:
            report = pm.start_session(recover=True, positionbook=ORPHAN_BOOK)
            assert [o.symbol for o in report.orphans] == ["BANKNIFTY28NOV2552000CE"]
            leg = pm.save_position_entry(
                symbol="NIFTY28NOV2524100PE", leg_type="PE", entry_price=60.0, stop_price=55.0,
                quantity=50, position_key="th-1",
            )  # fmt: skip
            pm.queue_position_update(leg, current_price=66.0, stop_price=58.5,
                                     last_trail_level=2.5, state={"atm": 24100})  # fmt: skip
            assert pm.sync(5)
            assert pm.save_position_exit(leg, exit_price=58.5, exit_reason="STOP_HIT")
            pm.end_session()
        finally:
            pm.close()
        wait_for(
            lambda: rows(daemon.db, "SELECT 1 FROM alert_deliveries WHERE state = 'DELIVERED'"),
            10,
            "an alert delivered",
        )
    finally:
        strategy.close()
        # Not asserted: every row was acknowledged, so committed, before the stop; the stop
        # itself has been seen to end in SIGSEGV (-11) now and then after "flushing what is
        # pending" with a command sink configured (reported; not this module's subject).
        daemon.stop()
    yield daemon.db
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def source(day_db: Path, workdir: Path) -> Path:
    copy = workdir / "day.db"
    src, dst = sqlite3.connect(f"file:{day_db}?mode=ro", uri=True), sqlite3.connect(copy)
    src.backup(dst)  # the -wal's pages too, if any
    src.close()
    dst.close()
    return copy


def table(db: Path | PgDsn, name: str, source: Path) -> list[tuple[Any, ...]]:
    """Every row of a table, every column the SQLite ``source`` has, in key order (booleans
    read as 0/1 on both)."""
    conn = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    try:
        listed = ", ".join(r[1] for r in conn.execute(f"PRAGMA table_info({name})"))
    finally:
        conn.close()
    found = rows(db, f"SELECT {listed} FROM {name} ORDER BY {TABLES[name]}")
    return [tuple(int(v) if isinstance(v, bool) else v for v in row) for row in found]


def migrate(source: Path, target: PgDsn, *extra: str) -> Any:
    return posctl(source, "ipc:///nowhere", "migrate", "--to", target.url, *extra)


def test_a_daemon_day_is_copied_row_for_row_and_a_daemon_on_postgresql_recovers_it(
    source: Path, pg: PgDsn, workdir: Path
) -> None:
    run = posctl(source, "ipc:///nowhere", "--json", "migrate", "--to", pg.url)
    assert run.returncode == 0, run.stderr
    counts = json.loads(run.stdout)["migrated"]["tables"]
    for name in TABLES:
        theirs, mine = table(pg, name, source), table(source, name, source)
        assert theirs == mine, name
        assert counts[name] == len(mine)
    for name in ("strategy_sessions", "strategy_positions", "position_events",
                 "broker_orphans", "alert_outbox", "alert_deliveries"):  # fmt: skip
        assert counts[name] > 0, name  # the day wrote every kind of row
    # The trail level's int flag: 2 stays an integer, 2.5 a float, on PostgreSQL too.
    flags = {r[0]: r[1] for r in pg_rows(
        pg, "SELECT position_key, last_trail_level_is_int FROM strategy_positions")}  # fmt: skip
    assert flags["ce-1"] is True and flags["th-1"] is False
    # The seed's two queries: the same answers on both.
    assert sorted(map(tuple, rows(pg, SEED_CRASH_QUERY))) == sorted(
        map(tuple, rows(source, SEED_CRASH_QUERY))
    )
    seed = {r["position_key"] for r in rows(pg, SEED_RECOVERY_QUERY)}
    assert seed == {r["position_key"] for r in rows(source, SEED_RECOVERY_QUERY)} == {
        "ce-1", "pe-1"}  # fmt: skip
    # A daemon on PostgreSQL: posctl crashed shows the crashed legs; a new session's id
    # continues after the copied ones (the identity sequences were set past them).
    daemon = DaemonProcess(workdir, "--flush-interval", "0.05", heartbeat_timeout=1.0, db=pg)
    daemon.start()
    try:
        crashed = posctl(pg, daemon.endpoint, "--json", "crashed")
        assert crashed.returncode == 1, crashed.stderr
        found = json.loads(crashed.stdout)
        keys = {leg["position_key"] for c in found["crashes"] for leg in c["legs"]}
        assert keys == {"ce-1", "pe-1"} and found["count"] == 2
        pm = PositionPersistenceManager("theta_decay", endpoint=daemon.endpoint, ack_timeout=5)
        try:
            report = pm.start_session(recover=True, positionbook=ORPHAN_BOOK)
            top = max(r[0] for r in table(source, "strategy_sessions", source))
            assert report.session_id == top + 1
            leg = pm.save_position_entry(symbol="NIFTY28NOV2524200CE", leg_type="CE",
                                         entry_price=10.0, stop_price=9.0, quantity=25)  # fmt: skip
            assert leg.position_id is not None
            assert leg.position_id > max(r[0] for r in table(source, "strategy_positions", source))
        finally:
            pm.close()
    finally:
        daemon.stop()


def counts(db: PgDsn) -> dict[str, int]:
    return {name: int(pg_rows(db, f"SELECT count(*) FROM {name}")[0][0]) for name in TABLES}


def test_a_target_that_holds_rows_is_refused_and_nothing_is_written(
    source: Path, pg: PgDsn
) -> None:
    assert migrate(source, pg).returncode == 0
    before = counts(pg)
    again = migrate(source, pg)
    assert again.returncode == 5
    assert "already holds rows" in again.stderr and "nothing was copied" in again.stderr
    assert counts(pg) == before


@pytest.mark.parametrize(
    "damage",
    [
        # the last table copied (foreign-key order) refers to a leg that does not exist
        "INSERT INTO protective_orders (position_id, session_id, crash_event_id, state, mode, "
        "symbol, exchange, product, action, quantity, pricetype, tag, planned_at, updated_at) "
        "VALUES (999999, 1, 1, 'PLANNED', 'on', 'X', 'NFO', 'MIS', 'SELL', 1, 'SL-M', 't', "
        "'2026-01-01T00:00:00.000Z', '2026-01-01T00:00:00.000Z')",
        # SQLite keeps text in an INTEGER column; PostgreSQL's BIGINT does not
        "UPDATE broker_orphans SET broker_quantity = 'many'",
    ],
    ids=["foreign-key", "type"],
)
def test_a_failure_midway_leaves_the_target_empty(source: Path, pg: PgDsn, damage: str) -> None:
    conn = sqlite3.connect(source)
    conn.execute(damage)
    conn.commit()
    conn.close()
    run = migrate(source, pg)
    assert run.returncode == 5, run.stdout
    assert "copy failed" in run.stderr and "nothing was copied" in run.stderr
    assert set(counts(pg).values()) == {0}
    # Nothing was consumed either: with the damage repaired, the copy goes through.
    conn = sqlite3.connect(source)
    conn.execute("DELETE FROM protective_orders WHERE position_id = 999999")
    conn.execute("UPDATE broker_orphans SET broker_quantity = -30")
    conn.commit()
    conn.close()
    assert migrate(source, pg).returncode == 0
    assert table(pg, "broker_orphans", source) == table(source, "broker_orphans", source)


def test_a_later_steps_columns_are_copied_by_name_and_a_column_without_a_place_refused(
    source: Path, pg: PgDsn
) -> None:
    import psycopg

    from positiond.store.postgres import migrate as migrate_pg

    with psycopg.connect(pg.url, autocommit=True) as raw:
        migrate_pg(raw)
        raw.execute("ALTER TABLE strategy_sessions ADD COLUMN desk_note TEXT")
    conn = sqlite3.connect(source)
    conn.execute("ALTER TABLE strategy_sessions ADD COLUMN desk_note TEXT")
    conn.execute("ALTER TABLE strategy_positions ADD COLUMN owner TEXT")
    conn.execute("UPDATE strategy_sessions SET desk_note = 'desk-' || id")
    conn.commit()
    conn.close()
    refused = migrate(source, pg)
    assert refused.returncode == 5
    assert "strategy_positions: columns missing in the target: owner" in refused.stderr
    assert set(counts(pg).values()) == {0}
    conn = sqlite3.connect(source)
    conn.execute("ALTER TABLE strategy_positions DROP COLUMN owner")
    conn.commit()
    conn.close()
    assert migrate(source, pg).returncode == 0
    hosts = pg_rows(pg, "SELECT id, desk_note FROM strategy_sessions ORDER BY id")
    assert hosts and all(r[1] == f"desk-{r[0]}" for r in hosts)


def test_a_daemon_on_the_source_is_read_through_a_snapshot_one_on_the_target_refuses(
    source: Path, pg: PgDsn, workdir: Path
) -> None:
    on_source = DaemonProcess(workdir, heartbeat_timeout=1.0, db=source)
    on_source.start()
    try:
        run = posctl(source, "ipc:///nowhere", "--json", "migrate", "--to", pg.url)
        assert run.returncode == 0, run.stderr
        done = json.loads(run.stdout)["migrated"]
        assert done["live_source"] is True
        assert done["tables"]["position_events"] == len(table(pg, "position_events", source))
        human = migrate(source, pg)
        assert human.returncode == 5, (run.stdout, human.stdout)  # now it holds rows
    finally:
        on_source.stop()
    with fresh_database(admin_dsn()) as empty:
        (workdir / "t").mkdir()  # its own log: "ready" is read from it
        on_target = DaemonProcess(workdir / "t", heartbeat_timeout=1.0, db=empty)
        on_target.start()
        try:
            refused = migrate(source, empty)
            assert refused.returncode == 5
            assert "a positiond is running on the target" in refused.stderr
            assert set(counts(empty).values()) == {0}
        finally:
            on_target.stop()


def test_a_target_newer_than_this_positiond_is_refused(source: Path, pg: PgDsn) -> None:
    import psycopg

    from positiond.store.pgschema import SCHEMA_VERSION
    from positiond.store.postgres import migrate as migrate_pg

    with psycopg.connect(pg.url, autocommit=True) as raw:
        migrate_pg(raw)
        raw.execute("INSERT INTO schema_version (version) VALUES (%s)", (SCHEMA_VERSION + 1,))
    run = migrate(source, pg)
    assert run.returncode == 5 and "newer than this positiond" in run.stderr
    assert set(counts(pg).values()) == {0}


def test_the_source_must_be_a_positiond_database_and_the_target_a_url(
    workdir: Path, pg: PgDsn
) -> None:
    missing = migrate(workdir / "none.db", pg)
    assert missing.returncode == 3 and "no SQLite database" in missing.stderr
    blank = workdir / "blank.db"
    sqlite3.connect(blank).close()
    assert "not a positiond database" in migrate(blank, pg).stderr
    wrong = posctl(blank, "ipc:///nowhere", "migrate", "--to", str(workdir / "x.db"))
    assert wrong.returncode == 2 and "postgresql:// URL" in wrong.stderr


def test_the_targets_triggers_do_not_fire_for_copied_rows_and_stay_enabled(
    source: Path, pg: PgDsn
) -> None:
    """A later schema's triggers (alerts, notifications on PostgreSQL) must not raise copied
    events again: here one that refuses every insert stands for them."""
    import psycopg

    from positiond.store.postgres import migrate as migrate_pg

    with psycopg.connect(pg.url, autocommit=True) as raw:
        migrate_pg(raw)
        raw.execute(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'trigger fired'; END $$"
        )
        raw.execute(
            "CREATE TRIGGER refuse_events AFTER INSERT ON position_events "
            "FOR EACH ROW EXECUTE FUNCTION refuse()"
        )
    run = migrate(source, pg)
    assert run.returncode == 0, run.stderr
    assert counts(pg)["position_events"] == len(table(source, "position_events", source))
    state = pg_rows(pg, "SELECT tgenabled FROM pg_trigger WHERE tgname = 'refuse_events'")
    assert state[0][0] == "O"  # enabled again for the daemon's own inserts


def test_an_older_source_is_migrated_in_its_copy_and_never_written(
    workdir: Path, pg: PgDsn
) -> None:
    from positiond.store import schema

    old = workdir / "old.db"
    conn = sqlite3.connect(old, isolation_level=None)
    for version, script in enumerate(schema.MIGRATIONS[:5], start=1):
        conn.executescript(f"BEGIN;\n{script}\nPRAGMA user_version = {version};\nCOMMIT;")
    conn.execute(
        "INSERT INTO strategy_sessions (session_key, strategy_name, status, start_time) "
        "VALUES ('k1', 'expiry_blast', 'CRASHED', '2026-01-01T09:15:00.000Z')"
    )
    conn.execute("DELETE FROM sqlite_sequence")
    conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('strategy_sessions', 40)")
    conn.close()
    before = old.read_bytes()
    run = posctl(old, "ipc:///nowhere", "--json", "migrate", "--to", pg.url)
    assert run.returncode == 0, run.stderr
    done = json.loads(run.stdout)["migrated"]
    assert done["schema_version"] == schema.SCHEMA_VERSION and done["live_source"] is False
    assert done["tables"]["strategy_sessions"] == 1
    # SQLite had handed out ids up to 40 (the rest pruned): PostgreSQL continues after 40.
    assert done["sequences"]["strategy_sessions"] == 40
    assert old.read_bytes() == before  # the source itself stays at version 5
    assert [tuple(r) for r in pg_rows(pg, "SELECT id, session_key FROM strategy_sessions")] == [
        (1, "k1")
    ]
