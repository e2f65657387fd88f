"""Shared bench machinery: a real daemon subprocess (bench.launcher), worker processes, /proc
readings.

Nothing here sleeps blindly: every wait polls a condition against a deadline.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from bench import launcher
from positiond_client import PositionPersistenceManager

__all__ = [
    "BenchError",
    "DaemonProcess",
    "Worker",
    "cpu_seconds",
    "environment",
    "kill_process",
    "poll_until",
    "read_only_db",
    "rss_bytes",
    "start_workers",
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
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()


def read_only_db(db: Path) -> sqlite3.Connection:
    """An operator's view: read-only, autocommit (each SELECT sees the latest commit)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5, isolation_level=None)
    return conn


class DaemonProcess(launcher.DaemonProcess):
    """The shared launcher (:mod:`bench.launcher`) on a fresh tmp dir; a context manager that
    always cleans up.

    Ready once a real session start is answered: the whole path works, at any ``log_level``
    (the scenarios run the daemon at WARNING, without the ready line). ``startup_s`` is the time
    from the spawn to that answer.
    """

    def __init__(
        self,
        *,
        heartbeat_timeout: float | None = None,
        flush_interval: float | None = None,
        log_level: str = "INFO",
        ready_timeout: float = 15.0,
        extra: Sequence[str] = (),
    ) -> None:
        super().__init__(
            tmp_workdir("pdb-"), *extra, heartbeat_timeout=heartbeat_timeout,
            flush_interval=flush_interval, log_level=log_level,
        )  # fmt: skip
        self.ready_timeout = ready_timeout
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

    def start(self, timeout: float | None = None, step: float = POLL_STEP) -> DaemonProcess:
        t0 = time.monotonic()
        super().start(self.ready_timeout if timeout is None else timeout, step)
        self.startup_s = time.monotonic() - t0
        return self

    def ready(self) -> bool:
        """The socket is bound and a session start is answered (then ended)."""
        self.alive()
        if not self.sock.exists():
            return False
        pm = self.manager("bench-ready", ack_timeout=1.0)
        try:
            if pm.start_session() is not None:
                pm.end_session()
                return True
        finally:
            pm.close(0.2)
        return False

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


# ---- environment ---------------------------------------------------------------------


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
        "loadavg": os.getloadavg(),
    }


# ---- /proc -------------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---- worker processes --------------------------------------------------------------------


class Worker:
    """``python -m bench.workers MODE ...`` speaking a line protocol on stdin/stdout.

    The worker prints ``READY {json}`` once set up, starts on ``GO {json}`` (times are
    ``time.monotonic()`` values: one clock for every process on Linux), prints ``DONE {json}``
    and exits when its stdin closes.
    """

    def __init__(self, workdir: Path, name: str, mode: str, *args: str) -> None:
        self.name = name
        self.errlog = workdir / f"{name}.log"
        with open(self.errlog, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.workers", mode, *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                cwd=Path(__file__).resolve().parent.parent,
            )
        self.ready: dict[str, Any] = {}

    def _line(self, prefix: str, deadline: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"worker {self.name} did not say {prefix} in time")
            readable, _, _ = select.select([self.proc.stdout], [], [], remaining)
            if not readable:
                continue
            line = self.proc.stdout.readline().decode(errors="replace").strip()
            if line.startswith(prefix + " "):
                data: dict[str, Any] = json.loads(line[len(prefix) + 1 :])
                return data
            if not line:
                self.proc.wait(5)
                raise BenchError(
                    f"worker {self.name} exited ({self.proc.returncode}) before {prefix}: "
                    + self.errlog.read_text(errors="replace")[-2000:]
                )

    def wait_ready(self, deadline: float) -> dict[str, Any]:
        self.ready = self._line("READY", deadline)
        return self.ready

    def go(self, **params: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"GO {json.dumps(params)}\n".encode())
        self.proc.stdin.flush()

    def result(self, deadline: float) -> dict[str, Any]:
        return self._line("DONE", deadline)

    def close(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            kill_process(self.proc, signal.SIGKILL)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def start_workers(
    workdir: Path, specs: Sequence[tuple[str, str, Sequence[str]]], timeout: float = 60.0
) -> list[Worker]:
    """Start workers (name, mode, args) all at once and wait until every one is READY."""
    workers: list[Worker] = []
    try:
        for name, mode, args in specs:
            workers.append(Worker(workdir, name, mode, *args))
        deadline = time.monotonic() + timeout
        for worker in workers:
            worker.wait_ready(deadline)
    except BaseException:
        for worker in workers:
            kill_process(worker.proc, signal.SIGKILL)
            worker.close()
        raise
    return workers
