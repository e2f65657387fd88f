"""The PostgreSQL store (issue 14) against a real server: what differs from SQLite.

The rules themselves run on both backends in tests/test_store.py, tests/test_daemon.py and
tests/test_recovery_daemon.py (``@both_backends``); here: the schema is the same, the server's
own faults (a lock held, a connection lost, a second daemon), values only one of the two
engines takes, the configuration that selects it and what it refuses.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from positiond.config import format_config, load
from positiond.ops import Batch, CrashOp, EndOp, EntryOp, ExitOp, Result, StartOp
from positiond.store import open_store
from positiond.store.dbfile import DatabaseLocked
from positiond.store.dsn import PgDsn, parse_db
from positiond.store.schema import SCHEMA_VERSION, SchemaError
from positiond_client.protocol import encode
from tests.helpers import UNIT, DaemonProcess, rows, wait_for
from tests.pg import ENV, admin_dsn, fresh_database
from tests.tcp_cut import CutProxy
from tests.test_daemon import decode_reply

psycopg = pytest.importorskip("psycopg")

from psycopg.conninfo import make_conninfo  # noqa: E402

from positiond.store import pgschema  # noqa: E402  (needs nothing, kept beside its siblings)
from positiond.store.lease import application_name  # noqa: E402
from positiond.store.pgconn import translate  # noqa: E402
from positiond.store.postgres import PostgresStore  # noqa: E402

TOKEN = "c" * 32
ROOT = Path(__file__).parent.parent


@pytest.fixture
def pg() -> Iterator[PgDsn]:
    with fresh_database(admin_dsn()) as dsn:
        yield dsn


@pytest.fixture
async def store(pg: PgDsn) -> AsyncIterator[PostgresStore]:
    opened = await PostgresStore.open(pg, busy_timeout=0.2)
    yield opened
    await opened.close()


def start(key: str = "s1") -> StartOp:
    return StartOp(b"r", 1, key, "expiry_blast", "host", 123, 0.5, 1.7e9, token=TOKEN)


def entry(key: str, **extra: Any) -> EntryOp:
    fields = {"symbol": "NIFTY", "exchange": "NFO", "product": "MIS", "side": "BUY",
              "quantity": 75, "entry_price": 100.0, "stop_price": 90.0, **extra}  # fmt: skip
    return EntryOp(b"r", 2, "s1", key, fields, 1.7e9)


async def migrated(dsn: PgDsn) -> None:
    """Create the schema in ``dsn`` (a daemon's first start does it)."""
    store = await PostgresStore.open(dsn)
    await store.close()


async def apply(store: Any, *ops: Any, **kw: Any) -> list[Result]:
    results: list[Result] = await store.apply(Batch(ops=list(ops), time=1.7e9, **kw))
    return results


# ---- the schema ------------------------------------------------------------------------------


def test_both_backends_have_the_same_migrations() -> None:
    # A step added to one backend's schema (store/schema.py) must be added to the other's.
    assert pgschema.SCHEMA_VERSION == SCHEMA_VERSION


async def test_same_tables_and_columns_as_sqlite(store: PostgresStore, workdir: Path) -> None:
    lite = await open_store(workdir / "p.db")
    await lite.close()
    conn = sqlite3.connect(workdir / "p.db")
    tables = [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
    )]  # fmt: skip
    expected = {t: [r[1] for r in conn.execute(f"PRAGMA table_info({t})")] for t in tables}
    conn.close()
    found = rows(
        store.path,
        "SELECT table_name, column_name FROM information_schema.columns "
        "WHERE table_schema = 'public' AND table_name != 'schema_version' "
        "ORDER BY table_name, ordinal_position",
    )
    actual: dict[str, list[str]] = {}
    for r in found:
        actual.setdefault(r["table_name"], []).append(r["column_name"])
    assert actual == expected
    statuses = "SELECT name FROM {} ORDER BY name"
    for lookup in ("session_statuses", "position_statuses", "event_types"):
        lite_rows = [r[0] for r in rows(workdir / "p.db", statuses.format(lookup))]
        assert [r[0] for r in rows(store.path, statuses.format(lookup))] == lite_rows


async def test_versions_are_recorded_and_a_newer_database_is_refused(pg: PgDsn) -> None:
    store = await PostgresStore.open(pg)
    assert await store.migrate() == SCHEMA_VERSION
    await store.close()
    versions = [r[0] for r in rows(pg, "SELECT version FROM schema_version ORDER BY version")]
    assert versions == list(range(1, SCHEMA_VERSION + 1))
    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (SCHEMA_VERSION + 1,))
    with pytest.raises(SchemaError, match="newer"):
        await PostgresStore.open(pg)


# ---- the server's faults ---------------------------------------------------------------------


async def test_a_second_store_on_the_database_is_refused(store: PostgresStore) -> None:
    with pytest.raises(DatabaseLocked, match="another positiond"):
        await PostgresStore.open(store.path, busy_timeout=0.2)
    await store.close()  # released: the next daemon (a restart) gets it
    again = await asyncio.wait_for(PostgresStore.open(store.path, busy_timeout=0), 5 * UNIT)
    await again.close()


async def test_a_held_lock_fails_the_batch_and_commits_nothing(store: PostgresStore) -> None:
    await apply(store, start())
    with psycopg.connect(store.path.url) as other:  # an operator holding a table lock
        other.execute("LOCK TABLE strategy_positions IN EXCLUSIVE MODE")
        with pytest.raises(sqlite3.OperationalError, match="lock timeout"):
            await apply(store, entry("ce"))
        other.rollback()
    assert rows(store.path, "SELECT COUNT(*) AS n FROM strategy_positions")[0]["n"] == 0
    (res,) = await apply(store, entry("ce"))  # the retry goes through once the lock is gone
    assert res.ok


async def test_a_lost_connection_fails_one_batch_then_reconnects(store: PostgresStore) -> None:
    await apply(store, start())
    with psycopg.connect(store.path.url, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = %s AND datname = current_database()",
            (application_name(store.host_id),),  # the writer's, not the lease's
        )
    with pytest.raises(sqlite3.OperationalError):
        await apply(store, entry("ce"))
    (res,) = await apply(store, entry("ce"))  # reconnected, the lock taken again
    assert res.ok and res.data["duplicate"] is False
    with pytest.raises(DatabaseLocked):
        await PostgresStore.open(store.path, busy_timeout=0.2)


async def test_a_value_postgresql_cannot_store_refuses_only_its_op(store: PostgresStore) -> None:
    # SQLite keeps a NUL inside text, PostgreSQL refuses it: that op alone, never a batch retried
    # forever (which would stall every later ack).
    results = await apply(store, start(), entry("bad", symbol="NIF\x00TY"), entry("good"))
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].code == "INTERNAL"
    keys = rows(store.path, "SELECT position_key FROM strategy_positions")
    assert [r["position_key"] for r in keys] == ["good"]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    level=st.one_of(
        st.integers(min_value=-(2**53), max_value=2**53),
        st.floats(allow_nan=False, allow_infinity=False),
    )
)
def test_a_trail_level_comes_back_as_it_was_sent(pg: PgDsn, level: int | float) -> None:
    # 12 stays 12 and 12.0 stays 12.0 (the strategy compares them), as on SQLite.
    async def round_trip() -> Any:
        store = await PostgresStore.open(pg)
        try:
            key = f"k-{type(level).__name__}-{level!r}"
            await apply(store, start(), entry(key, last_trail_level=level))
            legs = (await store.query("open"))["legs"]
            return next(leg["last_trail_level"] for leg in legs if leg["position_key"] == key)
        finally:
            await store.close()

    back = asyncio.run(round_trip())
    assert type(back) is type(level) and back == level


# ---- the SQL translation ---------------------------------------------------------------------


def test_placeholders_are_translated_and_literals_left_alone() -> None:
    assert translate("SELECT ? , ?, '?', ':x' WHERE a = :b AND c = :b AND d::text = ?2") == (
        "SELECT $1 , $2, '?', ':x' WHERE a = $1 AND c = $1 AND d::text = $2",
        ("b",),
    )
    assert translate("SELECT 1 ORDER BY t DESC")[0] == "SELECT 1 ORDER BY t DESC NULLS LAST"


# ---- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_a_url_selects_postgresql_and_anything_else_is_a_path(scheme: str) -> None:
    url = f"{scheme}://pd:s3cret@db.example:5432/book?sslmode=require"
    parsed = parse_db(url)
    assert parsed == PgDsn(url)
    assert "s3cret" not in str(parsed) and "db.example:5432/book" in str(parsed)
    assert load(["--db", url], {}, None).config.db == PgDsn(url)
    assert load([], {"POSITIOND_DB": url}, None).config.db == PgDsn(url)
    assert load(["--db", "postgresql.db"], {}, None).config.db == Path("postgresql.db")
    shown = format_config(load(["--db", url], {}, None))
    assert f'db = "{parsed}"' in shown and "s3cret" not in shown


def test_alerts_and_reconciliation_are_accepted_with_postgresql(tmp_path: Path) -> None:
    file = tmp_path / "positiond.toml"
    file.write_text(
        'db = "postgresql:///book"\n[[alerts.sink]]\nname = "ops"\ntype = "webhook"\n'
        'url = "http://127.0.0.1:9/hook"\n'
    )
    loaded = load(["--config", str(file)], {}, None)  # alerts work on PostgreSQL
    assert [sink.name for sink in loaded.config.alerts.sinks] == ["ops"]
    reconcile = ["--db", "postgresql:///book", "--openalgo-host", "http://127.0.0.1:9",
                 "--openalgo-reconcile-interval", "60"]  # fmt: skip
    assert load(reconcile, {}, None).config.openalgo_reconcile_interval == 60  # works too


def test_posctl_on_postgresql_what_it_cannot_read_or_do(pg: PgDsn, workdir: Path) -> None:
    from tests.test_ctl import posctl

    empty = posctl(pg, f"ipc://{workdir}/none.sock", "sessions")
    assert empty.returncode == 3 and "is not a positiond database" in empty.stderr, empty.stderr
    gone = posctl(PgDsn(f"postgresql:///x?host={workdir}"), "ipc:///nowhere", "crashed")
    assert gone.returncode == 3 and "cannot open postgresql:///x" in gone.stderr, gone.stderr
    asyncio.run(migrated(pg))
    alerts = posctl(pg, f"ipc://{workdir}/none.sock", "alerts")  # read as on SQLite
    assert alerts.returncode == 0 and "No alerts." in alerts.stdout, alerts.stderr
    assert "Traceback" not in empty.stderr + gone.stderr + alerts.stderr


def test_the_daemon_runs_on_postgresql_alone(workdir: Path, pg: PgDsn) -> None:
    daemon = DaemonProcess(workdir, "--status-interval", "0.2", db=pg).start()
    try:
        (workdir / "second").mkdir()
        second = DaemonProcess(workdir / "second", "--busy-timeout", "0.2", db=pg)
        with pytest.raises(AssertionError, match="another positiond is already running"):
            second.start(timeout=5)
        health = daemon.status()
        assert health["db"] == str(pg) and health["db_size"] is None
        assert not list(workdir.glob("*.db*")) and not list(Path.cwd().glob("postgres*"))
    finally:
        daemon.stop()


def test_an_outage_of_postgresql_acks_nothing_and_writing_resumes_by_itself(
    workdir: Path, pg: PgDsn
) -> None:
    daemon = DaemonProcess(
        workdir, "--flush-interval", "0.05", "--status-interval", "0.2", db=pg
    ).start()
    admin = psycopg.connect(admin_dsn(), autocommit=True)
    name = pg.url.split("/")[3].split("?")[0]
    try:
        with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as raw:
            raw.setsockopt(zmq.LINGER, 0)
            raw.connect(daemon.endpoint)
            raw.send(encode({"v": 1, "type": "start", "seq": 1, "session": "o", "strategy": "s"}))
            assert raw.poll(5000 * UNIT)
            token = decode_reply(raw.recv())["token"]
            # The database goes away: no new connection, the daemon's own one cut.
            admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )
            entry = {"v": 1, "type": "entry", "seq": 2, "session": "o", "token": token,
                     "key": "o-1", "symbol": "X", "exchange": "NFO", "product": "MIS",
                     "side": "BUY", "quantity": 75, "entry_price": 10.0}  # fmt: skip
            raw.send(encode(entry))
            assert not raw.poll(1500 * UNIT), "acked while the database was unreachable"
            wait_for(lambda: daemon.status()["writes_ok"] is False, 10, "health turns bad")
            admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
            assert raw.poll(10000 * UNIT), "not acked once the database was back"
            reply = decode_reply(raw.recv())
            assert reply["seq"] == 2 and reply["duplicate"] is False, reply
        assert rows(pg, "SELECT position_key FROM strategy_positions")[0][0] == "o-1"
        wait_for(lambda: daemon.status()["writes_ok"] is True, 10, "health back to good")
        assert daemon.proc is not None and daemon.proc.poll() is None
    finally:
        admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        admin.close()
        daemon.stop()


def test_an_unreachable_server_at_start_is_a_one_line_error(workdir: Path) -> None:
    url = f"postgresql:///book?host={workdir}&user=pd&password=s3cret"  # no server there
    done = subprocess.run(
        [sys.executable, "-m", "positiond", "--db", url, "--endpoint", f"ipc://{workdir}/s"],
        capture_output=True, text=True, timeout=30 * UNIT,
    )  # fmt: skip
    assert done.returncode != 0
    assert "cannot connect to the database postgresql:///book" in done.stderr, done.stderr
    assert "s3cret" not in done.stderr + done.stdout and "Traceback" not in done.stderr


@pytest.mark.parametrize("ci", [True, False])
def test_without_a_server_the_postgresql_tests_skip_but_fail_under_ci(ci: bool) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", ENV)}
    if ci:
        env["CI"] = "true"
    test = "tests/test_store.py::test_each_store_is_a_store[postgres]"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
         "-rs", test],
        capture_output=True, text=True, timeout=60 * UNIT, env=env, cwd=ROOT,
    )  # fmt: skip
    if ci:
        assert done.returncode == 1 and "CI runs every PostgreSQL test" in done.stdout, done.stdout
    else:
        assert done.returncode == 0 and "1 skipped" in done.stdout, done.stdout
        assert "POSITIOND_TEST_PG_DSN is unset" in done.stdout


async def test_a_cut_connection_whose_server_session_lives_on_does_not_block_writing(
    pg: PgDsn,
) -> None:
    # The writer's connection is cut but its server process keeps the database's lock (until
    # the server's keepalives notice, hours by default): the store ends that session of its own
    # and writes again at the next batch.
    with psycopg.connect(pg.url) as probe:
        host, port, name = probe.info.host, probe.info.port, probe.info.dbname
    upstream = f"{host}/.s.PGSQL.{port}" if host.startswith("/") else (host, int(port))
    proxy = CutProxy(upstream)
    try:
        # The same role and database, through the proxy (a key=value DSN: libpq takes both).
        via = PgDsn(make_conninfo(pg.url, host="127.0.0.1", port=str(proxy.port), dbname=name))
        store = await PostgresStore.open(via, busy_timeout=0.5)
        try:
            await apply(store, start())
            proxy.cut()
            with pytest.raises(sqlite3.OperationalError):
                await apply(store, entry("ce"))
            (res,) = await apply(store, entry("ce"))
            assert res.ok and res.data["duplicate"] is False
        finally:
            await store.close()
    finally:
        proxy.close()


# ---- the same rules on both: a differential property ------------------------------------------

SESSIONS = ("s1", "s2")
LEGS = ("k1", "k2", "k3")


def _op(kind: str, session: str, key: str, n: int) -> Any:
    if kind == "start":
        return start(session)
    if kind == "entry":
        fields = {"symbol": "NIFTY", "exchange": "NFO", "product": "MIS",
                  "side": "SIDEWAYS" if n == 9 else "BUY", "quantity": 0 if n == 8 else 75,
                  "entry_price": 10.0,
                  "last_trail_level": n if n % 2 else n + 0.5}  # fmt: skip
        return EntryOp(b"r", n, session, key, fields, 1.7e9)
    if kind == "exit":
        return ExitOp(b"r", n, session, key, 11.0, "STOP_HIT", 1.7e9, {"stop_price": float(n)})
    if kind == "crash":
        source = ("HEARTBEAT", "DISCONNECT", "CLIENT")[n % 3]
        token = TOKEN if source == "CLIENT" else None
        final = {key: {"stop_price": 1.0 * n}}
        return CrashOp(b"r" if token else None, n if token else None, session, source, "x",
                       1.7e9, final_updates=final, token=token)  # fmt: skip
    return EndOp(b"r", n, session, 1.7e9, token=TOKEN)


_OPS = st.tuples(
    st.sampled_from(["start", "entry", "exit", "crash", "end"]),
    st.sampled_from(SESSIONS), st.sampled_from(LEGS), st.integers(0, 9),
)  # fmt: skip
_BATCH = st.tuples(
    st.lists(_OPS, min_size=1, max_size=5),
    st.dictionaries(st.sampled_from(LEGS), st.fixed_dictionaries({}, optional={
        "current_price": st.floats(0, 1e6), "stop_price": st.none() | st.floats(0, 1e6),
        "last_trail_level": st.integers(-9, 9) | st.floats(-9, 9)})),
)  # fmt: skip


def _outcome(results: list[Result]) -> list[tuple[Any, ...]]:
    """What a client sees, less the row ids (PostgreSQL spends one on a refused insert)."""
    ids = ("position_id", "session_id")
    return [
        (r.ok, r.code, {k: v for k, v in r.data.items() if k not in ids},
         [(g.key, g.stop_price, g.last_trail_level, type(g.last_trail_level)) for g in r.legs])
        for r in results
    ]  # fmt: skip


_STATE = (
    ("SELECT position_key, status, was_crashed, stop_price, current_price, exit_reason "
     "FROM strategy_positions ORDER BY position_key"),
    "SELECT session_key, status, crash_source FROM strategy_sessions ORDER BY session_key",
    "SELECT event_type, count(*) FROM position_events GROUP BY event_type ORDER BY event_type",
)  # fmt: skip


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(batches=st.lists(_BATCH, min_size=1, max_size=4))
def test_both_backends_answer_and_store_the_same(workdir: Path, batches: list[Any]) -> None:
    lite = workdir / f"diff-{len(list(workdir.glob('diff-*.db')))}.db"

    async def run(db: Path | PgDsn) -> tuple[list[Any], list[Any]]:
        store = await open_store(db)
        seen = []
        try:
            both = ([("start", "s1", "", 0), ("start", "s2", "", 0)], {})  # mostly: sessions
            for n, (ops, updates) in enumerate([both, *batches]):
                made = [_op(kind, s, k, i) for kind, s, k, i in ops]
                seen += _outcome(await store.apply(Batch(made, updates, time=1.7e9 + n)))
            state = [[tuple(r) for r in rows(db, sql)] for sql in _STATE]
            for what in ("open", "crashed"):  # the recovery reads, the trail level's type too
                state.append([
                    ({k: v for k, v in leg.items() if k not in ("position_id", "session_id")},
                     type(leg["last_trail_level"]))
                    for leg in (await store.query(what))["legs"]
                ])  # fmt: skip
        finally:
            await store.close()
        return seen, state

    with fresh_database(admin_dsn()) as pg:
        on_sqlite = asyncio.run(run(lite))
        on_postgres = asyncio.run(run(pg))
    assert on_postgres[0] == on_sqlite[0]
    # SQLite's booleans are 0/1, PostgreSQL's true/false: equal as Python values.
    assert on_postgres[1] == on_sqlite[1]
