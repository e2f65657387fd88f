"""The daemon's own absences: a pause (SIGSTOP, a VM suspended, a starved or blocked loop) is
no evidence of death, and a restart keeps what it knew of a session.

Real daemon, real strategy processes: while the daemon is stopped, the strategies keep
heartbeating into the socket; when it runs again none of them may be declared dead, while a
strategy that really died (killed) or really hung (stopped) during the pause still is.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from positiond_client import PositionPersistenceManager
from tests.conftest import Soak
from tests.helpers import UNIT, DaemonProcess, rows, session_status, wait_for
from tests.test_daemon import Strategy

TIMEOUT = 1.0  # the daemon fixture's heartbeat timeout


def _verdicts(db: Path, session_id: object) -> list[str]:
    found = rows(
        db,
        "SELECT event_type FROM position_events WHERE session_id = ? AND position_id IS NULL "
        "AND event_type IN ('CRASH', 'REVIVED', 'STALLED')",
        (session_id,),
    )
    return [r["event_type"] for r in found]


def _pause(daemon: DaemonProcess, seconds: float, during: list[Strategy]) -> None:
    """Stop the daemon for ``seconds``; kill the ``during`` strategies halfway through."""
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGSTOP)
    try:
        # The pause itself is the stimulus, its length the test's parameter: not a wait.
        time.sleep(seconds / 2)
        for strategy in during:
            strategy.proc.kill()
            strategy.proc.wait()
        time.sleep(seconds / 2)
    finally:
        daemon.proc.send_signal(signal.SIGCONT)


def _run_pause(
    daemon: DaemonProcess,
    strategies: list[Strategy],
    monkeypatch: pytest.MonkeyPatch,
    factor: float,
    healthy_count: int,
) -> None:
    def start(mode: str, *args: str) -> Strategy:
        monkeypatch.setenv("STRATEGY_KEY_PREFIX", f"s{len(strategies)}-")
        strategy = Strategy(daemon.endpoint, mode, *args)
        strategies.append(strategy)
        return strategy

    healthy = [start("stream", "10") for _ in range(healthy_count - 1)]
    healthy.append(start("updates"))  # idle: heartbeats only
    hung, killed = start("hold"), start("hold")
    ids = [s.info()["session_id"] for s in healthy]
    hung_id, killed_id = hung.info()["session_id"], killed.info()["session_id"]

    hung.proc.send_signal(signal.SIGSTOP)  # really silent from here on
    try:
        _pause(daemon, factor * TIMEOUT, [killed])
        resumed = time.monotonic()
        # Real deaths during the pause are still found: the exit at once (the connection
        # dropped), the hung one by its missed heartbeats within about one timeout.
        wait_for(lambda: session_status(daemon.db, killed_id) == "CRASHED", 5, "killed CRASHED")  # type: ignore[arg-type]
        killed_after = time.monotonic() - resumed
        wait_for(lambda: session_status(daemon.db, hung_id) == "CRASHED", 5, "hung CRASHED")  # type: ignore[arg-type]
        hung_after = time.monotonic() - resumed
        found = rows(
            daemon.db,
            "SELECT id, crash_source FROM strategy_sessions WHERE id IN (?, ?)",
            (hung_id, killed_id),
        )
        sources = {r["id"]: r["crash_source"] for r in found}
    finally:
        hung.proc.send_signal(signal.SIGCONT)

    # The healthy ones: each can still sync, ...
    for strategy in healthy:
        strategy.send("sync")
    answers = [json.loads(s.line()) for s in healthy]
    # ... and nothing was ever decided about them: no verdict, no event, no was_crashed.
    wrong = {sid: _verdicts(daemon.db, sid) for sid in ids}
    wrong = {sid: kinds for sid, kinds in wrong.items() if kinds}
    assert not wrong, (
        f"pause of {factor:g} x the timeout: {len(wrong)} of {len(ids)} healthy sessions got "
        f"verdicts {wrong}"
    )
    assert all(a.get("synced") is True for a in answers), answers
    for sid in ids:
        assert session_status(daemon.db, sid) == "RUNNING"  # type: ignore[arg-type]
    marked = rows(daemon.db, "SELECT session_id FROM strategy_positions WHERE was_crashed = 1")
    assert {r["session_id"] for r in marked} <= {hung_id, killed_id}
    for strategy in healthy:
        assert strategy.proc.poll() is None
        assert strategy._lines.empty(), "a healthy strategy was sent a notice (REVIVED?)"
    assert sources == {hung_id: "HEARTBEAT", killed_id: "DISCONNECT"}
    assert killed_after < 0.5 * UNIT + 0.5, killed_after
    assert hung_after < TIMEOUT + 1.0 * UNIT, hung_after


@pytest.mark.parametrize("factor", [1.1, 2.0, 3.0])
def test_a_paused_daemon_declares_no_running_strategy_dead(
    daemon: DaemonProcess,
    strategies: list[Strategy],
    monkeypatch: pytest.MonkeyPatch,
    factor: float,
) -> None:
    _run_pause(daemon, strategies, monkeypatch, factor, healthy_count=3)


@pytest.mark.soak
@pytest.mark.parametrize("factor", [5.0, 10.0, 30.0])
def test_a_long_pause_with_many_strategies(
    daemon: DaemonProcess,
    strategies: list[Strategy],
    monkeypatch: pytest.MonkeyPatch,
    factor: float,
    soak: Soak,
) -> None:
    _run_pause(daemon, strategies, monkeypatch, factor, healthy_count=12)


def test_a_session_stalled_before_a_restart_runs_again_with_its_next_updates(
    daemon: DaemonProcess,
) -> None:
    pm = PositionPersistenceManager(
        "expiry_blast", endpoint=daemon.endpoint, ack_timeout=5, progress_deadline=1.0
    )
    try:
        sid = pm.start_session()
        leg = pm.save_position_entry(symbol="X", entry_price=10.0, quantity=1, stop_price=9.0)
        wait_for(lambda: session_status(daemon.db, sid) == "STALLED", 5, "STALLED")
        daemon.stop()
        daemon.start()
        sent = [0.0]

        def loop_turn() -> bool:
            """The strategy's main loop works again: an update every 0.1 s (10 Hz)."""
            if time.monotonic() - sent[0] >= 0.1:
                sent[0] = time.monotonic()
                pm.queue_position_update(leg, stop_price=9.0 + sent[0] % 1)
            return session_status(daemon.db, sid) == "RUNNING"

        wait_for(loop_turn, 5, "RUNNING again after updates")
        kinds = [
            r["event_type"]
            for r in rows(
                daemon.db,
                "SELECT event_type FROM position_events WHERE position_id IS NULL ORDER BY id",
            )
        ]
        assert kinds[0] == "SESSION_START" and kinds[-1] == "PROGRESS", kinds
        assert kinds.count("STALLED") == 1 and kinds.count("PROGRESS") == 1, kinds
        # The deadline is watched on the new daemon too: silent again, stalled again.
        wait_for(lambda: session_status(daemon.db, sid) == "STALLED", 5, "STALLED again")
        assert pm.end_session()
    finally:
        pm.close()
