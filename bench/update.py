"""Scenario ``update``: what ``queue_position_update`` costs the strategy's own thread.

positiond: the call coalesces the fields under a lock and wakes the client's I/O thread; the
daemon batches them to SQLite every flush interval. Baseline: the seed's list + lock, flushed
inline by the caller (executemany UPDATE + commit). The seed flushed every 10 s of wall time,
about 20 legs' worth of updates; to keep the run short the baseline flushes every FLUSH_EVERY
calls instead, so each flush writes ~20 rows, and its cost lands on the unlucky call.
"""

from __future__ import annotations

import shutil
import time
from array import array

from bench.common import BenchError, DaemonProcess, Scenario, read_only_db, stats, tmp_workdir
from bench.seed import SeedStore
from positiond_client import Leg

__all__ = ["run"]

FLUSH_EVERY = 20  # baseline: calls between two inline flushes (~ the seed's 20 legs per flush)
WARMUP = 1000


def _price(i: int) -> tuple[float, float, float]:
    """(current, stop, highest) for call ``i``: a wiggle, a stop trailing every 1000 calls."""
    current = 100.0 + (i % 200) * 0.05
    return current, 90.0 + (i // 1000) * 0.05, current + 1.0


def _positiond(n: int, sc: Scenario) -> array[int]:
    samples = array("q", bytes(8 * n))
    with DaemonProcess() as daemon:
        pm = daemon.manager("bench-update", ack_timeout=5.0)
        try:
            if pm.start_session() is None:
                raise BenchError("positiond did not acknowledge the session start")
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
            t_start = time.perf_counter()
            for i in range(n):
                leg = legs[i & 1]
                current, stop, high = _price(i)
                t0 = perf()
                update(leg, current_price=current, stop_price=stop, highest_price=high)
                samples[i] = perf() - t0
            loop_s = time.perf_counter() - t_start
            t0 = time.perf_counter_ns()
            synced = pm.sync(timeout=10.0)
            sync_ms = (time.perf_counter_ns() - t0) / 1e6
            if not synced:
                raise BenchError("sync() after the update burst was not acknowledged in 10 s")
            expected = {legs[(n - 1 - j) & 1].key: _price(n - 1 - j) for j in range(2)}
            conn = read_only_db(daemon.db)
            try:
                for key, (current, stop, high) in expected.items():
                    row = conn.execute(
                        "SELECT current_price, stop_price, highest_price FROM "
                        "strategy_positions WHERE position_key = ?",
                        (key,),
                    ).fetchone()
                    if row is None or tuple(row) != (current, stop, high):
                        raise BenchError(
                            f"leg {key}: db holds {row}, last update sent {(current, stop, high)}"
                        )
                trail_events = conn.execute(
                    "SELECT count(*) FROM position_events WHERE event_type = 'TRAIL_UPDATE'"
                ).fetchone()[0]
            finally:
                conn.close()
            for leg in legs:
                if not pm.save_position_exit(leg, exit_price=95.0, exit_reason="BENCH"):
                    raise BenchError(f"exit of {leg.key} was not acknowledged")
            pm.end_session()
        finally:
            pm.close(1.0)
        sc.raw["positiond_warnings"] = daemon.warnings()
    sc.raw.update(
        positiond_loop_s=loop_s,
        positiond_sync_after_burst_ms=sync_ms,
        trail_update_events=trail_events,
    )
    return samples


def _baseline(n: int, sc: Scenario) -> array[int]:
    samples = array("q", bytes(8 * n))
    workdir = tmp_workdir("pdb-seed-")
    try:
        seed = SeedStore(workdir / "seed.db")
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
            flushes: list[int] = []
            t_start = time.perf_counter()
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
            loop_s = time.perf_counter() - t_start
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
    flush_stats = stats((samples[i] for i in flushes), 1e-3)
    sc.raw.update(baseline_loop_s=loop_s, baseline_flush_calls_us=flush_stats.as_dict())
    return samples


def run(quick: bool) -> Scenario:
    n = 20_000 if quick else 200_000
    sc = Scenario("update")
    pd_samples = _positiond(n, sc)
    base_samples = _baseline(n, sc)
    pd, base = stats(pd_samples, 1e-3), stats(base_samples, 1e-3)
    flush = sc.raw["baseline_flush_calls_us"]
    sc.row(f"call p50 (µs), n={n}", pd.p50, base.p50)
    sc.row("call p99 (µs)", pd.p99, base.p99)
    sc.row("call p99.9 (µs)", pd.p999, base.p999)
    sc.row("call max = worst stall (µs)", pd.max, base.max)
    sc.row("call mean (µs)", pd.mean, base.mean)
    sc.row(f"baseline flush call p50 (µs), every {FLUSH_EVERY}", None, flush["p50"])
    over_pd = sum(1 for s in pd_samples if s > 1_000_000)
    over_base = sum(1 for s in base_samples if s > 1_000_000)
    sc.row("calls > 1 ms (count)", str(over_pd), str(over_base))
    sc.row("sync() after the burst (ms)", sc.raw["positiond_sync_after_burst_ms"])
    sc.raw.update(
        n=n,
        warmup=WARMUP,
        flush_every=FLUSH_EVERY,
        positiond_us=pd.as_dict(),
        baseline_us=base.as_dict(),
        calls_over_1ms={"positiond": over_pd, "baseline": over_base},
        positiond_top20_us=[s / 1e3 for s in sorted(pd_samples, reverse=True)[:20]],
        baseline_top20_us=[s / 1e3 for s in sorted(base_samples, reverse=True)[:20]],
    )
    return sc
