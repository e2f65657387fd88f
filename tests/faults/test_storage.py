"""Guarantee 5: storage faults, caused for real (no mocked sqlite).

- an operator's second connection holding ``BEGIN IMMEDIATE`` (SQLITE_BUSY);
- a full disk: the database on a tiny tmpfs, filled up (SQLITE_FULL);
- a read-only file: the database and its WAL made immutable (``chattr +i``): writes through the
  daemon's open descriptors fail with EPERM.

In each case, while the fault lasts: nothing is acknowledged (durable calls return None/False
after ack_timeout), nothing reaches the database, the daemon logs the fault and reports itself
unhealthy (status.json); once the fault clears it recovers by itself: every message commits,
every ack arrives, the newest state is stored, ``integrity_check`` is ok.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

from positiond_client import Leg, PositionPersistenceManager
from tests.faults.support import integrity_ok, legs_by_key, reap, start
from tests.helpers import UNIT, DaemonProcess, wait_for

ACK_TIMEOUT = 0.3
# How long each fault is held: long enough for the daemon to retry several times.
HOLD = 2.0 * UNIT
BIG_STATE = {"blob": "x" * 120_000}  # entries large enough to need new pages in a full WAL


def status(daemon: DaemonProcess) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((daemon.workdir / "status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return data


def start_daemon(workdir: Path, *extra: str, db: Path | None = None) -> DaemonProcess:
    args = ["--flush-interval", "0.05", "--busy-timeout", "0.2", "--status-interval", "0.1"]
    if db is not None:
        args += ["--db", str(db)]
    daemon = DaemonProcess(workdir, *args, *extra)
    if db is not None:
        daemon.db = db
    return start(daemon)


def survive(
    daemon: DaemonProcess,
    inject: Callable[[], None],
    release: Callable[[], None],
    fault_log: str,
    state: dict[str, Any] | None = None,
) -> None:
    """Write through a fault and after it; assert nothing acked during it, everything after."""
    pm = PositionPersistenceManager("storage", endpoint=daemon.endpoint, ack_timeout=ACK_TIMEOUT)
    released = False
    try:
        assert pm.start_session() is not None
        before = pm.save_position_entry(
            symbol="NIFTY", entry_price=100.0, stop_price=90.0, quantity=75, position_key="before"
        )
        assert before.position_id is not None
        assert pm.sync(5)
        wait_for(lambda: status(daemon).get("healthy") is True, 5, "a healthy status.json")

        inject()
        t0 = time.monotonic()
        legs: list[Leg] = []
        for i in range(3):
            called = time.monotonic()
            legs.append(
                pm.save_position_entry(
                    symbol="NIFTY",
                    entry_price=100.0 + i,
                    stop_price=90.0,
                    quantity=75,
                    position_key=f"during-{i}",
                    state=state,
                )
            )
            # Returned after ack_timeout, without raising, unacknowledged.
            assert legs[-1].position_id is None
            assert time.monotonic() - called < ACK_TIMEOUT + 0.5 * UNIT
        pm.queue_position_update(before, current_price=120.0, stop_price=110.0)
        assert not pm.save_position_exit(legs[0], exit_price=95.0, exit_reason="STOP_HIT")
        assert pm.sync(ACK_TIMEOUT) is False
        wait_for(lambda: fault_log in daemon.output(), 10, f"the daemon to log {fault_log!r}")
        wait_for(lambda: status(daemon).get("healthy") is False, 5, "status.json: unhealthy")
        # The fault lasts (the daemon keeps retrying meanwhile): this is its duration.
        time.sleep(max(0.0, HOLD - (time.monotonic() - t0)))
        assert all(leg.position_id is None for leg in legs), "acked during the fault"
        assert daemon.proc is not None and daemon.proc.poll() is None, daemon.output()
        stored = legs_by_key(daemon.db)
        assert sorted(stored) == ["before"], "written during the fault"
        assert stored["before"]["stop_price"] == 90.0

        release()
        released = True
        wait_for(lambda: all(leg.position_id is not None for leg in legs), 15, "the acks")
        assert pm.sync(5)
        wait_for(lambda: status(daemon).get("healthy") is True, 5, "status.json: healthy again")
        assert "database writes work again" in daemon.output()
        stored = legs_by_key(daemon.db)
        assert sorted(stored) == ["before", "during-0", "during-1", "during-2"]
        assert (stored["before"]["stop_price"], stored["before"]["current_price"]) == (110, 120)
        assert stored["during-0"]["status"] == "CLOSED" and stored["during-0"]["exits"] == 1
        assert all(stored[leg.key]["entries"] == 1 for leg in legs)
        assert [stored[leg.key]["position_id"] for leg in legs] == [leg.position_id for leg in legs]
        assert pm.end_session()
    finally:
        if not released:
            release()
        pm.close()
    assert daemon.stop() == 0, daemon.output()
    integrity_ok(daemon.db)


def test_a_write_lock_held_by_another_connection(workdir: Path) -> None:
    daemon = start_daemon(workdir)
    operator = sqlite3.connect(daemon.db, isolation_level=None, timeout=0)
    try:
        survive(
            daemon,
            lambda: operator.execute("BEGIN IMMEDIATE"),
            lambda: operator.execute("ROLLBACK") if operator.in_transaction else None,
            "database is locked",
        )
    finally:
        operator.close()
        reap(daemon)


@contextmanager
def tiny_filesystem(workdir: Path, size: str) -> Iterator[Path]:
    mountpoint = workdir / "fs"
    mountpoint.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {done.stderr}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def fill(directory: Path) -> Path:
    """Write a file until the filesystem has no byte left; return it."""
    filler = directory / "filler"
    chunk = b"\0" * 4096
    with open(filler, "wb", buffering=0) as f:
        while True:
            try:
                f.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    # Whatever a smaller write can still take, too.
    with open(filler, "ab", buffering=0) as f, suppress(OSError):
        while f.write(b"\0"):
            pass
    return filler


def test_disk_full(workdir: Path) -> None:
    with tiny_filesystem(workdir, "2m") as fs:
        daemon = start_daemon(workdir, db=fs / "positiond.db")
        filler: list[Path] = []
        try:
            survive(
                daemon,
                lambda: filler.append(fill(fs)),
                lambda: [f.unlink() for f in filler if f.exists()] and None,
                "database or disk is full",
                state=BIG_STATE,
            )
        finally:
            reap(daemon)


def chattr(flag: str, *paths: Path) -> None:
    subprocess.run(["chattr", flag, *map(str, paths)], check=True, capture_output=True)


def test_read_only_database_files(workdir: Path) -> None:
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed (e2fsprogs)")
    probe = workdir / "probe"
    probe.write_bytes(b"")
    try:
        chattr("+i", probe)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot make a file immutable here (needs CAP_LINUX_IMMUTABLE): {exc.stderr}")
    chattr("-i", probe)
    daemon = start_daemon(workdir)
    files = [daemon.db, daemon.db.with_name(daemon.db.name + "-wal")]
    try:
        survive(
            daemon,
            lambda: chattr("+i", *files),
            lambda: chattr("-i", *files),
            "database write failed",
        )
    finally:
        with suppress(subprocess.CalledProcessError):
            chattr("-i", *files)  # or the workdir cannot be removed
        reap(daemon)
    assert os.access(daemon.db, os.W_OK)


def test_a_graceful_stop_on_a_full_disk_exits_cleanly_and_keeps_everything(workdir: Path) -> None:
    # The final checkpoint copies the WAL into the database file, which needs room the disk no
    # longer has. It used to end in a traceback, exit 1 and a status.json left behind.
    with tiny_filesystem(workdir, "4m") as fs:
        daemon = start_daemon(workdir, db=fs / "positiond.db")
        pm = PositionPersistenceManager("full", endpoint=daemon.endpoint, ack_timeout=2.0)
        filler: list[Path] = []
        try:
            assert pm.start_session() is not None
            keys = [f"big-{i}" for i in range(6)]
            for key in keys:
                leg = pm.save_position_entry(
                    symbol="NIFTY", entry_price=100.0, stop_price=90.0, quantity=75,
                    position_key=key, state=BIG_STATE,
                )  # fmt: skip
                assert leg.position_id is not None
            assert pm.sync(5)
            wait_for(lambda: (daemon.workdir / "status.json").exists(), 5, "status.json")
            filler.append(fill(fs))
            code = daemon.stop()
            output = daemon.output()
            assert code == 0, output
            assert "Traceback" not in output, output
            (line,) = [x for x in output.splitlines() if "could not checkpoint" in x]
            assert "database or disk is full" in line and "nothing is lost" in line, line
            assert "positiond stopped" in output
            assert not (daemon.workdir / "status.json").exists()
        finally:
            pm.close()
            reap(daemon)
            for f in filler:
                f.unlink(missing_ok=True)
        stored = legs_by_key(daemon.db)
        assert set(keys) <= set(stored)
        assert all(stored[key]["entries"] == 1 for key in keys)
        integrity_ok(daemon.db)
