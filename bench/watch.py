"""Scenario ``watch``: what one ``posctl watch`` costs the daemon.

A real daemon; in this process a strategy streams updates (every leg's price and stop move all
the time) and another one enters and exits a leg in a loop, timing each ack. Phases without a
watcher and with one (a real ``posctl watch --json`` subprocess, output discarded) alternate;
the daemon's CPU time comes from /proc/PID/stat over each phase.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

from bench.common import DaemonProcess, cpu_seconds
from bench.report import Scenario, at_most, stats
from positiond.ctl.access import ask_health
from positiond_client import PositionPersistenceManager

__all__ = ["run"]

LEGS = 10
STREAM_SLEEP = 0.005  # a strategy's loop: every leg updated each ~5 ms (~2000 updates/s)


def _watcher(daemon: DaemonProcess) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "positiond.ctl", "--db", str(daemon.db),
            "--endpoint", daemon.endpoint, "watch", "--json"]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _phase(
    daemon: DaemonProcess, acker: PositionPersistenceManager, seconds: float, n: int
) -> tuple[float, list[float]]:
    """(daemon CPU %, ack latencies in ms) over ``seconds`` of entry/exit round trips."""
    pid = daemon.pid
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    latencies: list[float] = []
    i = 0
    while time.monotonic() - t0 < seconds:
        i += 1
        began = time.perf_counter()
        leg = acker.save_position_entry(
            symbol=f"ACK{n}-{i}", leg_type="CE", entry_price=10.0, stop_price=9.0, quantity=1
        )
        latencies.append((time.perf_counter() - began) * 1e3)
        began = time.perf_counter()
        acker.save_position_exit(leg, exit_price=10.0, exit_reason="EXIT")
        latencies.append((time.perf_counter() - began) * 1e3)
        time.sleep(0.02)
    cpu = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0) * 100
    return cpu, latencies


def run(quick: bool) -> Scenario:
    sc = Scenario("watch")
    seconds, rounds = (2.0, 1) if quick else (6.0, 3)
    cpu: dict[bool, list[float]] = {False: [], True: []}
    acks: dict[bool, list[float]] = {False: [], True: []}
    with DaemonProcess(log_level="WARNING") as daemon:
        streamer = daemon.manager("bench-stream", ack_timeout=5.0)
        acker = daemon.manager("bench-ack", ack_timeout=5.0)
        streamer.start_session()
        acker.start_session()
        legs = [
            streamer.save_position_entry(
                symbol=f"SYM{i}", leg_type="CE", entry_price=100.0, stop_price=90.0, quantity=1
            )
            for i in range(LEGS)
        ]
        stop = threading.Event()
        sent = [0]

        def stream() -> None:
            price = 100.0
            while not stop.is_set():
                price += 0.05
                for leg in legs:
                    streamer.queue_position_update(
                        leg, current_price=price, highest_price=price, stop_price=price - 10
                    )
                sent[0] += len(legs)
                time.sleep(STREAM_SLEEP)

        thread = threading.Thread(target=stream, daemon=True)
        thread.start()
        try:
            time.sleep(1.0)  # warm up
            n = 0
            for _ in range(rounds):
                for watching in (False, True):
                    n += 1
                    proc = _watcher(daemon) if watching else None
                    try:
                        if proc is not None:
                            time.sleep(1.5)  # posctl's start-up is not the daemon's cost
                        used, lat = _phase(daemon, acker, seconds, n)
                    finally:
                        if proc is not None:
                            proc.terminate()
                            proc.wait(10)
                    cpu[watching].append(used)
                    acks[watching] += lat
            health = ask_health(daemon.endpoint, 5.0) or {}
        finally:
            stop.set()
            thread.join()
            streamer.close(1.0)
            acker.close(1.0)
    counters = health.get("counters", {})
    rate = sent[0] / max(1e-9, rounds * 2 * (seconds + 0.75) + 1.0)
    none, one = stats(acks[False]), stats(acks[True])
    sc.row("daemon CPU %, streaming, no watcher", cpu[False])
    sc.row("daemon CPU %, streaming, one posctl watch", cpu[True])
    sc.row("ack p50 (ms): one watcher (baseline: none)", one.p50, none.p50)
    sc.row(
        "ack p99 (ms): one watcher (baseline: none)", one.p99, none.p99, target=at_most(50, " ms")
    )
    sc.raw.update(
        cpu=cpu, acks_none=none.as_dict(), acks_one=one.as_dict(), counters=counters,
        updates_per_s=rate,
    )  # fmt: skip
    sc.notes.append(
        f"watch: a strategy streamed ~{rate:,.0f} updates/s over {LEGS} legs while another "
        f"entered and exited a leg every ~20 ms; {rounds} round(s) of {seconds:g} s without and "
        f"with one `posctl watch --json` (frames sent: {counters.get('watch_frames', '?')}, "
        f"watchers ended or dropped: {counters.get('watchers_dropped', '?')}). Daemon CPU from "
        "/proc/PID/stat; the ack rows show one watcher (positiond column) against none "
        "(baseline column)."
    )
    return sc
