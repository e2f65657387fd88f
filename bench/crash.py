"""Scenario ``crash``: how long until a dead strategy's session reads CRASHED in the database.

kill -9: the process's ipc connection drops; the daemon should notice within milliseconds.
SIGSTOP: the process is alive but silent; only the heartbeat timeout (1 s here) can tell.
Measured from the signal to the first read-only SELECT that sees status CRASHED (polled every
1 ms, as an operator's dashboard would see it). The seed had no equivalent: a killed strategy
left its session RUNNING forever.
"""

from __future__ import annotations

import select
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from bench.common import BenchError, DaemonProcess, kill_process, read_only_db
from bench.report import Scenario, at_most, stats

__all__ = ["run"]

STRATEGY = Path(__file__).with_name("strategy_proc.py")
DETECT_DEADLINE = 5.0  # seconds
READY_DEADLINE = 15.0
STOP_HEARTBEAT_TIMEOUT = 1.0


def _spawn(daemon: DaemonProcess, index: int) -> tuple[subprocess.Popen[bytes], int]:
    """Start a strategy process; return it and its session id once it printed READY."""
    errlog = daemon.workdir / f"strategy-{index}.log"
    with open(errlog, "ab") as err:
        proc = subprocess.Popen(
            [sys.executable, str(STRATEGY), daemon.endpoint],
            stdout=subprocess.PIPE,
            stderr=err,
            stdin=subprocess.DEVNULL,
        )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + READY_DEADLINE
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError("strategy process did not print READY in time")
            readable, _, _ = select.select([proc.stdout], [], [], remaining)
            if not readable:
                continue
            line = proc.stdout.readline().decode(errors="replace").strip()
            if line.startswith("READY "):
                return proc, int(line.split()[1])
            if not line or line.startswith("ERROR"):
                proc.wait(5)
                raise BenchError(
                    f"strategy process failed ({line or 'exit ' + str(proc.returncode)}): "
                    + errlog.read_text(errors="replace")[-2000:]
                )
    except BaseException:
        kill_process(proc, signal.SIGKILL)
        raise


def _status(conn: sqlite3.Connection, session_id: int) -> tuple[str, str | None]:
    row = conn.execute(
        "SELECT status, crash_source FROM strategy_sessions WHERE id = ?", (session_id,)
    ).fetchone()
    if row is None:
        raise BenchError(f"session {session_id} is not in the database")
    return str(row[0]), row[1]


def _wait_status(
    conn: sqlite3.Connection, session_id: int, want: str, t0: float, deadline: float
) -> tuple[float | None, str | None]:
    """Poll every 1 ms until the session reads ``want``; (seconds since t0, crash_source)."""
    while True:
        status, source = _status(conn, session_id)
        now = time.perf_counter()
        if status == want:
            return now - t0, source
        if now - t0 > deadline:
            return None, source
        time.sleep(0.001)


def _kill_runs(reps: int, sc: Scenario) -> list[float]:
    latencies: list[float] = []
    sources: Counter[str] = Counter()
    missed = 0
    with DaemonProcess() as daemon:  # default heartbeat timeout (3 s): the kill must beat it
        conn = read_only_db(daemon.db)
        try:
            for rep in range(reps):
                proc, sid = _spawn(daemon, rep)
                try:
                    if _status(conn, sid)[0] != "RUNNING":
                        raise BenchError(f"session {sid} is not RUNNING after READY")
                    t0 = time.perf_counter()
                    proc.send_signal(signal.SIGKILL)
                    took, source = _wait_status(conn, sid, "CRASHED", t0, DETECT_DEADLINE)
                finally:
                    kill_process(proc, signal.SIGKILL)
                sources[str(source)] += 1
                if took is None:
                    missed += 1
                else:
                    latencies.append(took * 1e3)
        finally:
            conn.close()
        sc.raw["kill_daemon_warnings"] = daemon.warnings()
    sc.raw.update(kill_ms=latencies, kill_sources=dict(sources), kill_missed=missed)
    if missed:
        sc.notes.append(
            f"crash: {missed}/{reps} kill -9 runs not CRASHED within {DETECT_DEADLINE}s"
        )
    if set(sources) - {"DISCONNECT"}:
        sc.notes.append(f"crash: kill -9 crash_source counts {dict(sources)} (expected DISCONNECT)")
    return latencies


def _stop_runs(reps: int, sc: Scenario) -> tuple[list[float], list[float]]:
    latencies: list[float] = []
    revive: list[float] = []
    sources: Counter[str] = Counter()
    missed = not_revived = 0
    with DaemonProcess(heartbeat_timeout=STOP_HEARTBEAT_TIMEOUT) as daemon:
        conn = read_only_db(daemon.db)
        try:
            for rep in range(reps):
                proc, sid = _spawn(daemon, 1000 + rep)
                try:
                    t0 = time.perf_counter()
                    proc.send_signal(signal.SIGSTOP)
                    took, source = _wait_status(conn, sid, "CRASHED", t0, DETECT_DEADLINE)
                    sources[str(source)] += 1
                    if took is None:
                        missed += 1
                    else:
                        latencies.append(took * 1e3)
                    # Continued, the strategy is alive after all: it re-announces its session
                    # and the daemon revives it (RUNNING again, legs ACTIVE).
                    t1 = time.perf_counter()
                    proc.send_signal(signal.SIGCONT)
                    back, _ = _wait_status(conn, sid, "RUNNING", t1, DETECT_DEADLINE)
                    if back is None:
                        not_revived += 1
                    else:
                        revive.append(back * 1e3)
                finally:
                    kill_process(proc, signal.SIGKILL)
        finally:
            conn.close()
        sc.raw["stop_daemon_warnings"] = daemon.warnings()
    sc.raw.update(
        stop_ms=latencies,
        stop_sources=dict(sources),
        stop_missed=missed,
        revive_ms=revive,
        not_revived=not_revived,
    )
    if missed:
        sc.notes.append(
            f"crash: {missed}/{reps} SIGSTOP runs not CRASHED within {DETECT_DEADLINE}s"
        )
    if not_revived:
        sc.notes.append(f"crash: {not_revived}/{reps} SIGCONT'd sessions did not return to RUNNING")
    if set(sources) - {"HEARTBEAT"}:
        sc.notes.append(f"crash: SIGSTOP crash_source counts {dict(sources)} (expected HEARTBEAT)")
    return latencies, revive


def run(quick: bool) -> Scenario:
    reps = 2 if quick else 20
    sc = Scenario("crash")
    kill = stats(_kill_runs(reps, sc))
    stop, revive = _stop_runs(reps, sc)
    stopped, revived = stats(stop), stats(revive)
    sc.row(f"kill -9 → CRASHED p50 (ms), runs={kill.n}/{reps}", kill.p50, "never")
    sc.row("kill -9 → CRASHED p99 (ms)", kill.p99, "never", target=at_most(20, " ms"))
    sc.row("kill -9 → CRASHED max (ms)", kill.max, "never")
    hb = f"{STOP_HEARTBEAT_TIMEOUT:g}"
    sc.row(f"SIGSTOP → CRASHED p50 (ms), hb timeout {hb}s, runs={stopped.n}", stopped.p50, "never")
    stop_limit = at_most(STOP_HEARTBEAT_TIMEOUT * 1000 + 250, " ms (timeout + 0.25 s)")
    sc.row("SIGSTOP → CRASHED p99 (ms)", stopped.p99, "never", target=stop_limit)
    sc.row("SIGSTOP → CRASHED max (ms)", stopped.max, "never")
    sc.row(f"SIGCONT → RUNNING again p50 (ms), runs={revived.n}", revived.p50)
    sc.raw.update(
        reps=reps,
        heartbeat_timeout_stop=STOP_HEARTBEAT_TIMEOUT,
        kill_stats_ms=kill.as_dict(),
        stop_stats_ms=stopped.as_dict(),
        revive_stats_ms=revived.as_dict(),
    )
    return sc
