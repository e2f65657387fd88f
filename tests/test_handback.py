"""Protective stop orders handed back (issue 13, the session side): ``start``'s ``protect``,
adoption and revival releasing a leg's order, the worker's HandBack turned into notices or a
closed leg, and what the client library makes of them.

A real daemon (in this process, so the test can call the protect worker's callback exactly as
the worker does), real ipc sockets, a real SQLite file; the protective orders are written into
that database as the worker writes them (the worker itself is built apart).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from positiond.protect.handback import HandBack
from positiond.protect.settings import ProtectConfig
from positiond_client import AsyncPositionPersistenceManager, LegError, PositionPersistenceManager
from positiond_client.handles import Protection
from positiond_client.session import ClientSession
from tests.helpers import rows, wait_for
from tests.inprocess import (
    InProcessDaemon,
    RawClient,
    insert_protective_order,
    wait_until_crashed,
)

TOKEN = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def inproc(workdir: Path) -> Iterator[InProcessDaemon]:
    daemon = InProcessDaemon(workdir, ProtectConfig(mode="dry-run", strategies=("s",)))
    try:
        yield daemon
    finally:
        daemon.stop()


class Notices:
    """``on_notice`` for a real client: every notice, thread-safe."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()

    def __call__(self, code: str, details: dict[str, Any]) -> None:
        with self._lock:
            self.seen.append((code, dict(details)))

    def wait(self, code: str, having: str = "key") -> dict[str, Any]:
        """The first ``code`` notice whose details have ``having``."""

        def found() -> dict[str, Any] | None:
            with self._lock:
                return next((d for c, d in self.seen if c == code and having in d), None)

        details = wait_for(found, what=f"notice {code}")
        assert details is not None
        return details


def crash_a_leg(d: InProcessDaemon, session: str = "old", key: str = "leg-1") -> None:
    """A strategy with one leg (stop 9.5) whose process exits: the session is CRASHED
    (DISCONNECT), the leg CRASHED."""
    raw = RawClient(d.endpoint)
    ack = raw.ask({"type": "start", "session": session, "token": TOKEN, "seq": 1,
                   "strategy": "s"})  # fmt: skip
    assert ack["type"] == "ack", ack
    ack = raw.ask({"type": "entry", "session": session, "token": TOKEN, "seq": 2, "key": key,
                   "symbol": "X", "exchange": "NFO", "product": "MIS", "side": "BUY",
                   "quantity": 75, "entry_price": 10.0, "stop_price": 9.5})  # fmt: skip
    assert ack["type"] == "ack", ack
    raw.close()
    wait_until_crashed(d.db, session)


def release_of(db: Path, protect_id: int) -> tuple[str | None, int | None]:
    row = rows(db, "SELECT release, release_session FROM protective_orders WHERE id = ?",
               (protect_id,))[0]  # fmt: skip
    return row["release"], row["release_session"]


def leg_row(db: Path, key: str) -> Any:
    return rows(db, "SELECT * FROM strategy_positions WHERE position_key = ?", (key,))[0]


# ---- start: protect ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("strategy", "choice", "stored", "acked"),
    [
        ("s", True, 1, True),
        ("s", False, 0, False),
        ("s", None, None, None),  # said nothing: follows the config, nothing echoed
        ("other", True, 1, False),  # [protect] does not list it: a session cannot widen it
    ],
)
def test_start_protect_is_stored_and_the_ack_says_what_is_effective(
    inproc: InProcessDaemon, strategy: str, choice: bool | None, stored: int | None,
    acked: bool | None,
) -> None:  # fmt: skip
    raw = RawClient(inproc.endpoint)
    try:
        start = {"type": "start", "session": "k", "token": TOKEN, "seq": 1, "strategy": strategy}
        if choice is not None:
            start["protect"] = choice
        ack = raw.ask(start)
        assert ack["type"] == "ack", ack
        assert ack.get("protect") == acked
        assert ("protect" in ack) == (choice is not None)
        found = rows(inproc.db, "SELECT protect FROM strategy_sessions WHERE session_key = 'k'")
        assert found[0]["protect"] == stored
        # Each start sets it anew: a re-announce that opts out is stored too.
        again = raw.ask({**start, "seq": 2, "protect": False})
        assert again["protect"] is False and again["resumed"] is True
        found = rows(inproc.db, "SELECT protect FROM strategy_sessions WHERE session_key = 'k'")
        assert found[0]["protect"] == 0
    finally:
        raw.close()


def test_the_client_sends_its_choice_and_learns_the_effective_one(
    inproc: InProcessDaemon,
) -> None:
    pm = PositionPersistenceManager("s", endpoint=inproc.endpoint, ack_timeout=5)
    try:
        sid = pm.start_session(protect=True)
        assert pm.protected is True
        found = rows(inproc.db, "SELECT protect FROM strategy_sessions WHERE id = ?", (sid,))
        assert found[0]["protect"] == 1
        pm.end_session()
    finally:
        pm.close()
    pm = PositionPersistenceManager("s", endpoint=inproc.endpoint, ack_timeout=5)
    try:
        with pm.session(protect=False):
            assert pm.protected is False
    finally:
        pm.close()


# ---- adoption and revival set release ------------------------------------------------------


@pytest.mark.parametrize("keep", [False, True])
def test_adoption_hands_the_order_back_and_the_leg_shows_it(
    inproc: InProcessDaemon, keep: bool
) -> None:
    crash_a_leg(inproc)
    protect_id = insert_protective_order(inproc.db, "leg-1")
    pm = PositionPersistenceManager("s", endpoint=inproc.endpoint, ack_timeout=5)
    try:
        pm.start_session()
        crashed = pm.get_crashed_positions()
        assert [c.protection for c in crashed] == [
            Protection(protect_id, "PLACED", "OA-1001", 9.5, "SL-M", None)
        ]
        assert release_of(inproc.db, protect_id) == (None, None)  # a query changes nothing
        wakes = inproc.wakes
        leg = pm.mark_position_recovered("leg-1", keep_protection=keep)
        how = "KEEP" if keep else "CANCEL"
        assert leg.protection == Protection(protect_id, "PLACED", "OA-1001", 9.5, "SL-M", how)
        assert leg.protection_pending
        assert release_of(inproc.db, protect_id) == (how, pm.session_id)
        wait_for(lambda: inproc.wakes > wakes, what="the protect worker woken")
        # Adopting again (already ours) shows the same, and releases nothing twice.
        again = pm.mark_position_recovered("leg-1")
        assert again.protection == leg.protection
        event = rows(inproc.db, "SELECT payload FROM position_events WHERE event_type = "
                     "'RECOVERY'")  # fmt: skip
        assert json.loads(event[0]["payload"])["protection"] == how
    finally:
        pm.close()


def test_a_leg_without_an_order_adopts_as_before(inproc: InProcessDaemon) -> None:
    crash_a_leg(inproc)
    pm = PositionPersistenceManager("s", endpoint=inproc.endpoint, ack_timeout=5)
    try:
        pm.start_session()
        leg = pm.mark_position_recovered("leg-1")
        assert leg.protection is None and not leg.protection_pending
    finally:
        pm.close()


def test_review_and_requeue_leave_the_order_protecting_until_someone_adopts(
    inproc: InProcessDaemon,
) -> None:
    """posctl resolve --resume is a requeue: nobody manages the leg yet, so its stop stays."""
    crash_a_leg(inproc)
    protect_id = insert_protective_order(inproc.db, "leg-1")
    op = RawClient(inproc.endpoint)
    try:
        ack = op.ask({"type": "resolve", "seq": 1, "key": "leg-1", "action": "review",
                      "reason": "look", "by": "posctl"})  # fmt: skip
        assert ack["status"] == "NEEDS_REVIEW"
        assert release_of(inproc.db, protect_id) == (None, None)
        ack = op.ask({"type": "resolve", "seq": 2, "key": "leg-1", "action": "requeue",
                      "by": "posctl"})  # fmt: skip
        assert ack["status"] == "CRASHED"
        assert release_of(inproc.db, protect_id) == (None, None)
        ack = op.ask({"type": "query", "seq": 3, "what": "crashed"})
        assert ack["legs"][0]["protection"]["release"] is None
    finally:
        op.close()
    pm = PositionPersistenceManager("s", endpoint=inproc.endpoint, ack_timeout=5)
    try:
        pm.start_session()
        pm.mark_position_recovered("leg-1")
        assert release_of(inproc.db, protect_id) == ("CANCEL", pm.session_id)
    finally:
        pm.close()


def test_revival_cancels_the_order_and_the_revived_client_is_told(
    inproc: InProcessDaemon,
) -> None:
    crash_a_leg(inproc, session="old")
    protect_id = insert_protective_order(inproc.db, "leg-1")
    sid = rows(inproc.db, "SELECT id FROM strategy_sessions WHERE session_key = 'old'")[0]["id"]
    back = RawClient(inproc.endpoint)
    try:
        ack = back.ask({"type": "start", "session": "old", "token": TOKEN, "seq": 3,
                        "strategy": "s"})  # fmt: skip
        assert ack["revived"]["legs"] == ["leg-1"]
        assert ack["revived"]["protection"] == {
            "leg-1": {"id": protect_id, "state": "PLACED", "order_id": "OA-1001",
                      "trigger_price": 9.5, "pricetype": "SL-M", "release": "CANCEL"}
        }  # fmt: skip
        assert release_of(inproc.db, protect_id) == ("CANCEL", sid)
        inproc.handback(HandBack("leg-1", sid, "cancelled", protect_id, "OA-1001", 9.5))
        notice = back.recv()
        assert notice == {"v": 1, "type": "notice", "code": "PROTECTION_RELEASED",
                          "key": "leg-1", "protect_id": protect_id, "order_id": "OA-1001",
                          "outcome": "cancelled"}  # fmt: skip
    finally:
        back.close()


# ---- HandBack -> notices, closed legs ------------------------------------------------------


def adopted(inproc: InProcessDaemon, notices: Notices) -> tuple[PositionPersistenceManager, Any]:
    crash_a_leg(inproc)
    protect_id = insert_protective_order(inproc.db, "leg-1")
    pm = PositionPersistenceManager(
        "s", endpoint=inproc.endpoint, ack_timeout=5, on_notice=notices
    )
    pm.start_session()
    leg = pm.mark_position_recovered("leg-1")
    assert leg.protection is not None and leg.protection.id == protect_id
    return pm, leg


@pytest.mark.parametrize(
    ("outcome", "code", "state"),
    [
        ("cancelled", "PROTECTION_RELEASED", "CANCELLED"),
        ("kept", "PROTECTION_RELEASED", "KEPT"),
        ("cancel_failed", "PROTECTION_CANCEL_FAILED", "CANCEL_FAILED"),
    ],
)
def test_a_settled_order_is_a_notice_to_the_client_holding_the_leg(
    inproc: InProcessDaemon, outcome: str, code: str, state: str
) -> None:
    notices = Notices()
    pm, leg = adopted(inproc, notices)
    try:
        assert pm.session_id is not None
        inproc.handback(
            HandBack("leg-1", pm.session_id, outcome, leg.protection.id, "OA-1001", 9.5,
                     reason="order not found" if outcome == "cancel_failed" else "")
        )  # fmt: skip
        details = notices.wait(code)
        assert details["key"] == "leg-1" and details["order_id"] == "OA-1001"
        if code == "PROTECTION_RELEASED":
            assert details["outcome"] == outcome
        else:
            assert details["reason"] == "order not found"
        wait_for(lambda: leg.protection.state == state, what=f"leg.protection {state}")
        assert not leg.protection_pending
        assert leg.protection.live == (state != "CANCELLED")
        # The leg is the strategy's as before.
        pm.queue_position_update(leg, current_price=10.2, stop_price=9.7)
        assert pm.sync(5)
        assert leg_row(inproc.db, "leg-1")["stop_price"] == 9.7
    finally:
        pm.close()


def test_a_triggered_stop_closes_the_leg_and_the_next_call_raises(
    inproc: InProcessDaemon,
) -> None:
    notices = Notices()
    pm, leg = adopted(inproc, notices)
    try:
        assert pm.session_id is not None
        pm.queue_position_update(leg, current_price=9.6)  # pending when the stop fills
        inproc.handback(
            HandBack("leg-1", pm.session_id, "triggered", leg.protection.id, "OA-1001", 9.5,
                     fill_price=9.45)
        )  # fmt: skip
        # (the update above may be refused LEG_CLOSED before the commit's notice arrives: the
        # client then raises a LEG_CLOSED notice of its own, {key, reason}, first)
        details = notices.wait("LEG_CLOSED", having="exit_price")
        assert details == {"v": 1, "type": "notice", "code": "LEG_CLOSED", "key": "leg-1",
                           "protect_id": leg.protection.id, "order_id": "OA-1001",
                           "exit_reason": "PROTECTIVE_STOP", "exit_price": 9.45}  # fmt: skip
        stored = leg_row(inproc.db, "leg-1")
        assert (stored["status"], stored["exit_reason"], stored["exit_price"]) == (
            "CLOSED", "PROTECTIVE_STOP", 9.45,
        )  # fmt: skip
        exits = rows(inproc.db, "SELECT payload FROM position_events WHERE event_type = 'EXIT'")
        assert len(exits) == 1
        payload = json.loads(exits[0]["payload"])
        assert (payload["protect_id"], payload["order_id"]) == (leg.protection.id, "OA-1001")
        wait_for(lambda: leg.protection.state == "TRIGGERED", what="leg.protection TRIGGERED")
        assert not pm.is_open(leg)
        with pytest.raises(LegError) as update:
            pm.queue_position_update(leg, current_price=9.0)
        assert update.value.code == "LEG_CLOSED"
        with pytest.raises(LegError) as exit_:
            pm.save_position_exit(leg, exit_price=9.0, exit_reason="STOP_HIT")
        assert exit_.value.code == "LEG_CLOSED"
        # The daemon and the session go on.
        other = pm.save_position_entry("Y", entry_price=5.0, stop_price=4.0, quantity=1)
        assert other.position_id is not None
        assert pm.sync(5)
    finally:
        pm.close()


def test_the_daemon_refuses_a_closed_legs_update_and_exit_even_if_the_notice_was_missed(
    inproc: InProcessDaemon,
) -> None:
    """A client that was away when LEG_CLOSED went out learns it from the refusals."""
    crash_a_leg(inproc)
    protect_id = insert_protective_order(inproc.db, "leg-1")
    raw = RawClient(inproc.endpoint)
    token = "fedcba9876543210fedcba9876543210"
    try:
        ack = raw.ask({"type": "start", "session": "new", "token": token, "seq": 1,
                       "strategy": "s"})  # fmt: skip
        sid = ack["session_id"]
        ack = raw.ask({"type": "resolve", "session": "new", "token": token, "seq": 2,
                       "key": "leg-1", "action": "adopt"})  # fmt: skip
        assert ack["leg"]["protection"]["release"] == "CANCEL"
        raw.close()  # (away: the notice is lost — and the session crashes, DISCONNECT)
        raw = RawClient(inproc.endpoint)
        ack = raw.ask({"type": "start", "session": "new", "token": token, "seq": 3,
                       "strategy": "s"})  # fmt: skip
        assert ack["type"] == "ack", ack
        inproc.handback(HandBack("leg-1", sid, "triggered", protect_id, "OA-1001", 9.5,
                                 fill_price=9.4))  # fmt: skip
        assert raw.recv()["code"] == "LEG_CLOSED"
        raw.send({"type": "update", "session": "new", "token": token, "key": "leg-1",
                  "current_price": 9.0})  # fmt: skip
        refused = raw.recv()
        assert (refused["type"], refused["code"], refused["key"]) == (
            "error", "LEG_CLOSED", "leg-1",
        )  # fmt: skip
        refused = raw.ask({"type": "exit", "session": "new", "token": token, "seq": 4,
                           "key": "leg-1", "exit_price": 9.0,
                           "exit_reason": "STOP_HIT"})  # fmt: skip
        assert (refused["type"], refused["code"], refused["seq"]) == ("error", "LEG_CLOSED", 4)
        assert leg_row(inproc.db, "leg-1")["exit_reason"] == "PROTECTIVE_STOP"
    finally:
        raw.close()


def test_stale_and_unknown_handbacks_change_nothing(inproc: InProcessDaemon) -> None:
    notices = Notices()
    pm, leg = adopted(inproc, notices)
    try:
        sid = pm.session_id
        assert sid is not None
        pid = leg.protection.id
        inproc.handback(HandBack("leg-1", sid + 99, "triggered", pid, "OA-1001", 9.5, 9.4))
        inproc.handback(HandBack("no-such-leg", sid, "triggered", pid, "OA-1", 9.5, 9.4))
        inproc.handback(HandBack("no-such-leg", sid, "cancelled", pid, "OA-1", 9.5))
        inproc.handback(HandBack("leg-1", sid + 99, "cancelled", pid, "OA-1001", 9.5))
        inproc.handback(HandBack("leg-1", sid, "exploded", pid, "OA-1001", 9.5))
        assert pm.sync(5)
        assert leg_row(inproc.db, "leg-1")["status"] == "ACTIVE"
        assert pm.is_open(leg)
        pm.queue_position_update(leg, current_price=10.1)
        # The real one, then the same report again: closed once.
        inproc.handback(HandBack("leg-1", sid, "triggered", pid, "OA-1001", 9.5, 9.4))
        notices.wait("LEG_CLOSED", having="exit_price")
        inproc.handback(HandBack("leg-1", sid, "triggered", pid, "OA-1001", 9.5, 9.4))
        assert pm.sync(5)
        exits = rows(inproc.db, "SELECT id FROM position_events WHERE event_type = 'EXIT'")
        assert len(exits) == 1
        daemon_said = [d for c, d in notices.seen if c == "LEG_CLOSED" and "exit_price" in d]
        assert len(daemon_said) == 1
        assert inproc.daemon.engine.sessions  # alive, serving
    finally:
        pm.close()


def test_a_fill_reported_after_the_holder_crashed_again_still_closes_the_leg(
    inproc: InProcessDaemon,
) -> None:
    """The position is gone at the broker whoever watches it: the leg must not stay open."""
    crash_a_leg(inproc)
    protect_id = insert_protective_order(inproc.db, "leg-1")
    raw = RawClient(inproc.endpoint)
    ack = raw.ask({"type": "start", "session": "new", "token": TOKEN, "seq": 1, "strategy": "s"})
    sid = ack["session_id"]
    raw.ask({"type": "resolve", "session": "new", "token": TOKEN, "seq": 2, "key": "leg-1",
             "action": "adopt"})  # fmt: skip
    raw.close()
    wait_until_crashed(inproc.db, "new")
    inproc.handback(HandBack("leg-1", sid, "triggered", protect_id, "OA-1001", 9.5, 9.4))
    wait_for(lambda: leg_row(inproc.db, "leg-1")["status"] == "CLOSED", what="leg closed")
    assert leg_row(inproc.db, "leg-1")["exit_reason"] == "PROTECTIVE_STOP"


# ---- the client, sans I/O ------------------------------------------------------------------


def _session_with_leg() -> ClientSession:
    s = ClientSession(0.0)
    s.open_leg("leg-1", {"current_price": 10.0})
    return s


def test_a_leg_closed_notice_closes_the_leg_locally() -> None:
    s = _session_with_leg()
    raw = json.dumps({"v": 1, "type": "notice", "code": "LEG_CLOSED", "key": "leg-1",
                      "protect_id": 1, "order_id": "OA-1", "exit_reason": "PROTECTIVE_STOP",
                      "exit_price": 9.4}).encode()  # fmt: skip
    effects = s.receive(raw, 1.0)
    assert effects[0][:2] == ("notice", "LEG_CLOSED")
    assert not s.is_open("leg-1")
    assert "OA-1" in (s.closed_reason("leg-1") or "")
    with pytest.raises(LegError):
        s.update("leg-1", {"current_price": 9.0})


def test_a_leg_closed_refusal_closes_the_leg_and_tells_the_strategy_once() -> None:
    s = _session_with_leg()
    raw = json.dumps({"v": 1, "type": "error", "code": "LEG_CLOSED", "reason": "closed",
                      "key": "leg-1"}).encode()  # fmt: skip
    effects = s.receive(raw, 1.0)
    assert ("notice", "LEG_CLOSED", {"key": "leg-1", "reason": "closed"}) in effects
    assert s.closed_reason("leg-1") == "closed" and not s.is_open("leg-1")
    assert not [e for e in s.receive(raw, 2.0) if e[0] == "notice"]  # once


def test_a_client_that_missed_the_notice_learns_the_outcome_from_its_next_start(
    inproc: InProcessDaemon,
) -> None:
    """The session's next start (here from a second connection, the session staying live)
    shows every order handed to it, settled ones included."""
    crash_a_leg(inproc)
    protect_id = insert_protective_order(inproc.db, "leg-1")
    first = RawClient(inproc.endpoint)
    token = "fedcba9876543210fedcba9876543210"
    start = {"type": "start", "session": "new", "token": token, "strategy": "s"}
    try:
        sid = first.ask({**start, "seq": 1})["session_id"]
        first.ask({"type": "resolve", "session": "new", "token": token, "seq": 2,
                   "key": "leg-1", "action": "adopt"})  # fmt: skip
        # The worker cancels the order and reports it (the notice goes to `first`, unread).
        conn = sqlite3.connect(inproc.db, timeout=10)
        conn.execute("UPDATE protective_orders SET state = 'CANCELLED' WHERE id = ?",
                     (protect_id,))  # fmt: skip
        conn.commit()
        conn.close()
        inproc.handback(HandBack("leg-1", sid, "cancelled", protect_id, "OA-1001", 9.5))
        second = RawClient(inproc.endpoint)
        try:
            ack = second.ask({**start, "seq": 3})
        finally:
            second.close()
        assert ack["resumed"] is True and "revived" not in ack
        assert ack["protection"] == {
            "leg-1": {"id": protect_id, "state": "CANCELLED", "order_id": "OA-1001",
                      "trigger_price": 9.5, "pricetype": "SL-M", "release": "CANCEL"}
        }  # fmt: skip
    finally:
        first.close()


def test_a_start_ack_showing_a_filled_order_closes_the_leg_locally() -> None:
    s = ClientSession(0.0)
    s.connected(0.0)
    s.open_session({"v": 1, "type": "start", "session": "k", "token": TOKEN, "strategy": "s"})
    payload = s.next_send(0.0)
    assert payload is not None
    s.sent(0.0)
    s.open_leg("leg-1", {"current_price": 10.0})
    s.open_leg("leg-2", {"current_price": 20.0})
    order = {"id": 3, "state": "TRIGGERED", "order_id": "OA-9", "trigger_price": 9.5,
             "pricetype": "SL-M", "release": "CANCEL"}  # fmt: skip
    ack = {"v": 1, "type": "ack", "seq": json.loads(payload)["seq"], "session_id": 1,
           "status": "RUNNING", "resumed": True, "token": TOKEN, "heartbeat_timeout": 3.0,
           "protection": {"leg-1": order}}  # fmt: skip
    effects = s.receive(json.dumps(ack).encode(), 1.0)
    notices = [e[1:] for e in effects if e[0] == "notice"]
    assert [code for code, _ in notices] == ["LEG_CLOSED", "PROTECTION"]
    assert notices[1][1] == {"protection": {"leg-1": order}}
    assert not s.is_open("leg-1") and s.is_open("leg-2")


def test_the_managers_leg_handles_follow_the_notices(workdir: Path) -> None:
    """What the I/O thread hands the manager (its on_notice) updates the handles it gave out,
    and the strategy's own callback still gets every notice."""
    seen = Notices()
    pm = PositionPersistenceManager(
        "s", endpoint=f"ipc://{workdir}/none.sock", ack_timeout=0.1, on_notice=seen
    )
    try:
        pm.start_session()
        leg = pm.save_position_entry("X", entry_price=10.0, stop_price=9.5, quantity=1)
        order = {"id": 3, "state": "PLACED", "order_id": "OA-9", "trigger_price": 9.5,
                 "pricetype": "SL-M", "release": "CANCEL"}  # fmt: skip
        pm._on_notice("REVIVED", {"legs": [leg.key], "protection": {leg.key: order}})
        assert leg.protection_pending and leg.protection is not None
        pm._on_notice("PROTECTION", {"protection": {leg.key: {**order, "state": "KEPT"}}})
        assert leg.protection.state == "KEPT" and leg.protection.live
        assert not leg.protection_pending
        pm._on_notice("PROTECTION_CANCEL_FAILED", {"key": leg.key, "reason": "refused"})
        assert leg.protection.state == "CANCEL_FAILED" and leg.protection.live
        pm._on_notice("LEG_CLOSED", {"key": leg.key, "reason": "filled"})
        assert leg.protection.state == "TRIGGERED" and not leg.protection.live
        pm._on_notice("PROTECTION_RELEASED", {"key": "unknown-leg", "outcome": "cancelled"})
        assert [c for c, _ in seen.seen] == [
            "REVIVED", "PROTECTION", "PROTECTION_CANCEL_FAILED", "LEG_CLOSED",
            "PROTECTION_RELEASED",
        ]  # fmt: skip
    finally:
        pm.close(0.0)


async def test_the_asyncio_twin_takes_protect_and_keep_protection(
    inproc: InProcessDaemon,
) -> None:
    crash_a_leg(inproc)
    protect_id = insert_protective_order(inproc.db, "leg-1")
    async with AsyncPositionPersistenceManager(
        "s", endpoint=inproc.endpoint, ack_timeout=5
    ) as pm, pm.session(protect=True):
        assert pm.protected is True
        leg = await pm.mark_position_recovered("leg-1", keep_protection=True)
        assert leg.protection is not None and leg.protection.release == "KEEP"
        assert release_of(inproc.db, protect_id) == ("KEEP", pm.session_id)
        await pm.save_position_exit(leg, exit_price=10.0, exit_reason="MANUAL")


def test_a_fill_after_the_strategy_exited_the_leg_itself_is_logged_as_a_double_exit(
    inproc: InProcessDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    """The strategy exited at the broker while its protective stop was still live (what the
    rule in docs/INTEGRATION.md prevents), and the stop filled too: the leg keeps the
    strategy's exit, and the daemon says loudly that the position may be reversed."""
    notices = Notices()
    pm, leg = adopted(inproc, notices)
    try:
        sid = pm.session_id
        assert sid is not None and pm.save_position_exit(leg, 9.6, "STOP_HIT")
        inproc.handback(HandBack("leg-1", sid, "triggered", leg.protection.id, "OA-1001", 9.5,
                                 fill_price=9.4))  # fmt: skip
        wait_for(
            lambda: any("may now be reversed" in r.getMessage() for r in caplog.records),
            what="the double exit logged",
        )
        stored = leg_row(inproc.db, "leg-1")
        assert (stored["exit_reason"], stored["exit_price"]) == ("STOP_HIT", 9.6)
        assert not [d for c, d in notices.seen if c == "LEG_CLOSED"]
    finally:
        pm.close()
