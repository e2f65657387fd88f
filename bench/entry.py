"""Scenario ``entry``: durable entry round trip (``save_position_entry`` returns after commit).

positiond: caller -> client I/O thread -> ipc -> daemon -> one SQLite transaction -> ack ->
caller. Baseline: the seed's in-process write in the caller's thread through the SQLAlchemy ORM
(position row + event row + commit). Runs alternate between the two so both see the same
machine. Below them, the floors (:mod:`bench.floor`) say where positiond's time goes.
"""

from __future__ import annotations

import shutil
import time

from bench.common import BenchError, DaemonProcess, read_only_db, tmp_workdir
from bench.floor import daemon_rtts, floor_rtts, store_apply_ns, threaded_rtts
from bench.report import Scenario, Target, at_most, stats
from bench.seed import BaselineStore, SeedStore, seed_store
from positiond_client import Leg, PositionPersistenceManager

__all__ = ["run"]

WARMUP = 20

P50_TARGET = Target(
    "≤ 0.15 ms and ≥ 9x", lambda p, r: p is not None and p <= 0.15 and r is not None and r >= 9
)


def _positiond_run(pm: PositionPersistenceManager, run: int, n: int) -> tuple[list[int], list[int]]:
    """n timed entries (after WARMUP untimed), then every leg's exit, timed too."""
    samples: list[int] = []
    exits: list[int] = []
    legs: list[Leg] = []
    perf = time.perf_counter_ns
    for i in range(WARMUP + n):
        t0 = perf()
        leg = pm.save_position_entry(
            symbol=f"NIFTY28NOV25{24000 + i}CE",
            leg_type="CE",
            entry_price=100.0 + i * 0.05,
            stop_price=90.0,
            quantity=75,
            position_key=f"run{run}-{i}",
        )
        elapsed = perf() - t0
        if leg.position_id is None:
            raise BenchError(f"entry {i} of run {run} returned without its position id")
        legs.append(leg)
        if i >= WARMUP:
            samples.append(elapsed)
    for leg in legs:
        t0 = perf()
        if not pm.save_position_exit(leg, exit_price=95.0, exit_reason="BENCH"):
            raise BenchError(f"exit of {leg.key} was not acknowledged")
        exits.append(perf() - t0)
    return samples, exits


def _baseline_run(n: int, tuned: bool = False) -> tuple[list[int], str]:
    workdir = tmp_workdir("pdb-seed-")
    samples: list[int] = []
    try:
        seed: BaselineStore
        if tuned:
            seed, label = SeedStore(workdir / "seed.db", wal=True), "sqlite3 WAL"
        else:
            seed, label = seed_store(workdir / "seed.db")
        try:
            perf = time.perf_counter_ns
            for i in range(WARMUP + n):
                t0 = perf()
                seed.save_position_entry(
                    f"seed-{i}", f"NIFTY28NOV25{24000 + i}CE", "CE", 100.0 + i * 0.05, 90.0, 75
                )
                elapsed = perf() - t0
                if i >= WARMUP:
                    samples.append(elapsed)
        finally:
            seed.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return samples, label


def _check_stored(daemon: DaemonProcess, expected: int) -> None:
    conn = read_only_db(daemon.db)
    try:
        legs, entries, still_open = conn.execute(
            "SELECT count(*), "
            "(SELECT count(*) FROM position_events WHERE event_type = 'ENTRY'), "
            "sum(status != 'CLOSED') FROM strategy_positions"
        ).fetchone()
    finally:
        conn.close()
    if legs < expected or entries < expected:
        raise BenchError(f"expected {expected} legs and ENTRY events, got {legs}/{entries}")
    if still_open:
        raise BenchError(f"{still_open} legs are not CLOSED after their acknowledged exit")


def run(quick: bool) -> Scenario:
    runs, n = (2, 100) if quick else (5, 1000)
    sc = Scenario("entry")
    per_run: dict[str, list[float]] = {}

    def record(name: str, samples: list[int], scale: float = 1e-6) -> None:
        s = stats(samples, scale)
        per_run.setdefault(f"{name}_p50", []).append(s.p50)
        per_run.setdefault(f"{name}_p99", []).append(s.p99)
        per_run.setdefault(f"{name}_max", []).append(s.max)

    label = ""
    with DaemonProcess(log_level="WARNING") as daemon:
        pm = daemon.manager("bench-entry", ack_timeout=5.0)
        try:
            if pm.start_session() is None:
                raise BenchError("positiond did not acknowledge the session start")
            for r in range(runs):
                samples, exits = _positiond_run(pm, r, n)
                record("positiond", samples)
                record("exit", exits)
                base, label = _baseline_run(n)
                record("seed", base)
                record("tuned", _baseline_run(n, tuned=True)[0])
                record("raw", daemon_rtts(daemon.endpoint, n))
                record("threaded", threaded_rtts(daemon.endpoint, n))
            pm.end_session()
        finally:
            pm.close(1.0)
        _check_stored(daemon, runs * (WARMUP + n))
        sc.raw["positiond_warnings"] = daemon.warnings()
    for _ in range(runs):
        record("echo", floor_rtts("echo", n))
        record("commit", floor_rtts("commit", n))
        record("store", store_apply_ns(n, background_checkpoint=False), 1e-3)
        record("store_bg", store_apply_ns(n, background_checkpoint=True), 1e-3)

    pd, seed = per_run["positiond_p50"], per_run["seed_p50"]
    sc.row(f"durable entry p50 (ms), {runs} runs x {n}", pd, seed, target=P50_TARGET)
    sc.row("durable entry p99 (ms)", per_run["positiond_p99"], per_run["seed_p99"],
           target=at_most(1.0, " ms"))  # fmt: skip
    sc.row("durable entry max (ms)", per_run["positiond_max"], per_run["seed_max"])
    sc.row("durable exit p50 (ms)", per_run["exit_p50"])
    sc.row("entry p50 vs tuned in-process sqlite3 (WAL, NORMAL) (ms)", pd, per_run["tuned_p50"])
    sc.row("floor: bare client -> positiond p50 (ms)", per_run["raw_p50"])
    sc.row("floor: bare client -> positiond p99 (ms)", per_run["raw_p99"])
    sc.row("prototype: minimal threaded client -> positiond p50 (ms)", per_run["threaded_p50"])
    sc.row("floor: bare client -> asyncio ROUTER echo p50 (ms)", per_run["echo_p50"])
    sc.row("floor: bare client -> asyncio ROUTER echo p99 (ms)", per_run["echo_p99"])
    sc.row("floor: ... + 1 aiosqlite hop and commit p50 (ms)", per_run["commit_p50"])
    sc.row("floor: ... + 1 aiosqlite hop and commit p99 (ms)", per_run["commit_p99"])
    sc.row("floor: store apply_batch(1 entry) p50 (µs)", per_run["store_p50"])
    sc.row("floor: store apply_batch(1 entry) p99 (µs)", per_run["store_p99"])
    sc.row("prototype: store with background checkpoint p99 (µs)", per_run["store_bg_p99"])
    sc.raw.update(runs=runs, n=n, warmup=WARMUP, baseline=label, per_run=per_run)
    sc.notes.append(
        f"entry: baseline = seed-style {label}: one position row + one event row + commit per "
        "entry, in the strategy's own thread, SQLite defaults (rollback journal, synchronous "
        "FULL); 'tuned in-process' = the same SQL on WAL + synchronous NORMAL, as positiond uses"
    )
    return sc
