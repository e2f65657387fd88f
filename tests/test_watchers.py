"""The watchers' bounds as properties (positiond.watchers.WatchHub, pure: time and the send are
parameters; the send is the socket's edge), and a bug in publishing costing only the watchers
(an in-process daemon)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest
import zmq
import zmq.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from positiond.config import Config
from positiond.ctl.board import Board
from positiond.ops import Batch, EntryOp, ExitOp, Result, StartOp, WatchOp
from positiond.server import Daemon
from positiond.watchers import KEEPALIVE, SILENCE, WatchHub
from tests import conftest
from tests.helpers import UNIT

PROPERTY = settings(
    derandomize=True, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
KEYS = [f"leg-{i}" for i in range(6)]
WATCHERS = [b"w1", b"w2", b"w3"]

# One step: a batch of updates (leg, stop) and entries; a tick after dt seconds; a watcher
# reporting what it read (or not: a stuck one); the socket refusing sends for a while.
updates = st.lists(st.tuples(st.sampled_from(KEYS), st.integers(1, 999)), max_size=8)
step = st.one_of(
    st.tuples(st.just("batch"), updates, st.integers(0, 3)),
    st.tuples(st.just("tick"), st.floats(0.0, 3.0)),
    st.tuples(st.just("report"), st.sampled_from(WATCHERS)),
    st.tuples(st.just("full"), st.booleans()),
)


class Edge:
    """What the socket received, per watcher; ``full`` makes every send fail (EAGAIN)."""

    def __init__(self) -> None:
        self.frames: dict[bytes, list[dict[str, Any]]] = {}
        self.full = False

    def send(self, rid: bytes, payload: bytes) -> bool:
        if self.full:
            return False
        self.frames.setdefault(rid, []).append(orjson.loads(payload))
        return True


def _subscribe(hub: WatchHub, rid: bytes, now: float) -> None:
    op = WatchOp(rid, 1, None, "test")
    hub.publish(Batch(ops=[op], time=1.0), [Result(True, {"snapshot": {}})], now)


@settings(PROPERTY, max_examples=conftest.SOAK.count(300))
@given(st.lists(step, max_size=60))
def test_each_watcher_is_bounded_and_gets_consecutive_frames_with_the_newest_values(
    steps: list[tuple[Any, ...]],
) -> None:
    edge = Edge()
    now = [0.0]
    hub = WatchHub(edge.send, window=5, max_pending=12, monotonic=lambda: now[0])
    for rid in WATCHERS:
        _subscribe(hub, rid, now[0])
    newest: dict[str, int] = {}
    entries = 0
    for action in steps:
        if action[0] == "batch":
            _, updates, n_entries = action
            ops = [EntryOp(None, None, "s", f"e{entries + i}", {}, 1.0) for i in range(n_entries)]
            entries += n_entries
            batch = Batch(ops=list(ops), time=1.0)
            for key, stop in updates:
                batch.updates[key] = {"stop_price": float(stop)}
                newest[key] = stop
            hub.publish(batch, [Result(True, {"status": "ACTIVE"}) for _ in ops], now[0])
        elif action[0] == "tick":
            now[0] += action[1]
            hub.tick(now[0], lambda rid: True, lambda: {"healthy": True})
            for watcher in hub.watchers.values():  # the bounds hold after every tick
                assert watcher.sent - watcher.read <= hub.window
                assert len(watcher.events) + len(watcher.legs) <= hub.max_pending
                assert now[0] - watcher.heard <= SILENCE
        elif action[0] == "report" and action[1] in hub.watchers:
            hub.progress(action[1], hub.watchers[action[1]].sent)
        elif action[0] == "full":
            edge.full = action[1]
    # what still watches gets the rest: then it holds each leg's newest stop, frames in order
    edge.full = False
    for _ in range(3):
        now[0] += KEEPALIVE
        for rid in list(hub.watchers):
            hub.progress(rid, hub.watchers[rid].sent)
        hub.tick(now[0], lambda rid: True, lambda: {"healthy": True})
    for rid in hub.watchers:
        frames = edge.frames.get(rid, [])
        changes = [f for f in frames if f["type"] == "changes"]
        assert [f["n"] for f in changes] == list(range(1, len(changes) + 1))
        assert all(f["type"] != "dropped" for f in frames)
        seen: dict[str, float] = {}
        for frame in changes:
            for event in frame["events"]:
                if event["event"] == "update":
                    seen[event["key"]] = event["stop_price"]
        assert seen == {key: float(stop) for key, stop in newest.items()}
        # at most one update per leg in a frame: coalesced
        for frame in changes:
            keys = [e["key"] for e in frame["events"] if e["event"] == "update"]
            assert len(keys) == len(set(keys))
    # and a dropped one was told, when its queue could take it
    for rid in WATCHERS:
        if rid not in hub.watchers:
            assert hub.progress(rid, 0) is not None  # NOT_WATCHING


def test_a_stuck_watcher_is_dropped_after_the_window_or_the_silence() -> None:
    edge = Edge()
    now = [0.0]
    hub = WatchHub(edge.send, window=3, monotonic=lambda: now[0])
    _subscribe(hub, b"stuck", 0.0)
    _subscribe(hub, b"quiet", 0.0)
    for i in range(5):  # changes every tick: "stuck" never reports, "quiet" does
        batch = Batch(time=1.0)
        batch.updates["k"] = {"stop_price": float(i)}
        hub.publish(batch, [], now[0])
        now[0] += 0.2
        hub.progress(b"quiet", hub.watchers[b"quiet"].sent)
        hub.tick(now[0], lambda rid: True, lambda: {})
    assert b"stuck" not in hub.watchers and b"quiet" in hub.watchers
    assert edge.frames[b"stuck"][-1]["type"] == "dropped"
    now[0] += SILENCE + 0.1  # nothing changes, nothing is reported: silence drops it too
    hub.tick(now[0], lambda rid: True, lambda: {})
    assert not hub.watchers


async def test_a_bug_in_publishing_costs_the_watchers_never_an_ack(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = Config(db=workdir / "p.db", endpoint=f"ipc://{workdir}/p.sock")
    daemon = Daemon(config)
    await daemon.start()
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(config.endpoint)

    async def ask(msg: dict[str, Any]) -> dict[str, Any]:
        await sock.send(orjson.dumps({"v": 1, **msg}))
        while True:
            raw = await asyncio.wait_for(sock.recv(), 5 * UNIT)
            reply: dict[str, Any] = orjson.loads(raw)
            if reply["type"] in ("ack", "error"):
                return reply

    try:
        assert (await ask({"type": "watch", "seq": 1}))["type"] == "ack"
        assert daemon.watchers

        def broken(*args: Any) -> None:
            raise RuntimeError("a bug")

        monkeypatch.setattr(daemon.watchers, "publish", broken)
        start = {"type": "start", "seq": 2, "session": "s-1", "strategy": "x"}
        reply = await ask(start)
        assert (reply["type"], reply["seq"], reply["status"]) == ("ack", 2, "RUNNING")
        assert not daemon.watchers  # it cost them
        reply = await ask({"type": "watching", "n": 0})
        assert reply["code"] == "NOT_WATCHING"
    finally:
        sock.close(linger=0)
        ctx.term()
        daemon.request_stop()
        await daemon.stop()


def test_a_revival_reaches_the_board_with_its_legs_active_again() -> None:
    edge = Edge()
    hub = WatchHub(edge.send, monotonic=lambda: 0.0)
    _subscribe(hub, b"w", 0.0)
    crashed_at = {"crash_timestamp": "2025-11-28T10:00:00.000Z", "crash_reason": "missed"}
    start = StartOp(None, 1, "s-1", "alpha", "box", 42, None, 1.0)
    revived = Result(True, {"session_id": 7, "revived": {**crashed_at, "legs": ["leg-1"]}})
    hub.publish(Batch(ops=[start], time=1.0), [revived], 0.0)
    hub.tick(0.5, lambda rid: True, lambda: {})
    (frame,) = [f for f in edge.frames[b"w"] if f["type"] == "changes"]
    board = Board()
    board.load({"sessions": [{"session": "s-1", "id": 7, "strategy": "alpha",
                              "status": "CRASHED"}],
                "legs": [{"key": "leg-1", "session": "s-1", "status": "CRASHED"}]})  # fmt: skip
    board.apply(frame)
    assert board.sessions["s-1"]["status"] == "RUNNING"
    assert board.legs["leg-1"]["status"] == "ACTIVE"
    assert not board.attention()


def test_a_filtered_watcher_gets_nothing_of_sessions_from_before_it_of_other_strategies() -> None:
    edge = Edge()
    hub = WatchHub(edge.send, monotonic=lambda: 0.0)
    snapshot = {"snapshot": {"sessions": [{"session": "a-1", "strategy": "alpha"}]}}
    hub.publish(Batch(ops=[WatchOp(b"w", 1, None, "t", "alpha")], time=1.0),
                [Result(True, snapshot)], 0.0)  # fmt: skip
    # "b-1" (strategy beta) was live before: this watcher's snapshot did not name it
    other = ExitOp(None, 2, "b-1", "leg-b", 9.0, "STOP_HIT", 1.0)
    mine = EntryOp(None, 3, "a-1", "leg-a", {"symbol": "A"}, 1.0)
    batch = Batch(ops=[other, mine], time=1.0)
    batch.updates = {"leg-b2": {"stop_price": 1.0}, "leg-a": {"stop_price": 2.0}}
    batch.update_owners = {"leg-b2": "b-1", "leg-a": "a-1"}
    batch.heartbeats = {"b-1": 1.0, "a-1": 1.0}
    hub.publish(batch, [Result(True, {}), Result(True, {"status": "ACTIVE"})], 0.0)
    hub.tick(0.5, lambda rid: True, lambda: {})
    (frame,) = [f for f in edge.frames[b"w"] if f["type"] == "changes"]
    assert {(e["event"], e["key"]) for e in frame["events"]} == {
        ("entry", "leg-a"), ("update", "leg-a"),
    }  # fmt: skip
    hub.tick(1.5, lambda rid: True, lambda: {})
    assert edge.frames[b"w"][-1]["seen"] == {"a-1": "1970-01-01T00:00:01.000Z"}
