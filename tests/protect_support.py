"""Machinery of the protect tests: a real daemon with ``[openalgo]`` and ``[protect]`` pointing at
the fake OpenAlgo (bench/fake_openalgo.py), and strategy processes (bench/protect_proc.py)
holding legs until they are killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from positiond.store.dsn import PgDsn
from tests.fake_openalgo import FakeOpenAlgo
from tests.helpers import UNIT, DaemonProcess, rows, wait_for

__all__ = [
    "CE",
    "KEY",
    "PE",
    "Holder",
    "alerts",
    "leg",
    "orders",
    "start_daemon",
]

KEY = "oa-protect-key-77c1"
CE = "NIFTY28NOV2524000CE"
PE = "NIFTY28NOV2524000PE"
ROOT = Path(__file__).resolve().parents[1]


def leg(symbol: str, stop: float | None, quantity: int = 75, side: str = "BUY",
        **extra: Any) -> dict[str, Any]:  # fmt: skip
    return {"symbol": symbol, "entry_price": 100.0, "stop_price": stop, "quantity": quantity,
            "side": side, **extra}  # fmt: skip


def start_daemon(
    workdir: Path, fake: FakeOpenAlgo, protect: str = 'mode = "on"\nstrategies = ["guarded"]',
    *, timeout: float = 0.5, poll_interval: float = 0.1, db: Path | PgDsn | None = None,
) -> DaemonProcess:  # fmt: skip
    key_file = workdir / "openalgo.key"
    key_file.write_text(KEY + "\n")
    config = workdir / "positiond.toml"
    config.write_text(
        f'[openalgo]\nhost = "{fake.url}"\napi_key_file = "{key_file}"\n'
        f"timeout = {timeout * UNIT}\n\n[protect]\npoll_interval = {poll_interval}\n{protect}\n"
    )
    return DaemonProcess(
        workdir, "--flush-interval", "0.05", "--config", str(config), "--status-interval", "0.2",
        heartbeat_timeout=1.0, db=db,
    ).start()


class Holder:
    """A strategy process holding legs (bench/protect_proc.py); :meth:`kill` is kill -9."""

    def __init__(self, endpoint: str, strategy: str, legs: list[dict[str, Any]]) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.protect_proc", endpoint, strategy, json.dumps(legs)],
            stdout=subprocess.PIPE, env=env, text=True, cwd=ROOT,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, "the strategy process printed nothing"
        info = json.loads(line)
        self.session_id: int = info["session_id"]
        self.keys: list[str] = info["legs"]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def orders(db: Path | PgDsn) -> list[dict[str, Any]]:
    """The protective_orders rows with their leg's key."""
    sql = ("SELECT o.*, p.position_key FROM protective_orders o "
           "JOIN strategy_positions p ON p.position_id = o.position_id ORDER BY o.id")
    return [dict(r) for r in rows(db, sql)]


def alerts(db: Path | PgDsn, kind: str) -> list[dict[str, Any]]:
    return [json.loads(r["body"]) for r in rows(
        db, "SELECT body FROM alert_outbox WHERE kind = ? ORDER BY id", (kind,))]  # fmt: skip


def settled(db: Path | PgDsn, n: int, what: str = "protective orders") -> list[dict[str, Any]]:
    """Wait until ``n`` rows exist and none is PLANNED; the rows."""
    return wait_for(
        lambda: (found := orders(db)) and len(found) >= n
        and all(o["state"] != "PLANNED" for o in found) and found,
        15, what,
    )  # fmt: skip
