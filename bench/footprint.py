"""Scenario ``footprint``: what the daemon costs the machine.

A few load-generator processes (``bench.workers sessions``) hold 1,000 raw-protocol sessions
with 10 open legs each and heartbeat every one of them every 0.5 s, as the client library does.
Measured from /proc: the daemon's RSS and CPU while only those heartbeats arrive; its RSS
across two floods of 1M update messages (spread over all the legs, each ended by a ``sync``
whose ack says all of it is stored; the second flood shows whether memory keeps growing); and
the database's size (pages in use, WAL included) before and after the floods: coalescing keeps
one row per leg, so updates should not make it grow.
"""

from __future__ import annotations

import threading
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


class _PeakRss:
    """Samples a process's RSS every 50 ms on a thread while the ``with`` block runs."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss_bytes(self.pid))

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes(self.pid))


def _db_bytes(daemon: DaemonProcess) -> int:
    conn = read_only_db(daemon.db)
    try:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        size = conn.execute("PRAGMA page_size").fetchone()[0]
    finally:
        conn.close()
    return int((pages - free) * size)


def _live_sessions(daemon: DaemonProcess) -> int:
    conn = read_only_db(daemon.db)
    try:
        return int(
            conn.execute(
                "SELECT count(*) FROM strategy_sessions WHERE status = 'RUNNING' "
                "AND strategy_name LIKE 'bench-idle-%'"
            ).fetchone()[0]
        )
    finally:
        conn.close()


def run(quick: bool) -> Scenario:
    if quick:
        sessions, legs, generators, idle_runs, idle_s, flood = 40, 10, 1, 2, 0.3, 10_000
        flush = 0.2
    else:
        sessions, legs, generators, idle_runs, idle_s, flood = 1000, 10, 2, 5, 2.0, 1_000_000
        flush = 1.0  # the default
    sc = Scenario("footprint")
    # Default status interval: a faster one would be part of the idle CPU measured.
    extra = ["--heartbeat-timeout", str(HEARTBEAT_TIMEOUT)]
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
                f0 = time.monotonic()
                for worker in workers:
                    worker.go(updates=flood // generators)
                with _PeakRss(daemon.pid) as sampler:
                    results = [w.result(time.monotonic() + 300) for w in workers]
                peak = max(peak, sampler.peak)
                rates.append(sum(r["sent"] for r in results) / (time.monotonic() - f0))
                rss_after.append(rss_bytes(daemon.pid) / MIB)
            time.sleep(flush * 1.5)  # a flush interval: heartbeats and the last values written
            db_after = _db_bytes(daemon)
            live = _live_sessions(daemon)
        finally:
            for worker in workers:
                worker.close()
        warnings = daemon.warnings()
    if live < sessions:
        raise BenchError(f"only {live} of {sessions} sessions were RUNNING at the end")
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
        db_before=db_before, db_after=db_after, warnings=warnings,
    )  # fmt: skip
    return sc
