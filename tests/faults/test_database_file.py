"""The database file itself: other names for it, deleted or replaced files, broken files.

Real daemon processes on real files:

- a second daemon reaching the same database through a symlink or a hard link is refused, and
  the live session of the first goes on (it used to start and crash it: "did not return after
  daemon restart"); posctl's direct write sees the daemon's lock through any name too;
- the database, its WAL or its -shm file deleted or replaced while the daemon runs: nothing is
  acknowledged any more, the daemon says so (log, status.json) and keeps what was acknowledged
  (the WAL checkpointed into the database, or a rescued copy of a deleted database);
- a garbage, truncated or damaged file is refused at start with one line and exit code 3, and
  damage met at runtime stops the writes with the same advice instead of a silent retry loop.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from positiond.store.schema import migrate
from positiond_client import PositionPersistenceManager
from tests.faults.support import integrity_ok, legs_by_key, reap, start
from tests.faults.test_storage import status
from tests.helpers import UNIT, DaemonProcess, rows, session_status, wait_for
from tests.test_ctl import posctl

ACK_TIMEOUT = 0.3
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


# ---- files deleted or replaced under a running daemon ---------------------------------------


def replace_with_copy(path: Path) -> None:
    copy = path.with_name(path.name + ".copy")
    shutil.copyfile(path, copy)
    os.replace(copy, path)  # same content, another file: writes to the old one are lost


FAULT = {"": "the database {db} was", "-wal": "WAL {db}-wal", "-shm": "shared-memory file"}


@pytest.mark.parametrize(
    ("suffix", "how"),
    [("", "deleted"), ("", "renamed"), ("", "replaced"), ("-wal", "deleted"), ("-shm", "deleted")],
    ids=["db-deleted", "db-renamed", "db-replaced", "wal-deleted", "shm-deleted"],
)
def test_a_database_file_gone_under_the_daemon_stops_the_acks(
    workdir: Path, suffix: str, how: str
) -> None:
    daemon = start(daemon_on(workdir, workdir / "positiond.db"))
    target = daemon.db.with_name(daemon.db.name + suffix)
    pm = PositionPersistenceManager("gone", endpoint=daemon.endpoint, ack_timeout=ACK_TIMEOUT)
    try:
        assert pm.start_session() is not None
        acked = [f"before-{i}" for i in range(5)]
        assert all(entry(pm, key) is not None for key in acked)
        assert pm.sync(5)
        assert target.exists()
        if how == "deleted":
            target.unlink()
        elif how == "renamed":
            target.rename(workdir / "moved.db")
        else:
            replace_with_copy(target)

        # The next write is not acknowledged (it went to a file nobody will read again).
        assert entry(pm, "after") is None
        assert pm.sync(ACK_TIMEOUT) is False
        wait_for(lambda: status(daemon).get("healthy") is False, 5, "status.json: unhealthy")
        fault = status(daemon)["storage_fault"]
        assert FAULT[suffix].format(db=daemon.db) in fault, fault
        assert "STORAGE FAILED" in daemon.output()
        health = posctl(daemon.db, daemon.endpoint, "status")
        assert health.returncode == 1, health.stdout + health.stderr
        said = " ".join(health.stdout.split())
        assert "UNHEALTHY: the database" in said, said
        assert FAULT[suffix].format(db=daemon.db) in said, said
        if suffix == "":
            wait_for(lambda: "nothing acknowledged is lost" in daemon.output(), 10, "the rescue")
            (rescued,) = workdir.glob("positiond.db.rescued-*")
            # Every acked leg (and maybe the unacked one: its client re-sends it anyway).
            assert set(acked) <= set(legs_by_key(rescued)) <= {*acked, "after"}
            integrity_ok(rescued)
        else:
            wait_for(lambda: "was checkpointed" in daemon.output(), 10, "the checkpoint")
        assert entry(pm, "still-after") is None  # for good, not once
    finally:
        pm.close()
        # What the issue saw: after a SIGKILL and a restart every acked leg was gone.
        reap(daemon)
    if suffix == "":  # the operator puts the rescued copy in place, as the log says
        (rescued,) = workdir.glob("positiond.db.rescued-*")
        for extra in ("-wal", "-shm"):
            daemon.db.with_name(daemon.db.name + extra).unlink(missing_ok=True)
        os.replace(rescued, daemon.db)
    start(daemon)
    try:
        stored = legs_by_key(daemon.db)
        assert set(acked) <= set(stored), sorted(stored)
        assert all(stored[key]["entries"] == 1 for key in acked)
    finally:
        code = daemon.stop()
    assert code == 0, daemon.output()
    integrity_ok(daemon.db)


# ---- broken files ---------------------------------------------------------------------------


def positiond_db(path: Path, legs: int = 300) -> None:
    """A real positiond database with one finished session and ``legs`` closed legs."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        migrate(conn)
        conn.execute("BEGIN")
        conn.execute(
            "INSERT INTO strategy_sessions (session_key, strategy_name, status, start_time) "
            "VALUES ('s', 'old', 'COMPLETED', '2025-11-28T10:00:00.000Z')"
        )
        conn.executemany(
            "INSERT INTO strategy_positions (position_key, session_id, symbol, exchange, "
            "product, side, quantity, entry_price, entry_time, status, updated_at, state) "
            "VALUES (?, 1, 'NIFTY', 'NFO', 'MIS', 'BUY', 75, 100, '2025-11-28T10:00:00.000Z', "
            "'CLOSED', '2025-11-28T10:00:00.000Z', ?)",
            [(f"k{i}", json.dumps({"note": "x" * 500})) for i in range(legs)],
        )
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def page_of(db: Path, table: str) -> int:
    """The root page of ``table`` (a b-tree page every check and every write reads)."""
    return int(rows(db, "SELECT rootpage FROM sqlite_schema WHERE name = ?", (table,))[0][0])


def smash_page(db: Path, page: int) -> None:
    size = int(rows(db, "PRAGMA page_size")[0][0])
    with open(db, "r+b") as f:
        f.seek((page - 1) * size)
        f.write(bytes(range(256)) * (size // 256))


def garbage(db: Path) -> None:
    db.write_bytes(os.urandom(64 * 1024))


def truncated(db: Path) -> None:
    positiond_db(db)
    os.truncate(db, db.stat().st_size // 2)


def truncated_header(db: Path) -> None:
    positiond_db(db)
    os.truncate(db, 50)


def damaged_page(db: Path) -> None:
    positiond_db(db)
    smash_page(db, page_of(db, "strategy_positions"))


@pytest.mark.parametrize("damage", [garbage, truncated, truncated_header, damaged_page])
def test_a_broken_database_is_refused_at_start_with_one_line(workdir: Path, damage: object) -> None:
    db = workdir / "positiond.db"
    damage(db)  # type: ignore[operator]
    daemon = daemon_on(workdir, db)
    done = run_to_exit(daemon)
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    (line,) = [x for x in done.stderr.splitlines() if "ERROR" in x]
    assert f"the database {db} is damaged or not a database" in line, line
    assert "restore the latest backup" in line and "DEPLOY.md" in line, line
    assert "positiond ready" not in done.stderr
    assert not (workdir / "status.json").exists()


def test_damage_found_at_runtime_stops_the_writes_and_says_what_to_do(workdir: Path) -> None:
    db = workdir / "positiond.db"
    positiond_db(db)
    daemon = start(daemon_on(workdir, db))
    pm = PositionPersistenceManager("damaged", endpoint=daemon.endpoint, ack_timeout=ACK_TIMEOUT)
    try:
        wait_for(lambda: status(daemon).get("healthy") is True, 5, "a healthy status.json")
        smash_page(db, page_of(db, "strategy_sessions"))
        # Another connection's commit: the daemon drops its page cache and reads the file again.
        other = sqlite3.connect(db, isolation_level=None)
        other.execute("CREATE TABLE scratch (x)")
        other.close()
        assert pm.start_session() is None  # needs the damaged page: not acknowledged
        wait_for(lambda: status(daemon).get("storage_fault"), 10, "a storage fault")
        fault = status(daemon)["storage_fault"]
        assert "is damaged" in fault and "restore the latest backup" in fault, fault
        assert status(daemon)["healthy"] is False
        wait_for(lambda: "STORAGE FAILED" in daemon.output(), 5, "the log line")
        assert daemon.output().count("STORAGE FAILED") == 1  # said once, not every retry
    finally:
        pm.close()
        code = daemon.stop()
    # Stopped with nothing written since: 3, like a damaged database at start (no restart).
    assert code == 3, daemon.output()
    assert "Traceback" not in daemon.output()


def test_a_database_that_cannot_be_created_is_one_line_and_exit_1(workdir: Path) -> None:
    (workdir / "a-file").write_text("not a directory")
    db = workdir / "a-file" / "positiond.db"
    done = run_to_exit(daemon_on(workdir, db))
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    (line,) = [x for x in done.stderr.splitlines() if "ERROR" in x]
    assert f"cannot create or lock the database {db}" in line, line
