"""sd_notify: the Notifier on its own, then a real daemon talking to a fake NOTIFY_SOCKET."""

from __future__ import annotations

import itertools
import os
import select
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from positiond.notify import Notifier
from positiond_client.protocol import encode
from tests.helpers import UNIT, rows, wait_for


class FakeSystemd:
    """The receiving end of $NOTIFY_SOCKET: a datagram socket in the test's directory."""

    def __init__(self, path: Path | None = None, abstract: str | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract is not None:
            self.sock.bind(b"\0" + abstract.encode())
            self.address = "@" + abstract
        else:
            assert path is not None
            self.sock.bind(str(path))
            self.address = str(path)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def recv(self, timeout: float) -> dict[str, str] | None:
        """The next notification, or None if none came within ``timeout`` units."""
        ready, _, _ = select.select([self.sock], [], [], timeout * UNIT)
        if not ready:
            return None
        data = self.sock.recv(4096).decode()
        fields = dict(line.split("=", 1) for line in data.split("\n") if line)
        self.messages.append((time.monotonic(), fields))
        return fields

    def wait(self, key: str, timeout: float = 10) -> dict[str, str]:
        """Read notifications until one carries ``key``; fail after ``timeout`` units."""
        deadline = time.monotonic() + timeout * UNIT
        while time.monotonic() < deadline:
            msg = self.recv(max(0.0, deadline - time.monotonic()) / UNIT)
            if msg is not None and key in msg:
                return msg
        raise AssertionError(f"no {key}= notification in {timeout * UNIT:.1f}s: {self.messages}")

    def quiet_for(self, key: str, window: float, timeout: float = 10) -> bool:
        """Wait until ``window`` units pass without a ``key`` notification."""
        deadline = time.monotonic() + timeout * UNIT
        while time.monotonic() < deadline:
            start = time.monotonic()
            while True:
                left = window - (time.monotonic() - start) / UNIT
                if left <= 0:
                    return True
                msg = self.recv(left)
                if msg is not None and key in msg:
                    break  # heard one: start the window again
        return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def systemd(workdir: Path) -> Iterator[FakeSystemd]:
    fake = FakeSystemd(workdir / "notify")
    yield fake
    fake.close()


class NotifiedDaemon:
    """``python -m positiond`` started the way systemd starts it: NOTIFY_SOCKET and friends."""

    def __init__(self, workdir: Path, systemd: FakeSystemd, *extra: str, **env: str) -> None:
        self.db = workdir / "positiond.db"
        self.sock = workdir / "pd.sock"
        self.endpoint = f"ipc://{self.sock}"
        self.log = workdir / "daemon.log"
        environ = {k: v for k, v in os.environ.items() if not k.startswith("POSITIOND_")}
        environ |= {"NOTIFY_SOCKET": systemd.address, **env}
        args = [sys.executable, "-m", "positiond", "--db", str(self.db)]
        args += ["--endpoint", self.endpoint, "--log-level", "DEBUG", *extra]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(args, env=environ, stdout=out, stderr=out)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout * UNIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"daemon did not stop:\n{self.output()}") from None


@pytest.fixture
def started() -> Iterator[list[NotifiedDaemon]]:
    daemons: list[NotifiedDaemon] = []
    yield daemons
    for daemon in daemons:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()


def _start_message(session: str) -> bytes:
    return encode({"v": 1, "type": "start", "seq": 1, "session": session, "strategy": "s"})


# ---- the notifier alone ------------------------------------------------------------------


def test_notifier_does_nothing_outside_systemd() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert notifier.ready("x") is False
    assert notifier.watchdog() is False
    notifier.close()


def test_notifier_sends_one_datagram_to_a_path_socket(systemd: FakeSystemd) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": systemd.address})
    assert notifier.ready("line one\nline two")
    # One datagram, and a newline in STATUS cannot smuggle in another assignment.
    assert systemd.recv(1) == {"READY": "1", "STATUS": "line one line two"}
    assert notifier.extend_timeout(2.5)
    assert systemd.recv(1) == {"EXTEND_TIMEOUT_USEC": "2500000"}
    assert notifier.reloading()
    assert set(systemd.recv(1) or {}) == {"RELOADING", "MONOTONIC_USEC"}
    notifier.close()


def test_notifier_reaches_an_abstract_socket() -> None:
    fake = FakeSystemd(abstract=f"positiond-test-{os.getpid()}-{time.monotonic_ns()}")
    try:
        notifier = Notifier({"NOTIFY_SOCKET": fake.address})
        assert notifier.stopping()
        assert fake.recv(1) == {"STOPPING": "1"}
        notifier.close()
    finally:
        fake.close()


def test_notifier_survives_a_missing_socket(workdir: Path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(workdir / "nobody")})
    assert notifier.enabled
    assert notifier.watchdog() is False  # logged once, never raised
    notifier.close()


def test_watchdog_interval_is_half_the_timeout_and_only_for_us(systemd: FakeSystemd) -> None:
    env = {"NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": "200000"}
    notifier = Notifier(env)
    assert notifier.watchdog_interval == pytest.approx(0.1)
    notifier.close()
    notifier = Notifier({**env, "WATCHDOG_PID": str(os.getpid())})
    assert notifier.watchdog_interval == pytest.approx(0.1)
    notifier.close()
    notifier = Notifier({**env, "WATCHDOG_PID": "1"})  # meant for another process
    assert notifier.watchdog_interval is None
    notifier.close()
    notifier = Notifier({**env, "WATCHDOG_USEC": "soon"})
    assert notifier.watchdog_interval is None
    notifier.close()


# ---- a real daemon -----------------------------------------------------------------------


def test_ready_only_once_the_database_is_migrated_and_the_socket_accepts(
    workdir: Path, systemd: FakeSystemd, started: list[NotifiedDaemon]
) -> None:
    daemon = NotifiedDaemon(workdir, systemd)
    started.append(daemon)
    ready = systemd.wait("READY")
    # At the moment READY=1 arrives, the socket accepts and the schema is there.
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(daemon.sock))
    finally:
        probe.close()
    tables = {r["name"] for r in rows(daemon.db, "SELECT name FROM sqlite_master")}
    assert {"strategy_sessions", "strategy_positions"} <= tables
    assert ready["READY"] == "1"
    assert ready["STATUS"].startswith("0 session(s) live, 0 leg(s) open, 0 pending")
    # Nothing claimed readiness before (only READY, no earlier notification).
    assert [fields for _, fields in systemd.messages] == [ready]
    assert daemon.stop() == 0


def test_stopping_on_sigterm_then_a_clean_exit(
    workdir: Path, systemd: FakeSystemd, started: list[NotifiedDaemon]
) -> None:
    daemon = NotifiedDaemon(workdir, systemd)
    started.append(daemon)
    systemd.wait("READY")
    daemon.proc.send_signal(signal.SIGTERM)
    assert systemd.wait("STOPPING")["STOPPING"] == "1"
    assert daemon.stop() == 0
    assert "positiond stopped" in daemon.output()


def test_watchdog_pings_at_half_the_watchdog_timeout(
    workdir: Path, systemd: FakeSystemd, started: list[NotifiedDaemon]
) -> None:
    daemon = NotifiedDaemon(workdir, systemd, WATCHDOG_USEC="200000")
    started.append(daemon)
    systemd.wait("READY")
    stamps = []
    for _ in range(8):
        systemd.wait("WATCHDOG", timeout=2)
        stamps.append(time.monotonic())
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    # Every 0.1 s (half of 200 ms): not faster, and far from the 0.2 s at which systemd fires.
    # (The mean over the run, so a late read on our side does not count as a fast ping.)
    assert 0.095 <= statistics.mean(gaps) < 0.1 + 0.05 * UNIT, gaps
    assert statistics.median(gaps) > 0.09, gaps
    assert daemon.stop() == 0


def test_watchdog_pings_stop_while_the_writer_hangs_and_resume_after(
    workdir: Path, systemd: FakeSystemd, started: list[NotifiedDaemon]
) -> None:
    # A long busy timeout: the daemon's write waits inside SQLite for the lock we hold.
    daemon = NotifiedDaemon(workdir, systemd, "--busy-timeout", "60", WATCHDOG_USEC="200000")
    started.append(daemon)
    systemd.wait("READY")
    systemd.wait("WATCHDOG", timeout=2)
    blocker = sqlite3.connect(daemon.db, isolation_level=None, timeout=5)
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as client:
        client.setsockopt(zmq.LINGER, 0)
        try:
            blocker.execute("BEGIN IMMEDIATE")  # the database's write lock, really held
            client.connect(daemon.endpoint)
            client.send(_start_message("hang-1"))
            # The writer is stuck in its COMMIT path: no ping for many intervals.
            assert systemd.quiet_for("WATCHDOG", window=0.6), systemd.messages
            assert not client.poll(0), "acked although the write cannot have committed"
            wait_for(lambda: "no more watchdog pings" in daemon.output(), 5, "the stall log")
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        # The write goes through, is acknowledged, and the pings come back.
        assert client.poll(10_000 * UNIT), "no ack after the lock was released"
        systemd.wait("WATCHDOG", timeout=5)
    wait_for(lambda: "pings resume" in daemon.output(), 5, "the resume log")
    assert daemon.stop() == 0
    stored = rows(daemon.db, "SELECT session_key FROM strategy_sessions")
    assert [r["session_key"] for r in stored] == ["hang-1"]


def test_a_long_final_flush_extends_the_stop_timeout(
    workdir: Path, systemd: FakeSystemd, started: list[NotifiedDaemon]
) -> None:
    daemon = NotifiedDaemon(workdir, systemd, "--busy-timeout", "60", WATCHDOG_USEC="200000")
    started.append(daemon)
    systemd.wait("READY")
    blocker = sqlite3.connect(daemon.db, isolation_level=None, timeout=5)
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as client:
        client.setsockopt(zmq.LINGER, 0)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            client.connect(daemon.endpoint)
            client.send(_start_message("flush-1"))
            # The stalled watchdog says the write is in SQLite, waiting for our lock.
            wait_for(lambda: "no more watchdog pings" in daemon.output(), 5, "the stall")
            daemon.proc.send_signal(signal.SIGTERM)
            systemd.wait("STOPPING")
            extend = systemd.wait("EXTEND_TIMEOUT_USEC", timeout=5)
            assert int(extend["EXTEND_TIMEOUT_USEC"]) >= 1_000_000
            assert daemon.proc.poll() is None  # still writing, not given up
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert client.poll(10_000 * UNIT), "the final flush was not acknowledged"
    assert daemon.stop() == 0
    assert [
        r["session_key"] for r in rows(daemon.db, "SELECT session_key FROM strategy_sessions")
    ] == ["flush-1"]
