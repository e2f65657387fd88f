"""The engine's decisions, driven step by step with an injected clock (no sockets, no sleep)."""

from __future__ import annotations

from typing import Any

import orjson

from positiond.engine import Engine
from positiond.liveness import MAX_STEP
from positiond.ops import (
    CrashOp,
    EntryOp,
    ExitOp,
    LegRow,
    LiveSession,
    Result,
    StallOp,
    StartOp,
    token_hash,
)

TICK = 0.05  # the daemon's tick interval


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(engine: Engine, clock: Clock, seconds: float) -> bool:
    """Let the daemon run for ``seconds``, ticking as it does; True if any tick wanted a batch.

    (One jump of the clock would be a gap in the daemon's own progress, which ages no one.)
    """
    due = False
    end = clock.now + seconds
    while clock.now < end - 1e-9:
        clock.now = min(clock.now + TICK, end)
        due = engine.tick(clock.now) or due
    return due


RID = b"peer-1"
TOKEN = "5" * 32


def make(timeout: float = 3.0, flush: float = 1.0) -> tuple[Engine, Clock]:
    clock = Clock()
    engine = Engine(timeout, flush, monotonic=clock, wall=lambda: 1.7e9 + clock.now)
    engine.add_peer(RID, fd=7, uid=1000, pid=4242)
    return engine, clock


def send(engine: Engine, clock: Clock, msg: dict[str, Any]) -> dict[str, Any] | None:
    reply = engine.receive(
        RID, {"v": 1, "session": "s1", "token": TOKEN, **msg}, clock.now, clock()
    )
    return None if reply is None else dict(orjson.loads(reply))


def started(engine: Engine, clock: Clock) -> None:
    send(engine, clock, {"type": "start", "seq": 1, "strategy": "expiry_blast"})
    batch = engine.take_batch(clock.now)
    engine.committed(batch, [Result(True, {"session_id": 1})])


def enter(engine: Engine, clock: Clock, key: str, seq: int, stop: float = 90.0) -> None:
    entry = {
        "type": "entry",
        "seq": seq,
        "key": key,
        "symbol": "X",
        "exchange": "NFO",
        "product": "MIS",
        "side": "BUY",
        "quantity": 75,
        "entry_price": 100.0,
        "stop_price": stop,
    }
    assert send(engine, clock, entry) is None


def test_updates_are_coalesced_per_leg_and_flushed_on_the_interval() -> None:
    engine, clock = make(flush=1.0)
    started(engine, clock)
    enter(engine, clock, "ce", 2)
    engine.take_batch(clock.now)  # the entry
    for i in range(100):
        send(engine, clock, {"type": "update", "key": "ce", "current_price": 100.0 + i})
    send(engine, clock, {"type": "update", "key": "ce", "stop_price": 95.0})
    clock.now += 0.5
    assert engine.take_batch(clock.now).updates == {}  # not due yet
    clock.now += 0.6
    assert engine.batch_due(clock.now)
    batch = engine.take_batch(clock.now)
    assert {k: (u["current_price"], u["stop_price"]) for k, u in batch.updates.items()} == {
        "ce": (199.0, 95.0)
    }
    assert [(e.before, e.after) for e in batch.trail_events] == [((90.0, None), (95.0, None))]
    assert engine.pending_updates == 0


def test_update_for_unknown_or_foreign_leg_is_refused() -> None:
    engine, clock = make()
    started(engine, clock)
    reply = send(engine, clock, {"type": "update", "key": "nope", "stop_price": 1.0})
    assert reply is not None and reply["code"] == "UNKNOWN_LEG" and reply["key"] == "nope"
    engine.receive(
        b"peer-2",
        {
            "v": 1,
            "session": "s2",
            "token": "6" * 32,
            "type": "start",
            "seq": 1,
            "strategy": "other",
        },
        clock.now,
        clock.now,
    )
    enter(engine, clock, "ce", 2)
    foreign = engine.receive(
        b"peer-2",
        {
            "v": 1,
            "session": "s2",
            "token": "6" * 32,
            "type": "update",
            "key": "ce",
            "stop_price": 1.0,
        },
        clock.now,
        clock.now,
    )
    assert foreign is not None and orjson.loads(foreign)["code"] == "FENCED"


def test_silent_session_is_crashed_with_its_pending_updates_written_first() -> None:
    engine, clock = make(timeout=3.0, flush=60.0)
    started(engine, clock)
    enter(engine, clock, "ce", 2)
    engine.take_batch(clock.now)
    send(engine, clock, {"type": "update", "key": "ce", "stop_price": 97.5, "last_trail_level": 3})
    assert not run(engine, clock, 2.9)
    assert run(engine, clock, 0.2)
    batch = engine.take_batch(clock.now)
    (crash,) = batch.ops
    assert isinstance(crash, CrashOp)
    assert crash.source == "HEARTBEAT" and crash.reason.startswith("missed heartbeats (last seen ")
    assert crash.final_updates["ce"]["stop_price"] == 97.5
    assert engine.legs == {} and engine.sessions == {}
    # Anything it sends now is told to re-announce.
    reply = send(engine, clock, {"type": "hb"})
    assert reply is not None and reply["code"] == "UNKNOWN_SESSION"


def test_process_exit_crashes_only_the_sessions_of_that_peer() -> None:
    engine, clock = make()
    started(engine, clock)
    engine.peer_gone(b"someone-else")
    assert engine.take_batch(clock.now).ops == []
    engine.peer_gone(RID)
    (crash,) = engine.take_batch(clock.now).ops
    assert isinstance(crash, CrashOp)
    assert (crash.source, crash.reason) == ("DISCONNECT", "process exited (pid 4242)")


def test_own_crash_report_retires_the_session_so_a_later_disconnect_adds_nothing() -> None:
    engine, clock = make()
    started(engine, clock)
    send(engine, clock, {"type": "crash", "seq": 2, "error_type": "KeyError", "message": "'x'"})
    engine.peer_gone(RID)
    (crash,) = engine.take_batch(clock.now).ops
    assert isinstance(crash, CrashOp) and crash.source == "CLIENT"
    assert crash.reason == "KeyError: 'x'"


def test_restart_verdict_for_sessions_that_do_not_return() -> None:
    engine, clock = make(timeout=2.0)
    sessions = [
        LiveSession("s1", 1, "expiry_blast", token_hash(TOKEN), None),
        LiveSession("s2", 2, "other", None, None),
    ]
    engine.load(sessions, [LegRow("ce", "s1", 90.0, 1.0)])
    run(engine, clock, 1.0)
    send(engine, clock, {"type": "hb"})
    run(engine, clock, 1.5)
    (crash,) = engine.take_batch(clock.now).ops
    assert isinstance(crash, CrashOp)
    assert (crash.session_key, crash.source) == ("s2", "RESTART")
    assert crash.reason == "did not return after daemon restart"
    # The session that came back keeps its legs, loaded from the database.
    assert send(engine, clock, {"type": "update", "key": "ce", "stop_price": 91.0}) is None


def test_exit_takes_the_pending_update_and_the_leg_stops_taking_updates() -> None:
    engine, clock = make()
    started(engine, clock)
    enter(engine, clock, "ce", 2)
    send(engine, clock, {"type": "update", "key": "ce", "stop_price": 96.0})
    send(
        engine,
        clock,
        {
            "type": "exit",
            "seq": 3,
            "key": "ce",
            "exit_reason": "STOP_HIT",
            "exit_price": 96.0,
            "current_price": 95.5,
        },
    )
    batch = engine.take_batch(clock.now, flush_updates=True)
    assert [type(op) for op in batch.ops] == [EntryOp, ExitOp]
    exit_op = batch.ops[1]
    assert isinstance(exit_op, ExitOp)
    assert exit_op.final_update is not None
    assert (exit_op.final_update["stop_price"], exit_op.final_update["current_price"]) == (
        96.0,
        95.5,
    )
    assert batch.updates == {}
    reply = send(engine, clock, {"type": "update", "key": "ce", "stop_price": 1.0})
    assert reply is not None and reply["code"] == "UNKNOWN_LEG"


def test_acks_follow_commit_and_a_refused_entry_is_forgotten() -> None:
    engine, clock = make()
    send(engine, clock, {"type": "start", "seq": 1, "strategy": "expiry_blast"})
    enter(engine, clock, "ce", 2)
    batch = engine.take_batch(clock.now)
    assert [type(op) for op in batch.ops] == [StartOp, EntryOp]
    replies = engine.committed(
        batch,
        [Result(True, {"session_id": 9}), Result.error("KEY_CONFLICT", "taken")],
    )
    answers = [orjson.loads(payload) for _, payload in replies]
    assert [(a["type"], a["seq"]) for a in answers] == [("ack", 1), ("error", 2)]
    assert answers[0]["session_id"] == 9 and answers[1]["code"] == "KEY_CONFLICT"
    assert "ce" not in engine.legs


def test_failed_batch_is_requeued_and_newer_updates_win() -> None:
    engine, clock = make(flush=0.0)
    started(engine, clock)
    enter(engine, clock, "ce", 2)
    engine.take_batch(clock.now)
    send(engine, clock, {"type": "update", "key": "ce", "stop_price": 91.0, "current_price": 1.0})
    send(engine, clock, {"type": "exit", "seq": 3, "key": "zz", "exit_reason": "X"})
    failed = engine.take_batch(clock.now)
    send(engine, clock, {"type": "update", "key": "ce", "stop_price": 92.0})
    engine.requeue(failed)
    retry = engine.take_batch(clock.now)
    assert [type(op) for op in retry.ops] == [ExitOp]
    assert (retry.updates["ce"]["stop_price"], retry.updates["ce"]["current_price"]) == (92.0, 1.0)


def test_a_requeued_sync_still_carries_the_updates_before_it() -> None:
    engine, clock = make(flush=3600.0)
    started(engine, clock)
    enter(engine, clock, "ce", 2)
    engine.take_batch(clock.now)
    send(engine, clock, {"type": "update", "key": "ce", "stop_price": 95.0})
    send(engine, clock, {"type": "sync", "seq": 3})
    failed = engine.take_batch(clock.now)
    assert failed.updates  # a sync forces the flush
    engine.requeue(failed)  # the commit failed (say, a locked database)
    retry = engine.take_batch(clock.now)
    assert retry.updates["ce"]["stop_price"] == 95.0


def test_a_wrong_or_missing_token_is_refused_and_is_no_heartbeat() -> None:
    engine, clock = make(timeout=3.0)
    started(engine, clock)
    for token in (None, "0" * 32):
        msg: dict[str, Any] = {"v": 1, "session": "s1", "type": "hb"}
        if token:
            msg["token"] = token
        run(engine, clock, 1.0)
        reply = engine.receive(b"intruder", msg, clock.now, clock.now)
        assert reply is not None and orjson.loads(reply)["code"] == "BAD_TOKEN"
    run(engine, clock, 1.1)  # 3.1 s since the owner's last message: the intruder kept nothing alive
    assert [type(op) for op in engine.take_batch(clock.now).ops] == [CrashOp]


def test_a_loaded_session_proves_itself_with_the_token_whose_hash_is_stored() -> None:
    engine, clock = make()
    engine.load([LiveSession("s1", 1, "expiry_blast", token_hash(TOKEN), None)], [])
    bad = engine.receive(RID, {"v": 1, "session": "s1", "token": "1" * 32, "type": "hb"}, 0, 0)
    assert bad is not None and orjson.loads(bad)["code"] == "BAD_TOKEN"
    assert send(engine, clock, {"type": "hb"}) is None


def test_progress_deadline_marks_a_session_stalled_then_running_again() -> None:
    engine, clock = make(timeout=3.0)
    send(engine, clock, {"type": "start", "seq": 1, "strategy": "s", "progress_deadline": 5.0})
    engine.committed(engine.take_batch(clock.now), [Result(True, {"session_id": 1})])
    enter(engine, clock, "ce", 2)
    engine.take_batch(clock.now)
    for _ in range(6):  # heartbeats keep it alive, but no update comes: the main loop is stuck
        run(engine, clock, 1.0)
        send(engine, clock, {"type": "hb"})
    (stall,) = engine.take_batch(clock.now).ops
    assert isinstance(stall, StallOp) and stall.stalled and stall.payload["legs"] == ["ce"]
    assert stall.payload["last_progress"] == 1.7e9 + 1000.0
    for _ in range(10):
        run(engine, clock, 1.0)
        send(engine, clock, {"type": "hb"})
    assert engine.take_batch(clock.now).ops == []  # reported once
    send(engine, clock, {"type": "update", "key": "ce", "stop_price": 91.0})
    (progress,) = engine.take_batch(clock.now).ops
    assert isinstance(progress, StallOp) and not progress.stalled


def test_a_revival_is_logged_as_loudly_as_the_crash(caplog: Any) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="positiond.engine")
    engine, clock = make(timeout=3.0)
    started(engine, clock)
    run(engine, clock, 3.5)  # silent for longer than the timeout, the daemon running
    engine.take_batch(clock.now)  # the verdict
    (crashed,) = [r for r in caplog.records if "crashed" in r.getMessage()]
    send(engine, clock, {"type": "start", "seq": 5, "strategy": "expiry_blast"})
    revived = {"crash_timestamp": "2026-11-28T10:00:00.000Z", "crash_reason": "missed heartbeats",
               "legs": ["ce", "pe"]}  # fmt: skip
    engine.committed(
        engine.take_batch(clock.now), [Result(True, {"session_id": 1, "revived": revived})]
    )
    (back,) = [r for r in caplog.records if "REVIVED" in r.getMessage()]
    assert back.levelno == crashed.levelno == logging.WARNING
    assert back.getMessage() == (
        "session 1 (expiry_blast) REVIVED: alive after all, RUNNING again with 2 leg(s) ACTIVE "
        "(it was declared crashed at 2026-11-28T10:00:00.000Z: missed heartbeats)"
    )
    # A plain resume (a reconnect, a daemon restart) is no revival: nothing more is logged.
    send(engine, clock, {"type": "start", "seq": 6, "strategy": "expiry_blast"})
    engine.committed(engine.take_batch(clock.now), [Result(True, {"session_id": 1})])
    assert len([r for r in caplog.records if "REVIVED" in r.getMessage()]) == 1


def test_a_crash_the_strategy_reports_is_logged_once_it_took(caplog: Any) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="positiond.engine")
    engine, clock = make()
    started(engine, clock)
    send(engine, clock, {"type": "crash", "seq": 2, "error_type": "KeyError", "message": "'x'"})
    batch = engine.take_batch(clock.now)
    assert not [r for r in caplog.records if "crashed" in r.getMessage()]  # not before commit
    engine.committed(batch, [Result(True, {"session_id": 1, "status": "CRASHED", "legs": 2})])
    (record,) = [r for r in caplog.records if "crashed" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        "session 1 (expiry_blast) crashed, reported by the strategy: KeyError: 'x' "
        "(2 leg(s) CRASHED)"
    )
    # A repeat (re-sent after a reconnect) or a refusal adds nothing.
    for result in (
        Result(True, {"session_id": 1, "duplicate": True}),
        Result.error("BAD_TOKEN", ""),
    ):
        send(engine, clock, {"type": "crash", "seq": 3, "error_type": "KeyError", "message": ""})
        engine.committed(engine.take_batch(clock.now), [result])
    assert len([r for r in caplog.records if "crashed" in r.getMessage()]) == 1


def test_a_daemon_pause_or_clock_jump_ages_no_one() -> None:
    engine, clock = make(timeout=1.0)
    send(engine, clock, {"type": "start", "seq": 1, "strategy": "s", "progress_deadline": 1.0})
    engine.committed(engine.take_batch(clock.now), [Result(True, {"session_id": 1})])
    enter(engine, clock, "ce", 2)
    engine.take_batch(clock.now)
    for pause in (1.1, 30.0, 3600.0):  # SIGSTOP of the daemon, a VM suspended, a stepped clock
        run(engine, clock, 0.45)
        clock.now += pause
        # The tick may run before the queued messages are read: it must decide nothing.
        engine.tick(clock.now)
        assert engine.take_batch(clock.now).ops == []
        send(engine, clock, {"type": "update", "key": "ce", "stop_price": 91.0})
        run(engine, clock, 0.3)
        assert engine.take_batch(clock.now).ops == []
    assert "s1" in engine.sessions and engine.clock.gaps == 3


def test_a_session_silent_since_before_a_pause_is_still_declared_dead() -> None:
    engine, clock = make(timeout=1.0)
    started(engine, clock)
    run(engine, clock, 0.3)
    send(engine, clock, {"type": "hb"})  # its last word
    last_wall = clock.now  # send() passes the test clock as the wall clock too
    run(engine, clock, 0.2)
    clock.now += 60.0  # the daemon was stopped; the strategy hung meanwhile
    resumed = clock.now
    engine.tick(clock.now)
    while "s1" in engine.sessions:
        run(engine, clock, TICK)
    # 0.8 s of its timeout were left, the gap counts MAX_STEP: dead within one tick of that.
    assert clock.now - resumed <= 0.8 - MAX_STEP + TICK + 1e-6
    (crash,) = engine.take_batch(clock.now).ops
    assert isinstance(crash, CrashOp) and crash.source == "HEARTBEAT"
    assert crash.payload["last_seen"] == last_wall  # the real time, not shifted by the pause


def test_a_session_stalled_before_a_restart_runs_again_at_its_next_update() -> None:
    engine, clock = make(timeout=3.0)
    stalled = LiveSession("s1", 1, "s", token_hash(TOKEN), 5.0, "STALLED")
    engine.load([stalled], [LegRow("ce", "s1", 90.0, 1.0)])
    send(engine, clock, {"type": "update", "key": "ce", "stop_price": 91.0})
    (progress,) = engine.take_batch(clock.now).ops
    assert isinstance(progress, StallOp) and not progress.stalled


def test_a_session_heartbeating_too_seldom_for_the_timeout_is_given_two_heartbeats() -> None:
    engine, clock = make(timeout=3.0)
    send(engine, clock, {"type": "start", "seq": 1, "strategy": "s", "heartbeat_interval": 2.5})
    ((_, ack),) = engine.committed(engine.take_batch(clock.now), [Result(True, {"session_id": 1})])
    assert orjson.loads(ack)["heartbeat_timeout"] == 5.0
    run(engine, clock, 4.9)
    assert engine.take_batch(clock.now).ops == []
    run(engine, clock, 0.2)
    (crash,) = engine.take_batch(clock.now).ops
    assert isinstance(crash, CrashOp) and crash.payload["timeout"] == 5.0
    # Announced often enough: the daemon's own timeout.
    send(engine, clock, {"type": "start", "seq": 2, "strategy": "s", "heartbeat_interval": 0.5})
    ((_, ack),) = engine.committed(engine.take_batch(clock.now), [Result(True, {"session_id": 1})])
    assert orjson.loads(ack)["heartbeat_timeout"] == 3.0
    # After a restart, the interval stored with the session counts the same way.
    engine.load([LiveSession("s2", 2, "s", None, None, "RUNNING", 2.5)], [])
    assert engine.liveness.timeout_for("s2") == 5.0
