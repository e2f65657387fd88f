"""The daemon's subscribe stream (positiond.watchers, PROTOCOL.md §4.14): a real daemon, real
strategies, raw watcher sockets."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from positiond.ctl.access import ask_health
from positiond.watchers import MAX_WATCHERS, SILENCE, WINDOW
from positiond_client import PositionPersistenceManager
from tests.helpers import UNIT, DaemonProcess, wait_for
from tests.pg import both_backends
from tests.test_daemon import Strategy
from tests.watch_support import RawWatcher, kinds


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield context
    context.destroy(linger=0)


def _manager(daemon: DaemonProcess, strategy: str) -> PositionPersistenceManager:
    return PositionPersistenceManager(strategy, endpoint=daemon.endpoint, ack_timeout=5.0)


def _counter(daemon: DaemonProcess, name: str) -> int:
    health = ask_health(daemon.endpoint, 2 * UNIT)
    assert health is not None
    return int(health["counters"][name])


@both_backends
def test_snapshot_first_then_every_committed_change(
    daemon: DaemonProcess, ctx: zmq.Context[zmq.Socket[bytes]], strategies: list[Strategy]
) -> None:
    pm = _manager(daemon, "alpha")
    with pm.session():
        leg = pm.save_position_entry(
            symbol="NIFTY28NOV2524000CE", leg_type="CE", entry_price=100.0, stop_price=90.0,
            quantity=75,
        )  # fmt: skip
        watcher, only_alpha = RawWatcher(ctx, daemon.endpoint), RawWatcher(ctx, daemon.endpoint)
        ack = watcher.subscribe()
        assert ack["type"] == "ack"
        snapshot = ack["snapshot"]
        (row,) = [r for r in snapshot["legs"] if r["key"] == leg.key]
        assert (row["status"], row["stop_price"], row["quantity"]) == ("ACTIVE", 90.0, 75)
        assert [(s["strategy"], s["status"]) for s in snapshot["sessions"]] == [
            ("alpha", "RUNNING")
        ]
        assert [e["event"] for e in snapshot["events"]] == ["SESSION_START", "ENTRY"]
        assert only_alpha.subscribe(strategy="alpha")["snapshot"]["legs"][0]["key"] == leg.key

        pm.queue_position_update(leg, current_price=106.0, highest_price=106.0, stop_price=95.0)
        watcher.until(lambda ev: bool(kinds(ev, "trail", key=leg.key)))
        (trail,) = kinds(watcher.events, "trail", key=leg.key)
        assert trail["stop_price"] == [90.0, 95.0] and trail["strategy"] == "alpha"
        watcher.until(lambda ev: bool(kinds(ev, "update", key=leg.key, stop_price=95.0)))

        # another strategy, killed -9: its session, its entries, then its crash
        other = Strategy(daemon.endpoint, "hold")
        strategies.append(other)
        info = other.info()
        watcher.until(lambda ev: len(kinds(ev, "entry", strategy="expiry_blast")) >= 2)
        (started,) = kinds(watcher.events, "session", strategy="expiry_blast")
        assert started["id"] == info["session_id"] and started["status"] == "RUNNING"
        other.proc.kill()
        watcher.until(lambda ev: bool(kinds(ev, "crash", session=started["session"])))
        (crash,) = kinds(watcher.events, "crash", session=started["session"])
        assert crash["source"] == "DISCONNECT"

        pm.save_position_exit(leg, exit_price=95.0, exit_reason="STOP_HIT")
        watcher.until(lambda ev: bool(kinds(ev, "exit", key=leg.key)))
    watcher.until(lambda ev: bool(kinds(ev, "end", strategy="alpha")))
    assert watcher.frames[0]["type"] in ("changes", "health")
    numbers = [f["n"] for f in watcher.frames if f["type"] == "changes"]
    assert numbers == list(range(1, len(numbers) + 1))  # none lost, none repeated

    # the filtered watcher saw alpha's changes and none of the other strategy's
    only_alpha.until(lambda ev: bool(kinds(ev, "end", strategy="alpha")))
    assert kinds(only_alpha.events, "exit", key=leg.key)
    assert not [e for e in only_alpha.events if e.get("strategy") == "expiry_blast"]
    watcher.close()
    only_alpha.close()


def test_a_stuck_watcher_is_dropped_with_a_bounded_queue_and_acks_stay_fast(
    daemon: DaemonProcess, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    pm = _manager(daemon, "streamer")
    with pm.session():
        legs = [
            pm.save_position_entry(
                symbol=f"SYM{i}", leg_type="CE", entry_price=100.0, stop_price=90.0, quantity=1
            )
            for i in range(20)
        ]
        stop = threading.Event()

        def stream() -> None:  # a strategy's main loop: every leg's stop moves all the time
            price = 100.0
            while not stop.is_set():
                price += 0.01
                for leg in legs:
                    pm.queue_position_update(leg, current_price=price, stop_price=price - 10)
                time.sleep(0.005)

        def sync_latencies(count: int) -> list[float]:
            out = []
            for _ in range(count):
                began = time.perf_counter()
                assert pm.sync(timeout=5.0)
                out.append(time.perf_counter() - began)
            return out

        streamer = threading.Thread(target=stream, daemon=True)
        streamer.start()
        try:
            baseline = sync_latencies(30)
            stuck = RawWatcher(ctx, daemon.endpoint)
            assert len(stuck.subscribe()["snapshot"]["legs"]) == 20  # then never reads again
            during: list[float] = []
            deadline = time.monotonic() + (WINDOW / 10 + SILENCE + 10) * UNIT
            while _counter(daemon, "watchers_dropped") == 0:
                assert time.monotonic() < deadline, "the stuck watcher was never dropped"
                during += sync_latencies(10)
        finally:
            stop.set()
            streamer.join()
    # Never slowed: the acks kept their pace while the watcher was stuck.
    p50, p99 = statistics.median(during), sorted(during)[int(len(during) * 0.99) - 1]
    assert p99 < 0.5 * UNIT, (p50, p99, statistics.median(baseline))
    # Bounded: what waited for it is at most the window of changes and the health beats.
    frames = []
    while (msg := stuck.recv(0.5)) is not None:
        frames.append(msg)
    assert frames[-1]["type"] == "dropped" and "not read" in frames[-1]["reason"]
    changes = [f for f in frames if f["type"] == "changes"]
    assert WINDOW < len(changes) <= WINDOW + 1
    assert len(frames) <= WINDOW + 1 + SILENCE + 2
    # It is told when it reports again, and can subscribe again.
    stuck.report(changes[-1]["n"])
    error = stuck.recv()
    assert error is not None and error["code"] == "NOT_WATCHING"
    assert stuck.subscribe()["type"] == "ack"
    stuck.close()


def test_many_watchers_each_get_everything_and_one_too_many_is_refused(
    daemon: DaemonProcess, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    watchers = [RawWatcher(ctx, daemon.endpoint) for _ in range(MAX_WATCHERS)]
    for watcher in watchers:
        assert watcher.subscribe()["type"] == "ack"
    extra = RawWatcher(ctx, daemon.endpoint)
    refused = extra.subscribe()
    assert (refused["type"], refused["code"]) == ("error", "BUSY")
    pm = _manager(daemon, "many")
    with pm.session():
        leg = pm.save_position_entry(
            symbol="X", leg_type="CE", entry_price=10.0, stop_price=9.0, quantity=1
        )
        pm.queue_position_update(leg, current_price=11.0, stop_price=10.0)
        pm.save_position_exit(leg, exit_price=10.0, exit_reason="STOP_HIT")
    for watcher in watchers:
        events = watcher.until(lambda ev: bool(kinds(ev, "end", strategy="many")))
        assert [e["event"] for e in events if e["event"] != "update"] == [
            "session", "entry", "trail", "exit", "end",
        ]  # fmt: skip
        watcher.close()
    # a watcher is no session: none was declared crashed, none is counted as one
    health = ask_health(daemon.endpoint, 2 * UNIT)
    assert health is not None and health["sessions"] == 0
    wait_for(lambda: _counter(daemon, "watchers_dropped") >= MAX_WATCHERS, 10, "watchers gone")
    assert extra.subscribe()["type"] == "ack"  # room again once they are gone
    extra.close()


def test_watch_is_refused_by_a_validation_error_like_any_message(
    daemon: DaemonProcess, ctx: zmq.Context[zmq.Socket[bytes]], workdir: Path
) -> None:
    watcher = RawWatcher(ctx, daemon.endpoint)
    watcher.sock.send(b'{"v":1,"type":"watch","seq":1,"session":"s","token":"ab"}')
    reply = watcher.recv()
    assert reply is not None and (reply["code"], reply["seq"]) == ("BAD_FIELD", 1)
    watcher.close()
