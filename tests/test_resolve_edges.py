"""Legs nobody can act on, and answers that claim more than they know (issue 10 §5, §6).

- An adoption the daemon did not answer in time may still commit: the client must say "outcome
  unknown", take the leg when the late ack comes, and a repeated call must return it.
- A leg left ACTIVE in a session that is over (``end_session`` with legs open) is stranded: it is
  resolvable (close, review, requeue, adopt) instead of refused forever.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from positiond_client import PositionPersistenceManager, UnavailableError
from tests.helpers import DaemonProcess, rows, wait_for
from tests.test_ctl import ctl
from tests.test_recovery_daemon import positionbook

CE = "NIFTY28NOV2524000CE"


def leg_of(daemon: DaemonProcess, key: str) -> sqlite3.Row:
    return rows(
        daemon.db,
        "SELECT p.*, s.status AS session_status, s.strategy_name FROM strategy_positions p "
        "JOIN strategy_sessions s ON s.id = p.session_id WHERE p.position_key = ?",
        (key,),
    )[0]


def ended_with_a_leg_open(daemon: DaemonProcess, key: str) -> int:
    """A session that entered one leg and ended with it still open (allowed: it stays ACTIVE)."""
    pm = PositionPersistenceManager("expiry_blast", endpoint=daemon.endpoint, ack_timeout=5)
    try:
        sid = pm.start_session()
        assert sid is not None
        leg = pm.save_position_entry(CE, "CE", 100.0, 90.0, 75, position_key=key)
        pm.queue_position_update(leg, stop_price=95.0, last_trail_level=1)
        assert pm.end_session()
    finally:
        pm.close()
    assert (leg_of(daemon, key)["status"], leg_of(daemon, key)["session_status"]) == (
        "ACTIVE",
        "COMPLETED",
    )
    return sid


def crashed_leg(daemon: DaemonProcess, key: str) -> None:
    pm = PositionPersistenceManager("expiry_blast", endpoint=daemon.endpoint, ack_timeout=5)
    try:
        assert pm.start_session() is not None
        pm.save_position_entry(CE, "CE", 100.0, 90.0, 75, position_key=key)
        assert pm.handle_crash("RuntimeError: feed died")
    finally:
        pm.close()


# ---- §6: stranded legs ------------------------------------------------------------------


def test_a_leg_left_open_at_end_can_be_closed_by_the_operator(daemon: DaemonProcess) -> None:
    ended_with_a_leg_open(daemon, "s-1")
    run = ctl(daemon, "resolve", "s-1", "--closed", "--exit-price", "96.5")
    assert run.returncode == 0, run.stdout + run.stderr
    leg = leg_of(daemon, "s-1")
    assert (leg["status"], leg["exit_price"], leg["exit_reason"]) == ("CLOSED", 96.5, "MANUAL_EXIT")


@pytest.mark.parametrize(
    ("flag", "status"), [("--review", "NEEDS_REVIEW"), ("--resume", "CRASHED")]
)
def test_a_leg_left_open_at_end_can_be_reviewed_or_requeued(
    daemon: DaemonProcess, flag: str, status: str
) -> None:
    ended_with_a_leg_open(daemon, "s-1")
    args = [flag, "left open at the end of the day"] if flag == "--review" else [flag]
    run = ctl(daemon, "resolve", "s-1", *args)
    assert run.returncode == 0, run.stdout + run.stderr
    assert leg_of(daemon, "s-1")["status"] == status
    if status == "CRASHED":  # requeued: the seed's crash query finds it for the next run
        pm = PositionPersistenceManager("expiry_blast", endpoint=daemon.endpoint, ack_timeout=5)
        try:
            assert pm.start_session() is not None
            assert [c.position_key for c in pm.get_crashed_positions()] == ["s-1"]
        finally:
            pm.close()


def test_a_leg_left_open_at_end_can_be_adopted_and_then_updated(daemon: DaemonProcess) -> None:
    old = ended_with_a_leg_open(daemon, "s-1")
    pm = PositionPersistenceManager("expiry_blast", endpoint=daemon.endpoint, ack_timeout=5)
    try:
        sid = pm.start_session()
        leg = pm.mark_position_recovered("s-1")
        assert (leg.stop_price, leg.last_trail_level) == (95.0, 1)
        pm.queue_position_update(leg, stop_price=97.0)
        assert pm.sync(5)
        stored = leg_of(daemon, "s-1")
        assert (stored["status"], stored["session_id"], stored["stop_price"]) == (
            "ACTIVE",
            sid,
            97.0,
        )
        assert sid != old
        assert pm.save_position_exit(leg, 97.0, "STOP_HIT")
        assert pm.end_session()
    finally:
        pm.close()
    assert leg_of(daemon, "s-1")["status"] == "CLOSED"


def test_a_leg_open_in_a_live_session_is_still_its_owners(daemon: DaemonProcess) -> None:
    pm = PositionPersistenceManager("expiry_blast", endpoint=daemon.endpoint, ack_timeout=5)
    try:
        assert pm.start_session() is not None
        pm.save_position_entry(CE, "CE", 100.0, 90.0, 75, position_key="live-1")
        run = ctl(daemon, "resolve", "live-1", "--closed")
        assert run.returncode == 5  # refused: its live owner exits it
        assert leg_of(daemon, "live-1")["status"] == "ACTIVE"
    finally:
        pm.close()


def test_prune_removes_a_stranded_session_once_its_leg_is_resolved(daemon: DaemonProcess) -> None:
    ended_with_a_leg_open(daemon, "s-1")
    assert ctl(daemon, "prune", "--older-than", "0d").returncode == 0
    assert rows(daemon.db, "SELECT count(*) AS n FROM strategy_positions")[0]["n"] == 1
    assert ctl(daemon, "resolve", "s-1", "--closed").returncode == 0
    assert ctl(daemon, "prune", "--older-than", "0d").returncode == 0
    assert rows(daemon.db, "SELECT count(*) AS n FROM strategy_positions")[0]["n"] == 0


# ---- §5: an adoption whose answer came too late -------------------------------------------


def test_an_adoption_without_an_answer_is_outcome_unknown_and_the_retry_finds_it(
    daemon: DaemonProcess,
) -> None:
    crashed_leg(daemon, "c-1")
    pm = PositionPersistenceManager("expiry_blast", endpoint=daemon.endpoint, ack_timeout=0.3)
    operator = sqlite3.connect(daemon.db, isolation_level=None, timeout=0)
    try:
        assert pm.start_session() is not None
        operator.execute("BEGIN IMMEDIATE")  # the writer is busy (a long prune, a backup...)
        with pytest.raises(UnavailableError, match="outcome unknown") as raised:
            pm.mark_position_recovered("c-1")
        assert "nothing was" not in str(raised.value)
        operator.execute("ROLLBACK")
        # The adoption commits once the writer gets through, and the late ack gives us the leg.
        wait_for(lambda: leg_of(daemon, "c-1")["status"] == "ACTIVE", 10, "the adoption")
        wait_for(lambda: pm.is_open("c-1"), 5, "the late ack to open the leg in the client")
        pm.ack_timeout = 5
        leg = pm.mark_position_recovered("c-1")  # "already yours": the handle, not an error
        assert (leg.key, leg.stop_price, leg.was_crashed) == ("c-1", 90.0, True)
        pm.queue_position_update(leg, stop_price=93.0)
        assert pm.sync(5)
        stored = leg_of(daemon, "c-1")
        assert (stored["status"], stored["stop_price"]) == ("ACTIVE", 93.0)
    finally:
        if operator.in_transaction:
            operator.execute("ROLLBACK")
        operator.close()
        pm.close()
    adoptions = rows(daemon.db, "SELECT id FROM position_events WHERE event_type = 'RECOVERY'")
    assert len(adoptions) == 1  # re-sent and repeated, applied once


def test_a_read_without_an_answer_still_says_nothing_was_decided(workdir: Path) -> None:
    pm = PositionPersistenceManager(
        "expiry_blast", endpoint=f"ipc://{workdir}/nobody.sock", ack_timeout=0.2
    )
    try:
        with pytest.raises(UnavailableError, match="nothing was read or decided"):
            pm.get_crashed_positions()
    finally:
        pm.close(0)


def test_bulk_resolve_takes_stranded_legs_too(daemon: DaemonProcess) -> None:
    ended_with_a_leg_open(daemon, "s-1")
    crashed_leg(daemon, "c-1")
    run = ctl(daemon, "resolve", "--all", "--strategy", "expiry_blast", "--closed", "--yes")
    assert run.returncode == 0, run.stdout + run.stderr
    assert leg_of(daemon, "s-1")["status"] == leg_of(daemon, "c-1")["status"] == "CLOSED"


@pytest.mark.parametrize(
    ("net", "verdict", "status"),
    [("75", "RESUME", "ACTIVE"), ("0", "CLOSED_AT_BROKER", "CLOSED")],
)
def test_the_next_run_recovers_the_legs_a_stopped_run_left_open(
    daemon: DaemonProcess, net: str, verdict: str, status: str
) -> None:
    """A clean stop (COMPLETED) with a leg open leaves it stranded; the strategy's next run
    verifies it with the broker and adopts (or closes) it like a crashed leg."""
    old = ended_with_a_leg_open(daemon, "s-1")
    pm = PositionPersistenceManager("expiry_blast", endpoint=daemon.endpoint, ack_timeout=5)
    try:
        report = pm.start_session(recover=True, positionbook=positionbook((CE, net)))
        assert {v.leg.position_key: v.verdict for v in report.verdicts} == {"s-1": verdict}
        stored = leg_of(daemon, "s-1")
        assert stored["status"] == status
        if verdict == "RESUME":
            assert stored["session_id"] == report.session_id != old
            assert report.adopted["s-1"].stop_price == 95.0
    finally:
        pm.close()
    # posctl sees it the same way while it is stranded (another strategy's run does not adopt it)
    other = PositionPersistenceManager("other", endpoint=daemon.endpoint, ack_timeout=5)
    try:
        assert (
            other.start_session(recover=True, positionbook=positionbook((CE, net))).verdicts == []
        )
    finally:
        other.close()
