"""Shared test machinery: deadlines scaled by one env factor, a real daemon process, db reads."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# Every deadline in the suite is a multiple of this unit (seconds), scaled for slow machines.
FACTOR = float(os.environ.get("POSITIOND_TEST_TIMEOUT_FACTOR", "1"))
UNIT = 1.0 * FACTOR


def wait_for(condition: Callable[[], T], timeout: float = 5.0, what: str = "condition") -> T:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` units."""
    deadline = time.monotonic() + timeout * UNIT
    delay = 0.001
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout * UNIT:.1f}s waiting for {what}")
        time.sleep(delay)  # polling interval of a condition wait, not a blind sleep
        delay = min(delay * 2, 0.02)


def rows(db: Path, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
    """Read the database the way an operator would: a separate read-only connection."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def session_status(db: Path, session_id: int) -> str | None:
    if not db.exists():
        return None
    found = rows(db, "SELECT status FROM strategy_sessions WHERE id = ?", (session_id,))
    return found[0]["status"] if found else None


class DaemonProcess:
    """``python -m positiond`` as a real subprocess on a tmp database and ipc socket."""

    def __init__(self, workdir: Path, *extra: str, heartbeat_timeout: float = 3.0) -> None:
        self.workdir = workdir
        self.db = workdir / "positiond.db"
        self.sock = workdir / "pd.sock"
        self.endpoint = f"ipc://{self.sock}"
        self.starts = 0
        self.log = workdir / "daemon-0.log"
        self.args = [
            sys.executable,
            "-m",
            "positiond",
            "--db",
            str(self.db),
            "--endpoint",
            self.endpoint,
            "--heartbeat-timeout",
            str(heartbeat_timeout),
            "--log-level",
            "DEBUG",
            *extra,
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DaemonProcess:
        self.starts += 1
        self.log = self.workdir / f"daemon-{self.starts}.log"  # one log per run
        out = open(self.log, "ab")  # noqa: SIM115 -- owned by the child
        self.proc = subprocess.Popen(self.args, stdout=out, stderr=out)
        out.close()
        wait_for(self.ready, 10, "the daemon to report ready")
        return self

    def ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.output()}")
        return "positiond ready" in self.output()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        """Signal the daemon and wait for it; return its exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout * UNIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"daemon did not stop on signal {sig}:\n{self.output()}") from None
        return code

    def kill(self) -> None:
        self.stop(signal.SIGKILL)
