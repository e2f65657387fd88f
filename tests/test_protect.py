"""Protective stop orders (positiond.protect) end to end: a real daemon, real strategy processes
killed with SIGKILL, the fake OpenAlgo broker (bench/fake_openalgo.py) with its order book.

Every test here ends by asserting that no account-wide call (closeposition, placesmartorder,
cancelallorder) ever reached the broker (the ``fake`` fixture)."""

from __future__ import annotations

import contextlib
import sqlite3
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from positiond.store.dsn import PgDsn
from tests.fake_openalgo import FakeOpenAlgo
from tests.helpers import rows, wait_for
from tests.pg import both_backends
from tests.protect_support import (
    CE,
    KEY,
    PE,
    Holder,
    alerts,
    leg,
    orders,
    settled,
    start_daemon,
)
from tests.test_ctl import ctl, ctl_json

BN = "BANKNIFTY28NOV2552000CE"


@pytest.fixture
def fake() -> Iterator[FakeOpenAlgo]:
    with FakeOpenAlgo(api_key=KEY) as server:
        yield server
        assert server.forbidden() == [], "an account-wide call reached the broker"


@pytest.fixture
def holders() -> Iterator[list[Holder]]:
    made: list[Holder] = []
    yield made
    for holder in made:
        holder.kill()


def order_of(db: Path | PgDsn, key: str) -> dict[str, Any]:
    return next(o for o in orders(db) if o["position_key"] == key)


def leg_row(db: Path | PgDsn, key: str) -> dict[str, object]:
    return dict(rows(db, "SELECT * FROM strategy_positions WHERE position_key = ?", (key,))[0])


@both_backends
def test_kill_9_places_one_stop_per_leg_a_fill_closes_it_and_resolve_cancels(
    db: Path | PgDsn, workdir: Path, fake: FakeOpenAlgo, holders: list[Holder]
) -> None:
    fake.orders.set_position(CE, 75)
    fake.orders.set_position(PE, -50)
    daemon = start_daemon(workdir, fake, db=db)
    try:
        holder = Holder(daemon.endpoint, "guarded", [
            leg(CE, 92.5, 75, "BUY", position_key="ce"),
            leg(PE, 118.0, 50, "SELL", position_key="pe"),
        ])  # fmt: skip
        holders.append(holder)
        assert fake.orders.placed() == []  # a live strategy is never protected
        holder.kill()
        found = settled(daemon.db, 2)
        assert {o["state"] for o in found} == {"PLACED"}
        placed = sorted(fake.orders.placed(), key=lambda o: o["symbol"])
        assert [(o["symbol"], o["action"], o["quantity"], o["pricetype"], o["trigger_price"],
                 o["strategy"], o["product"], o["exchange"]) for o in placed] == [
            (CE, "SELL", "75", "SL-M", 92.5, "positiond-protect", "MIS", "NFO"),
            (PE, "BUY", "50", "SL-M", 118.0, "positiond-protect", "MIS", "NFO"),
        ]  # fmt: skip
        by_key = {o["position_key"]: o for o in found}
        assert {by_key["ce"]["order_id"], by_key["pe"]["order_id"]} == {
            o["orderid"] for o in placed
        }
        events = [r["event_type"] for r in rows(
            daemon.db, "SELECT event_type FROM position_events WHERE event_type LIKE 'PROTECT%' "
            "ORDER BY id")]  # fmt: skip
        assert sorted(events) == ["PROTECT_PLACED"] * 2 + ["PROTECT_PLANNED"] * 2
        assert len(alerts(daemon.db, "protect_placed")) == 2
        code, shown = ctl_json(daemon, "crashed")
        assert code == 1
        seen = {g["position_key"]: g["protection"] for c in shown["crashes"] for g in c["legs"]}
        assert {k: (p["state"], p["order_id"], p["trigger_price"]) for k, p in seen.items()} == {
            k: ("PLACED", o["order_id"], o["trigger_price"]) for k, o in by_key.items()
        }  # fmt: skip
        table = ctl(daemon, "positions").stdout
        assert f"PLACED {by_key['ce']['order_id']}" in table, table
        code, listed = ctl_json(daemon, "positions")
        assert {g["position_key"]: g["protection"]["state"] for g in listed["positions"]} == {
            "ce": "PLACED", "pe": "PLACED"}  # fmt: skip

        # The broker fills the CE stop: the leg is closed at the fill price.
        fake.orders.trigger(by_key["ce"]["order_id"], 92.1)
        wait_for(lambda: leg_row(daemon.db, "ce")["status"] == "CLOSED", 10, "the leg closed")
        closed = leg_row(daemon.db, "ce")
        assert (closed["exit_reason"], closed["exit_price"]) == ("PROTECTIVE_STOP", 92.1)
        ce_row = order_of(daemon.db, "ce")
        assert (ce_row["state"], ce_row["fill_price"]) == ("TRIGGERED", 92.1)
        assert len(alerts(daemon.db, "protect_triggered")) == 1

        # An operator closes the PE leg: its outstanding order is cancelled at the broker.
        run = ctl(daemon, "resolve", "pe", "--closed", "--note", "squared off by hand")
        assert run.returncode == 0, run.stderr
        wait_for(lambda: not fake.orders.live(), 10, "the PE order cancelled")
        wait_for(lambda: order_of(daemon.db, "pe")["state"] == "CANCELLED", 10, "CANCELLED")
        pe_row = order_of(daemon.db, "pe")
        assert pe_row["release"] == "CANCEL" and pe_row["release_session"] is None
        assert len(fake.received("placeorder")) == 2  # never a second order for one leg
        wait_for(lambda: daemon.status().get("protect", {}).get("triggered") == 1, 10, "status")
        assert "on: 2 placed, 1 triggered, 0 failed" in ctl(daemon, "status").stdout
    finally:
        daemon.stop()


def test_the_positionbook_decides_and_legs_without_a_stop_are_named(
    workdir: Path, fake: FakeOpenAlgo, holders: list[Holder]
) -> None:
    fake.orders.set_position(CE, 0)  # flat: closed at the broker
    fake.orders.set_position(PE, 30)  # 30 of 75: ambiguous
    fake.orders.set_position(BN, 15)
    daemon = start_daemon(workdir, fake)
    try:
        holder = Holder(daemon.endpoint, "guarded", [
            leg(CE, 90.0, position_key="flat"), leg(PE, 70.0, position_key="part"),
            leg(BN, None, 15, position_key="nostop"),
        ])  # fmt: skip
        holders.append(holder)
        holder.kill()
        found = {o["position_key"]: o for o in settled(daemon.db, 3)}
        assert {k: o["state"] for k, o in found.items()} == {
            "flat": "SKIPPED", "part": "SKIPPED", "nostop": "SKIPPED"
        }  # fmt: skip
        assert "closed at the broker" in found["flat"]["reason"]
        assert "no stop" in found["nostop"]["reason"]
        assert "NEEDS_REVIEW" in found["part"]["reason"]
        wait_for(lambda: leg_row(daemon.db, "part")["status"] == "NEEDS_REVIEW", 10, "review")
        assert leg_row(daemon.db, "flat")["status"] == "CRASHED"  # told, never changed here
        said = {a["legs"][0]["position_key"]: a["reason"] for a in alerts(daemon.db,
                                                                         "protect_skipped")}
        assert "no stop" in said["nostop"] and "NOT protected" in said["nostop"]
        assert fake.received("placeorder") == []
    finally:
        daemon.stop()


def test_dry_run_places_nothing_and_says_what_it_would(
    workdir: Path, fake: FakeOpenAlgo, holders: list[Holder]
) -> None:
    fake.orders.set_position(CE, 75)
    daemon = start_daemon(workdir, fake, 'mode = "dry-run"\nstrategies = ["*"]')
    try:
        holder = Holder(daemon.endpoint, "anything", [leg(CE, 91.0, position_key="ce")])
        holders.append(holder)
        holder.kill()
        (row,) = settled(daemon.db, 1)
        assert (row["state"], row["mode"], row["trigger_price"]) == ("DRY_RUN", "dry-run", 91.0)
        (said,) = alerts(daemon.db, "protect_planned")
        assert said["reason"].startswith("dry-run: would place SELL 75 " + CE)
        assert fake.received("positionbook")  # reading is fine
        assert [r.path for r in fake.requests if "order" in r.path] == []  # no order call
    finally:
        daemon.stop()


def test_outside_the_window_a_rejection_and_unprotected_sessions(
    workdir: Path, fake: FakeOpenAlgo, holders: list[Holder]
) -> None:
    fake.orders.set_position(CE, 150)  # the two unprotected legs
    fake.orders.set_position(BN, 15)
    fake.orders.reject = "RMS: margin exceeds"
    daemon = start_daemon(workdir, fake, 'mode = "on"\nstrategies = ["guarded", "optout"]')
    try:
        other = Holder(daemon.endpoint, "elsewhere", [leg(CE, 91.0, position_key="other")])
        optout = Holder(daemon.endpoint, "optout", [leg(CE, 91.0, position_key="optout")])
        holders += [other, optout]
        # what start_session(protect=False) stores (the wire is another part of the issue)
        with contextlib.closing(sqlite3.connect(daemon.db)) as conn, conn:
            conn.execute("UPDATE strategy_sessions SET protect = 0 WHERE id = ?",
                         (optout.session_id,))  # fmt: skip
        guarded = Holder(daemon.endpoint, "guarded", [leg(BN, 91.0, 15, position_key="g")])
        holders.append(guarded)
        for holder in (other, optout, guarded):
            holder.kill()
        (row,) = settled(daemon.db, 1)
        assert row["position_key"] == "g" and row["state"] == "FAILED"
        assert "RMS: margin exceeds" in row["reason"]
        (said,) = alerts(daemon.db, "protect_failed")
        assert "RMS: margin exceeds" in said["reason"]
        wait_for(lambda: all(leg_row(daemon.db, k)["status"] == "CRASHED"
                             for k in ("other", "optout")), 10, "crashed")  # fmt: skip
        assert len(orders(daemon.db)) == 1  # the others never get a row
        assert len(fake.received("placeorder")) == 1  # a refusal is final: not retried
    finally:
        daemon.stop()

    # A window that excludes now (2 minutes long, 12 hours away).
    far = datetime.now(UTC) + timedelta(hours=12)
    window = f"{far:%H:%M}-{far + timedelta(minutes=2):%H:%M}"
    daemon = start_daemon(workdir, fake, f'mode = "on"\nstrategies = ["late"]\n'
                          f'trading_window = "{window}"\ntimezone = "UTC"')  # fmt: skip
    try:
        late = Holder(daemon.endpoint, "late", [leg(CE, 91.0, position_key="late")])
        holders.append(late)
        late.kill()
        settled(daemon.db, 2)
        row = order_of(daemon.db, "late")
        assert row["state"] == "SKIPPED" and "outside the trading window" in row["reason"]
        assert len(fake.received("placeorder")) == 1
    finally:
        daemon.stop()


def test_the_order_rate_limit_is_kept(
    workdir: Path, fake: FakeOpenAlgo, holders: list[Holder]
) -> None:
    n = 24
    symbols = [f"NIFTY28NOV25{24000 + 50 * i}CE" for i in range(n)]
    for symbol in symbols:
        fake.orders.set_position(symbol, 75)
    daemon = start_daemon(workdir, fake, 'mode = "on"\nstrategies = ["*"]\nrate = 5')
    try:
        holder = Holder(daemon.endpoint, "wide", [leg(s, 90.0) for s in symbols])
        holders.append(holder)
        holder.kill()
        found = settled(daemon.db, n)
        assert {o["state"] for o in found} == {"PLACED"}
        times = sorted(fake.orders.order_times)
        sent = [b["symbol"] for b in fake.received("placeorder")]
        assert len(times) == n, Counter(sent).most_common(2)  # none refused, none retried
        most = max(sum(1 for t in times if s <= t < s + 1.0) for s in times)
        assert most <= 5, f"{most} order calls within one second"
    finally:
        daemon.stop()


@both_backends
@pytest.mark.parametrize("lands", [True, False], ids=["landed", "lost"])
def test_a_daemon_killed_between_planned_and_placed_ends_with_one_order(
    db: Path | PgDsn, workdir: Path, fake: FakeOpenAlgo, holders: list[Holder], lands: bool
) -> None:
    fake.orders.set_position(CE, 75)
    fake.orders.set_position(PE, 75)
    fake.orders.hang, fake.orders.hang_lands = 30.0, lands
    daemon = start_daemon(workdir, fake, timeout=5.0, db=db)  # still waiting when it is killed
    try:
        holder = Holder(daemon.endpoint, "guarded", [leg(CE, 90.0), leg(PE, 70.0)])
        holders.append(holder)
        holder.kill()
        wait_for(lambda: len(fake.received("placeorder")) >= 2, 10, "the hung placements")
        assert {o["state"] for o in orders(daemon.db)} == {"PLANNED"}
        daemon.kill()  # SIGKILL between PLANNED and PLACED
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop()
    fake.orders.hang = 0.0
    again = start_daemon(workdir, fake, db=db)
    try:
        found = settled(again.db, 2)
        assert {o["state"] for o in found} == {"PLACED"}
        live = fake.orders.live()
        assert sorted(o["symbol"] for o in live) == sorted([CE, PE])  # one order per leg
        assert {o["order_id"] for o in found} == {o["orderid"] for o in live}
        expected = 2 if lands else 4
        assert len(fake.received("placeorder")) == expected
        if lands:
            assert all("orderbook" in o["reason"] for o in found)
    finally:
        again.stop()


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_a_plan_racing_a_hand_back_waits_for_it_and_then_plans_nothing(db: PgDsn) -> None:
    """The writer hands a CRASHED leg back (not committed yet) while the worker plans its stop:
    as SQLite's write lock does, the plan waits for the hand-back and then sees the leg is no
    longer CRASHED. Without it, the plan would commit a PLANNED row nobody releases: a stop
    placed on a leg a live strategy holds."""
    from concurrent.futures import ThreadPoolExecutor

    from positiond.protect import db as protect_db
    from tests.test_alert_delivery import START, connect, crash

    crash(db, START)  # session 1, leg 1 CRASHED
    leg = {"position_id": 1, "session_id": 1, "crash_event_id": 1, "symbol": CE,
           "exchange": "NFO", "product": "NRML", "side": "SELL", "quantity": 75}  # fmt: skip
    writer, worker = connect(db), connect(db)
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE strategy_positions SET status = 'ACTIVE' WHERE position_id = 1")
        with ThreadPoolExecutor(1) as pool:
            plan = pool.submit(
                protect_db.insert, worker, leg, state="PLANNED", mode="on", order=None,
                pricetype="SL-M", tag="positiond-protect", reason=None,
                event="PROTECT_PLANNED", payload={}, now="t",
            )  # fmt: skip
            waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            wait_for(lambda: rows(db, waiting)[0][0] == 1, 10, "the plan waiting for the writer")
            writer.execute("COMMIT")
            assert plan.result(timeout=10) is None  # the leg is ACTIVE again: nothing planned
    finally:
        writer.close()
        worker.close()
    assert rows(db, "SELECT count(*) FROM protective_orders")[0][0] == 0
