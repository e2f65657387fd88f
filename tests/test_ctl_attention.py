"""posctl: nothing that needs a human is hidden (crashed = attention, orphans, bulk resolve),
and the small things: --version, a closed pipe, which database it reads.

Real daemon processes, real sockets, real SQLite files; posctl runs as a subprocess.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from positiond.config import ConfigError
from positiond.ctl.access import CtlError, open_readonly, who
from positiond.ctl.locate import locate
from positiond.store.schema import migrate
from positiond_client import PositionPersistenceManager
from tests.helpers import UNIT, DaemonProcess, rows
from tests.test_ctl import (
    BN,
    CE,
    FIN,
    PE,
    ZONE,
    crash_in_process,
    ctl,
    ctl_json,
    events_of,
    kill_a_strategy,
    leg_row,
    manager,
    managers,
    positionbook,
)
from tests.test_daemon import Strategy

__all__ = ["managers"]  # the fixture, used here


def posctl_env(
    *args: str, env: dict[str, str] | None = None, columns: int = 200, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """posctl with exactly the given arguments (no --db added) in a controlled environment."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("POSITIOND_", "POSCTL_"))}
    full = base | {"TZ": ZONE, "COLUMNS": str(columns)} | (env or {})
    if "POSITIOND_TEST_TIMEOUT_FACTOR" in os.environ:
        full["POSITIOND_TEST_TIMEOUT_FACTOR"] = os.environ["POSITIOND_TEST_TIMEOUT_FACTOR"]
    return subprocess.run(
        [sys.executable, "-m", "positiond.ctl", *args],
        input=stdin, capture_output=True, text=True, env=full, timeout=60 * UNIT,
    )  # fmt: skip


def at(daemon: DaemonProcess, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return posctl_env("--db", str(daemon.db), "--endpoint", daemon.endpoint, *args, **kw)


def orphan(daemon: DaemonProcess, oid: int) -> Any:
    return rows(daemon.db, "SELECT * FROM broker_orphans WHERE id = ?", (oid,))[0]


# ---- crashed: everything that needs attention ----------------------------------------------


def test_crashed_shows_every_kind_of_attention_and_exits_1_until_all_are_resolved(
    daemon: DaemonProcess,
    strategies: list[Strategy],
    managers: list[PositionPersistenceManager],
    workdir: Path,
) -> None:
    kill_a_strategy(daemon, strategies)  # ce-1 CE 75, pe-1 PE 75: CRASHED
    crash_in_process(daemon, managers, "bn-1")  # banknifty_straddle: bn-1 BN 30 CRASHED
    done = manager(daemon, managers, "finisher")
    done.save_position_entry(symbol=CE, entry_price=90.0, stop_price=85.0, quantity=25,
                             position_key="fin-1")  # fmt: skip
    assert done.end_session()  # ended with fin-1 still ACTIVE: nobody can ever exit it now
    book = workdir / "book.json"
    book.write_text(positionbook((CE, "100"), (PE, "0"), (BN, "15"), (FIN, "-40")))
    assert ctl(daemon, "verify", "--positionbook", str(book), "--apply").returncode == 1

    # The case: verify flagged bn-1 NEEDS_REVIEW; its strategy has no CRASHED leg.
    code, data = ctl_json(daemon, "crashed", "--strategy", "banknifty_straddle")
    assert (code, data["count"], data["attention"]) == (1, 0, 1)
    assert [leg["position_key"] for leg in data["needs_review"]] == ["bn-1"]
    assert "broker net 15" in data["needs_review"][0]["review_reason"]
    assert data["orphans"] == []  # orphans belong to no strategy

    code, data = ctl_json(daemon, "crashed")
    assert code == 1
    assert [leg["position_key"] for c in data["crashes"] for leg in c["legs"]] == ["ce-1"]
    assert [leg["position_key"] for leg in data["open_in_finished"]] == ["fin-1"]
    assert data["open_in_finished"][0]["session_status"] == "COMPLETED"
    assert [(o["symbol"], o["broker_quantity"]) for o in data["orphans"]] == [(FIN, -40)]
    assert data["attention"] == 4
    human = ctl(daemon, "attention")  # the same command
    assert human.returncode == 1, human.stderr
    for text in ("needs review", "broker net 15", "open in a finished session", "-40",
                 "its owner can never exit it", "unresolved orphans", FIN, "#1"):  # fmt: skip
        assert text in human.stdout, text

    # A leg closed by verification: no price was seen, and the output says so.
    closed = ctl(daemon, "positions", "--status", "CLOSED")
    assert "CLOSED_AT_BROKER, exit price unknown" in closed.stdout and "at —" not in closed.stdout
    assert "exit price unknown" in ctl(daemon, "events", "pe-1").stdout

    # Resolve all of it: attention falls group by group to the stranded leg, which the daemon
    # owns (another change makes it resolvable); the strategies' own checks are clean.
    assert ctl(daemon, "resolve", "bn-1", "--closed", "--exit-price", "305").returncode == 0
    assert ctl(daemon, "resolve", "ce-1", "--closed").returncode == 0
    assert ctl(daemon, "resolve-orphan", "1", "--acknowledge", "--note", "hedge").returncode == 0
    for strategy in ("banknifty_straddle", "expiry_blast"):
        quiet = ctl(daemon, "crashed", "--strategy", strategy)
        assert quiet.returncode == 0 and "Nothing needs attention" in quiet.stdout
    code, data = ctl_json(daemon, "crashed")
    assert (code, data["attention"], len(data["open_in_finished"])) == (1, 1, 1)


def test_crashed_at_80_100_120_columns_shows_every_number_whole(
    daemon: DaemonProcess, managers: list[PositionPersistenceManager]
) -> None:
    """The issue's terminal: default position keys (SYMBOL-<16 hex>, ~36 characters), quantity
    30 and stop 344.30 must not become ``3`` and ``344.``; highest and last must not vanish."""
    pm = manager(daemon, managers, "expiry_blast")
    legs = [pm.save_position_entry(symbol=s, leg_type=s[-2:], entry_price=310.25,
                                   stop_price=344.3, quantity=30) for s in (CE, PE)]  # fmt: skip
    for leg in legs:
        pm.queue_position_update(leg, current_price=351.75, highest_price=12345.5,
                                 last_trail_level=3)  # fmt: skip
    assert pm.sync(5) and pm.handle_crash(RuntimeError("feed died"))
    ids = [r["position_id"] for r in rows(daemon.db, "SELECT position_id FROM strategy_positions")]
    for width in (80, 100, 120):
        run = at(daemon, "crashed", columns=width)
        assert run.returncode == 1, run.stderr
        for line in run.stdout.splitlines():
            assert len(line.rstrip()) <= width, line
        for number in ("30", "310.25", "344.30", "12,345.50", "351.75", "3"):
            found = re.findall(rf"(?<![\w.,#:-]){re.escape(number)}(?![\w.,:-])", run.stdout)
            assert len(found) >= 2, (width, number, run.stdout)
        for pid in ids:
            assert f"#{pid}" in run.stdout


# ---- orphans -------------------------------------------------------------------------------


@pytest.mark.parametrize("daemon_running", [True, False], ids=["daemon", "direct"])
def test_orphans_are_listed_and_resolved_with_who_and_why(
    daemon: DaemonProcess, strategies: list[Strategy], workdir: Path, daemon_running: bool
) -> None:
    sid = kill_a_strategy(daemon, strategies)  # an expiry_blast session, for --adopt --session
    book = workdir / "book.json"
    book.write_text(positionbook((CE, "75"), (PE, "75"), (FIN, "-40"), (BN, "30")))
    assert ctl(daemon, "verify", "--positionbook", str(book), "--apply").returncode == 1
    code, data = ctl_json(daemon, "orphans")
    assert (code, data["unresolved"]) == (1, 2)
    ids = {o["symbol"]: o["id"] for o in data["orphans"]}
    assert data["orphans"][0]["detected_by"].startswith(who())
    listed = ctl(daemon, "orphans")
    assert listed.returncode == 1 and f"#{ids[FIN]}" in listed.stdout and "-40" in listed.stdout
    if not daemon_running:
        assert daemon.stop() == 0
    via = "daemon" if daemon_running else "direct"

    fin, bn = f"#{ids[FIN]}", str(ids[BN])  # as the table shows it, or plain
    code, data = ctl_json(daemon, "resolve-orphan", fin, "--acknowledge", "--note", "my hedge")
    assert (code, data["via"], data["result"]["status"]) == (0, via, "ACKNOWLEDGED")
    record = orphan(daemon, ids[FIN])
    assert record["resolved_by"].startswith(who()) and record["resolution_reason"] == "my hedge"
    assert record["resolved_at"].endswith("Z")
    again = ctl(daemon, "resolve-orphan", fin, "--acknowledge", "--note", "my hedge")
    assert again.returncode == 0 and "already ACKNOWLEDGED" in again.stdout

    refused = ctl(daemon, "resolve-orphan", bn, "--adopt", "banknifty", "--session", str(sid),
                  "--note", "x")  # fmt: skip
    assert refused.returncode == 5 and "UNKNOWN_SESSION" in refused.stderr  # not its session
    code, data = ctl_json(daemon, "resolve-orphan", bn, "--adopt", "expiry_blast",
                          "--session", str(sid), "--note", "its next run enters it")  # fmt: skip
    assert (code, data["result"]["status"]) == (0, "ADOPTED")
    assert orphan(daemon, ids[BN])["adopted_by"] == f"expiry_blast (session {sid})"

    code, data = ctl_json(daemon, "resolve-orphan", fin, "--closed", "--note", "squared off")
    assert (code, data["result"]["status"]) == (0, "CLOSED")
    assert "before: ACKNOWLEDGED" in orphan(daemon, ids[FIN])["resolution_reason"]
    final = ctl(daemon, "resolve-orphan", fin, "--acknowledge", "--note", "x")
    assert final.returncode == 5 and "BAD_STATE" in final.stderr
    assert ctl(daemon, "resolve-orphan", "999", "--closed", "--note", "x").returncode == 5
    assert ctl(daemon, "resolve-orphan", fin, "--closed").returncode == 2  # why is required

    code, data = ctl_json(daemon, "orphans")
    assert (code, data["orphans"], data["unresolved"]) == (0, [], 0)
    code, data = ctl_json(daemon, "orphans", "--all")
    assert {o["id"]: o["status"] for o in data["orphans"]} == {ids[FIN]: "CLOSED",
                                                               ids[BN]: "ADOPTED"}  # fmt: skip
    # Seen again: the adopted one is known, the closed one is a new position.
    code, data = ctl_json(daemon, "verify", "--positionbook", str(book), "--apply")
    assert data["actions"]["orphans"] == "recorded 1 (1 already recorded)"


# ---- bulk resolve --------------------------------------------------------------------------


def test_resolve_all_of_a_strategy_after_a_confirmation(
    daemon: DaemonProcess, strategies: list[Strategy], managers: list[PositionPersistenceManager]
) -> None:
    kill_a_strategy(daemon, strategies)  # expiry_blast: ce-1, pe-1
    crash_in_process(daemon, managers, "bn-1")  # banknifty_straddle: bn-1
    args = ("resolve", "--strategy", "expiry_blast", "--all", "--closed", "--note", "flat")
    for answer in ("n\n", ""):  # no, or no answer at all: nothing changes
        run = at(daemon, *args, stdin=answer)
        assert run.returncode == 1 and "[y/N]" in run.stderr and "Nothing changed" in run.stderr
        assert "ce-1" in run.stdout and "pe-1" in run.stdout and "bn-1" not in run.stdout
        assert leg_row(daemon, "ce-1")["status"] == "CRASHED"
    run = at(daemon, *args, stdin="y\n")
    assert run.returncode == 0, run.stderr
    for key in ("ce-1", "pe-1"):
        assert (leg_row(daemon, key)["status"], leg_row(daemon, key)["exit_reason"]) == (
            "CLOSED", "MANUAL_EXIT")  # fmt: skip
        (event,) = events_of(daemon, key, "EXIT")
        assert event["by"] == who() and event["reason"] == "flat"
    assert leg_row(daemon, "bn-1")["status"] == "CRASHED"  # another strategy's

    code, data = ctl_json(daemon, "resolve", "--all", "--review", "check it", "--yes")
    assert (code, data["legs"], data["via"]) == (0, ["bn-1"], "daemon")
    assert leg_row(daemon, "bn-1")["status"] == "NEEDS_REVIEW"
    code, data = ctl_json(daemon, "resolve", "--all", "--resume", "--yes")
    assert code == 0 and list(data["results"].values()) == ["CRASHED"]
    nothing = ctl(daemon, "resolve", "--all", "--resume", "--yes")
    assert nothing.returncode == 0 and "nothing to do" in nothing.stdout
    for bad in (("resolve", "--all", "--closed", "--exit-price", "1"),
                ("resolve", "bn-1", "--all", "--closed"), ("resolve", "--closed"),
                ("resolve", "bn-1", "--closed", "--yes")):  # fmt: skip
        assert at(daemon, *bad).returncode == 2, bad


# ---- version, a closed pipe ----------------------------------------------------------------


def test_version() -> None:
    run = posctl_env("--version")
    assert (run.returncode, run.stdout) == (0, f"positiond {metadata.version('positiond')}\n")


@pytest.mark.parametrize(
    ("args", "expected"),
    [(("sessions",), 0), (("--json", "positions"), 0), (("crashed",), 1),
     (("--json", "crashed"), 1), (("--help",), 0)],
    ids=["sessions", "positions-json", "crashed", "crashed-json", "help"],
)  # fmt: skip
def test_a_closed_pipe_keeps_the_exit_code_and_prints_no_traceback(
    daemon: DaemonProcess, strategies: list[Strategy], args: tuple[str, ...], expected: int
) -> None:
    """``posctl ... | head`` where head is gone before posctl writes: a real pipe, reader
    closed. Each command must end with the code it has when its whole output is read."""
    kill_a_strategy(daemon, strategies)
    cmd = [sys.executable, "-m", "positiond.ctl", "--db", str(daemon.db), "--endpoint",
           daemon.endpoint, *args]  # fmt: skip
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        run = subprocess.run(cmd, stdout=write_end, stderr=subprocess.PIPE, timeout=30 * UNIT,
                             env={**os.environ, "COLUMNS": "200"})  # fmt: skip
    finally:
        os.close(write_end)
    assert (run.returncode, run.stderr) == (expected, b"")


# ---- which database ------------------------------------------------------------------------


def empty_db(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as conn:
        migrate(conn)
    return path


def test_locate_prefers_flags_then_env_then_config_then_the_service(tmp_path: Path) -> None:
    state, runtime = tmp_path / "var-lib", tmp_path / "run"
    home = {"HOME": str(tmp_path / "home"), "XDG_STATE_HOME": str(tmp_path / "xdg")}
    env = home | {"POSCTL_SYSTEM_STATE_DIR": str(state), "POSCTL_SYSTEM_RUNTIME_DIR": str(runtime),
                  "POSCTL_SYSTEM_CONFIG": str(tmp_path / "none.toml")}  # fmt: skip
    found = locate(None, None, None, env)  # no service here: this user's default
    assert found.db == tmp_path / "xdg" / "positiond" / "positiond.db"
    assert "this user's default" in found.db_source
    state.mkdir()
    found = locate(None, None, None, env)
    assert (found.db, found.endpoint) == (state / "positiond.db",
                                          f"ipc://{runtime}/positiond.sock")  # fmt: skip
    assert found.header() == f"database: {state}/positiond.db (the service's state directory)"
    config = tmp_path / "positiond.toml"
    config.write_text(f'db = "{tmp_path}/conf.db"\nendpoint = "ipc://{tmp_path}/c.sock"\n')
    found = locate(None, None, None, env | {"POSCTL_SYSTEM_CONFIG": str(config)})
    assert (found.db, found.db_source) == (tmp_path / "conf.db", f"db in {config}")
    assert found.endpoint == f"ipc://{tmp_path}/c.sock"
    found = locate(None, None, str(config), env | {"POSITIOND_DB": str(tmp_path / "env.db")})
    assert (found.db, found.db_source) == (tmp_path / "env.db", "POSITIOND_DB")
    found = locate(tmp_path / "flag.db", "ipc:///x.sock", str(config), env)
    assert (found.db, found.db_source, found.endpoint) == (tmp_path / "flag.db", "--db",
                                                           "ipc:///x.sock")  # fmt: skip
    config.write_text("no_such_setting = 1\n")
    with pytest.raises(ConfigError):
        locate(None, None, str(config), env)


def test_posctl_reads_the_services_database_not_a_stray_one_in_home(
    workdir: Path, managers: list[PositionPersistenceManager]
) -> None:
    state = workdir / "var-lib"
    state.mkdir()
    service = DaemonProcess(state).start()  # the service's database: a crashed leg
    try:
        pm = manager(service, managers, "expiry_blast")
        pm.save_position_entry(symbol=CE, entry_price=100.0, stop_price=90.0, quantity=75)
        assert pm.handle_crash(RuntimeError("boom"))
    finally:
        assert service.stop() == 0
    stray = empty_db(workdir / "xdg" / "positiond" / "positiond.db")  # positiond run by hand
    env = {"XDG_STATE_HOME": str(workdir / "xdg"), "POSCTL_SYSTEM_STATE_DIR": str(state),
           "POSCTL_SYSTEM_CONFIG": str(workdir / "none.toml")}  # fmt: skip
    run = posctl_env("crashed", env=env)
    assert run.returncode == 1, run.stdout + run.stderr
    first = run.stdout.splitlines()[0]
    assert first == f"database: {service.db} (the service's state directory)"
    # A config file naming another database wins, and the header says so.
    config = workdir / "positiond.toml"
    config.write_text(f'db = "{stray}"\n')
    run = posctl_env("--config", str(config), "crashed", env=env)
    assert run.returncode == 0
    assert run.stdout.splitlines()[0] == f"database: {stray} (db in {config})"
    run = posctl_env("crashed", env=env | {"POSITIOND_CONFIG": str(config)})
    assert run.returncode == 0 and str(stray) in run.stdout.splitlines()[0]
    bad = posctl_env("--config", str(workdir / "missing.toml"), "crashed", env=env)
    assert bad.returncode == 2 and "missing.toml" in bad.stderr


def test_a_service_directory_this_user_cannot_read_is_named_not_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """StateDirectoryMode=0700: an operator who is not root or positiond cannot read it. posctl
    must say so, not fall back to a database of its own. (Permissions are simulated: the tests
    may run as root, for whom every directory is readable.)"""
    state = tmp_path / "var-lib"
    state.mkdir()
    empty_db(tmp_path / "xdg" / "positiond" / "positiond.db")  # the stray one
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: Path(p) != state and real_access(p, m))
    env = {"XDG_STATE_HOME": str(tmp_path / "xdg"), "POSCTL_SYSTEM_STATE_DIR": str(state),
           "POSCTL_SYSTEM_CONFIG": str(tmp_path / "none.toml")}  # fmt: skip
    found = locate(None, None, None, env)
    assert found.db == state / "positiond.db" and "not readable by this user" in found.db_source
    with pytest.raises(CtlError) as refused:
        open_readonly(found.db)
    assert refused.value.exit_code == 3 and "not readable by this user" in refused.value.message
