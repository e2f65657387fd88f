"""A large prune never stops the acks of live strategies (issue 10 §9).

A prune runs in chunks, each its own short transaction in the writer's stream, so a live
strategy's entry waits for at most one chunk, not for the whole prune (which, with 700k sessions,
used to outlast the unit's watchdog and roll back at every retry).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.prune import fill_history
from positiond_client import PositionPersistenceManager
from tests import conftest
from tests.helpers import UNIT, DaemonProcess, rows

CE = "NIFTY28NOV2524000CE"


def prune(daemon: DaemonProcess, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "positiond.ctl", "--db", str(daemon.db), "--endpoint",
         daemon.endpoint, "--json", "prune", "--older-than", "1d", *args],
        capture_output=True, text=True, timeout=300 * UNIT,
    )  # fmt: skip
    return run, time.monotonic() - started


def test_live_entries_are_acked_between_the_chunks_of_a_large_prune(workdir: Path) -> None:
    # 30k sessions here, the 700k under --soak.
    size = min(700_000, conftest.SOAK.count(30_000))
    fill_history(workdir / "positiond.db", size)
    daemon = DaemonProcess(workdir, "--flush-interval", "0.05").start()
    pm = PositionPersistenceManager("live", endpoint=daemon.endpoint, ack_timeout=60 * UNIT)
    latencies: list[tuple[float, float]] = []  # (sent, acked), monotonic
    stop = threading.Event()

    def trade() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            sent = time.monotonic()
            leg = pm.save_position_entry(CE, "CE", 100.0, 90.0, 75, position_key=f"live-{n}")
            latencies.append((sent, time.monotonic()))
            pm.save_position_exit(leg, 101.0, "TARGET")

    try:
        assert pm.start_session() is not None
        trader = threading.Thread(target=trade)
        trader.start()
        begin = time.monotonic()
        run, took = prune(daemon)
        end = begin + took
        stop.set()
        trader.join(60 * UNIT)
        assert run.returncode == 0, run.stderr
        result = json.loads(run.stdout)["result"]
        assert (result["sessions"], result["positions"], result["events"]) == (
            size,
            size,
            4 * size,
        )
        assert result["chunks"] >= size // 200  # 200 sessions a transaction
        during = [acked - sent for sent, acked in latencies if begin <= sent and acked <= end]
        assert len(during) >= 10, f"only {len(during)} entries during a {took:.1f}s prune"
        # One transaction for the whole prune made an entry wait for (nearly) all of it; in
        # chunks it waits for one chunk.
        assert max(during) < took / 4, (max(during), took)
        # The live session's history is untouched and nothing else of the old one is left.
        assert rows(daemon.db, "SELECT count(*) AS n FROM strategy_sessions")[0]["n"] == 1
        assert pm.end_session()
    finally:
        stop.set()
        pm.close()
        daemon.stop()


def test_a_prune_with_the_daemon_stopped_goes_in_chunks_too(workdir: Path) -> None:
    fill_history(workdir / "positiond.db", 1_000)
    daemon = DaemonProcess(workdir)  # never started: posctl writes directly, under its lock
    run, _ = prune(daemon, "--chunk", "300")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["via"] == "direct"
    assert (out["result"]["sessions"], out["result"]["chunks"]) == (1_000, 4)
    assert rows(daemon.db, "SELECT count(*) AS n FROM position_events")[0]["n"] == 0
