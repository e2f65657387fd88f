"""Scenario ``protect``: from a strategy's kill -9 to its protective stop order at the broker.

A real daemon with ``[protect] mode = "on"`` and ``[openalgo]`` pointing at the fake OpenAlgo
(:mod:`bench.fake_openalgo`, with its order book). Each run starts a strategy process
(bench/protect_proc.py) holding one leg on its own instrument, which the fake's positionbook
shows open, SIGKILLs it, and measures until the fake accepts the ``placeorder`` for that leg.

What bounds it: the crash verdict (a process death closes its socket: a DISCONNECT verdict at
once; a hung one waits for the heartbeat timeout), the writer's commit, the protect worker's
wake-up (woken after the commit, not by its poll), one ``positionbook`` call, the PLANNED
commit, then the ``placeorder`` call.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.common import BenchError, DaemonProcess, kill_process, poll_until
from bench.fake_openalgo import FakeOpenAlgo
from bench.report import Scenario, at_most, stats

__all__ = ["run"]

ROOT = Path(__file__).resolve().parents[1]
PLACE_DEADLINE = 15.0  # seconds, from the kill to the order
KEY = "bench-protect-key"


def _daemon(fake: FakeOpenAlgo) -> DaemonProcess:
    daemon = DaemonProcess(log_level="WARNING")
    key = daemon.workdir / "openalgo.key"
    key.write_text(KEY + "\n")
    config = daemon.workdir / "protect.toml"
    config.write_text(
        f'[openalgo]\nhost = "{fake.url}"\napi_key_file = "{key}"\ntimeout = 5\n\n'
        '[protect]\nmode = "on"\nstrategies = ["bench_protect"]\n'
    )
    daemon.args += ["--config", str(config)]
    return daemon


def _spawn(daemon: DaemonProcess, symbol: str) -> subprocess.Popen[str]:
    leg = {"symbol": symbol, "entry_price": 100.0, "stop_price": 92.5, "quantity": 75}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.protect_proc", daemon.endpoint, "bench_protect",
         json.dumps([leg])],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        text=True, cwd=ROOT,
    )  # fmt: skip
    assert proc.stdout is not None
    if not proc.stdout.readline():
        kill_process(proc, signal.SIGKILL)
        raise BenchError("the strategy process printed nothing")
    return proc


def _placed(fake: FakeOpenAlgo, symbol: str) -> list[float]:
    with fake.orders.lock:
        ids = [i for i, o in fake.orders.orders.items() if o["symbol"] == symbol]
    return [1.0] if ids else []


def run(quick: bool) -> Scenario:
    reps = 3 if quick else 24
    sc = Scenario("protect")
    latencies: list[float] = []
    missed = 0
    with FakeOpenAlgo(api_key=KEY) as fake, _daemon(fake) as daemon:
        for rep in range(reps):
            symbol = f"NIFTY28NOV25{20000 + 50 * rep}CE"
            fake.orders.set_position(symbol, 75)
            proc = _spawn(daemon, symbol)
            seen = len(fake.orders.order_times)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGKILL)
            kill_process(proc, signal.SIGKILL)
            if proc.stdout is not None:
                proc.stdout.close()
            try:
                poll_until(lambda s=symbol: _placed(fake, s), PLACE_DEADLINE,
                           f"the protective order for {symbol}")  # fmt: skip
            except BenchError:
                missed += 1
                continue
            latencies.append((fake.orders.order_times[seen] - t0) * 1e3)
        sc.raw["daemon_warnings"] = daemon.warnings()[-20:]
        sc.raw["forbidden_calls"] = len(fake.forbidden())
        sc.raw["orders"] = len(fake.orders.placed())
    found = stats(latencies)
    sc.row(f"kill -9 → protective order at the broker p50 (ms), runs={found.n}/{reps}",
           found.p50, "never")  # fmt: skip
    sc.row("kill -9 → protective order p99 (ms)", found.p99, "never",
           target=at_most(2000, " ms"))  # fmt: skip
    sc.row("kill -9 → protective order max (ms)", found.max, "never")
    sc.raw.update(reps=reps, kill_ms=latencies, missed=missed, stats_ms=found.as_dict())
    if missed:
        sc.notes.append(f"protect: {missed}/{reps} kills without an order in time")
    if sc.raw["orders"] != reps - missed or sc.raw["forbidden_calls"]:
        sc.notes.append(f"protect: {sc.raw['orders']} orders for {reps} legs, "
                        f"{sc.raw['forbidden_calls']} account-wide calls")  # fmt: skip
    return sc
