"""Scenario ``outage``: what a daemon that is away or paused costs a strategy.

Same run, same manager, same daemon: durable entries timed with the daemon present, then after
it was SIGKILLed (the client knows it is unreachable: no connection), then present again once
restarted (everything queued meanwhile is checked stored). Then the daemon is SIGSTOPped while
the strategy sends updates flat out to 10 legs: the client's RSS, its send queue and its worst
update call over the pause (memory must stay flat: one pending state per leg).
"""

from __future__ import annotations

import os
import signal
import time

from bench.common import BenchError, DaemonProcess, poll_until, read_only_db
from bench.report import Scenario, at_most, stats
from positiond_client import Delivery, PositionPersistenceManager

__all__ = ["run"]

ACK_TIMEOUT = 2.0  # the default: what each call cost before the client knew the daemon away


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _entries(pm: PositionPersistenceManager, tag: str, n: int, expect: Delivery) -> list[int]:
    samples: list[int] = []
    perf = time.perf_counter_ns
    for i in range(n):
        t0 = perf()
        leg = pm.save_position_entry(
            symbol="NIFTY28NOV2524000CE", entry_price=100.0, stop_price=90.0, quantity=75,
            position_key=f"{tag}-{i}",
        )  # fmt: skip
        samples.append(perf() - t0)
        if leg.delivery is not expect:
            raise BenchError(f"entry {tag}-{i}: {leg.delivery}, expected {expect}")
    return samples


def _nothing(leg: object, **fields: object) -> None:
    pass


def _floor_worst_us(calls: int) -> float:
    """The same loop's worst call when the call does nothing (what the machine costs)."""
    worst, perf = 0, time.perf_counter_ns
    for i in range(calls):
        t0 = perf()
        _nothing(None, current_price=100.0 + i * 1e-4, state={"n": i})
        worst = max(worst, perf() - t0)
    return worst / 1e3


def _paused(daemon: DaemonProcess, seconds: float) -> dict[str, float]:
    pm = daemon.manager("bench-paused", ack_timeout=ACK_TIMEOUT)
    assert daemon.proc is not None
    try:
        pm.start_session()
        legs = [
            pm.save_position_entry(symbol=f"S{i}", entry_price=100.0, quantity=1)
            for i in range(10)
        ]
        if not pm.sync(5):
            raise BenchError("legs not stored before the pause")
        rss0 = _rss()
        daemon.proc.send_signal(signal.SIGSTOP)
        calls, worst, peak_queue, peak_bytes = 0, 0, 0, 0
        perf = time.perf_counter_ns
        try:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                for leg in legs:
                    t0 = perf()
                    pm.queue_position_update(
                        leg, current_price=100.0 + calls * 1e-4, state={"n": calls}
                    )
                    worst = max(worst, perf() - t0)
                    calls += 1
                if calls % 5000 == 0:
                    status = pm.status()
                    peak_queue = max(peak_queue, status.send_queue + status.pending_updates)
                    peak_bytes = max(peak_bytes, status.send_queue_bytes)
            growth = _rss() - rss0
        finally:
            daemon.proc.send_signal(signal.SIGCONT)
        if not pm.sync(30):
            raise BenchError("the updates sent during the pause were not stored after it")
        return {
            "calls": calls,
            "rss_growth_mib": growth / 2**20,
            "peak_queue": peak_queue,
            "peak_bytes": peak_bytes,
            "worst_us": worst / 1e3,
            "floor_worst_us": _floor_worst_us(calls),
        }
    finally:
        pm.close(1.0)


def run(quick: bool) -> Scenario:
    n, pause = (50, 2.0) if quick else (500, 20.0)
    sc = Scenario("outage")
    with DaemonProcess(log_level="WARNING") as daemon:
        pm = daemon.manager("bench-outage", ack_timeout=ACK_TIMEOUT)
        try:
            if pm.start_session() is None:
                raise BenchError("positiond did not acknowledge the session start")
            present = _entries(pm, "present", n, Delivery.STORED)
            assert daemon.proc is not None
            daemon.proc.send_signal(signal.SIGKILL)
            daemon.proc.wait()
            poll_until(lambda: not pm.connected, 10, "the client to see the daemon gone")
            away = _entries(pm, "away", n, Delivery.QUEUED)
            daemon.start()
            if not pm.sync(10):
                raise BenchError("the entries made while the daemon was away were not stored")
            again = _entries(pm, "again", n, Delivery.STORED)
            pm.end_session()
        finally:
            pm.close(1.0)
        conn = read_only_db(daemon.db)
        try:
            stored = conn.execute(
                "SELECT count(*) FROM strategy_positions WHERE position_key LIKE 'away-%'"
            ).fetchone()[0]
        finally:
            conn.close()
        if stored != n:
            raise BenchError(f"{stored} of the {n} entries made while away were stored")
        paused = _paused(daemon, pause)
    a, p, p2 = stats(away, 1e-6), stats(present, 1e-6), stats(again, 1e-6)
    sc.row(f"durable entry, daemon away (killed) p50 (ms), n={n}", a.p50, p.p50)
    sc.row("durable entry, daemon away p99 (ms)", a.p99, p.p99, target=at_most(5.0, " ms"))
    sc.row("durable entry, daemon away max (ms)", a.max, p.max)
    sc.row("durable entry, daemon back (restarted) p50 (ms)", p2.p50, p.p50)
    sc.row("durable entry, daemon back p99 (ms)", p2.p99, p.p99)
    sc.row(f"client RSS growth, daemon paused {pause:g} s (MiB)", paused["rss_growth_mib"],
           target=at_most(2.0, " MiB"))  # fmt: skip
    sc.row("  ... update calls during the pause", paused["calls"])
    sc.row("  ... peak messages waiting in the client (10 legs)", paused["peak_queue"])
    sc.row("  ... peak encoded bytes waiting to be sent", paused["peak_bytes"])
    sc.row("  ... worst update call (µs)", paused["worst_us"])
    sc.row("floor: empty function call, same loop and count, worst (µs)", paused["floor_worst_us"])
    sc.raw.update(n=n, pause_s=pause, paused=paused, ack_timeout=ACK_TIMEOUT)
    sc.notes.append(
        "outage: 'baseline' column = the same durable entry with the daemon present, same run, "
        f"same manager; before the client knew the daemon away each call waited ack_timeout "
        f"({ACK_TIMEOUT:g} s). Away = SIGKILLed daemon (no connection); every entry made "
        "meanwhile is checked stored after the restart."
    )
    return sc
