"""Verification never closes an open position: the same rule in posctl verify and recovery.

The issue's reproductions against a real daemon: yesterday's NEEDS_REVIEW leg and today's
crashed leg on one contract with the broker holding one lot; two strategies crashed on one
contract. Both ``posctl verify [--apply]`` and ``start_session(recover=True)`` must flag the
legs for review instead of closing one of them.
"""

from __future__ import annotations

import json

from positiond_client import PositionPersistenceManager
from tests.helpers import DaemonProcess, rows
from tests.test_ctl import ctl, ctl_json
from tests.test_ctl import positionbook as book_text
from tests.test_recovery_daemon import positionbook

CE = "NIFTY28NOV2524000CE"


def crashed_leg(daemon: DaemonProcess, strategy: str, key: str, quantity: int = 75) -> None:
    """A session of ``strategy`` that entered one BUY leg on CE and crashed."""
    pm = PositionPersistenceManager(strategy, endpoint=daemon.endpoint, ack_timeout=5)
    try:
        assert pm.start_session() is not None
        pm.save_position_entry(
            CE, "CE", 100.0, 90.0, quantity, side="BUY", position_key=key, state={"atm": 24000}
        )
        assert pm.handle_crash("RuntimeError: feed died")
    finally:
        pm.close()


def status_of(daemon: DaemonProcess, key: str) -> str:
    found = rows(daemon.db, "SELECT status FROM strategy_positions WHERE position_key = ?", (key,))
    return str(found[0]["status"])


def test_posctl_verify_never_closes_todays_leg_because_of_yesterdays_review(
    daemon: DaemonProcess,
) -> None:
    crashed_leg(daemon, "expiry_blast", "y-1")
    assert ctl(daemon, "resolve", "y-1", "--review", "yesterday: checked by hand").returncode == 0
    crashed_leg(daemon, "expiry_blast", "t-1")
    code, data = ctl_json(daemon, "verify", "--positionbook", "-", stdin=book_text((CE, "75")))
    assert code == 1  # attention: a MISMATCH
    [verdict] = data["verdicts"]
    assert (verdict["leg"]["position_key"], verdict["verdict"]) == ("t-1", "MISMATCH")
    assert "y-1" in verdict["reason"]
    assert [o["position_key"] for o in verdict["others"]] == ["y-1"]

    run = ctl(daemon, "verify", "--positionbook", "-", "--apply", stdin=book_text((CE, "75")))
    assert run.returncode == 1, run.stderr
    assert status_of(daemon, "t-1") == "NEEDS_REVIEW"  # flagged, not closed
    assert status_of(daemon, "y-1") == "NEEDS_REVIEW"


def test_recovery_in_the_strategy_flags_instead_of_closing(daemon: DaemonProcess) -> None:
    crashed_leg(daemon, "expiry_blast", "y-1")
    assert ctl(daemon, "resolve", "y-1", "--review", "yesterday").returncode == 0
    crashed_leg(daemon, "expiry_blast", "t-1")
    pm = PositionPersistenceManager("expiry_blast", endpoint=daemon.endpoint, ack_timeout=5)
    try:
        report = pm.start_session(recover=True, positionbook=positionbook((CE, "75")))
    finally:
        pm.close()
    assert {v.leg.position_key: v.verdict for v in report.verdicts} == {"t-1": "MISMATCH"}
    assert report.actions == {"t-1": "flagged for review"}
    assert report.adopted == {}
    assert status_of(daemon, "t-1") == "NEEDS_REVIEW"
    review = rows(
        daemon.db, "SELECT review_reason FROM strategy_positions WHERE position_key = 't-1'"
    )[0]["review_reason"]
    assert "y-1" in review


def test_two_strategies_on_one_contract_neither_recovery_closes_or_resumes(
    daemon: DaemonProcess,
) -> None:
    crashed_leg(daemon, "expiry_blast", "a-1")
    crashed_leg(daemon, "straddle", "b-1")
    book = positionbook((CE, "75"))
    for strategy, key in (("expiry_blast", "a-1"), ("straddle", "b-1")):
        pm = PositionPersistenceManager(strategy, endpoint=daemon.endpoint, ack_timeout=5)
        try:
            report = pm.start_session(recover=True, positionbook=book)
        finally:
            pm.close()
        assert {v.leg.position_key: v.verdict for v in report.verdicts} == {key: "MISMATCH"}
        assert report.adopted == {}
        assert status_of(daemon, key) == "NEEDS_REVIEW"
    events = rows(daemon.db, "SELECT payload FROM position_events WHERE event_type = 'EXIT'")
    assert events == []  # nothing was closed
    reasons = [json.loads(e["payload"])["reason"] for e in rows(
        daemon.db, "SELECT payload FROM position_events WHERE event_type = 'NEEDS_REVIEW'"
    )]  # fmt: skip
    assert any("b-1" in r for r in reasons) and any("a-1" in r for r in reasons)


def test_a_different_size_is_still_attributed_through_the_daemon(daemon: DaemonProcess) -> None:
    """Certainty where the book allows it: 75 + 50 uncertain, broker 50 -> only b-1 is there."""
    crashed_leg(daemon, "expiry_blast", "a-1", 75)
    crashed_leg(daemon, "straddle", "b-1", 50)
    code, data = ctl_json(daemon, "verify", "--positionbook", "-", stdin=book_text((CE, "50")))
    assert code == 0
    assert {v["leg"]["position_key"]: v["verdict"] for v in data["verdicts"]} == {
        "a-1": "CLOSED_AT_BROKER",
        "b-1": "RESUME",
    }


def test_verify_does_not_alert_on_an_orphan_a_human_acknowledged(daemon: DaemonProcess) -> None:
    """A known manual hedge stays listed, marked decided, and stops making verify exit 1."""
    book = book_text(("BANKNIFTY28NOV2552000CE", "-30"))
    code, data = ctl_json(daemon, "verify", "--positionbook", "-", "--apply", stdin=book)
    assert code == 1 and [o["resolution"] for o in data["orphans"]] == [None]
    [record] = rows(daemon.db, "SELECT id FROM broker_orphans")
    run = ctl(daemon, "resolve-orphan", str(record["id"]), "--acknowledge", "--note", "hedge")
    assert run.returncode == 0, run.stdout + run.stderr
    code, data = ctl_json(daemon, "verify", "--positionbook", "-", stdin=book)
    assert code == 0
    assert [(o["symbol"], o["resolution"]) for o in data["orphans"]] == [
        ("BANKNIFTY28NOV2552000CE", "ACKNOWLEDGED")
    ]
