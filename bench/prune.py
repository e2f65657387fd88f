"""Scenario ``prune``: live strategies' entry acks while ``posctl prune`` deletes a large history.

A database holding N finished sessions of a month ago (each a closed leg and four events) is
pruned through the running daemon by ``posctl prune --older-than 1d`` while a live strategy
enters and exits legs back to back. Baseline: the same strategy with no prune running, in the
same run. The prune goes in chunks (200 sessions a transaction by default); the row with the
largest chunk shows what a prune in few big transactions costs the live acks.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import BenchError, DaemonProcess
from bench.report import Scenario, stats
from positiond.ops import PRUNE_CHUNK, PRUNE_MAX_CHUNK
from positiond.store.schema import iso, migrate
from positiond_client import PositionPersistenceManager

__all__ = ["fill_history", "run"]

CE = "NIFTY28NOV2524000CE"


def fill_history(db: Path, sessions: int) -> None:
    """``sessions`` finished sessions of a month ago, each with a closed leg and four events."""
    old = iso(time.time() - 30 * 86400)
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        migrate(conn)
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO strategy_sessions (id, session_key, strategy_name, status, start_time, "
            "end_time) VALUES (?, ?, 'old_strategy', 'COMPLETED', ?, ?)",
            ((i, f"old-{i}", old, old) for i in range(1, sessions + 1)),
        )
        conn.executemany(
            "INSERT INTO strategy_positions (position_id, position_key, session_id, symbol, "
            "exchange, product, side, quantity, entry_price, entry_time, status, exit_price, "
            "exit_time, exit_reason, updated_at) VALUES (?, ?, ?, ?, 'NFO', 'MIS', 'BUY', 75, "
            "100.0, ?, 'CLOSED', 101.0, ?, 'STOP_HIT', ?)",
            ((i, f"old-leg-{i}", i, CE, old, old, old) for i in range(1, sessions + 1)),
        )
        conn.executemany(
            "INSERT INTO position_events (position_id, session_id, event_type, event_time, "
            "payload) VALUES (?, ?, ?, ?, '{}')",
            (
                (i if kind != "SESSION_START" else None, i, kind, old)
                for i in range(1, sessions + 1)
                for kind in ("SESSION_START", "ENTRY", "TRAIL_UPDATE", "EXIT")
            ),
        )
        conn.execute("COMMIT")
    finally:
        conn.close()


class Trader:
    """Entries and exits back to back on a thread; each entry's ack latency with its send time."""

    def __init__(self, pm: PositionPersistenceManager) -> None:
        self.pm = pm
        self.samples: list[tuple[float, float]] = []  # (sent, latency), monotonic seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._n = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self._n += 1
            sent = time.monotonic()
            leg = self.pm.save_position_entry(CE, "CE", 100.0, 90.0, 75, position_key=f"l{self._n}")
            self.samples.append((sent, time.monotonic() - sent))
            if leg.position_id is None:
                raise BenchError("a live entry was not acknowledged")
            self.pm.save_position_exit(leg, 101.0, "TARGET")

    def __enter__(self) -> Trader:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def between(self, begin: float, end: float) -> list[float]:
        return [lat for sent, lat in self.samples if begin <= sent and sent + lat <= end]


def _prune(daemon: DaemonProcess, chunk: int) -> tuple[dict[str, Any], float, float]:
    begin = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "positiond.ctl", "--db", str(daemon.db), "--endpoint",
         daemon.endpoint, "--json", "--timeout", "600", "prune", "--older-than", "1d",
         "--chunk", str(chunk)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    end = time.monotonic()
    if done.returncode != 0:
        raise BenchError(f"posctl prune failed: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)["result"]
    return result, begin, end


def _one(sessions: int, chunk: int, alone_s: float) -> dict[str, Any]:
    daemon = DaemonProcess(flush_interval=0.05)
    try:
        fill_history(daemon.db, sessions)
        daemon.start()
        pm = daemon.manager("live", ack_timeout=600)
        try:
            if pm.start_session() is None:
                raise BenchError("the live session did not start")
            with Trader(pm) as trader:
                time.sleep(alone_s / 4)  # warm up
                alone_begin = time.monotonic()
                time.sleep(alone_s)  # the baseline: the same strategy, no prune
                alone_end = time.monotonic()
                result, begin, end = _prune(daemon, chunk)
            pm.end_session()
        finally:
            pm.close()
    finally:
        daemon.close()
    if result["sessions"] != sessions:
        raise BenchError(f"pruned {result['sessions']} sessions of {sessions}")
    return {
        "alone_ms": [x * 1000 for x in trader.between(alone_begin, alone_end)],
        "during_ms": [x * 1000 for x in trader.between(begin, end)],
        "seconds": end - begin,
        "chunks": result["chunks"],
    }


def run(quick: bool) -> Scenario:
    sessions = 5_000 if quick else 200_000
    scenario = Scenario("prune")
    for chunk in (PRUNE_CHUNK, PRUNE_MAX_CHUNK):
        got = _one(sessions, chunk, 0.5 if quick else 2.0)
        alone, during = stats(got["alone_ms"]), stats(got["during_ms"])
        label = f"{sessions:,} sessions, chunk {chunk:,}"
        scenario.row(f"{label}: live entry ack p50 (ms) vs no prune", during.p50, alone.p50)
        scenario.row(f"{label}: live entry ack p99 (ms) vs no prune", during.p99, alone.p99)
        scenario.row(f"{label}: live entry ack max (ms) vs no prune", during.max, alone.max)
        scenario.row(f"{label}: prune time (s), {got['chunks']} chunks", got["seconds"])
        scenario.row(
            f"{label}: sessions pruned /s", sessions / got["seconds"], higher_is_better=True
        )
        scenario.raw[str(chunk)] = {
            "during": during.as_dict(),
            "alone": alone.as_dict(),
            "seconds": got["seconds"],
            "chunks": got["chunks"],
        }
    return scenario
