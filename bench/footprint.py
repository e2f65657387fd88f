"""Scenario ``footprint``: what the daemon costs the machine.

A few load-generator processes (``bench.workers sessions``) hold 1,000 raw-protocol sessions
with 10 open legs each and heartbeat every one of them every 0.5 s, as the client library does.
Measured from /proc: the daemon's RSS and CPU while only those heartbeats arrive; its RSS
across two floods of 1M update messages (spread over all the legs: the second flood shows
whether memory keeps growing); and the database's size (pages in use, WAL included) before and
after the floods: coalescing keeps one row per leg, so updates should not make it grow.
"""

from __future__ import annotations

import time

from bench.common import (
    BenchError,
    DaemonProcess,
    cpu_seconds,
    read_only_db,
    rss_bytes,
    start_workers,
)
from bench.report import Scenario, at_most

__all__ = ["run"]

MIB = 1024 * 1024
HEARTBEAT_TIMEOUT = 3.0


def _db_bytes(daemon: DaemonProcess) -> int:
    conn = read_only_db(daemon.db)
    try:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        size = conn.execute("PRAGMA page_size").fetchone()[0]
    finally:
        conn.close()
    return int((pages - free) * size)


def _updates(daemon: DaemonProcess) -> int:
    return int(daemon.status()["counters"]["updates"])


def run(quick: bool) -> Scenario:
    if quick:
        sessions, legs, generators, idle_runs, idle_s, flood = 40, 10, 1, 2, 0.3, 10_000
        flush = 0.2
    else:
        sessions, legs, generators, idle_runs, idle_s, flood = 1000, 10, 2, 5, 2.0, 1_000_000
        flush = 1.0  # the default
    sc = Scenario("footprint")
    extra = ["--status-interval", "0.1", "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT)]
    with DaemonProcess(flush_interval=flush, log_level="WARNING", extra=extra) as daemon:
        rss_fresh = rss_bytes(daemon.pid)
        t0 = time.monotonic()
        per = sessions // generators
        workers = start_workers(
            daemon.workdir,
            [
                (f"sessions-{g}", "sessions", [daemon.endpoint, str(per), str(legs)])
                for g in range(generators)
            ],
            timeout=300,
        )
        try:
            setup_s = time.monotonic() - t0
            time.sleep(flush)  # let the entries' aftermath (first flush, allocations) settle
            rss_idle: list[float] = []
            cpu_idle: list[float] = []
            for _ in range(idle_runs):
                c0, w0 = cpu_seconds(daemon.pid), time.monotonic()
                time.sleep(idle_s)
                c1, w1 = cpu_seconds(daemon.pid), time.monotonic()
                cpu_idle.append((c1 - c0) / (w1 - w0) * 100)
                rss_idle.append(rss_bytes(daemon.pid) / MIB)
            db_before = _db_bytes(daemon)
            rss_after: list[float] = []
            rates: list[float] = []
            peak = 0
            for _ in range(2):
                u0, f0 = _updates(daemon), time.monotonic()
                for worker in workers:
                    worker.go(updates=flood // generators)
                deadline = time.monotonic() + 300
                while _updates(daemon) < u0 + flood:
                    if time.monotonic() > deadline:
                        raise BenchError("the daemon did not take the flood within 300 s")
                    peak = max(peak, rss_bytes(daemon.pid))
                    time.sleep(0.05)
                rates.append(flood / (time.monotonic() - f0))
                for worker in workers:
                    worker.result(time.monotonic() + 60)
                time.sleep(flush * 1.5)  # a flush interval: the flood's last values are written
                rss_after.append(rss_bytes(daemon.pid) / MIB)
            db_after = _db_bytes(daemon)
            status = daemon.status()
        finally:
            for worker in workers:
                worker.close()
        warnings = daemon.warnings()
    if status["sessions"] < sessions:
        raise BenchError(f"only {status['sessions']} of {sessions} sessions were live at the end")
    idle_rss = max(rss_idle)
    sc.row("daemon RSS, fresh (MiB)", rss_fresh / MIB)
    sc.row(f"daemon RSS, {sessions:,} sessions x {legs} legs heartbeating (MiB)", rss_idle,
           target=at_most(64, " MiB"))  # fmt: skip
    sc.row("daemon CPU at idle, heartbeats only (% of one core)", cpu_idle,
           target=at_most(5, " %"))  # fmt: skip
    sc.row(f"RSS growth over the 1st flood of {flood:,} updates (MiB)", rss_after[0] - idle_rss)
    sc.row(f"RSS growth over the 2nd flood of {flood:,} updates (MiB)",
           rss_after[1] - rss_after[0], target=at_most(2, " MiB (flat)"))  # fmt: skip
    sc.row("daemon RSS peak during the floods (MiB)", peak / MIB)
    sc.row("flood rate, updates taken by the daemon /s", rates)
    sc.row(f"database in use with {sessions * legs:,} legs (MiB)", db_before / MIB)
    sc.row(f"database growth per {flood:,} updates (KiB)", (db_after - db_before) / 2 / 1024)
    sc.raw.update(
        sessions=sessions, legs=legs, generators=generators, setup_s=setup_s,
        rss_fresh=rss_fresh, rss_idle_mib=rss_idle, cpu_idle_pct=cpu_idle,
        rss_after_floods_mib=rss_after, rss_peak=peak, flood=flood, flood_rates=rates,
        db_before=db_before, db_after=db_after, status=status, warnings=warnings,
    )  # fmt: skip
    return sc
