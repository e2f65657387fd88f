"""TRAIL_UPDATE events for a leg's last update: written by its exit, or its session's crash or
end, exactly when a flush would have written one — the audit trail never ends a move early.

The engine part runs on an injected clock (a property against a twin engine that flushes
instead); the daemon part on a real daemon whose flush interval never comes, so only the final
write can store the last stop.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from positiond.engine import Engine
from positiond.ops import CrashOp, EndOp, ExitOp, Op, TrailEvent
from positiond_client.protocol import encode
from tests.conftest import SOAK
from tests.helpers import UNIT, DaemonProcess, rows, wait_for
from tests.test_daemon import decode_reply
from tests.test_engine import RID, enter, make, run, send, started

# ---- the engine: the same rule as a flush ---------------------------------------------------

TERMINALS = ("exit", "exit-carrying", "crash", "end", "heartbeat", "disconnect")

_UPDATE = st.fixed_dictionaries(
    {},
    optional={
        "stop_price": st.sampled_from([None, 90.0, 91.0, 92.5]),
        "last_trail_level": st.sampled_from([None, 0, 1, 2, 2.0, 2.5]),
        "current_price": st.sampled_from([100.0, 101.5]),
    },
).filter(bool)
_STEP = st.tuples(st.sampled_from(["ce", "pe"]), _UPDATE, st.booleans())  # leg, update, flush?


def _history(steps: list[tuple[str, dict[str, Any], bool]]) -> tuple[Engine, Any]:
    engine, clock = make(timeout=3.0, flush=3600.0)
    started(engine, clock)
    enter(engine, clock, "ce", 2)
    enter(engine, clock, "pe", 3, stop=80.0)
    engine.take_batch(clock.now)
    for key, update, flush in steps:
        send(engine, clock, {"type": "update", "key": key, **update})
        if flush:
            engine.take_batch(clock.now, flush_updates=True)
    return engine, clock


def _terminal(engine: Engine, clock: Any, how: str, carried: dict[str, Any]) -> Op:
    if how.startswith("exit"):
        extra = carried if how == "exit-carrying" else {}
        exit_msg = {"type": "exit", "seq": 9, "key": "ce", "exit_reason": "STOP_HIT", **extra}
        send(engine, clock, exit_msg)
    elif how == "crash":
        send(engine, clock, {"type": "crash", "seq": 9, "error_type": "E", "message": ""})
    elif how == "end":
        send(engine, clock, {"type": "end", "seq": 9})
    elif how == "heartbeat":
        run(engine, clock, 3.5)  # silent past the timeout, the daemon running
    else:
        engine.peer_gone(RID)
    (op,) = engine.take_batch(clock.now).ops
    assert isinstance(op, ExitOp | CrashOp | EndOp)
    return op


def _flushed(engine: Engine, clock: Any, how: str, carried: dict[str, Any]) -> list[TrailEvent]:
    """What a flush at that moment would have recorded for the legs the terminal path ends."""
    if how == "exit-carrying":
        send(engine, clock, {"type": "update", "key": "ce", **carried})
    events = engine.take_batch(clock.now, flush_updates=True).trail_events
    return [e for e in events if not how.startswith("exit") or e.key == "ce"]


def _by_leg(event: TrailEvent) -> str:
    return event.key


@settings(max_examples=SOAK.count(300), deadline=None, derandomize=True, database=None)
@given(
    steps=st.lists(_STEP, max_size=8),
    how=st.sampled_from(TERMINALS),
    carried=_UPDATE,
)
def test_final_updates_record_the_trail_events_a_flush_would_have(
    steps: list[tuple[str, dict[str, Any], bool]], how: str, carried: dict[str, Any]
) -> None:
    ended, clock = _history(steps)
    op = _terminal(ended, clock, how, carried)
    twin, twin_clock = _history(steps)
    expected = _flushed(twin, twin_clock, how, carried)
    assert sorted(op.trail_events, key=_by_leg) == sorted(expected, key=_by_leg)
    # Each event's "after" is exactly what the final write stores, types included (2 stays 2).
    finals = {op.key: op.final_update} if isinstance(op, ExitOp) else op.final_updates
    for event in op.trail_events:
        final = finals[event.key]
        assert final is not None
        for index, name in enumerate(("stop_price", "last_trail_level")):
            if name in final:
                assert repr(event.after[index]) == repr(final[name])


def test_each_final_path_carries_the_move_of_the_last_update() -> None:
    for how in TERMINALS:
        engine, clock = _history([("ce", {"stop_price": 95.0, "last_trail_level": 3}, False)])
        op = _terminal(engine, clock, how, {"stop_price": 96.0})
        after = (96.0, 3) if how == "exit-carrying" else (95.0, 3)
        assert [(e.key, e.before, e.after) for e in op.trail_events] == [
            ("ce", (90.0, None), after)
        ], how


def test_a_final_update_that_moves_nothing_records_nothing() -> None:
    engine, clock = _history([("ce", {"current_price": 101.0, "stop_price": 90.0}, False)])
    op = _terminal(engine, clock, "end", {})
    assert isinstance(op, EndOp) and op.final_updates and op.trail_events == []


# ---- a real daemon: the stored trail ends with the last move --------------------------------

_LEG = {
    "type": "entry",
    "symbol": "X",
    "exchange": "NFO",
    "product": "MIS",
    "side": "BUY",
    "quantity": 1,
    "entry_price": 10.0,
    "stop_price": 9.0,
}


@pytest.fixture
def slow_flush(workdir: Path) -> Iterator[DaemonProcess]:
    """A daemon whose flush interval never comes: only a final write can store an update."""
    daemon = DaemonProcess(workdir, "--flush-interval", "3600", heartbeat_timeout=1.0).start()
    try:
        yield daemon
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop()


def _acks(raw: zmq.Socket[bytes], count: int) -> list[dict[str, Any]]:
    replies = []
    for _ in range(count):
        assert raw.poll(5000 * UNIT), "no reply"
        replies.append(decode_reply(raw.recv()))
    return replies


def _leg_trail(daemon: DaemonProcess) -> list[tuple[str, dict[str, Any]]]:
    found = rows(
        daemon.db,
        "SELECT e.event_type, e.payload FROM position_events e JOIN strategy_positions p "
        "ON p.position_id = e.position_id WHERE p.position_key = 'x' ORDER BY e.id",
    )
    return [(r["event_type"], json.loads(r["payload"])) for r in found]


@pytest.mark.parametrize("how", ["exit", "crash", "end", "disconnect", "heartbeat", "sigterm"])
def test_the_stored_trail_ends_with_the_last_move(slow_flush: DaemonProcess, how: str) -> None:
    daemon = slow_flush
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as raw:
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(daemon.endpoint)
        base = {"v": 1, "session": f"trail-{how}", "token": "cd" * 16}
        raw.send(encode({**base, "type": "start", "seq": 1, "strategy": "s"}))
        raw.send(encode({**base, **_LEG, "seq": 2, "key": "x"}))
        update = {"type": "update", "key": "x", "stop_price": 9.5, "last_trail_level": 3}
        raw.send(encode({**base, **update, "current_price": 10.4}))
        raw.send(encode({**base, **_LEG, "seq": 3, "key": "y"}))
        # Handled in order: once "y" is acked, the update waits in the daemon's memory.
        assert {a["seq"] for a in _acks(raw, 3)} == {1, 2, 3}
        stop = rows(daemon.db, "SELECT stop_price FROM strategy_positions WHERE position_key='x'")
        assert stop[0]["stop_price"] == 9.0  # not flushed
        last = {"exit": "EXIT", "crash": "CRASH"}.get(how)
        if how == "exit":
            raw.send(encode({**base, "type": "exit", "seq": 4, "key": "x", "exit_reason": "T"}))
            _acks(raw, 1)
        elif how == "crash":
            crash = {"type": "crash", "seq": 4, "error_type": "E", "message": "m"}
            raw.send(encode({**base, **crash}))
            _acks(raw, 1)
        elif how == "end":
            raw.send(encode({**base, "type": "end", "seq": 4}))
            _acks(raw, 1)
        elif how == "sigterm":
            assert daemon.stop(signal.SIGTERM) == 0  # the shutdown flush: the normal path
        elif how == "heartbeat":  # connected but silent: the missed-heartbeats verdict
            last = "CRASH"
            wait_for(lambda: _leg_trail(daemon)[-1][0] == "CRASH", 5, "the crash verdict")
    if how == "disconnect":  # the socket closed with the context: a process exit on ipc
        last = "CRASH"
        wait_for(lambda: _leg_trail(daemon)[-1][0] == "CRASH", 5, "the crash verdict")
    if last == "CRASH":
        source = (
            "HEARTBEAT" if how == "heartbeat" else "DISCONNECT" if how == "disconnect" else "CLIENT"
        )
        assert rows(daemon.db, "SELECT crash_source FROM strategy_sessions")[0][0] == source
    trail = _leg_trail(daemon)
    kinds = [kind for kind, _ in trail]
    assert kinds == ["ENTRY", "TRAIL_UPDATE"] + ([last] if last else []), trail
    payload = trail[1][1]
    assert payload == {"stop_price": [9.0, 9.5], "last_trail_level": [None, 3], "price": 10.4}
    assert isinstance(payload["last_trail_level"][1], int)
    row = rows(
        daemon.db, "SELECT stop_price, last_trail_level FROM strategy_positions WHERE "
        "position_key = 'x'",
    )[0]  # fmt: skip
    assert (row["stop_price"], row["last_trail_level"]) == (9.5, 3)


# ---- storage faults: a failed write is retried, and the trail stays one unbroken chain -------


def test_a_failed_write_keeps_the_last_stop_of_a_leg_that_crashed_meanwhile() -> None:
    engine, clock = _history([])
    send(engine, clock, {"type": "update", "key": "ce", "stop_price": 95.0, "last_trail_level": 3})
    failed = engine.take_batch(clock.now, flush_updates=True)  # the database is locked...
    send(engine, clock, {"type": "update", "key": "ce", "current_price": 101.0})
    engine.peer_gone(RID)  # ... and the strategy dies meanwhile
    engine.requeue(failed)
    retry = engine.take_batch(clock.now, flush_updates=True)
    (crash,) = retry.ops
    assert isinstance(crash, CrashOp)
    final = crash.final_updates["ce"]
    assert (final["stop_price"], final["last_trail_level"], final["current_price"]) == (
        95.0, 3, 101.0,
    )  # fmt: skip
    assert [(e.before, e.after) for e in crash.trail_events] == [((90.0, None), (95.0, 3))]
    assert retry.trail_events == []  # not after the CRASH


def test_a_move_waiting_after_a_failed_write_goes_before_the_exit() -> None:
    engine, clock = _history([])
    send(engine, clock, {"type": "update", "key": "ce", "stop_price": 95.0})
    engine.requeue(engine.take_batch(clock.now, flush_updates=True))  # failed: kept
    send(engine, clock, {"type": "update", "key": "ce", "stop_price": 96.0})
    send(engine, clock, {"type": "exit", "seq": 9, "key": "ce", "exit_reason": "STOP_HIT"})
    batch = engine.take_batch(clock.now)
    (exit_op,) = batch.ops
    assert isinstance(exit_op, ExitOp) and exit_op.final_update is not None
    assert exit_op.final_update["stop_price"] == 96.0
    assert [(e.before, e.after) for e in exit_op.trail_events] == [
        ((90.0, None), (95.0, None)), ((95.0, None), (96.0, None)),
    ]  # fmt: skip
    assert batch.trail_events == []


_ACTION = st.one_of(
    st.tuples(st.just("update"), st.sampled_from(["ce", "pe"]), _UPDATE),
    st.tuples(st.just("flush"), st.none(), st.none()),
    st.tuples(st.just("fail"), st.none(), st.none()),
    st.tuples(st.just("exit"), st.sampled_from(["ce", "pe"]), _UPDATE),
)


def _commit(batch: Any, legs: dict[str, Any], trails: dict[str, list[TrailEvent]]) -> None:
    """What the store writes, in its order: each op (final update, its moves, then closing),
    then the batch's updates, then the batch's moves. ``legs``: open legs' (stop, level)."""

    def write(key: str, upd: dict[str, Any]) -> None:
        if key in legs:
            stop, level = legs[key]
            legs[key] = (upd.get("stop_price", stop), upd.get("last_trail_level", level))

    for op in batch.ops:
        if isinstance(op, ExitOp):
            if op.final_update:
                write(op.key, op.final_update)
                trails[op.key] += [e for e in op.trail_events if op.key in legs]
            legs.pop(op.key, None)
        elif isinstance(op, CrashOp | EndOp):
            for key, upd in op.final_updates.items():
                write(key, upd)
            for e in op.trail_events:
                if e.key in legs:
                    trails[e.key].append(e)
            if isinstance(op, CrashOp):
                legs.clear()
    for key, upd in batch.updates.items():
        write(key, upd)
    for e in batch.trail_events:
        trails[e.key].append(e)


@settings(max_examples=SOAK.count(300), deadline=None, derandomize=True, database=None)
@given(actions=st.lists(_ACTION, max_size=14), how=st.sampled_from(TERMINALS[2:]))
def test_with_failed_writes_the_trail_is_one_chain_ending_at_the_last_stop_sent(
    actions: list[tuple[str, Any, Any]], how: str
) -> None:
    engine, clock = _history([])
    stored: dict[str, Any] = {"ce": (90.0, None), "pe": (80.0, None)}  # ACTIVE legs' levels
    sent = dict(stored)  # (stop, level) as the strategy last sent them, leg by leg
    is_open = {"ce", "pe"}
    trails: dict[str, list[TrailEvent]] = {"ce": [], "pe": []}
    for seq, (action, key, fields) in enumerate(actions, start=10):
        if action in ("flush", "fail"):
            batch = engine.take_batch(clock.now, flush_updates=True)
            if action == "fail":
                engine.requeue(batch)  # a storage fault: nothing written, all kept
            else:
                _commit(batch, stored, trails)
            continue
        if key not in is_open:
            continue
        if action == "update":
            send(engine, clock, {"type": "update", "key": key, **fields})
        else:
            exit_msg = {"type": "exit", "seq": seq, "key": key, "exit_reason": "X", **fields}
            send(engine, clock, exit_msg)
            is_open.discard(key)
        stop, level = sent[key]
        sent[key] = (fields.get("stop_price", stop), fields.get("last_trail_level", level))
    if is_open:  # the session ends one way or another
        if how == "crash":
            send(engine, clock, {"type": "crash", "seq": 99, "error_type": "E", "message": ""})
        elif how == "end":
            send(engine, clock, {"type": "end", "seq": 99})
        elif how == "heartbeat":
            run(engine, clock, 3.5)
        else:
            engine.peer_gone(RID)
    for _ in range(3):  # then everything still pending is written (no more faults)
        _commit(engine.take_batch(clock.now, flush_updates=True), stored, trails)
    for key, entry_stop in (("ce", 90.0), ("pe", 80.0)):
        chain, at = trails[key], (entry_stop, None)
        for event in chain:  # each move starts where the last one ended, and moves
            assert event.before == at and event.after != event.before, (key, chain)
            at = event.after
        assert at == sent[key], (key, chain, sent[key])  # ... and ends at the last stop sent
