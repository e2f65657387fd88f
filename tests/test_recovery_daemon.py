"""Recovery end to end: a crashed strategy's legs verified, adopted, closed, fenced."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from positiond_client import (
    AsyncPositionPersistenceManager,
    LegError,
    PositionPersistenceManager,
    UnavailableError,
)
from positiond_client.protocol import encode
from tests.helpers import UNIT, DaemonProcess, rows, session_status, wait_for
from tests.pg import both_backends
from tests.test_daemon import SEED_CRASH_QUERY, Strategy, decode_reply

CE, PE = "NIFTY28NOV2524000CE", "NIFTY28NOV2524000PE"


def positionbook(*rows_: tuple[str, str]) -> dict[str, Any]:
    return {
        "status": "success",
        "data": [
            {
                "symbol": s,
                "exchange": "NFO",
                "product": "MIS",
                "quantity": q,
                "average_price": "100.0",
                "ltp": "101.0",
                "pnl": "0.0",
            }
            for s, q in rows_
        ],
    }


@pytest.fixture
def manager(daemon: DaemonProcess) -> Iterator[PositionPersistenceManager]:
    pm = PositionPersistenceManager("expiry_blast", endpoint=daemon.endpoint, ack_timeout=5)
    yield pm
    pm.close()


def crash_a_strategy(daemon: DaemonProcess, strategies: list[Strategy]) -> int:
    strategy = Strategy(daemon.endpoint, "hold")
    strategies.append(strategy)
    sid = int(strategy.info()["session_id"])  # type: ignore[call-overload]
    strategy.proc.send_signal(signal.SIGKILL)
    wait_for(lambda: session_status(daemon.db, sid) == "CRASHED", 5, "CRASHED")
    return sid


@both_backends
def test_get_crashed_positions_has_everything_to_rebuild_a_monitor(
    daemon: DaemonProcess, strategies: list[Strategy], manager: PositionPersistenceManager
) -> None:
    old = crash_a_strategy(daemon, strategies)
    legs = {leg.position_key: leg for leg in manager.get_crashed_positions()}
    assert sorted(legs) == ["ce-1", "pe-1"]
    ce = legs["ce-1"]
    assert (ce.symbol, ce.leg_type, ce.side, ce.quantity, ce.entry_price) == (
        CE,
        "CE",
        "BUY",
        75,
        100.0,
    )
    assert (ce.stop_price, ce.highest_price, ce.last_trail_level, ce.current_price) == (
        104.0,
        112.0,
        2.0,
        112.0,
    )
    assert legs["pe-1"].state == {"atm": 24000}
    assert ce.session_id == old and ce.crash_reason.startswith("process exited")  # type: ignore[union-attr]
    assert ce.crash_timestamp and ce.entry_time and ce.was_crashed
    # Like the seed's filter, by strategy name: another strategy has none.
    assert manager.get_crashed_positions("other_strategy") == []
    assert len(manager.get_crashed_positions(all_strategies=True)) == 2


@both_backends
def test_auto_recovery_adopts_closes_and_records_orphans(
    daemon: DaemonProcess, strategies: list[Strategy], manager: PositionPersistenceManager
) -> None:
    old = crash_a_strategy(daemon, strategies)
    book = positionbook((CE, "75"), (PE, "0"), ("BANKNIFTY28NOV2552000CE", "-30"))
    report = manager.start_session(recover=True, positionbook=book)
    assert {v.leg.position_key: v.verdict for v in report.verdicts} == {
        "ce-1": "RESUME",
        "pe-1": "CLOSED_AT_BROKER",
    }
    assert report.actions == {"ce-1": "adopted", "pe-1": "closed"}
    assert [(o.symbol, o.broker_quantity) for o in report.orphans] == [
        ("BANKNIFTY28NOV2552000CE", -30)
    ]
    leg = report.adopted["ce-1"]
    assert (leg.stop_price, leg.highest_price, leg.last_trail_level) == (104.0, 112.0, 2.0)
    assert leg.was_crashed and leg.position_id is not None
    # The adopted leg is ours now: it takes updates and its exit.
    manager.queue_position_update(leg, stop_price=106.0, last_trail_level=3)
    assert manager.sync(5)
    stored = rows(daemon.db, "SELECT * FROM strategy_positions WHERE position_key = 'ce-1'")[0]
    assert (stored["status"], stored["session_id"], stored["was_crashed"]) == (
        "ACTIVE",
        report.session_id,
        1,
    )
    assert (stored["stop_price"], stored["last_trail_level"]) == (106.0, 3.0)
    recovery = rows(daemon.db, "SELECT payload FROM position_events WHERE event_type='RECOVERY'")
    assert json.loads(recovery[0]["payload"])["from_session"] == old
    pe = rows(
        daemon.db, "SELECT status, exit_reason FROM strategy_positions WHERE position_key='pe-1'"
    )
    assert (pe[0]["status"], pe[0]["exit_reason"]) == ("CLOSED", "CLOSED_AT_BROKER")
    orphans = rows(daemon.db, "SELECT symbol, broker_quantity, detected_by FROM broker_orphans")
    assert [(o["symbol"], o["broker_quantity"]) for o in orphans] == [
        ("BANKNIFTY28NOV2552000CE", -30)
    ]
    assert orphans[0]["detected_by"].endswith("(expiry_blast)")
    assert rows(daemon.db, SEED_CRASH_QUERY) == []  # nothing left crashed
    assert manager.save_position_exit(leg, exit_price=106.0, exit_reason="STOP_HIT")
    # Running the recovery again (CE now flat too) finds nothing and records no orphan twice.
    book = positionbook((CE, "0"), (PE, "0"), ("BANKNIFTY28NOV2552000CE", "-30"))
    again = manager.recover(book)
    assert again.verdicts == [] and len(rows(daemon.db, "SELECT * FROM broker_orphans")) == 1


@both_backends
def test_mismatch_is_flagged_for_review_and_can_be_requeued(
    daemon: DaemonProcess, strategies: list[Strategy], manager: PositionPersistenceManager
) -> None:
    crash_a_strategy(daemon, strategies)
    report = manager.start_session(recover=True, positionbook=positionbook((CE, "50"), (PE, "75")))
    assert report.actions == {"ce-1": "flagged for review", "pe-1": "adopted"}
    ce = rows(
        daemon.db, "SELECT status, review_reason FROM strategy_positions WHERE position_key='ce-1'"
    )
    assert ce[0]["status"] == "NEEDS_REVIEW" and "broker net 50" in ce[0]["review_reason"]
    with pytest.raises(LegError) as info:
        manager.mark_position_recovered("ce-1")  # under review: not adoptable
    assert info.value.code == "BAD_STATE"


@both_backends
def test_fencing_a_frozen_strategy_that_comes_back(
    daemon: DaemonProcess, strategies: list[Strategy], manager: PositionPersistenceManager
) -> None:
    old = Strategy(daemon.endpoint, "updates")
    strategies.append(old)
    old_sid = int(old.info()["session_id"])  # type: ignore[call-overload]
    old.proc.send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: session_status(daemon.db, old_sid) == "CRASHED", 5, "CRASHED")
        manager.start_session()
        leg = manager.mark_position_recovered("ce-1")
        assert leg.stop_price == 104.0
    finally:
        old.proc.send_signal(signal.SIGCONT)
    # It wakes, is revived with the leg nobody took, and learns ce-1 is not its own any more.
    assert old.info() == {"notice": "REVIVED", "key": None}
    assert old.info() == {"notice": "FENCED", "key": "ce-1"}
    assert session_status(daemon.db, old_sid) == "RUNNING"
    old.send("tick-report")
    assert old.info() == {"error": "FENCED"}
    old.send("exit")
    assert old.info() == {"error": "FENCED"}
    # Another client cannot speak for the old session: without its token it is refused.
    session_key = rows(
        daemon.db, "SELECT session_key FROM strategy_sessions WHERE id = ?", (old_sid,)
    )[0]["session_key"]
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as raw:
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(daemon.endpoint)
        base = {"v": 1, "session": session_key, "key": "ce-1"}
        for msg in (
            {**base, "type": "update", "stop_price": 1.0},
            {**base, "type": "update", "stop_price": 1.0, "token": "0" * 32},
        ):
            raw.send(encode(msg))
            assert raw.poll(5000 * UNIT)
            assert decode_reply(raw.recv())["code"] == "BAD_TOKEN"
    assert manager.sync(5)
    leg_row = rows(daemon.db, "SELECT * FROM strategy_positions WHERE position_key = 'ce-1'")[0]
    assert (leg_row["status"], leg_row["stop_price"], leg_row["session_id"]) == (
        "ACTIVE",
        104.0,
        manager.session_id,
    )
    # The old client fenced the leg itself: nothing it tried reached the daemon.
    assert rows(daemon.db, "SELECT * FROM position_events WHERE event_type='FENCED_WRITE'") == []
    # The new owner still works the leg.
    assert manager.save_position_exit(leg, exit_price=104.0, exit_reason="STOP_HIT")


def test_reads_raise_when_the_daemon_is_away(workdir: Any) -> None:
    pm = PositionPersistenceManager("s", endpoint=f"ipc://{workdir}/none.sock", ack_timeout=0.1)
    try:
        with pytest.raises(UnavailableError):
            pm.get_crashed_positions()  # never "nothing crashed" for "no answer"
        assert pm.unacknowledged == 0
    finally:
        pm.close(0)


@both_backends
def test_writes_for_an_adopted_leg_are_refused_and_recorded(
    daemon: DaemonProcess, manager: PositionPersistenceManager
) -> None:
    """A client that does not know its leg was adopted (raw protocol) gets FENCED, on record."""
    token = "7" * 32
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as raw:
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(daemon.endpoint)

        def call(msg: dict[str, Any]) -> dict[str, Any]:
            raw.send(encode({"v": 1, "session": "raw-1", "token": token, **msg}))
            assert raw.poll(5000 * UNIT), "no reply"
            return decode_reply(raw.recv())

        start = {"type": "start", "seq": 1, "strategy": "expiry_blast"}
        sid = call(start)["session_id"]
        entry = {
            "type": "entry",
            "seq": 2,
            "key": "raw-leg",
            "symbol": CE,
            "exchange": "NFO",
            "product": "MIS",
            "side": "SELL",
            "quantity": 75,
            "entry_price": 100.0,
            "stop_price": 120.0,
        }
        assert call(entry)["duplicate"] is False
        # It sends no heartbeat: declared crashed after the 1 s timeout; another session adopts.
        wait_for(lambda: session_status(daemon.db, sid) == "CRASHED", 5, "CRASHED")  # type: ignore[arg-type]
        manager.start_session()
        manager.mark_position_recovered("raw-leg")
        revived = call({**start, "seq": 3})["revived"]
        assert revived["legs"] == []  # nothing handed back: its only leg is someone else's
        update = call({"type": "update", "key": "raw-leg", "stop_price": 1.0})
        exit_ = call({"type": "exit", "seq": 4, "key": "raw-leg", "exit_reason": "STOP_HIT"})
        assert (update["code"], update["key"]) == ("FENCED", "raw-leg")
        assert (exit_["code"], exit_["seq"]) == ("FENCED", 4)
    assert manager.sync(5)
    leg = rows(daemon.db, "SELECT * FROM strategy_positions WHERE position_key = 'raw-leg'")[0]
    assert (leg["status"], leg["stop_price"], leg["session_id"]) == (
        "ACTIVE",
        120.0,
        manager.session_id,
    )
    fenced = rows(daemon.db, "SELECT payload FROM position_events WHERE event_type='FENCED_WRITE'")
    payloads = sorted((json.loads(r["payload"]) for r in fenced), key=lambda p: p["type"])
    assert [p["type"] for p in payloads] == ["exit", "update"]
    assert payloads[0]["exit_reason"] == "STOP_HIT"  # the refused exit is kept for a human


async def test_asyncio_twin_recovers_inside_its_session_helper(
    daemon: DaemonProcess, strategies: list[Strategy]
) -> None:
    crash_a_strategy(daemon, strategies)
    pm = AsyncPositionPersistenceManager("expiry_blast", endpoint=daemon.endpoint, ack_timeout=5)
    book = positionbook((CE, "75"), (PE, "75"))
    try:
        preview = await pm.verify_with_broker(book)  # changes nothing
        assert [v.verdict for v in preview.verdicts] == ["RESUME", "RESUME"]
        async with pm.session(recover=True, positionbook=book):
            assert pm.recovery is not None and pm.recovery.session_id == pm.session_id
            assert pm.recovery.actions == {"ce-1": "adopted", "pe-1": "adopted"}
            for leg in pm.recovery.adopted.values():
                assert await pm.save_position_exit(leg, exit_price=1.0, exit_reason="EOD")
        done = rows(
            daemon.db,
            "SELECT status FROM strategy_positions WHERE session_id = ?",
            (pm.session_id,),
        )
        assert sorted(r["status"] for r in done) == ["CLOSED", "CLOSED"]
    finally:
        await pm.aclose()
