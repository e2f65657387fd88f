"""Scenario ``load``: durable entries and exits from many strategies while ingest runs.

M trader processes (real strategies, ``PositionPersistenceManager``) enter and exit one leg
after another, each call waiting for its ack (sent after the commit), while K ingest processes
stream updates over L legs as fast as they can. Group commit should keep the acks' tail short:
every commit carries whatever durable messages arrived while the previous one ran. Baseline:
the same traders, same processes, with the ingest processes idle. A third phase paces the
traders (a pause between cycles, as real strategies trade) under the same ingest. Phases
alternate.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.common import DaemonProcess, Worker, cpu_seconds, start_workers
from bench.floor import daemon_rtts
from bench.report import Scenario, at_most, stats

__all__ = ["run"]

PAUSE = 0.05  # seconds between two entry/exit cycles of a paced trader


def _machine_busy() -> tuple[float, float]:
    """(busy, total) CPU jiffies of the whole machine so far (/proc/stat)."""
    fields = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _phase(
    daemon: DaemonProcess,
    traders: list[Worker],
    ingest: list[Worker],
    seconds: float,
    pause: float = 0.0,
) -> dict[str, Any]:
    start = time.monotonic() + 0.2
    end = start + seconds
    for worker in traders:
        worker.go(start=start, end=end, pause=pause)
    for worker in ingest:
        worker.go(start=start, end=end)
    while time.monotonic() < start:
        time.sleep(0.005)
    cpu0, (busy0, total0) = cpu_seconds(daemon.pid), _machine_busy()
    batches0 = daemon.status()["counters"]["batches"]
    while time.monotonic() < end:
        time.sleep(0.005)
    cpu1, (busy1, total1) = cpu_seconds(daemon.pid), _machine_busy()
    batches1 = daemon.status()["counters"]["batches"]
    results = [w.result(end + 60) for w in traders]
    calls = sum(w.result(end + 60)["calls"] for w in ingest)
    acks = [ns for r in results for ns in (*r["entry_ns"], *r["exit_ns"])]
    s = stats(acks, 1e-6)
    return {
        "p50": s.p50,
        "p99": s.p99,
        "max": s.max,
        "acks_per_s": len(acks) / seconds,
        "failed": sum(r["failed"] for r in results),
        "ingest_calls_per_s": calls / seconds,
        "daemon_cpu_pct": (cpu1 - cpu0) / seconds * 100,
        "machine_busy_pct": (busy1 - busy0) / max(total1 - total0, 1) * 100,
        # Durable messages per commit: what group commit gathers (status lags <= 0.1 s).
        "acks_per_commit": len(acks) / max(batches1 - batches0, 1),
    }


def run(quick: bool) -> Scenario:
    if quick:
        m, k, legs, runs, seconds, idle_n = 2, 1, 10, 1, 0.5, 5
    else:
        m, k, legs, runs, seconds, idle_n = 8, 2, 100, 3, 3.0, 100
    sc = Scenario("load")
    loaded: list[dict[str, Any]] = []
    quiet: list[dict[str, Any]] = []
    paced: list[dict[str, Any]] = []
    paced_quiet: list[dict[str, Any]] = []
    extra = ["--status-interval", "0.1"]
    with DaemonProcess(log_level="WARNING", extra=extra) as daemon:
        specs = [(f"trader-{i}", "trader", [daemon.endpoint]) for i in range(m)]
        specs += [(f"ingest-{i}", "ingest-client", [daemon.endpoint, str(legs)]) for i in range(k)]
        workers = start_workers(daemon.workdir, specs)
        traders, ingest = workers[:m], workers[m:]
        try:
            for _ in range(runs):
                loaded.append(_phase(daemon, traders, ingest, seconds))
                quiet.append(_phase(daemon, traders, [], seconds))
                paced.append(_phase(daemon, traders, ingest, seconds, PAUSE))
                paced_quiet.append(_phase(daemon, traders, [], seconds, PAUSE))
        finally:
            for worker in workers:
                worker.close()
        idle = [stats(daemon_rtts(daemon.endpoint, idle_n, 5, PAUSE), 1e-6) for _ in range(runs)]
        warnings = daemon.warnings()

    def col(runs: list[dict[str, Any]], key: str) -> list[float]:
        return [float(r[key]) for r in runs]

    label = f"{m} traders + {k}x{legs} ingest"
    sc.row(f"ack p50 (ms), {label} vs traders alone", col(loaded, "p50"), col(quiet, "p50"))
    sc.row("ack p99 (ms)", col(loaded, "p99"), col(quiet, "p99"), target=at_most(5, " ms"))
    sc.row("ack max (ms)", col(loaded, "max"), col(quiet, "max"))
    sc.row(f"ack p99 (ms), traders pausing {PAUSE * 1000:g} ms per cycle", col(paced, "p99"),
           col(paced_quiet, "p99"), target=at_most(5, " ms"))  # fmt: skip
    sc.row("  ... their ack p50 (ms)", col(paced, "p50"), col(paced_quiet, "p50"))
    sc.row("  ... machine CPU busy (% of all cores)", col(paced, "machine_busy_pct"),
           col(paced_quiet, "machine_busy_pct"))  # fmt: skip
    sc.row(f"floor: one bare client, {PAUSE * 1000:g} ms pause per entry, nothing else: p50 (ms)",
           [i.p50 for i in idle])  # fmt: skip
    sc.row("floor: ... p99 (ms)", [i.p99 for i in idle])
    sc.row("durable acks /s (entries + exits)", col(loaded, "acks_per_s"),
           col(quiet, "acks_per_s"), higher_is_better=True)  # fmt: skip
    sc.row("ingest: update calls /s during the phase", col(loaded, "ingest_calls_per_s"))
    sc.row("durable messages per commit (group commit)", col(loaded, "acks_per_commit"),
           col(quiet, "acks_per_commit"))  # fmt: skip
    sc.row("daemon CPU (% of one core)", col(loaded, "daemon_cpu_pct"),
           col(quiet, "daemon_cpu_pct"))  # fmt: skip
    sc.row("machine CPU busy (% of all cores)", col(loaded, "machine_busy_pct"),
           col(quiet, "machine_busy_pct"))  # fmt: skip
    failed = sum(r["failed"] for r in loaded + quiet + paced + paced_quiet)
    if failed:
        sc.notes.append(f"load: {failed} entries/exits were not acknowledged")
    sc.raw.update(
        traders=m, ingest_processes=k, legs=legs, seconds=seconds, loaded=loaded, quiet=quiet,
        paced=paced, paced_quiet=paced_quiet,
        warnings=warnings,
    )  # fmt: skip
    sc.notes.append(
        "load: ratio = baseline / positiond, baseline = the same traders with ingest idle; "
        "an ack is one save_position_entry or save_position_exit round trip (after commit)"
    )
    return sc
