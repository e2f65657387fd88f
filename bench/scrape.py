"""Scenario ``scrape``: what a Prometheus scraping /metrics every second costs the daemon.

One daemon with ``--metrics-listen``, one strategy process streaming updates on two legs (the
crash scenario's, bench/strategy_proc.py, one update every 5 ms) and, in this process, a second
strategy that sends a durable ``sync`` every 20 ms and times its ack. Phases alternate: not
scraped, then scraped every second over real HTTP (the endpoint is open in both: an endpoint
nobody scrapes runs nothing). Per phase, from /proc: the daemon's CPU (utime + stime); from
status.json: messages received per second; from the syncs: ack latency. The difference of the
two phases' CPU, divided by the scrapes, is the CPU one scrape costs; the kernel counts CPU in
ticks of 10 ms and the machine may be shared, so a burst of back-to-back scrapes measures it
more precisely.
"""

from __future__ import annotations

import signal
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from bench.common import BenchError, DaemonProcess, cpu_seconds, kill_process, poll_until
from bench.crash import _spawn  # the same streaming strategy process as the crash scenario
from bench.report import Scenario, at_most, percentile

__all__ = ["run"]

SCRAPE_EVERY = 1.0  # seconds, as a busy Prometheus would (15 s is the usual)
SYNC_EVERY = 0.02
STATUS_INTERVAL = 0.25  # status.json carries the message counter; same in both phases


@dataclass
class Phase:
    scraped: bool
    cpu_pct: float = 0.0
    rate: float = 0.0  # messages the daemon received per second
    acks: list[float] = field(default_factory=list)  # sync round trips (s)
    scrapes: list[float] = field(default_factory=list)  # HTTP GET durations (s)
    body_bytes: int = 0


def _messages(daemon: DaemonProcess) -> tuple[float, int]:
    status = daemon.status()
    return float(status["time"]), int(status["counters"]["messages"])


def _phase(daemon: DaemonProcess, pm: Any, url: str | None, seconds: float) -> Phase:
    phase = Phase(url is not None)
    t_msg0, msg0 = _messages(daemon)
    c0, w0 = cpu_seconds(daemon.pid), time.monotonic()
    end, next_scrape = w0 + seconds, w0
    while (now := time.monotonic()) < end:
        if url is not None and now >= next_scrape:
            s0 = time.perf_counter()
            with urllib.request.urlopen(url, timeout=10) as reply:
                phase.body_bytes = len(reply.read())
            phase.scrapes.append(time.perf_counter() - s0)
            next_scrape += SCRAPE_EVERY
        s0 = time.perf_counter()
        if not pm.sync(5.0):
            raise BenchError("a sync was not acknowledged within 5 s")
        phase.acks.append(time.perf_counter() - s0)
        time.sleep(SYNC_EVERY)  # the probe's own pacing, not a wait for a condition
    c1, w1 = cpu_seconds(daemon.pid), time.monotonic()
    time.sleep(STATUS_INTERVAL * 1.5)  # a status.json written after the phase ended
    t_msg1, msg1 = _messages(daemon)
    phase.cpu_pct = (c1 - c0) / (w1 - w0) * 100
    phase.rate = (msg1 - msg0) / (t_msg1 - t_msg0)
    return phase


def _burst(daemon: DaemonProcess, url: str, count: int) -> float:
    """Daemon CPU (ms) per scrape over ``count`` back-to-back scrapes."""
    c0 = cpu_seconds(daemon.pid)
    for _ in range(count):
        with urllib.request.urlopen(url, timeout=10) as reply:
            reply.read()
    return (cpu_seconds(daemon.pid) - c0) / count * 1000


def run(quick: bool) -> Scenario:
    phase_s, rounds, burst = (2.0, 1, 20) if quick else (10.0, 3, 300)
    sc = Scenario("scrape")
    extra = ["--metrics-listen", "127.0.0.1:0", "--status-interval", str(STATUS_INTERVAL)]
    phases: list[Phase] = []
    with DaemonProcess(log_level="WARNING", extra=extra) as daemon:
        url = str(poll_until(lambda: daemon.status().get("metrics"), 10, "the metrics URL"))
        proc, _ = _spawn(daemon, 0)
        pm = daemon.manager("bench-scrape-probe", ack_timeout=5.0)
        try:
            if pm.start_session() is None:
                raise BenchError("the probe's session start was not acknowledged")
            _phase(daemon, pm, None, min(phase_s, 1.0))  # warm-up: first commits, allocations
            for _ in range(rounds):
                for scraped in (False, True):
                    phases.append(_phase(daemon, pm, url if scraped else None, phase_s))
            burst_ms = [_burst(daemon, url, burst) for _ in range(rounds)]
        finally:
            pm.end_session()
            pm.close(1.0)
            kill_process(proc, signal.SIGKILL)
        # The streaming strategy's kill -9 is a crash verdict: expected, not a warning.
        warnings = [w for w in daemon.warnings() if "(bench-crash) crashed" not in w]
    quiet = [p for p in phases if not p.scraped]
    busy = [p for p in phases if p.scraped]
    scrapes = sorted(s for p in busy for s in p.scrapes)

    def acks(group: list[Phase], q: float) -> float:
        return percentile(sorted(a for p in group for a in p.acks), q) * 1000

    sc.row("daemon CPU, not scraped (% of one core)", [p.cpu_pct for p in quiet])
    sc.row("daemon CPU, scraped every 1 s (% of one core)", [p.cpu_pct for p in busy])
    per_scrape = [
        (b.cpu_pct - q.cpu_pct) / 100 * phase_s / max(1, len(b.scrapes)) * 1000
        for q, b in zip(quiet, busy, strict=True)
    ]
    sc.row("daemon CPU growth per scrape (ms; scraped - not scraped phase)", per_scrape)
    sc.row(f"daemon CPU per scrape (ms; {burst} back-to-back, streaming on)", burst_ms,
           target=at_most(5, " ms"))  # fmt: skip
    sc.row("scrape duration p50 (ms, HTTP GET)", percentile(scrapes, 50) * 1000)
    sc.row("scrape duration max (ms)", scrapes[-1] * 1000)
    sc.row("exposition size (KiB)", busy[-1].body_bytes / 1024)
    sc.row("messages received /s, not scraped", [p.rate for p in quiet])
    sc.row("messages received /s, scraped", [p.rate for p in busy])
    sc.row("ack latency p50, not scraped (ms)", acks(quiet, 50))
    sc.row("ack latency p50, scraped (ms)", acks(busy, 50))
    sc.row("ack latency p99, not scraped (ms)", acks(quiet, 99))
    sc.row("ack latency p99, scraped (ms)", acks(busy, 99))
    sc.raw.update(
        phase_s=phase_s, rounds=rounds, scrape_every=SCRAPE_EVERY, sync_every=SYNC_EVERY,
        burst=burst, burst_cpu_ms=burst_ms,
        phases=[{"scraped": p.scraped, "cpu_pct": p.cpu_pct, "rate": p.rate,
                 "acks": len(p.acks), "scrapes": p.scrapes} for p in phases],
        warnings=warnings[-20:],
    )  # fmt: skip
    sc.notes.append(
        f"scrape: {rounds} round(s) of {phase_s:g} s not scraped then {phase_s:g} s scraped "
        f"every {SCRAPE_EVERY:g} s, while a strategy streams an update every 5 ms and a probe "
        f"syncs every {SYNC_EVERY * 1000:g} ms; CPU from /proc/PID/stat (utime + stime). "
        "Each scrape reads counters and a few count(*) on a read-only connection of its own, "
        "in the endpoint's thread."
    )
    if warnings:
        sc.notes.append(f"scrape: the daemon logged {len(warnings)} warning(s): {warnings[:3]}")
    return sc
