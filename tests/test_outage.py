"""A missing, paused or slow daemon never stalls a strategy nor grows its memory.

Real daemon processes (absent, killed, SIGSTOPped), the client in this process: durable calls
return at once while the daemon is known unreachable (positiond_client.link) and say so, the
outage is logged once and then every warn_every seconds, and the client's memory stays flat
while a paused daemon takes nothing.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
import zmq.auth

from positiond_client import Delivery, Leg, PositionPersistenceManager, UnavailableError
from tests.client_support import ClientProc
from tests.helpers import UNIT, DaemonProcess, rows, session_status, wait_for

# A call that returns "at once" (generous for a loaded 2-core machine; 2 s before the fix).
AT_ONCE = 0.1 * UNIT


def timed(call: object, *args: object, **kwargs: object) -> tuple[object, float]:
    started = time.perf_counter()
    result = call(*args, **kwargs)  # type: ignore[operator]
    return result, time.perf_counter() - started


@pytest.fixture
def absent(workdir: Path) -> Iterator[DaemonProcess]:
    """A daemon not started yet (the test starts it)."""
    daemon = DaemonProcess(workdir, "--flush-interval", "0.05", heartbeat_timeout=1.0)
    yield daemon
    if daemon.proc is not None and daemon.proc.poll() is None:
        daemon.stop()


def test_durable_calls_return_at_once_while_no_daemon_is_there_and_deliver_later(
    absent: DaemonProcess,
) -> None:
    pm = PositionPersistenceManager("outage", endpoint=absent.endpoint, ack_timeout=2.0)
    try:
        # Known unreachable once the first connect attempt failed (no socket file).
        wait_for(lambda: pm.status().link == "down", 5, "the failed connect attempt")
        assert not pm.connected and pm.status().unreachable
        sid, took = timed(pm.start_session)
        assert sid is None and took < AT_ONCE
        legs: list[Leg] = []
        for i in range(2):
            leg, took = timed(
                pm.save_position_entry, symbol="X", entry_price=10.0 + i, quantity=1,
                position_key=f"k{i}",
            )  # fmt: skip
            assert isinstance(leg, Leg)
            assert took < AT_ONCE and leg.delivery is Delivery.QUEUED and leg.position_id is None
            legs.append(leg)
        done, took = timed(pm.save_position_exit, legs[0], exit_price=11.0)
        assert done is Delivery.QUEUED and not done and took < AT_ONCE
        status = pm.status()
        assert status.unacknowledged == 4 and status.unreachable_for is not None
        absent.start()
        assert pm.sync(5)  # sync waits its whole timeout: the way to wait for the daemon
        assert pm.connected and pm.status().link == "up"
        assert [leg.delivery for leg in legs] == [Delivery.STORED, Delivery.STORED]
        assert all(leg.position_id is not None for leg in legs)
        stored = rows(absent.db, "SELECT position_key, status FROM strategy_positions")
        assert sorted((r["position_key"], r["status"]) for r in stored) == [
            ("k0", "CLOSED"),
            ("k1", "ACTIVE"),
        ]
        assert pm.save_position_exit(legs[1], exit_price=12.0) is Delivery.STORED
        assert pm.end_session() is Delivery.STORED
    finally:
        pm.close()


def test_closing_while_the_daemon_is_away_does_not_wait_for_acks(
    absent: DaemonProcess, caplog: pytest.LogCaptureFixture
) -> None:
    pm = PositionPersistenceManager("outage", endpoint=absent.endpoint, ack_timeout=2.0)
    wait_for(lambda: pm.status().link == "down", 5, "the failed connect attempt")
    pm.start_session()
    pm.save_position_entry(symbol="X", entry_price=1.0, quantity=1)
    _, took = timed(pm.close, 5.0)
    assert took < 5 * AT_ONCE  # (the I/O thread's join, not the 5 s given to the acks)
    assert any("2 durable message(s) not acknowledged" in r.getMessage() for r in caplog.records)


def test_a_daemon_that_dies_mid_session_costs_no_wait_and_reads_fail_at_once(
    daemon: DaemonProcess,
) -> None:
    pm = PositionPersistenceManager("outage", endpoint=daemon.endpoint, ack_timeout=2.0)
    try:
        sid = pm.start_session()
        assert sid is not None
        leg = pm.save_position_entry(symbol="X", entry_price=10.0, quantity=1)
        assert leg.delivery is Delivery.STORED
        daemon.kill()
        wait_for(lambda: not pm.connected, 5, "the lost connection")
        done, took = timed(pm.save_position_exit, leg, exit_price=9.0)
        assert done is Delivery.QUEUED and took < AT_ONCE
        started = time.perf_counter()
        with pytest.raises(UnavailableError, match="unreachable"):
            pm.get_crashed_positions()
        assert time.perf_counter() - started < AT_ONCE
        daemon.start()
        assert pm.sync(5)
        assert session_status(daemon.db, sid) == "RUNNING"
        status = rows(daemon.db, "SELECT status FROM strategy_positions")[0]["status"]
        assert status == "CLOSED"
    finally:
        pm.close()


def test_a_fresh_manager_is_not_declared_away_before_its_first_connect(
    daemon: DaemonProcess,
) -> None:
    # The first durable call comes right after the constructor, before any handshake: it
    # waits for its ack (the connect attempt gets its chance) and is stored.
    for i in range(5):
        pm = PositionPersistenceManager(f"fresh{i}", endpoint=daemon.endpoint, ack_timeout=2.0)
        try:
            assert pm.status().link in ("connecting", "up")
            assert pm.start_session() is not None
            leg = pm.save_position_entry(symbol="X", entry_price=1.0, quantity=1)
            assert leg.delivery is Delivery.STORED
        finally:
            pm.close()


def test_a_stale_socket_file_gets_the_grace_then_calls_return_at_once(workdir: Path) -> None:
    # A socket file nobody accepts on (a daemon starting, or killed): not "away" at once.
    path = workdir / "stale.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    pm = PositionPersistenceManager("stale", endpoint=f"ipc://{path}", ack_timeout=0.3)
    try:
        sid, took = timed(pm.start_session)
        assert sid is None and took >= 0.25  # the grace: the connect attempt had its chance
        assert pm.status().unreachable and pm.status().link == "connecting"
        leg, took = timed(pm.save_position_entry, symbol="X", entry_price=1.0, quantity=1)
        assert isinstance(leg, Leg) and leg.delivery is Delivery.QUEUED and took < AT_ONCE
    finally:
        pm.close(0)


def test_the_outage_is_logged_when_it_starts_and_every_warn_every_not_per_call(
    absent: DaemonProcess, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="positiond_client")
    pm = PositionPersistenceManager(
        "outage", endpoint=absent.endpoint, ack_timeout=2.0, warn_every=0.5
    )
    try:
        wait_for(lambda: pm.status().link == "down", 5, "the failed connect attempt")
        pm.start_session()
        started = time.monotonic()
        calls = 0
        while time.monotonic() - started < 1.6:  # a workload of 1.6 s, not a wait
            leg = pm.save_position_entry(symbol="X", entry_price=1.0, quantity=1)
            pm.save_position_exit(leg, exit_price=1.0)
            calls += 2
            time.sleep(0.01)
        absent.start()
        assert pm.sync(5)
        wait_for(
            lambda: any("answers again" in r.getMessage() for r in caplog.records), 5, "back"
        )
    finally:
        pm.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    away = [w for w in warnings if "unreachable" in w]
    # One when it started, then one every 0.5 s over ~1.6 s: not one per call.
    assert 2 <= len(away) <= 6, away
    assert calls > 50
    assert len(warnings) == len(away), warnings


def test_a_paused_daemon_costs_one_ack_timeout_then_calls_return_at_once(
    daemon: DaemonProcess,
) -> None:
    pm = PositionPersistenceManager("paused", endpoint=daemon.endpoint, ack_timeout=0.5)
    assert daemon.proc is not None
    try:
        pm.start_session()
        leg = pm.save_position_entry(symbol="X", entry_price=10.0, quantity=1)
        daemon.proc.send_signal(signal.SIGSTOP)
        try:
            # The connection stays up (the process exists): the first call finds out.
            first, took = timed(pm.save_position_entry, symbol="Y", entry_price=1.0, quantity=1)
            assert isinstance(first, Leg) and first.delivery is Delivery.UNANSWERED
            assert took >= 0.5
            assert pm.status().link == "unresponsive" and not pm.connected
            done, took = timed(pm.save_position_exit, leg, exit_price=9.0)
            assert done is Delivery.QUEUED and took < AT_ONCE
        finally:
            daemon.proc.send_signal(signal.SIGCONT)
        assert pm.sync(5)
        assert pm.connected and first.delivery is Delivery.STORED
    finally:
        pm.close()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def flood_a_paused_daemon(daemon: DaemonProcess, seconds: float) -> dict[str, float]:
    """Updates as fast as one thread can send them while the daemon is SIGSTOPped."""
    pm = PositionPersistenceManager("flood", endpoint=daemon.endpoint, ack_timeout=0.5)
    assert daemon.proc is not None
    try:
        pm.start_session()
        legs = [
            pm.save_position_entry(symbol=f"S{i}", entry_price=100.0, quantity=1, stop_price=90.0)
            for i in range(10)
        ]
        assert pm.sync(5)
        daemon.proc.send_signal(signal.SIGSTOP)
        try:
            rss0, peak_queue, peak_bytes, calls, worst = rss_bytes(), 0, 0, 0, 0.0
            perf = time.perf_counter
            end = time.monotonic() + seconds  # a workload length, not a wait
            while time.monotonic() < end:
                for leg in legs:
                    t0 = perf()
                    pm.queue_position_update(
                        leg, current_price=100.0 + calls * 1e-4, stop_price=90.0 + calls * 1e-5,
                        state={"n": calls},
                    )  # fmt: skip
                    worst = max(worst, perf() - t0)
                    calls += 1
                if calls % 2000 == 0:
                    status = pm.status()
                    peak_queue = max(peak_queue, status.send_queue)
                    peak_bytes = max(peak_bytes, status.send_queue_bytes)
                    assert status.pending_updates <= len(legs)
            growth = rss_bytes() - rss0
        finally:
            daemon.proc.send_signal(signal.SIGCONT)
        # Nothing was lost: the newest state of every leg is stored once the daemon runs.
        assert pm.sync(10)
        stored = rows(daemon.db, "SELECT state FROM strategy_positions ORDER BY position_id")
        assert json.loads(stored[-1]["state"]) == {"n": calls - 1}
        return {
            "calls": calls,
            "peak_queue": peak_queue,
            "peak_bytes": peak_bytes,
            "rss_growth": growth,
            "worst_call": worst,
        }
    finally:
        pm.close()


def check_flat(figures: dict[str, float]) -> None:
    assert figures["calls"] > 10_000, figures
    # What waits in the client: at most one state per leg and the durable messages.
    assert figures["peak_queue"] <= 12, figures
    assert figures["peak_bytes"] <= 64 * 1024, figures
    assert figures["rss_growth"] < 16 * 2**20, figures


def test_client_memory_stays_flat_while_the_daemon_is_paused(daemon: DaemonProcess) -> None:
    check_flat(flood_a_paused_daemon(daemon, 3.0))


@pytest.mark.soak
def test_client_memory_stays_flat_over_a_minute_of_a_paused_daemon(
    daemon: DaemonProcess,
) -> None:
    check_flat(flood_a_paused_daemon(daemon, 60.0))


def test_a_revival_is_logged_as_a_warning_by_the_client(
    daemon: DaemonProcess, workdir: Path
) -> None:
    proc = ClientProc(workdir, daemon.endpoint, "revive")
    try:
        sid = int(proc.json_until("session_id")["session_id"])
        proc.proc.send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: session_status(daemon.db, sid) == "CRASHED", 5, "CRASHED")
        finally:
            proc.proc.send_signal(signal.SIGCONT)
        line = proc.json_until("log")
        while "declared this session CRASHED" not in line["msg"]:
            line = proc.json_until("log")
        assert line["log"] == "WARNING", line
        wait_for(lambda: session_status(daemon.db, sid) == "RUNNING", 5, "REVIVED")
    finally:
        proc.close()


def test_on_tcp_a_frozen_daemon_is_known_unreachable_by_heartbeats_before_any_call(
    workdir: Path,
) -> None:
    keys = workdir / "keys"
    keys.mkdir()
    for name in ("server", "client"):
        zmq.auth.create_certificates(keys, name)
    allowed = workdir / "allowed"
    allowed.mkdir()
    (allowed / "client.key").write_bytes((keys / "client.key").read_bytes())
    daemon = DaemonProcess(
        workdir, "--curve-secret-key", str(keys / "server.key_secret"),
        "--curve-clients", str(allowed), heartbeat_timeout=30.0,
    )  # fmt: skip
    daemon.endpoint = "tcp://127.0.0.1:*"
    daemon.args[daemon.args.index("--endpoint") + 1] = daemon.endpoint
    daemon.start()
    assert daemon.proc is not None
    line = next(x for x in daemon.output().splitlines() if "positiond ready" in x)
    endpoint = line.rsplit("endpoint ", 1)[1].strip()
    pm = PositionPersistenceManager(
        "tcp_strategy", endpoint=endpoint, ack_timeout=0.5,
        curve_server_key=keys / "server.key", curve_client_cert=keys / "client.key_secret",
    )  # fmt: skip
    try:
        assert pm.start_session() is not None
        leg = pm.save_position_entry(symbol="X", entry_price=1.0, quantity=1)
        daemon.proc.send_signal(signal.SIGSTOP)
        try:
            # No call is waiting: ZeroMQ's PING/PONG finds the daemon silent and drops it.
            wait_for(lambda: pm.status().link == "down", 5, "the heartbeat timeout")
            done, took = timed(pm.save_position_exit, leg, exit_price=1.0)
            assert done is Delivery.QUEUED and took < AT_ONCE
        finally:
            daemon.proc.send_signal(signal.SIGCONT)
        assert pm.sync(10)
        assert rows(daemon.db, "SELECT status FROM strategy_positions")[0]["status"] == "CLOSED"
    finally:
        pm.close()
        daemon.stop()
