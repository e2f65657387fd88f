"""Safety properties of the hand-back in the store, whatever happens in whatever order.

A crashed leg with a live protective order, then any sequence of adoptions (with or without
keep_protection, by either of two live sessions), reviews, requeues, revivals of the crashed
session, the worker settling the order, and fill reports naming any session. After each step:

- only a hand-back sets a release: an adoption or revival of a leg whose order is still live,
  to the session now holding it (``release_session``); its ``CANCEL``/``KEEP`` is the first
  hand-back's for good (the worker may be acting on it); a review, a requeue, a crash never
  change it (nobody manages the leg yet);
- a fill report closes the leg (PROTECTIVE_STOP, at the fill) exactly when it names the session
  holding the still-open leg, and otherwise changes nothing; the leg is closed at most once.

Each step is its own batch on a real SQLite file, applied as the daemon's writer applies it.
"""

from __future__ import annotations

import itertools
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from positiond.ops import Batch, CrashOp, ProtectCloseOp, ResolveOp, StartOp
from positiond.store.sqlite import setup_connection
from positiond.store.writes import apply_batch
from tests.conftest import SOAK
from tests.inprocess import insert_protective_order
from tests.test_store import TOKEN, entry, start


@pytest.fixture(scope="module")
def db() -> Iterator[tuple[sqlite3.Connection, Path]]:
    with tempfile.TemporaryDirectory(prefix="pd-", dir="/tmp") as tmp:
        path = Path(tmp) / "t.db"
        connection = sqlite3.connect(path, isolation_level=None)
        connection.row_factory = sqlite3.Row
        setup_connection(connection, "NORMAL", 1000)
        yield connection, path
        connection.close()


_runs = itertools.count()

STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("adopt"), st.sampled_from(["b", "c"]), st.booleans()),
        st.tuples(st.just("review"), st.none(), st.none()),
        st.tuples(st.just("requeue"), st.none(), st.none()),
        st.tuples(st.just("revive"), st.none(), st.none()),
        st.tuples(st.just("crash"), st.sampled_from(["b", "c"]), st.none()),
        st.tuples(st.just("settle"), st.sampled_from(["CANCELLED", "TRIGGERED"]), st.none()),
        st.tuples(st.just("fill"), st.sampled_from(["a", "b", "c", "x"]),
                  st.floats(1.0, 200.0, allow_nan=False)),
    ),
    max_size=12,
)  # fmt: skip


def _one(conn: sqlite3.Connection, op: Any) -> Any:
    (result,) = apply_batch(conn, Batch(ops=[op], time=1.7e9))
    return result


def _state(conn: sqlite3.Connection, key: str, protect_id: int) -> dict[str, Any]:
    leg = conn.execute(
        "SELECT session_id, status, exit_reason, exit_price FROM strategy_positions "
        "WHERE position_key = ?",
        (key,),
    ).fetchone()
    order = conn.execute(
        "SELECT state, release, release_session FROM protective_orders WHERE id = ?",
        (protect_id,),
    ).fetchone()
    exits = conn.execute(
        "SELECT count(*) FROM position_events e JOIN strategy_positions p "
        "ON p.position_id = e.position_id WHERE p.position_key = ? AND e.event_type = 'EXIT'",
        (key,),
    ).fetchone()[0]
    return {**dict(leg), **dict(order), "exits": exits}


@settings(max_examples=SOAK.count(150), deadline=None, derandomize=True, database=None)
@given(steps=STEPS)
# the paths that matter most, always: a second holder after the first died, a fill for each
@example(steps=[("adopt", "b", False), ("crash", "b", None), ("adopt", "c", True),
                ("fill", "b", 9.0), ("fill", "c", 9.1), ("fill", "c", 9.2)])
@example(steps=[("review", None, None), ("requeue", None, None), ("revive", None, None),
                ("fill", "a", 8.5)])
@example(steps=[("settle", "CANCELLED", None), ("adopt", "c", False)])
def test_only_a_hand_back_releases_the_order_and_a_fill_closes_only_its_holders_leg(
    db: tuple[sqlite3.Connection, Path], steps: list[tuple[str, Any, Any]]
) -> None:
    conn, path = db
    run = next(_runs)
    names = {n: f"{n}{run}" for n in "abc"}
    key = f"leg{run}"
    ids = {}
    for name in "abc":
        ids[name] = _one(conn, start(names[name])).data["session_id"]
    ids["x"] = 10**9  # no such session
    assert _one(conn, entry(key, names["a"])).ok
    crash = CrashOp(None, None, names["a"], "DISCONNECT", "process exited", 1.7e9, {})
    assert _one(conn, crash).ok
    protect_id = insert_protective_order(path, key, trigger_price=90.0)

    for kind, arg, extra in steps:
        before = _state(conn, key, protect_id)
        live_order = before["state"] in ("PLANNED", "PLACED")
        if kind == "adopt":
            op: Any = ResolveOp(
                b"r", 1, names[arg], "t", key, "adopt", 1.7e9, keep_protection=extra
            )
            result = _one(conn, op)
            took = result.ok and not result.data["duplicate"]
            if took:
                assert result.data["leg"]["session_id"] == ids[arg]
                shown = result.data["leg"]["protection"]
                assert (shown is None) == (before["state"] not in ("PLANNED", "PLACED",
                                                                    "TRIGGERED"))  # fmt: skip
            expected = ("KEEP" if extra else "CANCEL", ids[arg])
        elif kind in ("review", "requeue"):
            _one(conn, ResolveOp(b"r", 1, None, "t", key, kind, 1.7e9, reason="r"))
            took, expected = False, (None, None)
        elif kind == "revive":
            result = _one(conn, StartOp(b"r", 1, names["a"], "expiry_blast", None, None, None,
                                        1.7e9, token=TOKEN))  # fmt: skip
            took = result.ok and key in result.data.get("revived", {}).get("legs", [])
            expected = ("CANCEL", ids["a"])
        elif kind == "crash":  # the adopter dies in turn: the leg is CRASHED again
            _one(conn, CrashOp(None, None, names[arg], "DISCONNECT", "exited", 1.7e9, {}))
            took, expected = False, (None, None)
        elif kind == "settle":
            conn.execute("UPDATE protective_orders SET state = ? WHERE id = ?", (arg, protect_id))
            took, expected = False, (None, None)
        else:  # fill
            op = ProtectCloseOp(None, None, "", key, ids[arg], extra, protect_id, "OA-1", 1.7e9)
            result = _one(conn, op)
            assert result.ok
            after = _state(conn, key, protect_id)
            closes = before["status"] != "CLOSED" and before["session_id"] == ids[arg]
            assert result.data["closed"] == closes
            if closes:
                assert (after["status"], after["exit_reason"], after["exit_price"]) == (
                    "CLOSED", "PROTECTIVE_STOP", extra,
                )  # fmt: skip
            else:
                assert after == before
            continue
        after = _state(conn, key, protect_id)
        released = (after["release"], after["release_session"])
        if not live_order or not took:
            assert released == (before["release"], before["release_session"])
        else:
            assert released == (before["release"] or expected[0], expected[1])
        assert after["exits"] <= 1
