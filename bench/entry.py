"""Scenario ``entry``: durable entry round trip (``save_position_entry`` returns after commit).

positiond: client -> I/O thread -> ipc -> daemon -> one SQLite transaction -> ack -> caller.
Baseline: the seed's in-process write in the caller's thread (position row + event row + commit).
"""

from __future__ import annotations

import shutil
import time

from bench.common import BenchError, DaemonProcess, Scenario, read_only_db, stats, tmp_workdir
from bench.seed import SeedStore
from positiond_client import Leg

__all__ = ["run"]

WARMUP = 20


def _positiond(n: int, sc: Scenario) -> list[int]:
    samples: list[int] = []
    exits: list[int] = []
    legs: list[Leg] = []
    late_ids = 0
    with DaemonProcess() as daemon:
        pm = daemon.manager("bench-entry", ack_timeout=5.0)
        try:
            sid = pm.start_session()
            if sid is None:
                raise BenchError("positiond did not acknowledge the session start")
            for i in range(WARMUP + n):
                t0 = time.perf_counter_ns()
                leg = pm.save_position_entry(
                    symbol=f"NIFTY28NOV25{24000 + i}CE",
                    leg_type="CE",
                    entry_price=100.0 + i * 0.05,
                    stop_price=90.0,
                    quantity=75,
                )
                elapsed = time.perf_counter_ns() - t0
                legs.append(leg)
                if leg.position_id is None:
                    # The call returned (acked) but the handle's id was not filled in yet.
                    late_ids += 1
                if i >= WARMUP:
                    samples.append(elapsed)
            if pm.unacknowledged:
                raise BenchError(f"{pm.unacknowledged} entries were never acknowledged")
            # Close every leg (a clean session end), timing the exit round trip on the way.
            for leg in legs:
                t0 = time.perf_counter_ns()
                if not pm.save_position_exit(leg, exit_price=95.0, exit_reason="BENCH"):
                    raise BenchError(f"exit of {leg.key} was not acknowledged")
                exits.append(time.perf_counter_ns() - t0)
            pm.end_session()
        finally:
            pm.close(1.0)
        conn = read_only_db(daemon.db)
        try:
            stored = conn.execute(
                "SELECT count(*) FROM strategy_positions WHERE session_id = ?", (sid,)
            ).fetchone()[0]
            events = conn.execute(
                "SELECT count(*) FROM position_events WHERE session_id = ? "
                "AND event_type = 'ENTRY'",
                (sid,),
            ).fetchone()[0]
            still_open = conn.execute(
                "SELECT count(*) FROM strategy_positions WHERE session_id = ? "
                "AND status != 'CLOSED'",
                (sid,),
            ).fetchone()[0]
        finally:
            conn.close()
        if stored != WARMUP + n or events != WARMUP + n:
            raise BenchError(f"expected {WARMUP + n} legs and ENTRY events, got {stored}/{events}")
        if still_open:
            raise BenchError(f"{still_open} legs are not CLOSED after their acknowledged exit")
        sc.raw["positiond_warnings"] = daemon.warnings()
        sc.raw["daemon_startup_s"] = daemon.startup_s
    sc.raw["legs_returned_without_position_id"] = late_ids
    sc.raw["positiond_exit_ms"] = stats(exits, 1e-6).as_dict()
    if late_ids:
        sc.notes.append(
            f"entry: {late_ids}/{WARMUP + n} acknowledged `save_position_entry` calls returned "
            "a Leg whose `position_id` was still None (Pending._finish sets the event before "
            "running the callback that fills it in: a race between the caller and the I/O thread)"
        )
    return samples


def _baseline(n: int) -> list[int]:
    workdir = tmp_workdir("pdb-seed-")
    samples: list[int] = []
    try:
        seed = SeedStore(workdir / "seed.db")
        try:
            for i in range(WARMUP + n):
                t0 = time.perf_counter_ns()
                seed.save_position_entry(
                    f"seed-{i}", f"NIFTY28NOV25{24000 + i}CE", "CE", 100.0 + i * 0.05, 90.0, 75
                )
                elapsed = time.perf_counter_ns() - t0
                if i >= WARMUP:
                    samples.append(elapsed)
        finally:
            seed.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return samples


def run(quick: bool) -> Scenario:
    n = 200 if quick else 2000
    sc = Scenario("entry")
    pd_samples = _positiond(n, sc)
    base_samples = _baseline(n)
    pd, base = stats(pd_samples, 1e-6), stats(base_samples, 1e-6)
    sc.row(f"round trip p50 (ms), n={n}", pd.p50, base.p50)
    sc.row("round trip p99 (ms)", pd.p99, base.p99)
    sc.row("round trip max (ms)", pd.max, base.max)
    sc.row("round trip mean (ms)", pd.mean, base.mean)
    sc.row("exit round trip p50 (ms)", sc.raw["positiond_exit_ms"]["p50"])
    sc.raw.update(
        n=n,
        warmup=WARMUP,
        positiond_ms=pd.as_dict(),
        baseline_ms=base.as_dict(),
        ratio_baseline_p50_over_positiond_p50=base.p50 / pd.p50,
        positiond_samples_ns=pd_samples,
        baseline_samples_ns=base_samples,
    )
    return sc
