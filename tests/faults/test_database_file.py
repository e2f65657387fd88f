"""The database file itself: other names for it, deleted or replaced files, broken files.

Real daemon processes on real files:

- a second daemon reaching the same database through a symlink or a hard link is refused, and
  the live session of the first goes on (it used to start and crash it: "did not return after
  daemon restart"); posctl's direct write sees the daemon's lock through any name too.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from positiond_client import PositionPersistenceManager
from tests.faults.support import start
from tests.helpers import UNIT, DaemonProcess, session_status
from tests.test_ctl import posctl

FAST = ("--flush-interval", "0.05", "--status-interval", "0.1")


def daemon_on(
    workdir: Path, db: Path, sock: str = "pd.sock", heartbeat_timeout: float = 3.0
) -> DaemonProcess:
    daemon = DaemonProcess(workdir, *FAST, heartbeat_timeout=heartbeat_timeout)
    daemon.db = db
    daemon.sock = workdir / sock
    daemon.endpoint = f"ipc://{daemon.sock}"
    daemon.args[daemon.args.index("--db") + 1] = str(db)
    daemon.args[daemon.args.index("--endpoint") + 1] = daemon.endpoint
    return daemon


def run_to_exit(daemon: DaemonProcess) -> subprocess.CompletedProcess[str]:
    """A daemon expected to refuse to run: its exit code and output."""
    return subprocess.run(daemon.args, capture_output=True, text=True, timeout=30 * UNIT)


def entry(pm: PositionPersistenceManager, key: str) -> int | None:
    leg = pm.save_position_entry(
        symbol="NIFTY", entry_price=100.0, stop_price=90.0, quantity=75, position_key=key
    )
    return leg.position_id


# ---- one database, several names ------------------------------------------------------------


def other_name(workdir: Path, db: Path, how: str) -> Path:
    if how == "symlink":
        link = workdir / "link.db"
        link.symlink_to(db)
        return link
    if how == "directory-symlink":
        (workdir / "linked-dir").symlink_to(db.parent)
        return workdir / "linked-dir" / db.name
    link = workdir / "hard" / "link.db"
    link.parent.mkdir()
    os.link(db, link)
    return link


@pytest.mark.parametrize("how", ["symlink", "directory-symlink", "hard-link"])
def test_a_second_daemon_through_another_name_is_refused(workdir: Path, how: str) -> None:
    (workdir / "data").mkdir()
    db = workdir / "data" / "positiond.db"
    first = start(daemon_on(workdir, db, heartbeat_timeout=1.0))
    pm = PositionPersistenceManager("named", endpoint=first.endpoint, ack_timeout=2.0)
    try:
        session = pm.start_session()
        assert session is not None and entry(pm, "leg-1") is not None
        name = other_name(workdir, db, how)
        done = run_to_exit(daemon_on(workdir, name, sock="pd2.sock", heartbeat_timeout=1.0))
        assert done.returncode == 1, done.stderr
        assert "already running on database" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr, done.stderr
        # The first daemon's session was never touched: still live, still writing.
        assert entry(pm, "leg-2") is not None
        assert pm.sync(5)
        assert session_status(db, session) == "RUNNING"
        assert "did not return" not in first.output()
        # posctl through the other name sees the daemon's lock: the change goes to the daemon.
        done = posctl(name, first.endpoint, "--json", "prune", "--older-than", "30d")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["via"] == "daemon"
        assert pm.end_session()
    finally:
        pm.close()
        code = first.stop()
    assert code == 0, first.output()


def test_a_symlink_to_a_database_not_created_yet(workdir: Path) -> None:
    real = workdir / "real.db"
    link = workdir / "link.db"
    link.symlink_to(real)  # dangling: the first start creates the database through it
    first = start(daemon_on(workdir, link))
    try:
        assert real.is_file() and link.resolve() == real
        done = run_to_exit(daemon_on(workdir, real, sock="pd2.sock"))
        assert done.returncode == 1 and "already running on database" in done.stderr, done.stderr
    finally:
        assert first.stop() == 0, first.output()
