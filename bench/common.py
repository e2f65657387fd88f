"""Shared bench machinery: a real daemon subprocess, percentiles, result rows, a markdown table.

Nothing here sleeps blindly: every wait polls a condition against a deadline.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from positiond_client import PositionPersistenceManager

__all__ = [
    "BenchError",
    "DaemonProcess",
    "Row",
    "Scenario",
    "Stats",
    "environment",
    "kill_process",
    "markdown_table",
    "percentile",
    "poll_until",
    "read_only_db",
    "stats",
    "tmp_workdir",
]

T = TypeVar("T")

# Polling step of condition waits (seconds): short enough not to distort latencies.
POLL_STEP = 0.001


class BenchError(RuntimeError):
    """A scenario could not run (daemon did not start, a deadline passed, ...)."""


def poll_until(condition: Callable[[], T], timeout: float, what: str) -> T:
    """Call ``condition`` every POLL_STEP until it returns something truthy, or raise."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(POLL_STEP)


def tmp_workdir(prefix: str) -> Path:
    """A fresh private directory under /tmp (short: an ipc path is limited to 107 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def kill_process(
    proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 10.0
) -> None:
    """Send ``sig`` to a child we started (if still running) and reap it; SIGKILL on timeout."""
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            if sig == signal.SIGTERM:
                # A stopped process only acts on SIGTERM once continued.
                proc.send_signal(signal.SIGCONT)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def read_only_db(db: Path) -> sqlite3.Connection:
    """An operator's view: read-only, autocommit (each SELECT sees the latest commit)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5, isolation_level=None)
    return conn


class DaemonProcess:
    """``python -m positiond`` on a private tmp dir; a context manager that always cleans up."""

    def __init__(
        self,
        *,
        heartbeat_timeout: float | None = None,
        flush_interval: float | None = None,
        log_level: str = "INFO",
        ready_timeout: float = 15.0,
    ) -> None:
        self.workdir = tmp_workdir("pdb-")
        self.db = self.workdir / "positiond.db"
        self.sock = self.workdir / "d.sock"
        self.endpoint = f"ipc://{self.sock}"
        self.log = self.workdir / "daemon.log"
        self.ready_timeout = ready_timeout
        self.args = [
            sys.executable,
            "-m",
            "positiond",
            "--db",
            str(self.db),
            "--endpoint",
            self.endpoint,
            "--log-level",
            log_level,
        ]
        if heartbeat_timeout is not None:
            self.args += ["--heartbeat-timeout", str(heartbeat_timeout)]
        if flush_interval is not None:
            self.args += ["--flush-interval", str(flush_interval)]
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s: float | None = None

    def __enter__(self) -> DaemonProcess:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def _alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise BenchError(
                f"positiond exited with code {self.proc.returncode}:\n{self.output()[-4000:]}"
            )

    def start(self) -> None:
        t0 = time.monotonic()
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.args, stdout=out, stderr=out, stdin=subprocess.DEVNULL
            )
        deadline = t0 + self.ready_timeout

        def socket_bound() -> bool:
            self._alive()
            return self.sock.exists()

        poll_until(socket_bound, self.ready_timeout, "the daemon's ipc socket")
        # The socket exists once bound; a real session start proves the whole path works.
        while True:
            self._alive()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"positiond did not answer a session start:\n{self.output()}")
            pm = self.manager("bench-ready", ack_timeout=max(0.05, min(1.0, remaining)))
            try:
                if pm.start_session() is not None:
                    pm.end_session()
                    break
            finally:
                pm.close(0.2)
        self.startup_s = time.monotonic() - t0

    def manager(self, strategy: str, **kwargs: Any) -> PositionPersistenceManager:
        return PositionPersistenceManager(strategy_name=strategy, endpoint=self.endpoint, **kwargs)

    def close(self) -> None:
        """SIGTERM and wait (SIGKILL if it hangs), then remove the tmp dir."""
        try:
            if self.proc is not None:
                kill_process(self.proc, signal.SIGTERM, timeout=15.0)
                if self.proc.returncode not in (0, None):
                    logging.getLogger("bench").warning(
                        "positiond exited with code %s; log tail:\n%s",
                        self.proc.returncode,
                        self.output()[-2000:],
                    )
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def warnings(self) -> list[str]:
        """WARNING/ERROR lines of the daemon's log (read before close())."""
        return [
            line
            for line in self.output().splitlines()
            if " WARNING " in line or " ERROR " in line or "Traceback" in line
        ]


# ---- statistics --------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of already sorted values, linear interpolation."""
    if not sorted_values:
        return math.nan
    if len(sorted_values) == 1:
        return float(sorted_values[0])
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = pos - lo
    return float(sorted_values[lo]) + (float(sorted_values[hi]) - float(sorted_values[lo])) * frac


@dataclass(frozen=True)
class Stats:
    n: int
    p50: float
    p99: float
    p999: float
    max: float
    mean: float
    min: float

    def as_dict(self) -> dict[str, float]:
        return {
            "n": self.n,
            "min": self.min,
            "p50": self.p50,
            "p99": self.p99,
            "p99.9": self.p999,
            "max": self.max,
            "mean": self.mean,
        }


def stats(values: Iterable[float], scale: float = 1.0) -> Stats:
    """Summary of ``values`` multiplied by ``scale`` (e.g. 1e-6 for ns -> ms)."""
    data = sorted(v * scale for v in values)
    if not data:
        return Stats(0, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan)
    return Stats(
        n=len(data),
        p50=percentile(data, 50),
        p99=percentile(data, 99),
        p999=percentile(data, 99.9),
        max=data[-1],
        mean=sum(data) / len(data),
        min=data[0],
    )


# ---- results -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One line of the result table; ``ratio`` is baseline / positiond (>1: positiond is faster)."""

    scenario: str
    metric: str
    positiond: float | str | None
    baseline: float | str | None = None

    @property
    def ratio(self) -> float | None:
        p, b = self.positiond, self.baseline
        if isinstance(p, int | float) and isinstance(b, int | float) and p > 0:
            return float(b) / float(p)
        return None


@dataclass
class Scenario:
    """What one scenario hands back: table rows, raw figures for --json, remarks for the reader."""

    name: str
    rows: list[Row] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def row(
        self, metric: str, positiond: float | str | None, baseline: float | str | None = None
    ) -> None:
        self.rows.append(Row(self.name, metric, positiond, baseline))


def _fmt(value: float | str | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    if math.isnan(value):
        return "nan"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def markdown_table(rows: Sequence[Row]) -> str:
    header = ["scenario", "metric", "positiond", "baseline", "ratio"]
    body = [
        [
            r.scenario,
            r.metric,
            _fmt(r.positiond),
            _fmt(r.baseline),
            "—" if r.ratio is None else f"{r.ratio:.2f}x",
        ]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def render(cells: Sequence[str]) -> str:
        padded = [
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join(
            ("-" * (w + 2)) if i < 2 else ("-" * (w + 1) + ":") for i, w in enumerate(widths)
        )
        + "|"
    )
    return "\n".join([render(header), rule, *(render(line) for line in body)])


def environment() -> dict[str, Any]:
    import platform

    import zmq

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "sqlite": sqlite3.sqlite_version,
        "libzmq": zmq.zmq_version(),
        "pyzmq": zmq.__version__,
    }
