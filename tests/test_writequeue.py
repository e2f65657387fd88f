"""The write queue alone: coalescing, envelopes dropped, requeue after a failed batch, trails."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from positiond.model import Leg
from positiond.ops import CrashOp, EntryOp, ProtectCloseOp, SyncOp, TrailEvent
from positiond.writequeue import WriteQueue
from positiond_client.protocol import UPDATE_FIELDS
from tests.test_engine import enter, make, send, started

ENVELOPE = {"v": 1, "type": "update", "session": "s1", "token": "7" * 32, "seq": 9, "key": "ce"}


def update(**fields: Any) -> dict[str, Any]:
    return {**ENVELOPE, **fields}


def legs() -> dict[str, Leg]:
    return {"ce": Leg("ce", "s1", 90.0, 1.0), "pe": Leg("pe", "s1", 110.0, None)}


def test_updates_coalesce_per_leg_newer_fields_win_older_ones_stay() -> None:
    queue = WriteQueue(1.0, 0.0)
    queue.update("s1", "ce", update(current_price=100.0, stop_price=91.0))
    queue.update("s1", "ce", update(current_price=101.0, highest_price=101.0))
    queue.update("s1", "pe", update(current_price=50.0))
    assert queue.pending_updates == 2
    batch = queue.take(1.0, 1.7e9, legs())
    assert batch.updates == {
        "ce": {"current_price": 101.0, "stop_price": 91.0, "highest_price": 101.0},
        "pe": {"current_price": 50.0},
    }
    assert batch.update_owners == {"ce": "s1", "pe": "s1"}
    assert queue.pending_updates == 0


def test_the_envelope_and_token_are_not_kept() -> None:
    queue = WriteQueue(1.0, 0.0)
    queue.update("s1", "ce", update(current_price=100.0, state={"a": 1}))
    (stored,) = queue.take(1.0, 0.0, legs()).updates.values()
    assert set(stored) <= set(UPDATE_FIELDS)
    assert stored == {"current_price": 100.0, "state": {"a": 1}}


def test_the_engine_queues_no_envelope_either() -> None:
    """Through the engine (this held the whole message, token included, before the split)."""
    engine, clock = make()
    started(engine, clock)
    enter(engine, clock, "ce", 2)
    engine.take_batch(clock.now)
    send(engine, clock, {"type": "update", "seq": 5, "key": "ce", "current_price": 101.0})
    batch = engine.take_batch(clock.now, flush_updates=True)
    assert batch.updates == {"ce": {"current_price": 101.0}}


def test_updates_wait_for_the_flush_interval_ops_do_not() -> None:
    queue = WriteQueue(1.0, 0.0)
    queue.update("s1", "ce", update(current_price=100.0))
    queue.heartbeat("s1", 1.7e9)
    assert not queue.due(0.5)
    assert queue.take(0.5, 0.0, legs()).updates == {}  # not yet
    assert queue.due(1.0)
    queue.add(EntryOp(b"r", 1, "s1", "xe", {}, 0.0))
    assert queue.due(1.0)
    batch = queue.take(1.0, 0.0, legs())
    assert [type(op) for op in batch.ops] == [EntryOp]
    assert batch.updates and batch.heartbeats == {"s1": 1.7e9}
    assert not queue.due(1.5)


def test_a_sync_takes_the_updates_along_before_their_time() -> None:
    queue = WriteQueue(10.0, 0.0)
    queue.update("s1", "ce", update(current_price=100.0))
    queue.add(SyncOp(b"r", 2, "s1"))
    assert queue.take(0.1, 0.0, legs()).updates == {"ce": {"current_price": 100.0}}


def test_requeue_puts_the_failed_batch_first_and_keeps_newer_updates() -> None:
    queue = WriteQueue(1.0, 0.0)
    first = EntryOp(b"r", 1, "s1", "xe", {}, 0.0)
    queue.add(first)
    queue.update("s1", "ce", update(current_price=100.0, stop_price=91.0))
    queue.heartbeat("s1", 1.0)
    book = legs()
    failed = queue.take(1.0, 0.0, book)  # the commit fails...
    later = EntryOp(b"r", 2, "s1", "ye", {}, 0.0)
    queue.add(later)  # ... while more arrives
    queue.update("s1", "ce", update(current_price=102.0))
    queue.heartbeat("s1", 2.0)
    queue.requeue(failed, book)
    retry = queue.take(2.0, 0.0, book)
    assert retry.ops == [first, later]
    assert retry.updates == {"ce": {"current_price": 102.0, "stop_price": 91.0}}
    assert retry.heartbeats == {"s1": 2.0}
    assert retry.update_owners == {"ce": "s1"}


def test_trail_events_move_the_legs_and_survive_a_failed_batch() -> None:
    queue = WriteQueue(1.0, 0.0)
    book = legs()
    queue.update("s1", "ce", update(current_price=100.0, stop_price=92.0))
    queue.update("s1", "pe", update(current_price=50.0, stop_price=110))  # 110.0 -> 110: no move
    failed = queue.take(1.0, 0.0, book)
    assert failed.trail_events == [TrailEvent("ce", "s1", (90.0, 1.0), (92.0, 1.0), 100.0)]
    assert (book["ce"].stop_price, book["pe"].stop_price) == (92.0, 110)
    queue.requeue(failed, book)
    queue.update("s1", "ce", update(current_price=101.0, last_trail_level=2))
    retry = queue.take(2.0, 0.0, book)
    # The failed batch's move first, then the one the retried updates make now.
    assert retry.trail_events == [
        TrailEvent("ce", "s1", (90.0, 1.0), (92.0, 1.0), 100.0),
        TrailEvent("ce", "s1", (92.0, 1.0), (92.0, 2), 101.0),
    ]


def test_a_leg_gone_since_the_failed_batch_has_its_update_carried_by_its_crash() -> None:
    """The carrier is found by the update's session although its envelope was dropped."""
    queue = WriteQueue(1.0, 0.0)
    book = legs()
    queue.update("s1", "ce", update(current_price=100.0, stop_price=92.0))
    failed = queue.take(1.0, 0.0, book)
    del book["ce"]  # the session crashed meanwhile: its legs left memory
    crash = CrashOp(None, None, "s1", "missed_heartbeats", "late", 0.0, {})
    queue.add(crash)
    queue.requeue(failed, book)
    assert crash.final_updates == {"ce": {"current_price": 100.0, "stop_price": 92.0}}
    assert [e.after for e in crash.trail_events] == [(92.0, 1.0)]
    assert queue.pending_updates == 0


def test_a_leg_closed_by_its_protective_stop_since_the_failed_batch_carries_its_update() -> None:
    """The protective close took the leg out of memory: it writes the failed batch's update."""
    queue = WriteQueue(1.0, 0.0)
    book = legs()
    queue.update("s1", "ce", update(current_price=100.0, stop_price=92.0))
    failed = queue.take(1.0, 0.0, book)
    del book["ce"]  # its protective stop filled meanwhile
    close = ProtectCloseOp(None, None, "s1", "ce", 7, 91.5, 1, "OA-1", 0.0)
    queue.add(close)
    queue.requeue(failed, book)
    assert close.final_update == {"current_price": 100.0, "stop_price": 92.0}
    assert [e.after for e in close.trail_events] == [(92.0, 1.0)]
    assert queue.pending_updates == 0


def test_final_trail_takes_the_leaving_legs_backlog_first() -> None:
    queue = WriteQueue(1.0, 0.0)
    book = legs()
    queue.update("s1", "ce", update(stop_price=92.0))
    queue.update("s1", "pe", update(stop_price=108.0))
    queue.requeue(queue.take(1.0, 0.0, book), book)  # failed: its two events wait
    # ce exits: as the engine does, its waiting update is taken out, its exit's fields on top
    final = {**(queue.take_update("ce") or {}), "stop_price": 93.0}
    events = queue.final_trail({"ce": final}, {"ce"}, book)
    assert [(e.key, e.after[0]) for e in events] == [("ce", 92.0), ("ce", 93.0)]
    # pe's waiting event is still there for the next flush
    assert [e.key for e in queue.take(2.0, 0.0, book).trail_events] == ["pe"]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["ce", "pe"]),
            st.dictionaries(st.sampled_from(UPDATE_FIELDS), st.integers(0, 5), min_size=1),
            st.booleans(),  # does the batch taken after this update fail?
        ),
        max_size=30,
    )
)
def test_whatever_fails_the_last_value_of_each_field_is_written(
    steps: list[tuple[str, dict[str, int], bool]],
) -> None:
    queue = WriteQueue(0.0, 0.0)
    book = legs()
    expected: dict[str, dict[str, int]] = {}
    written: dict[str, dict[str, Any]] = {}
    for key, fields, fails in steps:
        queue.update("s1", key, update(key=key, **fields))
        expected.setdefault(key, {}).update(fields)
        batch = queue.take(1.0, 0.0, book)
        if fails:
            queue.requeue(batch, book)
        else:
            for leg, upd in batch.updates.items():
                written.setdefault(leg, {}).update(upd)
    for leg, upd in queue.take(1.0, 0.0, book).updates.items():
        written.setdefault(leg, {}).update(upd)
    assert written == expected
