"""Scenario ``update``: what ``queue_position_update`` costs the strategy's own thread.

positiond: the call coalesces the fields under a lock and wakes the client's I/O thread; the
daemon batches them to SQLite every flush interval. Baseline: the seed's list + lock, flushed
inline by the caller through the SQLAlchemy ORM (bulk UPDATE + commit). The seed flushed every
10 s of wall time, about 20 legs' worth of updates; to keep the run short the baseline flushes
every FLUSH_EVERY calls instead, so each flush writes ~20 rows, and its cost lands on the
unlucky call. The baseline makes fewer calls per run (its flushes are slow); percentiles
compare all the same.
"""

from __future__ import annotations

import shutil
import threading
import time
from array import array

from bench.common import BenchError, DaemonProcess, read_only_db, tmp_workdir
from bench.report import Scenario, at_most, stats
from bench.seed import seed_store
from positiond_client import Leg, PositionPersistenceManager

__all__ = ["run"]

FLUSH_EVERY = 20  # baseline: calls between two inline flushes (~ the seed's 20 legs per flush)
WARMUP = 1000


def _price(i: int) -> tuple[float, float, float]:
    """(current, stop, highest) for call ``i``: a wiggle, a stop trailing every 1000 calls."""
    current = 100.0 + (i % 200) * 0.05
    return current, 90.0 + (i // 1000) * 0.05, current + 1.0


def _positiond_run(
    pm: PositionPersistenceManager, daemon: DaemonProcess, n: int
) -> tuple[array[int], float]:
    """n timed calls over two legs, then sync() and a check that the newest values are stored."""
    samples = array("q", bytes(8 * n))
    legs: list[Leg] = [
        pm.save_position_entry(
            symbol=f"NIFTY28NOV2524000{side}",
            leg_type=side,
            entry_price=100.0,
            stop_price=90.0,
            quantity=75,
        )
        for side in ("CE", "PE")
    ]
    update = pm.queue_position_update
    for i in range(WARMUP):
        current, stop, high = _price(i)
        update(legs[i & 1], current_price=current, stop_price=stop, highest_price=high)
    perf = time.perf_counter_ns
    for i in range(n):
        leg = legs[i & 1]
        current, stop, high = _price(i)
        t0 = perf()
        update(leg, current_price=current, stop_price=stop, highest_price=high)
        samples[i] = perf() - t0
    t0 = time.perf_counter_ns()
    if not pm.sync(timeout=10.0):
        raise BenchError("sync() after the update burst was not acknowledged in 10 s")
    sync_ms = (time.perf_counter_ns() - t0) / 1e6
    conn = read_only_db(daemon.db)
    try:
        for j in range(2):
            i = n - 1 - j
            row = conn.execute(
                "SELECT current_price, stop_price, highest_price FROM strategy_positions "
                "WHERE position_key = ?",
                (legs[i & 1].key,),
            ).fetchone()
            if row is None or tuple(row) != _price(i):
                raise BenchError(f"leg {legs[i & 1].key}: db holds {row}, last sent {_price(i)}")
    finally:
        conn.close()
    for leg in legs:
        if not pm.save_position_exit(leg, exit_price=95.0, exit_reason="BENCH"):
            raise BenchError(f"exit of {leg.key} was not acknowledged")
    return samples, sync_ms


def _baseline_run(n: int) -> tuple[array[int], list[int], str]:
    samples = array("q", bytes(8 * n))
    workdir = tmp_workdir("pdb-seed-")
    flushes: list[int] = []
    try:
        seed, label = seed_store(workdir / "seed.db")
        try:
            keys = ["seed-CE", "seed-PE"]
            for j, key in enumerate(keys):
                seed.save_position_entry(key, f"NIFTY28NOV2524000{key[-2:]}", key[-2:], 100.0,
                                         90.0, 75 + j)  # fmt: skip
            update, flush = seed.queue_position_update, seed.flush
            calls = 0
            for i in range(WARMUP):
                update(keys[i & 1], *_price(i))
                calls += 1
                if calls % FLUSH_EVERY == 0:
                    flush()
            perf = time.perf_counter_ns
            for i in range(n):
                key = keys[i & 1]
                current, stop, high = _price(i)
                t0 = perf()
                update(key, current, stop, high)
                calls += 1
                if calls % FLUSH_EVERY == 0:
                    flush()
                    flushes.append(i)
                samples[i] = perf() - t0
            flush()
            for j in range(2):
                i = n - 1 - j
                row = seed.read_leg(keys[i & 1])
                if row != _price(i):
                    raise BenchError(f"baseline leg {keys[i & 1]}: {row} != {_price(i)}")
        finally:
            seed.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return samples, [samples[i] for i in flushes], label


def _floor_run(n: int, work: bool) -> array[int]:
    """The machine's own noise: n timed calls of a function that does nothing (``work``:
    what the client's call does minus waking its I/O thread: a dict update under a lock)."""
    samples = array("q", bytes(8 * n))
    lock = threading.Lock()
    pending: dict[str, dict[str, float]] = {}

    def nothing(key: str, current_price: float, stop_price: float, highest_price: float) -> None:
        pass

    def coalesce(key: str, current_price: float, stop_price: float, highest_price: float) -> None:
        fields = {"current_price": current_price, "stop_price": stop_price,
                  "highest_price": highest_price}  # fmt: skip
        with lock:
            old = pending.get(key)
            if old is None:
                pending[key] = fields
            else:
                old.update(fields)

    call = coalesce if work else nothing
    perf = time.perf_counter_ns
    for i in range(n):
        key = "CE" if i & 1 else "PE"
        current, stop, high = _price(i)
        t0 = perf()
        call(key, current_price=current, stop_price=stop, highest_price=high)
        samples[i] = perf() - t0
    return samples


def run(quick: bool) -> Scenario:
    runs, n, n_base = (2, 20_000, 5_000) if quick else (3, 1_000_000, 100_000)
    sc = Scenario("update")
    per_run: dict[str, list[float]] = {}
    over = {"positiond": 0, "baseline": 0, "empty": 0, "coalesce": 0}
    top: dict[str, list[float]] = {name: [] for name in over}
    label = ""

    def record(name: str, samples: array[int]) -> None:
        s = stats(samples, 1e-3)
        for key, value in (("p50", s.p50), ("p99", s.p99), ("p999", s.p999), ("max", s.max),
                           ("mean", s.mean)):  # fmt: skip
            per_run.setdefault(f"{name}_{key}", []).append(value)
        over[name] += sum(1 for v in samples if v > 1_000_000)
        top[name] = sorted([*top[name], *(v / 1e3 for v in sorted(samples)[-10:])])[-20:]

    with DaemonProcess(log_level="WARNING") as daemon:
        pm = daemon.manager("bench-update", ack_timeout=5.0)
        try:
            if pm.start_session() is None:
                raise BenchError("positiond did not acknowledge the session start")
            for _ in range(runs):
                samples, sync_ms = _positiond_run(pm, daemon, n)
                record("positiond", samples)
                per_run.setdefault("sync_ms", []).append(sync_ms)
                base, flushes, label = _baseline_run(n_base)
                record("baseline", base)
                record("empty", _floor_run(n, work=False))
                record("coalesce", _floor_run(n, work=True))
                per_run.setdefault("flush_p50", []).append(stats(flushes, 1e-3).p50)
            pm.end_session()
        finally:
            pm.close(1.0)
        sc.raw["positiond_warnings"] = daemon.warnings()
    sc.row(f"call p50 (µs), {runs} runs x {n:,} calls", per_run["positiond_p50"],
           per_run["baseline_p50"], target=at_most(5, " µs"))  # fmt: skip
    sc.row("call p99 (µs)", per_run["positiond_p99"], per_run["baseline_p99"],
           target=at_most(50, " µs"))  # fmt: skip
    sc.row("call p99.9 (µs)", per_run["positiond_p999"], per_run["baseline_p999"])
    sc.row("call max = worst stall (µs)", per_run["positiond_max"], per_run["baseline_max"],
           target=at_most(1000, " µs"))  # fmt: skip
    sc.row("call mean (µs)", per_run["positiond_mean"], per_run["baseline_mean"])
    sc.row(f"baseline flush (the stalled call) p50 (µs), every {FLUSH_EVERY}", None,
           per_run["flush_p50"])  # fmt: skip
    sc.row("calls > 1 ms, all runs (count)", str(over["positiond"]), str(over["baseline"]))
    sc.row("sync() after 1 run's burst (ms)", per_run["sync_ms"])
    sc.row("floor: empty function call, max (µs)", per_run["empty_max"])
    sc.row("floor: empty function call, calls > 1 ms (count)", str(over["empty"]))
    sc.row("floor: dict update under a lock, no I/O thread: p99 (µs)", per_run["coalesce_p99"])
    sc.row("floor: dict update under a lock, no I/O thread: max (µs)", per_run["coalesce_max"])
    sc.raw.update(
        runs=runs, n=n, n_baseline=n_base, warmup=WARMUP, flush_every=FLUSH_EVERY,
        baseline=label, per_run=per_run, calls_over_1ms=over, top20_us=top,
    )  # fmt: skip
    sc.notes.append(
        f"update: baseline = seed-style {label} queue, flushed inline every {FLUSH_EVERY} "
        f"calls (bulk UPDATE + commit); {n_base:,} calls per baseline run"
    )
    return sc
