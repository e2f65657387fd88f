"""Machinery shared by the fault tests: the strategy process, its journal, database checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.helpers import UNIT, DaemonProcess, rows

SCRIPT = Path(__file__).with_name("fault_strategy.py")


def start(daemon: DaemonProcess) -> DaemonProcess:
    """``daemon.start()``; a daemon that never reported ready is not left running."""
    try:
        return daemon.start()
    except BaseException:
        reap(daemon)
        raise


def reap(daemon: DaemonProcess) -> None:
    """Kill the daemon if it still runs (cleanup after a failure)."""
    if daemon.proc is not None and daemon.proc.poll() is None:
        daemon.proc.kill()
        daemon.proc.wait()


class Journal:
    """What the strategy was told: the JSON lines it appended, read incrementally."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        self._offset = 0

    def read(self) -> list[dict[str, Any]]:
        """Parse the complete lines appended since the last call; return them."""
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line being written is read next time
        self._offset += end
        new = [json.loads(line) for line in data[:end].splitlines()]
        self.records.extend(new)
        return new

    def count(self) -> int:
        self.read()
        return len(self.records)

    def of(self, op: str) -> list[dict[str, Any]]:
        self.read()
        return [r for r in self.records if r["op"] == op]


class StrategyProcess:
    """tests/faults/fault_strategy.py as a real process; commands go to its stdin."""

    def __init__(self, workdir: Path, mode: str, endpoint: str, *options: str) -> None:
        self.journal = Journal(workdir / f"{mode}.journal")
        self.log = workdir / f"{mode}.log"
        out = open(self.log, "ab")  # noqa: SIM115 -- owned by the child
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), mode, endpoint, str(self.journal.path), *options],
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=out,
            env={**os.environ, "PYTHONPATH": str(SCRIPT.parent.parent.parent)},
        )
        out.close()

    def command(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def finish(self, timeout: float = 60) -> int:
        """``stop``, then wait for the process to exit; return its exit code."""
        if self.alive():
            self.command("stop")
        try:
            return self.proc.wait(timeout * UNIT)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"strategy did not finish:\n{self.output()}") from None

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-5000:] if self.log.exists() else ""

    def close(self) -> None:
        if self.alive():
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdin is not None:
            self.proc.stdin.close()


def expected(n: int) -> dict[str, Any]:
    """The stored fields of a leg that holds update ``n`` (see fault_strategy.values)."""
    return {
        "current_price": 100.0 + n,
        "stop_price": 50.0 + n,
        "highest_price": 101.0 + n,
        "last_trail_level": float(n),
        "state": {"n": n},
    }


def stored_n(row: Any) -> int:
    """Which update a stored leg holds; fails if its fields come from different updates."""
    n = json.loads(row["state"])["n"]
    got = {
        "current_price": row["current_price"],
        "stop_price": row["stop_price"],
        "highest_price": row["highest_price"],
        "last_trail_level": row["last_trail_level"],
        "state": {"n": n},
    }
    assert got == expected(n), f"leg {row['position_key']} mixes updates: {got}"
    return int(n)


def integrity_ok(db: Path) -> None:
    result = [r[0] for r in rows(db, "PRAGMA integrity_check")]
    assert result == ["ok"], result
    assert rows(db, "PRAGMA foreign_key_check") == []


def legs_by_key(db: Path, keys: list[str] | None = None) -> dict[str, Any]:
    """position_key -> its row plus its ENTRY/EXIT event counts (all legs, or these keys)."""
    sql = (
        "SELECT p.*, "
        "(SELECT COUNT(*) FROM position_events e WHERE e.position_id = p.position_id "
        " AND e.event_type = 'ENTRY') AS entries, "
        "(SELECT COUNT(*) FROM position_events e WHERE e.position_id = p.position_id "
        " AND e.event_type = 'EXIT') AS exits "
        "FROM strategy_positions p"
    )
    if keys is None:
        return {r["position_key"]: r for r in rows(db, sql)}
    found: dict[str, Any] = {}
    for i in range(0, len(keys), 500):
        chunk = keys[i : i + 500]
        marks = ",".join("?" * len(chunk))
        for r in rows(db, f"{sql} WHERE p.position_key IN ({marks})", tuple(chunk)):
            found[r["position_key"]] = r
    return found
