"""Scenario ``ingest``: K strategy processes x L legs streaming updates as fast as they can.

positiond: each process is a real strategy (``PositionPersistenceManager``); leg j's n-th update
sets its price to 1 + n, so ``sum(current_price - 1)`` over the stored legs is the number of
updates whose newest value is visible in SQLite. Sampled from a read-only connection, that sum
climbs at every flush commit; the end-to-end rate of a window is its climb between the first and
the last commit inside the window, divided by the time between them.

Raw ceiling, same run, same K and L: bare pyzmq DEALERs sending the same update messages to a
ROUTER that polls, drains and orjson-decodes them, and stores nothing.

The client coalesces a leg's updates while its I/O thread is busy, so positiond can make more
updates visible than it receives messages: the wire rate (messages the daemon decoded, from its
status.json counters) is reported beside it. The floor rows split one update message's CPU
cost in the daemon into its steps, measured in process: what the ceiling's sink pays (zmq
receive, orjson.loads) and what positiond adds (validation, the engine).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from typing import Any

from bench.common import (
    BenchError,
    DaemonProcess,
    Worker,
    cpu_seconds,
    read_only_db,
    start_workers,
    tmp_workdir,
)
from bench.floor import message_costs
from bench.report import Scenario, Target

__all__ = ["run"]

FLUSH_INTERVAL = 0.1  # seconds: commits often enough to time each window by its commits
STATUS_INTERVAL = 0.1
POLL = 0.01  # seconds between two reads of the stored sum
WARMUP = 0.5  # seconds of traffic before the first window
SETTLE = 10.0  # seconds the last updates may take to become visible

# The target: with 4 processes, >= 90 % of the raw ceiling.
TARGET_K = 4
RATIO_TARGET = Target("≥ 90% of ceiling", lambda p, r: r is not None and r >= 0.9)


def _windows(start: float, width: float, count: int) -> list[tuple[float, float]]:
    first = start + WARMUP
    return [(first + i * width, first + (i + 1) * width) for i in range(count)]


def _sample_at(samples: Sequence[Sequence[float]], t: float) -> tuple[float, float]:
    """The last (time, value) sample taken at or before t."""
    best = samples[0]
    for sample in samples:
        if sample[0] > t:
            break
        best = sample
    return best[0], best[1]


def _ceiling(k: int, legs: int, windows: int, width: float) -> list[float]:
    workdir = tmp_workdir("pdb-sink-")
    endpoint = f"ipc://{workdir}/sink.sock"
    workers: list[Worker] = []
    try:
        workers += start_workers(workdir, [("sink", "sink", [endpoint])])
        workers += start_workers(
            workdir, [(f"raw-{i}", "ingest-raw", [endpoint, str(legs)]) for i in range(k)]
        )
        start = time.monotonic() + 0.3
        spans = _windows(start, width, windows)
        end = spans[-1][1]
        for worker in workers:
            worker.go(start=start, end=end)
        samples = workers[0].result(end + 30)["samples"]
        rates = []
        for a, b in spans:
            ta, ca = _sample_at(samples, a)
            tb, cb = _sample_at(samples, b)
            rates.append((cb - ca) / (tb - ta) if tb > ta else float("nan"))
        return rates
    finally:
        for worker in workers:
            worker.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _until(t: float) -> None:
    while time.monotonic() < t:
        time.sleep(POLL)


def _visible(conn: Any) -> float:
    value = conn.execute(
        "SELECT coalesce(sum(current_price - 1.0), 0) FROM strategy_positions "
        "WHERE status = 'ACTIVE'"
    ).fetchone()[0]
    return float(value)


def _positiond(k: int, legs: int, windows: int, width: float, bare: bool) -> dict[str, Any]:
    """``bare``: the senders speak the protocol themselves (no client library, no coalescing)."""
    extra = ["--status-interval", str(STATUS_INTERVAL)]
    with DaemonProcess(flush_interval=FLUSH_INTERVAL, log_level="WARNING", extra=extra) as daemon:
        if bare:
            spec = [(f"bare-{i}", "ingest-raw", [daemon.endpoint, str(legs), "session"])
                    for i in range(k)]  # fmt: skip
        else:
            spec = [(f"client-{i}", "ingest-client", [daemon.endpoint, str(legs)])
                    for i in range(k)]  # fmt: skip
        workers = start_workers(daemon.workdir, spec)
        conn = read_only_db(daemon.db)
        try:
            start = time.monotonic() + 0.3
            spans = _windows(start, width, windows)
            end = spans[-1][1]
            for worker in workers:
                worker.go(start=start, end=end)
            _until(spans[0][0])
            cpu0, msgs0 = cpu_seconds(daemon.pid), daemon.status()["counters"]["messages"]
            samples: list[tuple[float, float]] = []  # (time, visible) at every change
            counters: list[tuple[float, float]] = []  # (time, messages decoded)
            last = -1.0
            while time.monotonic() < end + 0.05:
                now = time.monotonic()
                value = _visible(conn)
                if value != last:
                    samples.append((now, value))
                    last = value
                status = daemon.status()
                wall_age = time.time() - float(status["time"])
                counters.append((now - wall_age, float(status["counters"]["messages"])))
                time.sleep(POLL)
            cpu1, msgs1 = cpu_seconds(daemon.pid), daemon.status()["counters"]["messages"]
            done = [w.result(time.monotonic() + 30) for w in workers]
            calls = sum(d["calls"] for d in done)
            expected = float(sum(sum(d["final"].values()) for d in done))
            deadline = time.monotonic() + SETTLE
            while _visible(conn) < expected:
                if time.monotonic() > deadline:
                    raise BenchError(
                        f"after {SETTLE:.0f}s only {_visible(conn):,.0f} of {expected:,.0f} "
                        f"updates are visible in the database; daemon status {daemon.status()}"
                        f", log tail:\n{daemon.output()[-3000:]}"
                    )
                time.sleep(POLL)
            settle = time.monotonic() - end
        finally:
            conn.close()
            for worker in workers:
                worker.close()
        warnings = daemon.warnings()
    rates, wire = [], []
    for a, b in spans:
        inside = [s for s in samples if a <= s[0] <= b]
        if len(inside) >= 2 and inside[-1][0] > inside[0][0]:
            (ta, va), (tb, vb) = inside[0], inside[-1]
            rates.append((vb - va) / (tb - ta))
        else:  # fewer than two commits in the window (a starved daemon): the stored value's climb
            rates.append((_sample_at(samples, b)[1] - _sample_at(samples, a)[1]) / (b - a))
        (ta, ma), (tb, mb) = _sample_at(counters, a), _sample_at(counters, b)
        wire.append((mb - ma) / (tb - ta) if tb > ta else float("nan"))
    return {
        "visible": rates,
        "wire": wire,
        "calls_per_s": calls / (end - start),
        # Daemon CPU per message decoded, over the windows (status counters lag <= 0.1 s).
        "cpu_us_per_msg": (cpu1 - cpu0) / max(msgs1 - msgs0, 1) * 1e6,
        "settle_s": settle,
        "warnings": warnings,
    }


def run(quick: bool) -> Scenario:
    if quick:
        configs, windows, width = [(2, 10)], 1, 0.6
    else:
        configs = [(1, 10), (1, 100), (4, 10), (4, 100), (16, 10), (16, 100)]
        windows, width = 3, 2.0
    sc = Scenario("ingest")
    raw: dict[str, Any] = {}
    for k, legs in configs:
        ceiling = _ceiling(k, legs, windows, width)
        pd = _positiond(k, legs, windows, width, bare=False)
        bare = _positiond(k, legs, windows, width, bare=True)
        raw[f"{k}x{legs}"] = {"ceiling": ceiling, "client": pd, "bare": bare}
        target = RATIO_TARGET if k == TARGET_K else None
        sc.row(f"K={k} x L={legs}: strategies' updates visible in SQLite /s", pd["visible"],
               ceiling, higher_is_better=True, target=target)  # fmt: skip
        sc.row(f"K={k} x L={legs}:   ... messages the daemon decoded /s", pd["wire"])
        sc.row(f"K={k} x L={legs}: bare-protocol senders, visible /s", bare["visible"],
               ceiling, higher_is_better=True, target=target)  # fmt: skip
    cpu = [raw[f"{k}x{legs}"]["bare"]["cpu_us_per_msg"] for k, legs in configs]
    sc.row("daemon CPU µs per update (bare senders, all configs)", cpu)
    costs: dict[str, list[float]] = {}
    for _ in range(windows):
        for name, value in message_costs(5_000 if quick else 100_000).items():
            costs.setdefault(name, []).append(value)
    for name, values in costs.items():
        sc.row(f"floor: CPU µs per update: {name}", values)
    sc.raw.update(
        message_costs_us=costs, configs=raw, windows=windows, window_s=width, warmup_s=WARMUP,
        flush_interval=FLUSH_INTERVAL,
    )  # fmt: skip
    sc.notes.append(
        f"ingest: ratio = positiond / ceiling; {windows} windows of {width:g}s per config; the "
        f"daemon runs with --flush-interval {FLUSH_INTERVAL:g} so each window holds many "
        "commits (the rate does not depend on it: updates are coalesced in memory)"
    )
    return sc
