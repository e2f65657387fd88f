"""End to end: real daemon process, real strategy processes, real sockets and SQLite (the key
tests also on PostgreSQL: ``@both_backends``)."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq
import zmq.auth

from positiond_client import PositionPersistenceManager
from positiond_client.protocol import encode
from tests.helpers import UNIT, DaemonProcess, rows, session_status, wait_for
from tests.pg import both_backends

STRATEGY = Path(__file__).with_name("strategy_proc.py")

# The seed's crash identification query, verbatim (seed/position_persistence_architecture.txt).
SEED_CRASH_QUERY = """
SELECT 
    sp.position_id,
    sp.symbol,
    sp.leg_type,
    sp.entry_price,
    sp.entry_time,
    sp.stop_price,
    sp.last_trail_level,
    ss.crash_timestamp,
    ss.crash_reason
FROM strategy_positions sp
JOIN strategy_sessions ss ON sp.session_id = ss.id
WHERE sp.was_crashed = true
  AND sp.status = 'CRASHED'
  AND ss.strategy_name = 'expiry_blast'
ORDER BY ss.crash_timestamp DESC;
"""

# The seed's recovery query, verbatim.
SEED_RECOVERY_QUERY = """
SELECT * FROM strategy_positions 
           WHERE status = 'CRASHED' AND was_crashed = true
"""


class Strategy:
    """A strategy subprocess (tests/strategy_proc.py)."""

    def __init__(self, endpoint: str, mode: str, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(STRATEGY.parent.parent)}
        self.proc = subprocess.Popen(
            [sys.executable, str(STRATEGY), endpoint, mode, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        self._lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def line(self, timeout: float = 10) -> str:
        try:
            return self._lines.get(timeout=timeout * UNIT)
        except queue.Empty:
            raise AssertionError("strategy printed nothing in time") from None

    def _read(self) -> None:
        # A thread, not select() on the pipe: lines already in the reader's buffer count too.
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)

    def info(self) -> dict[str, object]:
        result: dict[str, object] = json.loads(self.line())
        return result

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(5)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


@both_backends
def test_kill_9_marks_crashed_and_seed_query_lists_open_legs(
    daemon: DaemonProcess, strategies: list[Strategy]
) -> None:
    strategy = Strategy(daemon.endpoint, "hold")
    strategies.append(strategy)
    info = strategy.info()
    killed_at = time.monotonic()
    strategy.proc.send_signal(signal.SIGKILL)
    wait_for(lambda: session_status(daemon.db, info["session_id"]) == "CRASHED", 5, "CRASHED")  # type: ignore[arg-type]
    latency = time.monotonic() - killed_at
    # Process death is seen on the connection, well before the 1 s heartbeat timeout.
    assert latency < 0.5 * UNIT + 0.5, latency

    found = rows(daemon.db, SEED_CRASH_QUERY)
    by_symbol = {r["symbol"]: r for r in found}
    assert sorted(by_symbol) == ["NIFTY28NOV2524000CE", "NIFTY28NOV2524000PE"]
    ce, pe = by_symbol["NIFTY28NOV2524000CE"], by_symbol["NIFTY28NOV2524000PE"]
    assert (ce["leg_type"], ce["entry_price"], ce["stop_price"], ce["last_trail_level"]) == (
        "CE",
        100.0,
        104.0,
        2.0,
    )
    assert (pe["leg_type"], pe["entry_price"], pe["stop_price"], pe["last_trail_level"]) == (
        "PE",
        80.0,
        79.0,
        1.0,
    )
    assert ce["crash_reason"].startswith("process exited")
    assert ce["crash_timestamp"] and ce["entry_time"]
    # The seed's recovery query finds the same legs; the leg closed before the crash is not there.
    assert {r["position_key"] for r in rows(daemon.db, SEED_RECOVERY_QUERY)} == {"ce-1", "pe-1"}
    state = rows(daemon.db, "SELECT state FROM strategy_positions WHERE position_key='pe-1'")
    assert json.loads(state[0]["state"]) == {"atm": 24000}
    events = rows(
        daemon.db,
        "SELECT event_type, position_id FROM position_events WHERE event_type = 'CRASH'",
    )
    assert len(events) == 3  # one for the session, one per open leg


@both_backends
def test_handle_crash_records_the_exception(
    daemon: DaemonProcess, strategies: list[Strategy]
) -> None:
    strategy = Strategy(daemon.endpoint, "raise")
    strategies.append(strategy)
    info = strategy.info()
    assert strategy.proc.wait(10 * UNIT) == 3
    session = rows(daemon.db, "SELECT * FROM strategy_sessions WHERE id = ?", (info["session_id"],))
    assert session[0]["status"] == "CRASHED"
    assert session[0]["crash_source"] == "CLIENT"
    assert session[0]["crash_reason"] == "KeyError: 'missing_key'"
    payload = rows(
        daemon.db,
        "SELECT payload FROM position_events WHERE event_type = 'CRASH' AND position_id IS NULL",
    )
    assert "missing_key" in json.loads(payload[0]["payload"])["traceback"]
    legs = rows(daemon.db, "SELECT status, was_crashed FROM strategy_positions")
    assert [(r["status"], r["was_crashed"]) for r in legs] == [("CRASHED", 1)]


@both_backends
def test_end_session_is_never_crashed_afterwards(daemon: DaemonProcess) -> None:
    pm = PositionPersistenceManager("expiry_blast", endpoint=daemon.endpoint, ack_timeout=5)
    sid = pm.start_session()
    leg = pm.save_position_entry(symbol="X", entry_price=10.0, quantity=1, stop_price=9.0)
    assert pm.save_position_exit(leg, exit_price=11.0, exit_reason="TARGET")
    assert pm.end_session()
    pm.close()  # the connection drops like a process exit would
    # Beyond the 1 s heartbeat timeout: a crashed verdict would have been written by now.
    probe = PositionPersistenceManager("probe", endpoint=daemon.endpoint, ack_timeout=5)
    probe.start_session()
    deadline = time.monotonic() + 1.5 * UNIT
    while time.monotonic() < deadline:
        assert session_status(daemon.db, sid) == "COMPLETED"  # type: ignore[arg-type]
        probe.sync(1)
    probe.end_session()
    probe.close()
    events = rows(daemon.db, "SELECT event_type FROM position_events WHERE session_id = ?", (sid,))
    assert [r["event_type"] for r in events] == ["SESSION_START", "ENTRY", "EXIT", "SESSION_END"]


def test_cpu_busy_strategy_stays_alive(daemon: DaemonProcess, strategies: list[Strategy]) -> None:
    # Pure-Python work for 2.5 heartbeat timeouts: the client's I/O thread keeps heartbeating.
    strategy = Strategy(daemon.endpoint, "busy", str(2.5 * UNIT))
    strategies.append(strategy)
    info = strategy.info()
    assert strategy.line(15).strip() == "DONE"
    assert session_status(daemon.db, info["session_id"]) == "COMPLETED"  # type: ignore[arg-type]
    assert "missed heartbeats" not in daemon.output()


def test_sigstop_is_declared_crashed_after_the_timeout_then_revived(
    daemon: DaemonProcess, strategies: list[Strategy]
) -> None:
    strategy = Strategy(daemon.endpoint, "hold")
    strategies.append(strategy)
    sid = strategy.info()["session_id"]
    strategy.proc.send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: session_status(daemon.db, sid) == "CRASHED", 5, "CRASHED")  # type: ignore[arg-type]
        reason = rows(daemon.db, "SELECT crash_reason, crash_source FROM strategy_sessions")[0]
        assert reason["crash_reason"].startswith("missed heartbeats (last seen ")
        assert reason["crash_source"] == "HEARTBEAT"
        assert len(rows(daemon.db, SEED_RECOVERY_QUERY)) == 2
    finally:
        strategy.proc.send_signal(signal.SIGCONT)
    # It wakes up, learns it was declared dead, re-announces: RUNNING again, legs ACTIVE.
    wait_for(lambda: session_status(daemon.db, sid) == "RUNNING", 5, "REVIVED")  # type: ignore[arg-type]
    legs = rows(
        daemon.db,
        "SELECT status, was_crashed FROM strategy_positions WHERE position_key IN ('ce-1','pe-1')",
    )
    assert [(r["status"], r["was_crashed"]) for r in legs] == [("ACTIVE", 1), ("ACTIVE", 1)]
    revived = rows(daemon.db, "SELECT payload FROM position_events WHERE event_type = 'REVIVED'")
    assert json.loads(revived[0]["payload"])["legs"] == ["ce-1", "pe-1"]


@both_backends
def test_daemon_restart_keeps_a_live_session_running_and_its_updates_flowing(
    daemon: DaemonProcess, strategies: list[Strategy]
) -> None:
    strategy = Strategy(daemon.endpoint, "updates")
    strategies.append(strategy)
    sid = strategy.info()["session_id"]
    for _ in range(5):
        strategy.send("tick")
    strategy.send("sync")
    assert strategy.info() == {"synced": True, "stop": 109.0}
    # Updates that only reached the old daemon's memory: re-sent after the reconnect.
    for _ in range(3):
        strategy.send("tick")
    daemon.kill()
    for _ in range(2):
        strategy.send("tick")  # while the daemon is away: coalesced in the client
    daemon.start()
    strategy.send("sync")
    assert strategy.info() == {"synced": True, "stop": 114.0}
    stop = rows(daemon.db, "SELECT stop_price FROM strategy_positions WHERE position_key = 'ce-1'")
    assert stop[0]["stop_price"] == 114.0
    # Well past one heartbeat timeout after the restart: still RUNNING, nothing CRASHED.
    probe = PositionPersistenceManager("probe", endpoint=daemon.endpoint, ack_timeout=5)
    probe.start_session()
    deadline = time.monotonic() + 1.5 * UNIT
    while time.monotonic() < deadline:
        probe.sync(1)
    probe.close()
    assert session_status(daemon.db, sid) == "RUNNING"  # type: ignore[arg-type]
    assert rows(daemon.db, SEED_RECOVERY_QUERY) == []


@both_backends
def test_session_that_does_not_return_after_restart_is_crashed(
    daemon: DaemonProcess, strategies: list[Strategy]
) -> None:
    strategy = Strategy(daemon.endpoint, "hold")
    strategies.append(strategy)
    sid = strategy.info()["session_id"]
    daemon.stop()
    strategy.proc.send_signal(signal.SIGKILL)  # dies while the daemon is down: nobody sees it
    strategy.proc.wait()
    daemon.start()
    wait_for(lambda: session_status(daemon.db, sid) == "CRASHED", 5, "CRASHED")  # type: ignore[arg-type]
    reason = rows(daemon.db, "SELECT crash_reason, crash_source FROM strategy_sessions")[0]
    assert (reason["crash_reason"], reason["crash_source"]) == (
        "did not return after daemon restart",
        "RESTART",
    )
    assert {r["position_key"] for r in rows(daemon.db, SEED_RECOVERY_QUERY)} == {"ce-1", "pe-1"}


def test_coalescing_stores_the_newest_state(daemon: DaemonProcess) -> None:
    pm = PositionPersistenceManager("expiry_blast", endpoint=daemon.endpoint, ack_timeout=5)
    pm.start_session()
    leg = pm.save_position_entry(symbol="X", entry_price=100.0, quantity=1, stop_price=90.0)
    for i in range(1, 2001):
        pm.queue_position_update(leg, current_price=100.0 + i, stop_price=90.0 + i / 10)
    pm.queue_position_update(leg, highest_price=2100.0, state={"step": 2000})
    assert pm.sync(5)
    row = rows(daemon.db, "SELECT * FROM strategy_positions")[0]
    assert (row["current_price"], row["stop_price"], row["highest_price"]) == (
        2100.0,
        290.0,
        2100.0,
    )
    assert json.loads(row["state"]) == {"step": 2000}
    trail = rows(
        daemon.db, "SELECT COUNT(*) AS n FROM position_events WHERE event_type = 'TRAIL_UPDATE'"
    )
    # Coalesced: at most one TRAIL_UPDATE per flush, far fewer than the 2000 stop moves.
    assert 1 <= trail[0]["n"] < 200
    pm.end_session()
    pm.close()


@both_backends
def test_duplicate_entry_and_exit_are_idempotent(daemon: DaemonProcess) -> None:
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as raw:
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(daemon.endpoint)

        def call(msg: dict[str, object]) -> dict[str, object]:
            raw.send(encode(msg))
            assert raw.poll(5000 * UNIT), "no reply"
            return decode_reply(raw.recv())

        # No token offered: the daemon issues one in the welcome (the start's ack).
        welcome = call({"v": 1, "type": "start", "seq": 100, "session": "dup", "strategy": "s"})
        base = {"v": 1, "session": "dup", "token": welcome["token"]}
        entry = {
            **base,
            "type": "entry",
            "key": "dup-1",
            "symbol": "X",
            "exchange": "NFO",
            "product": "MIS",
            "side": "BUY",
            "quantity": 75,
            "entry_price": 10.0,
        }
        first = call({**entry, "seq": 1})
        again = call({**entry, "seq": 2})
        assert first["duplicate"] is False and again["duplicate"] is True
        assert first["position_id"] == again["position_id"]
        exit_msg = {**base, "type": "exit", "key": "dup-1", "exit_reason": "STOP_HIT"}
        assert call({**exit_msg, "seq": 3})["duplicate"] is False
        assert call({**exit_msg, "seq": 4})["duplicate"] is True
        update = call({**base, "type": "update", "key": "dup-1", "stop_price": 1.0})
        assert update["code"] == "UNKNOWN_LEG"
        again_after_exit = call({**entry, "seq": 5})
        assert again_after_exit["duplicate"] is True and again_after_exit["status"] == "CLOSED"
    legs = rows(daemon.db, "SELECT status, stop_price FROM strategy_positions")
    assert [(r["status"], r["stop_price"]) for r in legs] == [("CLOSED", None)]
    exits = rows(daemon.db, "SELECT COUNT(*) AS n FROM position_events WHERE event_type = 'EXIT'")
    assert exits[0]["n"] == 1


def decode_reply(raw: bytes) -> dict[str, object]:
    import orjson

    reply: dict[str, object] = orjson.loads(raw)
    return reply


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"not json", "BAD_MESSAGE"),
        (b"[1, 2]", "BAD_MESSAGE"),
        (b'{"v": 99, "type": "hb", "session": "s"}', "BAD_VERSION"),
        (b'{"v": 1, "type": "launch", "session": "s"}', "BAD_TYPE"),
        (b'{"v": 1, "type": "hb"}', "BAD_FIELD"),
        (b'{"v": 1, "type": "hb", "session": "s", "extra": 1}', "BAD_FIELD"),
        (
            b'{"v": 1, "type": "entry", "seq": 7, "session": "s", "key": "k", "symbol": "X",'
            b' "exchange": "NFO", "product": "MIS", "side": "BUY", "quantity": -5,'
            b' "entry_price": 1.0}',
            "BAD_FIELD",
        ),
        (
            b'{"v": 1, "type": "update", "session": "s", "key": "k", "stop_price": NaN}',
            "BAD_MESSAGE",
        ),
        (
            b'{"v": 1, "type": "update", "session": "s", "key": "k", "stop_price": 1e400}',
            "BAD_MESSAGE",
        ),
        (
            b'{"v": 1, "type": "update", "session": "s", "key": "k", "stop_price": 1}',
            "UNKNOWN_SESSION",
        ),
    ],
)
@both_backends
def test_malformed_messages_get_errors_and_the_daemon_keeps_serving(
    daemon: DaemonProcess, payload: bytes, code: str
) -> None:
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as raw:
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(daemon.endpoint)
        raw.send(payload)
        assert raw.poll(5000 * UNIT), "no reply"
        reply = decode_reply(raw.recv())
        assert reply["type"] == "error" and reply["code"] == code, reply
        if b'"seq": 7' in payload:
            assert reply["seq"] == 7
        raw.send_multipart([b'{"v": 1, "type": "hb", "session": "s"}', b"extra"])
        assert raw.poll(5000 * UNIT)
        assert decode_reply(raw.recv())["code"] == "BAD_FRAMES"
    # Still serving: a real client works, and nothing bad reached the database.
    pm = PositionPersistenceManager("after", endpoint=daemon.endpoint, ack_timeout=5)
    assert pm.start_session() is not None
    assert pm.end_session()
    pm.close()
    assert rows(daemon.db, "SELECT COUNT(*) AS n FROM strategy_positions")[0]["n"] == 0
    assert daemon.proc is not None and daemon.proc.poll() is None


def test_sigterm_flushes_pending_updates(workdir: Path) -> None:
    # A flush interval far beyond the test: only the shutdown flush can write the update.
    daemon = DaemonProcess(workdir, "--flush-interval", "3600").start()
    try:
        with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as raw:
            raw.setsockopt(zmq.LINGER, 0)
            raw.connect(daemon.endpoint)
            base = {"v": 1, "session": "sigterm-1", "token": "ab" * 16}
            leg = {
                "type": "entry",
                "symbol": "X",
                "exchange": "NFO",
                "product": "MIS",
                "side": "BUY",
                "quantity": 1,
                "entry_price": 10.0,
                "stop_price": 9.0,
            }
            raw.send(encode({**base, "type": "start", "seq": 1, "strategy": "s"}))
            raw.send(encode({**base, **leg, "seq": 2, "key": "x"}))
            raw.send(encode({**base, "type": "update", "key": "x", "stop_price": 9.5}))
            raw.send(encode({**base, **leg, "seq": 3, "key": "y"}))
            # Messages are handled in order: once "y" is acked, the update is in memory.
            acks = set()
            while len(acks) < 3:
                assert raw.poll(5000 * UNIT), "no ack"
                acks.add(decode_reply(raw.recv())["seq"])
            stored = rows(
                daemon.db, "SELECT stop_price FROM strategy_positions WHERE position_key='x'"
            )
            assert stored[0]["stop_price"] == 9.0  # not flushed yet
            assert daemon.stop(signal.SIGTERM) == 0
        stored = rows(daemon.db, "SELECT stop_price FROM strategy_positions WHERE position_key='x'")
        assert stored[0]["stop_price"] == 9.5
        assert "positiond stopped" in daemon.output()
        assert not daemon.sock.exists()  # no stale socket file left for clients to find
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop()


def test_client_without_daemon_never_raises_and_delivers_later(workdir: Path) -> None:
    daemon = DaemonProcess(workdir, "--flush-interval", "0.05")
    pm = PositionPersistenceManager("expiry_blast", endpoint=daemon.endpoint, ack_timeout=0.2)
    try:
        assert pm.start_session() is None  # nobody answered: warned, not raised
        leg = pm.save_position_entry(symbol="X", entry_price=10.0, quantity=1, stop_price=9.0)
        started = time.perf_counter()
        for i in range(10_000):
            pm.queue_position_update(leg, current_price=10.0 + i / 100, stop_price=9.0 + i / 1000)
        per_call = (time.perf_counter() - started) / 10_000
        assert per_call < 0.001  # no blocking while the daemon is away (figure: see bench/)
        assert pm.unacknowledged == 2
        daemon.start()
        assert pm.sync(5)
        row = rows(daemon.db, "SELECT stop_price, current_price FROM strategy_positions")[0]
        assert (row["stop_price"], row["current_price"]) == (9.0 + 9999 / 1000, 10.0 + 9999 / 100)
        assert pm.session_id is not None
        assert pm.end_session()
    finally:
        pm.close()
        if daemon.proc is not None:
            daemon.stop()


def test_tcp_needs_curve_and_admits_only_known_client_keys(workdir: Path) -> None:
    keys, allowed = workdir / "keys", workdir / "allowed"
    keys.mkdir()
    allowed.mkdir()
    for name in ("server", "client", "stranger"):
        zmq.auth.create_certificates(keys, name)
    (allowed / "client.key").write_bytes((keys / "client.key").read_bytes())
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "positiond",
            "--db",
            str(workdir / "x.db"),
            "--endpoint",
            "tcp://127.0.0.1:*",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode == 2 and "CURVE" in refused.stderr  # never served in clear

    daemon = DaemonProcess(
        workdir,
        "--curve-secret-key",
        str(keys / "server.key_secret"),
        "--curve-clients",
        str(allowed),
    )
    daemon.endpoint = "tcp://127.0.0.1:*"
    daemon.args[daemon.args.index("--endpoint") + 1] = daemon.endpoint
    daemon.start()
    try:
        line = next(x for x in daemon.output().splitlines() if "positiond ready" in x)
        endpoint = line.rsplit("endpoint ", 1)[1].strip()
        assert endpoint.startswith("tcp://127.0.0.1:") and not endpoint.endswith("*")
        known = PositionPersistenceManager(
            "tcp_strategy",
            endpoint=endpoint,
            ack_timeout=5,
            curve_server_key=keys / "server.key",
            curve_client_cert=keys / "client.key_secret",
        )
        with known.session():
            leg = known.save_position_entry(symbol="X", entry_price=1.0, quantity=1)
            assert leg.position_id == 1
        known.close()
        stranger = PositionPersistenceManager(
            "intruder",
            endpoint=endpoint,
            ack_timeout=0.5,
            curve_server_key=keys / "server.key",
            curve_client_cert=keys / "stranger.key_secret",
        )
        assert stranger.start_session() is None  # the handshake is refused: nothing arrives
        stranger.close(0)
        sessions = rows(daemon.db, "SELECT strategy_name, status FROM strategy_sessions")
        assert [(r["strategy_name"], r["status"]) for r in sessions] == [
            ("tcp_strategy", "COMPLETED")
        ]
        with pytest.raises(ValueError, match="CURVE"):
            PositionPersistenceManager("no_keys", endpoint=endpoint)
    finally:
        daemon.stop()


def test_a_main_loop_that_stops_updating_is_stalled_not_crashed(daemon: DaemonProcess) -> None:
    pm = PositionPersistenceManager(
        "expiry_blast", endpoint=daemon.endpoint, ack_timeout=5, progress_deadline=1.0
    )
    try:
        sid = pm.start_session()
        leg = pm.save_position_entry(symbol="X", entry_price=10.0, quantity=1, stop_price=9.0)
        # Heartbeats keep flowing from the I/O thread, but no update comes for > 1 s.
        wait_for(lambda: session_status(daemon.db, sid) == "STALLED", 5, "STALLED")  # type: ignore[arg-type]
        stalled = rows(daemon.db, "SELECT payload FROM position_events WHERE event_type='STALLED'")
        assert json.loads(stalled[0]["payload"])["legs"] == [leg.key]
        assert rows(daemon.db, "SELECT status FROM strategy_positions")[0]["status"] == "ACTIVE"
        pm.queue_position_update(leg, stop_price=9.5)
        assert pm.sync(5)
        assert session_status(daemon.db, sid) == "RUNNING"  # type: ignore[arg-type]
        kinds = rows(daemon.db, "SELECT event_type FROM position_events WHERE position_id IS NULL")
        assert [k["event_type"] for k in kinds] == ["SESSION_START", "STALLED", "PROGRESS"]
        assert pm.end_session()
    finally:
        pm.close()


def test_no_session_token_is_ever_stored_in_clear(daemon: DaemonProcess) -> None:
    pm = PositionPersistenceManager("expiry_blast", endpoint=daemon.endpoint, ack_timeout=5)
    try:
        with pm.session():
            leg = pm.save_position_entry(symbol="X", entry_price=10.0, quantity=1, stop_price=9.0)
            pm.queue_position_update(leg, stop_price=9.5, last_trail_level=1)
            assert pm.sync(5)
            pm.save_position_exit(leg, exit_price=9.5, exit_reason="STOP_HIT")
        token = pm._token
        assert token
    finally:
        pm.close()
    dump = "\n".join(
        str(tuple(row))
        for table in ("strategy_sessions", "strategy_positions", "position_events")
        for row in rows(daemon.db, f"SELECT * FROM {table}")
    )
    assert "session_key" not in dump and len(dump) > 200  # the rows are there ...
    assert token not in dump  # ... but the token is not: only its hash


def test_the_daemon_logs_a_revival_like_the_crash(daemon: DaemonProcess) -> None:
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as raw:
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(daemon.endpoint)
        base = {"v": 1, "session": "revive-1", "token": "ef" * 16}
        raw.send(encode({**base, "type": "start", "seq": 1, "strategy": "s"}))
        assert raw.poll(5000 * UNIT) and decode_reply(raw.recv())["seq"] == 1
        # Silent past the 1 s heartbeat timeout (the connection stays up): declared crashed.
        wait_for(lambda: "crashed: missed heartbeats" in daemon.output(), 5, "the verdict")
        raw.send(encode({**base, "type": "start", "seq": 2, "strategy": "s"}))
        assert raw.poll(5000 * UNIT)
        ack = decode_reply(raw.recv())
        assert ack["seq"] == 2 and ack["revived"]
    wait_for(lambda: "REVIVED" in daemon.output(), 5, "the revival in the log")
    (crash,) = [x for x in daemon.output().splitlines() if "crashed: missed heartbeats" in x]
    (back,) = [x for x in daemon.output().splitlines() if "REVIVED" in x]
    assert "WARNING" in crash and "WARNING" in back, (crash, back)
    assert "session 1 (s) REVIVED: alive after all, RUNNING again with 0 leg(s) ACTIVE" in back
