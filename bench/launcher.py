"""One way to run a real daemon for the tests and the benchmarks: ``python -m positiond`` as a
child process on a private database and ipc socket.

Shared by ``tests/helpers.py`` and ``bench/common.py``; it lives in ``bench`` because the
benchmarks must not import the test suite while the tests already import the benchmarks (they
run each scenario once), and because it is tooling, not part of the installed daemon. Each side
adds only its defaults: the tests a DEBUG log and deadlines scaled by
``POSITIOND_TEST_TIMEOUT_FACTOR``, the benchmarks a temporary directory they remove and a
session start as the proof of readiness.

Nothing here sleeps blindly: every wait polls a condition against a deadline.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["READY_LINE", "DaemonError", "DaemonProcess", "poll"]

T = TypeVar("T")

# What the daemon logs (INFO) once its database is open and its socket accepts connections.
READY_LINE = "positiond ready"


class DaemonError(AssertionError):
    """The daemon exited, or did not get ready or stop in time (a test fails with it)."""


def poll(condition: Callable[[], T], timeout: float, what: str, step: float = 0.02) -> T:
    """Call ``condition`` until it returns something truthy (first every ms, backing off to
    ``step``), or raise :class:`DaemonError` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise DaemonError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(delay)  # the polling interval of a condition wait, not a blind sleep
        delay = min(delay * 2, step)


class DaemonProcess:
    """``python -m positiond --db DIR/positiond.db --endpoint ipc://DIR/pd.sock ...``.

    ``args`` may be changed before :meth:`start` (a test wraps the command). Each start logs to
    its own ``daemon-N.log``; :meth:`ready` is the readiness check (the ready line of the log);
    ``unit`` scales every deadline (slow machines).
    """

    def __init__(
        self,
        workdir: Path,
        *extra: str,
        heartbeat_timeout: float | None = None,
        flush_interval: float | None = None,
        log_level: str = "INFO",
        unit: float = 1.0,
    ) -> None:
        self.workdir = workdir
        self.db = workdir / "positiond.db"
        self.sock = workdir / "pd.sock"
        self.endpoint = f"ipc://{self.sock}"
        self.unit = unit
        self.starts = 0
        self.log = workdir / "daemon-0.log"
        self.args = [sys.executable, "-m", "positiond", "--db", str(self.db),
                     "--endpoint", self.endpoint]  # fmt: skip
        if heartbeat_timeout is not None:
            self.args += ["--heartbeat-timeout", str(heartbeat_timeout)]
        if flush_interval is not None:
            self.args += ["--flush-interval", str(flush_interval)]
        self.args += ["--log-level", log_level, *extra]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0, step: float = 0.02) -> DaemonProcess:
        """Start the daemon and wait (``timeout`` units at most) until :meth:`ready`, checked
        at most every ``step`` seconds."""
        self.starts += 1
        self.log = self.workdir / f"daemon-{self.starts}.log"  # one log per run
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.args, stdout=out, stderr=out, stdin=subprocess.DEVNULL
            )
        poll(self.ready, timeout * self.unit, "the daemon to report ready", step)
        return self

    def alive(self) -> None:
        """Raise :class:`DaemonError` (with the log) if the daemon has exited."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise DaemonError(f"daemon exited with {self.proc.returncode}:\n{self.output()}")

    def ready(self) -> bool:
        """Has the daemon logged that it is ready? (Needs ``log_level`` INFO or DEBUG.)"""
        self.alive()
        return READY_LINE in self.output()

    def output(self) -> str:
        """The log of the current run."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def warnings(self) -> list[str]:
        """The WARNING and ERROR lines (and tracebacks) of the current run's log."""
        return [
            line
            for line in self.output().splitlines()
            if " WARNING " in line or " ERROR " in line or "Traceback" in line
        ]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def status(self) -> dict[str, Any]:
        """The daemon's status.json, beside its socket (refreshed every ``--status-interval``)."""
        data: dict[str, Any] = json.loads((self.sock.parent / "status.json").read_text())
        return data

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        """Signal the daemon and wait for it (``timeout`` units); return its exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout * self.unit)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise DaemonError(f"daemon did not stop on signal {sig}:\n{self.output()}") from None
        return code

    def kill(self) -> None:
        """SIGKILL, and reap it."""
        self.stop(signal.SIGKILL)
