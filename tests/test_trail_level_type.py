"""A trail level comes back exactly as the strategy sent it: 12 as 12, 2.5 as 2.5, 12.0 as 12.0.

``last_trail_level`` is a REAL column (the seed's), and REAL affinity stores 12 as 12.0; the
flag ``last_trail_level_is_int`` (schema v4) says which values were integers. Checked on real
SQLite files through the store (every read the daemon answers with), and end to end: crashed
legs, adoption, posctl --json, and posctl on a database from before the flag.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from positiond.ops import Batch, CrashOp, QueryOp, StartOp
from positiond.store import recovery
from positiond.store.schema import MIGRATIONS
from positiond.store.sqlite import setup_connection
from positiond.store.writes import apply_batch, load_live
from positiond_client import PositionPersistenceManager
from positiond_client.protocol import MAX_PRICE
from tests.conftest import SOAK
from tests.helpers import DaemonProcess
from tests.test_ctl import posctl
from tests.test_store import entry

LEVELS = st.one_of(
    st.none(),
    st.integers(-int(MAX_PRICE), int(MAX_PRICE)),
    st.floats(-MAX_PRICE, MAX_PRICE, allow_nan=False),
    st.integers(-1000, 1000).map(float),  # integral floats: 12.0 must stay 12.0
    st.sampled_from([0, 2, 2.5, 12, 12.0, -3, 0.0, -0.0]),
)


def same(got: object, sent: object) -> bool:
    return type(got) is type(sent) and got == sent


@pytest.fixture(scope="module")
def conn() -> Iterator[sqlite3.Connection]:
    with tempfile.TemporaryDirectory(prefix="pd-", dir="/tmp") as tmp:
        connection = sqlite3.connect(Path(tmp) / "t.db", isolation_level=None)
        setup_connection(connection, "NORMAL", 1000)
        yield connection
        connection.close()


_keys = itertools.count()


def _apply(conn: sqlite3.Connection, *ops: Any, **kw: Any) -> list[Any]:
    results = apply_batch(conn, Batch(ops=list(ops), time=1.7e9, **kw))
    assert all(r.ok for r in results), results
    return results


def _query(conn: sqlite3.Connection, what: str, key: str) -> Any:
    found = recovery.query(conn.cursor(), QueryOp(None, None, None, "t", what, None), "")
    (leg,) = [leg for leg in found.data["legs"] if leg["position_key"] == key]
    return leg["last_trail_level"]


@settings(max_examples=SOAK.count(200), deadline=None, derandomize=True, database=None)
@given(sent=LEVELS, then=LEVELS)
def test_every_read_gives_back_the_type_that_was_sent(
    conn: sqlite3.Connection, sent: float | None, then: float | None
) -> None:
    n = next(_keys)
    session, key = f"s{n}", f"leg{n}"
    _apply(conn, StartOp(b"r", 1, session, "st", "h", 1, 0.5, 1.7e9, token="t"))
    _apply(conn, entry(key, session, last_trail_level=sent))
    assert same(_query(conn, "open", key), sent)
    live = {row.key: row.last_trail_level for row in load_live(conn)[1]}
    assert same(live[key], sent)  # what the engine compares the next update with
    _apply(conn, updates={key: {"last_trail_level": then}})
    assert same(_query(conn, "open", key), then)
    resumed = _apply(conn, StartOp(b"r", 2, session, "st", "h", 1, 0.5, 1.7e9, token="t"))
    assert [same(row.last_trail_level, then) for row in resumed[0].legs] == [True]
    _apply(conn, CrashOp(None, None, session, "DISCONNECT", "process exited", 1.7e9))
    assert same(_query(conn, "crashed", key), then)  # get_crashed_positions, posctl crashed


def test_a_strategy_gets_its_ints_back_after_a_crash_and_an_adoption(
    daemon: DaemonProcess,
) -> None:
    pm = PositionPersistenceManager("trail_types", endpoint=daemon.endpoint, ack_timeout=5)
    pm.start_session()
    sent = {"int": 2, "half": 2.5, "float": 3.0, "none": None}
    legs = {
        name: pm.save_position_entry(
            symbol="X", entry_price=100.0, quantity=1, position_key=name, last_trail_level=level
        )
        for name, level in sent.items()
    }
    sent["int"] = 12
    pm.queue_position_update(legs["int"], stop_price=95.0, last_trail_level=12)
    assert pm.sync(5)
    assert pm.handle_crash("gone")
    pm.close()

    after = PositionPersistenceManager("trail_types", endpoint=daemon.endpoint, ack_timeout=5)
    try:
        after.start_session()
        crashed = {leg.position_key: leg.last_trail_level for leg in after.get_crashed_positions()}
        assert crashed == sent and all(same(crashed[k], v) for k, v in sent.items())
        ran = posctl(daemon.db, daemon.endpoint, "--json", "positions")
        shown = {
            p["position_key"]: p["last_trail_level"] for p in json.loads(ran.stdout)["positions"]
        }
        assert all(same(shown[k], v) for k, v in sent.items()), shown
        ran = posctl(daemon.db, daemon.endpoint, "--json", "crashed")
        shown = {
            leg["position_key"]: leg["last_trail_level"]
            for crash in json.loads(ran.stdout)["crashes"]
            for leg in crash["legs"]
        }
        assert all(same(shown[k], v) for k, v in sent.items()), shown
        adopted = after.mark_position_recovered("int")
        assert same(adopted.last_trail_level, 12)
        ran = posctl(daemon.db, daemon.endpoint, "--json", "events", "int")
        assert same(json.loads(ran.stdout)["leg"]["last_trail_level"], 12)
        after.end_session()
    finally:
        after.close()


def test_posctl_reads_a_database_from_before_the_flag(workdir: Path) -> None:
    db = workdir / "old.db"
    conn = sqlite3.connect(db, isolation_level=None)
    for version, script in enumerate(MIGRATIONS[:3], start=1):
        conn.executescript(f"BEGIN;\n{script}\nPRAGMA user_version = {version};\nCOMMIT;")
    conn.execute(
        "INSERT INTO strategy_sessions (session_key, strategy_name, status, start_time) "
        "VALUES ('s', 'old', 'CRASHED', '2025-11-28T10:00:00.000Z')"
    )
    conn.execute(
        "INSERT INTO strategy_positions (position_key, session_id, symbol, exchange, product, "
        "side, quantity, entry_price, entry_time, last_trail_level, status, was_crashed, "
        "updated_at) VALUES ('k', 1, 'X', 'NFO', 'MIS', 'BUY', 1, 10.0, "
        "'2025-11-28T10:00:00.000Z', 4, 'CRASHED', TRUE, '2025-11-28T10:00:00.000Z')"
    )
    conn.close()
    ran = posctl(db, "ipc:///nonexistent/pd.sock", "--json", "positions")
    assert ran.returncode == 0, ran.stderr
    (leg,) = json.loads(ran.stdout)["positions"]
    assert same(leg["last_trail_level"], 4.0)  # unknown before the flag: as stored
    ran = posctl(db, "ipc:///nonexistent/pd.sock", "--json", "crashed")
    assert ran.returncode == 1, ran.stderr
    (crash,) = json.loads(ran.stdout)["crashes"]
    assert same(crash["legs"][0]["last_trail_level"], 4.0)
    assert sqlite3.connect(db).execute("PRAGMA user_version").fetchone()[0] == 3  # untouched
