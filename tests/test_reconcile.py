"""Periodic reconciliation: a real daemon checks its legs against tests/fake_openalgo.py's
positionbook and alerts drift (event ``drift``) through the outbox to a real webhook receiver.
The pure judgement (positiond.drift) is tested here too, with hypothesis."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.alert_receiver import Receiver
from positiond.config import Config, ConfigError
from positiond.drift import find_drift, in_window, parse_window
from positiond.store.dsn import PgDsn
from positiond_client import PositionPersistenceManager
from tests.fake_openalgo import FakeOpenAlgo, Reply, book
from tests.helpers import UNIT, DaemonProcess, rows, wait_for
from tests.pg import both_backends
from tests.test_ctl import BN, CE, ctl, ctl_json

KEY = "oa-recon-key-5f1e"
IST = ZoneInfo("Asia/Kolkata")


def row(symbol: str, quantity: int) -> dict[str, Any]:
    return {"symbol": symbol, "exchange": "NFO", "product": "MIS", "quantity": str(quantity)}


# ---- the pure judgement ------------------------------------------------------------------


def leg(key: str, symbol: str, qty: int, status: str = "ACTIVE", session: str = "RUNNING",
        side: str = "BUY") -> dict[str, Any]:  # fmt: skip
    return {
        "position_id": 1, "position_key": key, "session_id": 7, "strategy_name": "s",
        "symbol": symbol, "exchange": "NFO", "product": "MIS", "side": side, "quantity": qty,
        "entry_price": 100.0, "entry_time": "t", "status": status, "session_status": session,
    }  # fmt: skip


def kinds(drift: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return sorted((d["kind"], d["symbol"]) for d in drift)


def test_each_kind_of_drift_and_none_when_the_book_matches() -> None:
    live = [leg("ce", CE, 75)]
    assert find_drift(live, book(row(CE, 75))) == []
    assert kinds(find_drift(live, book())) == [("missing", CE)]  # the broker no longer shows it
    assert kinds(find_drift(live, book(row(CE, 50)))) == [("quantity", CE)]
    assert kinds(find_drift(live, book(row(CE, 75), row(BN, 30)))) == [("unknown", BN)]
    crashed = [leg("ce", CE, 75, status="CRASHED", session="CRASHED")]
    assert kinds(find_drift(crashed, book())) == [("missing", CE)]  # closed at the broker
    assert find_drift(crashed, book(row(CE, 75))) == []  # still there: nothing drifted
    assert kinds(find_drift(crashed, book(row(CE, 30)))) == [("quantity", CE)]
    same = find_drift(live, book())
    assert [d["signature"] for d in find_drift(live, book())] == [d["signature"] for d in same]


@pytest.mark.parametrize(
    "reply",
    [{"status": "error", "message": "session expired"}, {"status": "success"}, {"data": "x"}],
)
def test_a_refused_positionbook_is_never_read_as_flat(reply: Any) -> None:
    with pytest.raises(ValueError):
        find_drift([leg("ce", CE, 75)], reply)


quantities = st.lists(st.integers(1, 500), min_size=1, max_size=6)


@given(quantities, st.lists(st.booleans(), min_size=6, max_size=6))
def test_a_book_that_is_the_live_legs_is_no_drift_and_flat_is_each_missing(
    sizes: list[int], sells: list[bool]
) -> None:
    legs = [leg(f"k{i}", CE if i % 2 else BN, q, side="SELL" if sells[i] else "BUY")
            for i, q in enumerate(sizes)]  # fmt: skip
    net: dict[str, int] = {}
    for g in legs:
        net[g["symbol"]] = (
            net.get(g["symbol"], 0) + (-1 if g["side"] == "SELL" else 1) * g["quantity"]
        )
    assert find_drift(legs, book(*(row(s, q) for s, q in net.items()))) == []
    flat = find_drift(legs, book())
    nonzero = {s for s, q in net.items() if q}
    assert {d["symbol"] for d in flat} == nonzero
    assert all(d["kind"] == "missing" for d in flat)


def test_the_market_hours_window() -> None:
    window = parse_window("09:15-15:30")
    at = lambda h, m: datetime(2026, 11, 27, h, m, tzinfo=IST).astimezone(UTC)  # noqa: E731
    assert in_window(at(9, 15), window, IST) and in_window(at(15, 29), window, IST)
    assert not in_window(at(9, 14), window, IST) and not in_window(at(15, 30), window, IST)
    assert in_window(at(3, 0), None, IST)
    night = parse_window("22:00-02:00")  # wraps past midnight
    assert in_window(at(23, 0), night, IST) and in_window(at(1, 0), night, IST)
    assert not in_window(at(12, 0), night, IST)
    for bad in ("9-15", "25:00-26:00", "10:00-10:00", ""):
        with pytest.raises(ValueError):
            parse_window(bad)
    with pytest.raises(ConfigError, match="reconcile_window"):
        Config(openalgo_host="http://x", openalgo_reconcile_window="9:15 to 15:30")
    with pytest.raises(ConfigError, match="timezone"):
        Config(openalgo_timezone="Mars/Olympus")
    with pytest.raises(ConfigError, match="needs host"):
        Config(openalgo_reconcile_interval=5)


# ---- a real daemon -------------------------------------------------------------------------


@pytest.fixture
def fake() -> Iterator[FakeOpenAlgo]:
    with FakeOpenAlgo(api_key=KEY) as server:
        yield server


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    hook = Receiver()
    yield hook
    hook.close()


def start(
    workdir: Path, fake: FakeOpenAlgo, hook: Receiver, extra: str = "",
    db: Path | PgDsn | None = None,
) -> DaemonProcess:  # fmt: skip
    key_file = workdir / "openalgo.key"
    key_file.write_text(KEY + "\n")
    config = workdir / "positiond.toml"
    config.write_text(
        f'[openalgo]\nhost = "{fake.url}"\napi_key_file = "{key_file}"\n'
        f"timeout = {0.5 * UNIT}\nreconcile_interval = 1\n{extra}\n"
        f'[[alerts.sink]]\nname = "hook"\ntype = "webhook"\nurl = "{hook.url}"\n'
    )
    return DaemonProcess(
        workdir, "--flush-interval", "0.05", "--config", str(config), "--status-interval", "0.2",
        db=db,
    ).start()  # fmt: skip


def drift_posts(hook: Receiver) -> list[dict[str, Any]]:
    with hook.lock:
        return [p for p in hook.posts if p["event"] == "drift"]


def checks_after(fake: FakeOpenAlgo, n: int) -> int:
    """Wait for ``n`` more positionbook requests (whole checks) than now; the new count."""
    seen = len(fake.received("positionbook"))
    wait_for(lambda: len(fake.received("positionbook")) >= seen + n, 10, f"{n} more checks")
    return seen + n


@pytest.fixture
def pm_list() -> Iterator[list[PositionPersistenceManager]]:
    made: list[PositionPersistenceManager] = []
    yield made
    for pm in made:
        pm.close(1.0)


@both_backends
def test_drift_is_alerted_once_per_change_and_changes_no_leg(
    db: Path | PgDsn, workdir: Path, fake: FakeOpenAlgo, receiver: Receiver,
    pm_list: list[PositionPersistenceManager],
) -> None:  # fmt: skip
    # Refused until the leg is entered: a refused book judges nothing (no race with the checks).
    fake.reply("positionbook", Reply({"status": "error", "message": "not yet"}, status=500))
    daemon = start(workdir, fake, receiver, db=db)
    try:
        pm = PositionPersistenceManager("recon", endpoint=daemon.endpoint, ack_timeout=5)
        pm_list.append(pm)
        assert pm.start_session() is not None
        key = pm.save_position_entry(symbol=CE, entry_price=100.0, quantity=75)
        assert pm.sync(5)
        fake.reply("positionbook", Reply(book(row(CE, 75))))
        checks_after(fake, 2)
        assert drift_posts(receiver) == []  # the book matches: nothing to say

        fake.reply("positionbook", Reply(book()))  # the broker no longer shows the leg
        wait_for(lambda: drift_posts(receiver), 10, "the drift alert")
        checks_after(fake, 2)  # the same drift, checked again twice: not alerted again
        posts = drift_posts(receiver)
        assert len(posts) == 1, posts
        body = posts[0]
        assert body["severity"] == "warning" and body["session_id"] is None
        assert [(d["kind"], d["symbol"], d["broker_quantity"]) for d in body["drift"]] == [
            ("missing", CE, 0)
        ]
        assert [g["position_key"] for g in body["legs"]] == [key.key]
        status = rows(daemon.db, "SELECT status FROM strategy_positions")
        assert [r["status"] for r in status] == ["ACTIVE"]  # drift changes no leg

        fake.reply("positionbook", Reply(book(row(BN, 30))))  # and a position appears
        wait_for(lambda: len(drift_posts(receiver)) == 2, 10, "the second drift alert")
        second = drift_posts(receiver)[1]
        assert sorted((d["kind"], d["symbol"]) for d in second["drift"]) == [
            ("missing", CE), ("unknown", BN),
        ]  # fmt: skip
        assert "unknown BANKNIFTY" in second["reason"] and "missing" not in second["reason"]
        code, listed = ctl_json(daemon, "alerts")
        assert code == 0
        assert [a["event"] for a in listed["alerts"]] == ["drift"] * 2
        assert "drift" in ctl(daemon, "alerts").stdout
        wait_for(lambda: daemon.status().get("reconcile", {}).get("drift") == 2, 10, "status")
        assert "2 drift(s) at the last check" in ctl(daemon, "status").stdout
        pm.close(1.0)
        pm_list.clear()
    finally:
        daemon.stop()

    # Restarted with the same drift: it was alerted already (read back from the outbox).
    again = start(workdir, fake, receiver, db=db)
    try:
        checks_after(fake, 2)
        assert len(drift_posts(receiver)) == 2
    finally:
        again.stop()


def test_a_refused_or_hanging_positionbook_alerts_nothing_and_delays_no_ack(
    workdir: Path, fake: FakeOpenAlgo, receiver: Receiver,
    pm_list: list[PositionPersistenceManager],
) -> None:  # fmt: skip
    fake.reply("positionbook", Reply({"status": "error", "message": "broker down"}, status=500))
    daemon = start(workdir, fake, receiver)
    try:
        pm = PositionPersistenceManager("recon", endpoint=daemon.endpoint, ack_timeout=5)
        pm_list.append(pm)
        assert pm.start_session() is not None
        pm.save_position_entry(symbol=CE, entry_price=100.0, quantity=75)
        assert pm.sync(5)
        checks_after(fake, 2)
        fake.reply("positionbook", Reply(book(), delay=3 * UNIT))  # flat, but too late
        checks_after(fake, 1)
        t0 = time.monotonic()
        pm.save_position_entry(symbol=BN, entry_price=300.0, quantity=30)  # while it hangs
        assert pm.sync(5)
        assert time.monotonic() - t0 < 1.0 * UNIT
        checks_after(fake, 1)
        wait_for(lambda: "no answer from" in daemon.output(), 10, "the timeout logged")
        assert "broker down" in daemon.output()
        assert drift_posts(receiver) == []  # never read as flat
        assert (
            rows(daemon.db, "SELECT count(*) AS n FROM alert_outbox WHERE kind = 'drift'")[0]["n"]
            == 0
        )
        state = json.loads((daemon.sock.parent / "status.json").read_text())["reconcile"]
        assert state["refused"] >= 2 and state["alerts"] == 0
    finally:
        daemon.stop()


def test_outside_the_window_nothing_is_fetched(workdir: Path, fake: FakeOpenAlgo,
                                               receiver: Receiver) -> None:  # fmt: skip
    now = datetime.now(IST)
    start_at = (now.hour + 2) % 24  # a one-hour window that begins in two hours
    window = f'reconcile_window = "{start_at:02d}:00-{(start_at + 1) % 24:02d}:00"'
    fake.reply("positionbook", Reply(book()))
    daemon = start(workdir, fake, receiver, window)
    try:
        wait_for(lambda: "reconcile" in daemon.status(), 10, "the status with reconcile")
        wait_for(lambda: daemon.status()["uptime"] > 2.5, 10, "three intervals")
        assert fake.received("positionbook") == []
    finally:
        daemon.stop()
