"""posctl end to end: a real daemon builds the database, posctl runs as a subprocess.

Reads with the daemon running and stopped; changes through the running daemon (the ``by`` the
engine records, the ack in the reply) and written directly under the daemon's lock when it is
stopped; verification against a saved positionbook; prune never touching live, crashed or
reviewed data; exit codes.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import zmq

from positiond.ctl.access import who
from positiond.ctl.change import RESUME_ACTION
from positiond.store.dsn import PgDsn
from positiond_client import PositionPersistenceManager
from tests.helpers import UNIT, DaemonProcess, rows, session_status, wait_for
from tests.pg import both_backends
from tests.test_daemon import Strategy

CE, PE = "NIFTY28NOV2524000CE", "NIFTY28NOV2524000PE"
BN, FIN = "BANKNIFTY28NOV2552000CE", "FINNIFTY28NOV2523500PE"
ZONE = "Asia/Kolkata"  # posctl shows local time: run it in a zone that is not UTC


def posctl(
    db: Path | PgDsn, endpoint: str, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m positiond.ctl --db DB --endpoint E ARGS`` as an operator would run it."""
    env = {**os.environ, "TZ": ZONE, "COLUMNS": "200"}
    where = db.url if isinstance(db, PgDsn) else str(db)
    return subprocess.run(
        [sys.executable, "-m", "positiond.ctl", "--db", where, "--endpoint", endpoint, *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=60 * UNIT,
    )


def ctl(daemon: DaemonProcess, *args: str, stdin: str | None = None) -> Any:
    return posctl(daemon.db, daemon.endpoint, *args, stdin=stdin)


def ctl_json(daemon: DaemonProcess, *args: str, stdin: str | None = None) -> tuple[int, Any]:
    """(exit code, parsed --json output)."""
    run = ctl(daemon, "--json", *args, stdin=stdin)
    assert run.stdout, run.stderr
    return run.returncode, json.loads(run.stdout)


def positionbook(*rows_: tuple[str, str]) -> str:
    """A saved OpenAlgo positionbook() response: string fields, signed quantity."""
    data = [
        {"symbol": s, "exchange": "NFO", "product": "MIS", "quantity": q,
         "average_price": "100.0", "ltp": "101.5", "pnl": "0.0"}
        for s, q in rows_
    ]  # fmt: skip
    return json.dumps({"status": "success", "data": data})


def leg_row(daemon: DaemonProcess, key: str) -> Any:
    return rows(daemon.db, "SELECT * FROM strategy_positions WHERE position_key = ?", (key,))[0]


def events_of(daemon: DaemonProcess, key: str, kind: str) -> list[dict[str, Any]]:
    found = rows(
        daemon.db,
        "SELECT e.payload FROM position_events e JOIN strategy_positions p "
        "ON p.position_id = e.position_id WHERE p.position_key = ? AND e.event_type = ?",
        (key, kind),
    )
    return [json.loads(r["payload"]) for r in found]


@pytest.fixture
def managers() -> Iterator[list[PositionPersistenceManager]]:
    made: list[PositionPersistenceManager] = []
    yield made
    for pm in made:
        pm.close(0)


def kill_a_strategy(daemon: DaemonProcess, strategies: list[Strategy]) -> int:
    """tests/strategy_proc.py, kill -9: ce-1 and pe-1 CRASHED, ce-closed CLOSED before."""
    strategy = Strategy(daemon.endpoint, "hold")
    strategies.append(strategy)
    sid = int(str(strategy.info()["session_id"]))
    strategy.proc.send_signal(signal.SIGKILL)
    wait_for(lambda: session_status(daemon.db, sid) == "CRASHED", 5, "CRASHED")
    return sid


def manager(
    daemon: DaemonProcess, managers: list[PositionPersistenceManager], strategy: str
) -> PositionPersistenceManager:
    pm = PositionPersistenceManager(strategy, endpoint=daemon.endpoint, ack_timeout=5)
    managers.append(pm)
    assert pm.start_session() is not None
    return pm


def crash_in_process(
    daemon: DaemonProcess, managers: list[PositionPersistenceManager], key: str
) -> None:
    """A second strategy that reported its own crash with one BANKNIFTY leg of 30 open."""
    pm = manager(daemon, managers, "banknifty_straddle")
    pm.save_position_entry(symbol=BN, leg_type="CE", entry_price=310.0, stop_price=280.0,
                           quantity=30, position_key=key)  # fmt: skip
    assert pm.handle_crash(RuntimeError("feed disconnected"))


# ---- reads ---------------------------------------------------------------------------------


@both_backends
def test_crashed_lists_each_crash_with_its_legs_and_levels(
    daemon: DaemonProcess, strategies: list[Strategy], managers: list[PositionPersistenceManager]
) -> None:
    killed = kill_a_strategy(daemon, strategies)
    crash_in_process(daemon, managers, "bn-1")
    code, data = ctl_json(daemon, "crashed")
    assert code == 1 and data["count"] == 3 and not data["truncated"]
    # Grouped by crash, newest first: the BANKNIFTY strategy crashed last.
    assert [c["strategy_name"] for c in data["crashes"]] == ["banknifty_straddle", "expiry_blast"]
    blast = data["crashes"][1]
    assert blast["session_id"] == killed and blast["crash_reason"].startswith("process exited")
    assert blast["crash_source"] == "DISCONNECT" and blast["crash_timestamp"].endswith("Z")
    legs = {leg["position_key"]: leg for leg in blast["legs"]}
    assert sorted(legs) == ["ce-1", "pe-1"]  # ce-closed was exited before the crash
    ce = legs["ce-1"]
    assert (ce["symbol"], ce["side"], ce["quantity"], ce["entry_price"]) == (CE, "BUY", 75, 100.0)
    assert (ce["stop_price"], ce["highest_price"], ce["last_trail_level"]) == (104.0, 112.0, 2.0)
    assert legs["pe-1"]["state"] == {"atm": 24000}
    assert data["crashes"][0]["crash_reason"] == "RuntimeError: feed disconnected"

    human = ctl(daemon, "crashed")
    assert human.returncode == 1, human.stderr
    crash_time = datetime.fromisoformat(blast["crash_timestamp"]).astimezone(ZoneInfo(ZONE))
    assert crash_time.strftime("%Y-%m-%d %H:%M:%S IST") in human.stdout  # local time, zone
    for text in (CE, PE, BN, "104.00", "112.00", "process exited", "feed disconnected"):
        assert text in human.stdout, text
    assert "3 crashed leg(s) in 2 crash(es)" in human.stdout

    # Filters: the seed's by strategy name; --since a date or a duration back.
    code, data = ctl_json(daemon, "crashed", "--strategy", "expiry_blast")
    assert (code, data["count"], len(data["crashes"])) == (1, 2, 1)
    code, data = ctl_json(daemon, "crashed", "--strategy", "no_such_strategy")
    assert (code, data["count"]) == (0, 0)
    quiet = ctl(daemon, "crashed", "--strategy", "no_such_strategy").stdout.splitlines()
    assert quiet[0] == f"database: {daemon.db} (--db)"  # always says which database it read
    assert quiet[1].startswith("Nothing needs attention for strategy 'no_such_strategy'")
    code, data = ctl_json(daemon, "crashed", "--since", "1h")
    assert (code, data["count"]) == (1, 3)
    code, data = ctl_json(daemon, "crashed", "--since", "2999-01-01")
    assert (code, data["count"]) == (0, 0)
    run = ctl(daemon, "crashed", "--json")  # --json after the command works too
    assert run.returncode == 1 and json.loads(run.stdout)["count"] == 3


@both_backends
def test_reads_and_a_direct_resolve_with_the_daemon_stopped(
    daemon: DaemonProcess, strategies: list[Strategy]
) -> None:
    killed = kill_a_strategy(daemon, strategies)
    assert daemon.stop() == 0
    code, data = ctl_json(daemon, "crashed")
    assert (code, data["count"]) == (1, 2)

    code, data = ctl_json(daemon, "sessions")
    assert code == 0
    (session,) = data["sessions"]
    assert (session["id"], session["status"], session["strategy_name"]) == (
        killed, "CRASHED", "expiry_blast",
    )  # fmt: skip
    assert (session["open_legs"], session["crashed_legs"], session["all_legs"]) == (0, 2, 3)
    assert ctl_json(daemon, "sessions", "--status", "RUNNING")[1]["sessions"] == []

    code, data = ctl_json(daemon, "positions")  # default: legs that may be open at the broker
    assert sorted(p["position_key"] for p in data["positions"]) == ["ce-1", "pe-1"]
    code, data = ctl_json(daemon, "positions", "--status", "closed")
    assert [(p["position_key"], p["exit_reason"]) for p in data["positions"]] == [
        ("ce-closed", "STOP_HIT")
    ]
    assert len(ctl_json(daemon, "positions", "--status", "ALL")[1]["positions"]) == 3
    bad = ctl(daemon, "positions", "--status", "BOGUS")
    assert bad.returncode == 2 and "unknown status BOGUS" in bad.stderr

    code, data = ctl_json(daemon, "events", "ce-1")
    assert code == 0 and data["leg"]["status"] == "CRASHED"
    kinds = [e["event_type"] for e in data["events"]]
    assert kinds == ["ENTRY", "TRAIL_UPDATE", "CRASH"]
    trail = data["events"][1]["payload"]
    assert trail["stop_price"] == [90.0, 104.0] and trail["last_trail_level"] == [None, 2.0]
    by_id = ctl_json(daemon, "events", str(data["leg"]["position_id"]))[1]
    assert by_id["leg"]["position_key"] == "ce-1" and by_id["events"] == data["events"]
    human = ctl(daemon, "events", "ce-1")
    assert "stop_price 90 → 104" in human.stdout and "TRAIL_UPDATE" in human.stdout

    # A change with no daemon: written directly, under the daemon's lock, with its store code.
    code, data = ctl_json(daemon, "resolve", "ce-1", "--closed", "--exit-price", "104.5",
                          "--note", "exited by hand in the broker terminal")  # fmt: skip
    assert code == 0, data
    assert (data["via"], data["result"]["status"], data["result"]["duplicate"]) == (
        "direct", "CLOSED", False,
    )  # fmt: skip
    leg = leg_row(daemon, "ce-1")
    assert (leg["status"], leg["exit_reason"]) == ("CLOSED", "MANUAL_EXIT")
    assert leg["exit_price"] == 104.5
    (exit_event,) = events_of(daemon, "ce-1", "EXIT")
    assert exit_event["by"] == f"{who()} (direct write: daemon not running)"
    assert exit_event["reason"] == "exited by hand in the broker terminal"
    assert "directly" in ctl(daemon, "resolve", "ce-1", "--closed").stdout  # a repeat: no-op
    assert len(events_of(daemon, "ce-1", "EXIT")) == 1

    # posctl let go of the lock: the daemon starts again and the next change goes through it.
    daemon.start()
    code, data = ctl_json(daemon, "resolve", "pe-1", "--review", "qty differs")
    assert (code, data["via"]) == (0, "daemon")


@both_backends
def test_resolve_goes_through_the_running_daemon(
    daemon: DaemonProcess, strategies: list[Strategy], managers: list[PositionPersistenceManager]
) -> None:
    kill_a_strategy(daemon, strategies)
    code, data = ctl_json(daemon, "resolve", "pe-1", "--review", "broker shows 50, not 75")
    assert code == 0, data
    assert (data["via"], data["by"], data["action"]) == ("daemon", who(), "review")
    # The daemon's ack, passed through: the leg's id and its new status.
    assert data["result"] == {"position_id": leg_row(daemon, "pe-1")["position_id"],
                              "status": "NEEDS_REVIEW"}  # fmt: skip
    leg = leg_row(daemon, "pe-1")
    assert (leg["status"], leg["review_reason"]) == ("NEEDS_REVIEW", "broker shows 50, not 75")
    (review,) = events_of(daemon, "pe-1", "NEEDS_REVIEW")
    assert review["by"] == who() and review["from_status"] == "CRASHED"  # the engine's by

    human = ctl(daemon, "resolve", "pe-1", "--resume")
    assert human.returncode == 0 and "through the daemon" in human.stdout
    assert leg_row(daemon, "pe-1")["status"] == "CRASHED"
    assert events_of(daemon, "pe-1", "REQUEUED")[0]["by"] == who()
    # An operator who cannot see the database (the daemon's user owns it) still gets changes
    # through to the daemon's own database.
    hidden = posctl(daemon.workdir / "not-mine" / "x.db", daemon.endpoint, "--json", "resolve",
                    "pe-1", "--resume")  # fmt: skip
    assert hidden.returncode == 0, hidden.stderr
    assert json.loads(hidden.stdout)["result"] == {
        "position_id": leg_row(daemon, "pe-1")["position_id"], "status": "CRASHED",
        "duplicate": True,
    }  # fmt: skip

    # Refusals: a leg its live session owns, an unknown leg.
    live = manager(daemon, managers, "live_strategy")
    live.save_position_entry(symbol=CE, entry_price=101.0, stop_price=95.0, quantity=25,
                             position_key="live-1")  # fmt: skip
    refused = ctl(daemon, "resolve", "live-1", "--closed")
    assert refused.returncode == 5 and "BAD_STATE" in refused.stderr
    assert refused.stderr.count("\n") == 1  # one line
    code, data = ctl_json(daemon, "resolve", "no-such-leg", "--closed")
    assert code == 5 and data["error"]["code"] == "UNKNOWN_LEG"
    assert leg_row(daemon, "live-1")["status"] == "ACTIVE"


# ---- verify --------------------------------------------------------------------------------


@pytest.mark.parametrize("daemon_running", [True, False], ids=["daemon", "direct"])
@both_backends
def test_verify_judges_crashed_legs_and_apply_acts_on_safe_verdicts(
    daemon: DaemonProcess,
    strategies: list[Strategy],
    managers: list[PositionPersistenceManager],
    workdir: Path,
    daemon_running: bool,
) -> None:
    kill_a_strategy(daemon, strategies)  # ce-1 CE 75, pe-1 PE 75
    crash_in_process(daemon, managers, "bn-1")  # BN 30
    book = workdir / "positionbook.json"
    # CE still open, PE flat (the exit was missed), BN partly closed, FIN nobody's.
    book.write_text(positionbook((CE, "75"), (PE, "0"), (BN, "15"), (FIN, "-40")))

    code, data = ctl_json(daemon, "verify", "--positionbook", str(book))
    assert code == 1
    assert set(data) == {"verdicts", "orphans"}  # VerificationReport.to_dict()
    verdicts = {v["leg"]["position_key"]: v["verdict"] for v in data["verdicts"]}
    assert verdicts == {"ce-1": "RESUME", "pe-1": "CLOSED_AT_BROKER", "bn-1": "MISMATCH"}
    assert [(o["symbol"], o["broker_quantity"]) for o in data["orphans"]] == [(FIN, -40)]
    assert leg_row(daemon, "pe-1")["status"] == "CRASHED"  # without --apply nothing changes

    human = ctl(daemon, "verify", "--positionbook", "-", stdin=book.read_text())
    assert human.returncode == 1, human.stderr
    for text in ("RESUME", "CLOSED_AT_BROKER", "MISMATCH", FIN, "--apply", "Nothing changed"):
        assert text in human.stdout, text

    if not daemon_running:
        assert daemon.stop() == 0
    code, data = ctl_json(daemon, "verify", "--positionbook", str(book), "--apply")
    assert code == 1  # the MISMATCH and the orphan still need a human
    assert data["actions"] == {
        "ce-1": RESUME_ACTION,
        "pe-1": "closed",
        "bn-1": "flagged NEEDS_REVIEW",
        "orphans": "recorded 1 (0 already recorded)",
    }
    pe = leg_row(daemon, "pe-1")
    assert (pe["status"], pe["exit_reason"]) == ("CLOSED", "CLOSED_AT_BROKER")
    bn = leg_row(daemon, "bn-1")
    assert bn["status"] == "NEEDS_REVIEW" and "broker net 15" in bn["review_reason"]
    assert leg_row(daemon, "ce-1")["status"] == "CRASHED"  # for expiry_blast's next run
    (orphan,) = rows(daemon.db, "SELECT * FROM broker_orphans")
    assert (orphan["symbol"], orphan["broker_quantity"], orphan["known_quantity"]) == (FIN, -40, 0)
    assert orphan["detected_by"].startswith(who())
    by = events_of(daemon, "pe-1", "EXIT")[0]["by"]
    assert by == who() if daemon_running else by.endswith("(direct write: daemon not running)")

    # What is left: ce-1 open at the broker, BN's 30 under review matching the broker: exit 0.
    book.write_text(positionbook((CE, "75"), (PE, "0"), (BN, "30")))
    code, data = ctl_json(daemon, "verify", "--positionbook", str(book), "--apply")
    assert code == 0, data
    assert [v["verdict"] for v in data["verdicts"]] == ["RESUME"] and data["orphans"] == []


def test_verify_refuses_a_positionbook_it_cannot_trust(
    daemon: DaemonProcess, workdir: Path
) -> None:
    error = json.dumps({"status": "error", "message": "session expired"})
    for stdin, what in ((error, "not a success"), ("{not json", "not JSON")):
        run = ctl(daemon, "verify", "--positionbook", "-", stdin=stdin)
        assert run.returncode == 2 and what in run.stderr, run.stderr
    run = ctl(daemon, "verify", "--positionbook", str(workdir / "missing.json"))
    assert run.returncode == 2 and "cannot read" in run.stderr


# ---- prune ---------------------------------------------------------------------------------


@pytest.mark.parametrize("daemon_running", [True, False], ids=["daemon", "direct"])
@both_backends
def test_prune_never_removes_live_crashed_or_review_data(
    daemon: DaemonProcess,
    strategies: list[Strategy],
    managers: list[PositionPersistenceManager],
    daemon_running: bool,
) -> None:
    done = manager(daemon, managers, "finished_strategy")
    leg = done.save_position_entry(symbol=CE, entry_price=90.0, stop_price=85.0, quantity=25,
                                   position_key="done-1")  # fmt: skip
    assert done.save_position_exit(leg, exit_price=95.0, exit_reason="TARGET")
    assert done.end_session()
    crashed = kill_a_strategy(daemon, strategies)
    assert ctl(daemon, "resolve", "pe-1", "--review", "check at the broker").returncode == 0
    live = manager(daemon, managers, "live_strategy")  # stays RUNNING, its leg ACTIVE
    live.save_position_entry(symbol=PE, entry_price=70.0, stop_price=60.0, quantity=25,
                             position_key="live-1")  # fmt: skip
    if not daemon_running:
        assert daemon.stop() == 0  # a graceful stop leaves live sessions RUNNING

    code, data = ctl_json(daemon, "prune", "--older-than", "30d")
    assert code == 0 and data["result"]["sessions"] == 0
    code, data = ctl_json(daemon, "prune", "--older-than", "0d")
    assert code == 0, data
    assert data["via"] == ("daemon" if daemon_running else "direct")
    result = data["result"]
    assert (result["sessions"], result["positions"]) == (1, 1)
    assert result["events"] >= 3 and result["freed_bytes"] >= 0
    # Only the finished session went; the crashed one (with its reviewed leg and the leg it
    # closed before the crash) and the live one are all there.
    strategies_left = {r["strategy_name"]: r["status"] for r in rows(
        daemon.db, "SELECT strategy_name, status FROM strategy_sessions")}  # fmt: skip
    assert strategies_left == {"expiry_blast": "CRASHED", "live_strategy": "RUNNING"}
    legs = {r["position_key"]: r["status"] for r in rows(
        daemon.db, "SELECT position_key, status FROM strategy_positions")}  # fmt: skip
    assert legs == {"ce-1": "CRASHED", "pe-1": "NEEDS_REVIEW", "ce-closed": "CLOSED",
                    "live-1": "ACTIVE"}  # fmt: skip
    assert events_of(daemon, "ce-1", "CRASH") and events_of(daemon, "pe-1", "NEEDS_REVIEW")
    assert session_status(daemon.db, crashed) == "CRASHED"

    human = ctl(daemon, "prune", "--older-than", "12h")
    assert human.returncode == 0 and "sessions removed" in human.stdout
    bad = ctl(daemon, "prune", "--older-than", "30x")
    assert bad.returncode == 2 and "30d or 12h" in bad.stderr


# ---- status and exit codes -----------------------------------------------------------------


@both_backends
def test_status_reads_the_running_daemons_snapshot(daemon: DaemonProcess) -> None:
    wait_for((daemon.workdir / "status.json").exists, 5, "status.json")
    code, data = ctl_json(daemon, "status")
    assert (code, data["running"], data["healthy"], data["source"]) == (0, True, True, "daemon")
    assert data["status"]["pid"] == daemon.proc.pid  # type: ignore[union-attr]
    assert "healthy" in ctl(daemon, "status").stdout
    # A snapshot saying the writer is stuck: attention needed.
    status = daemon.workdir / "status.json"
    assert daemon.stop() == 0
    assert not status.exists()
    run = ctl(daemon, "status")
    assert run.returncode == 3 and "not running" in run.stderr
    snapshot = {"pid": os.getpid(), "time": datetime.now().timestamp(), "status_interval": 5,
                "healthy": False, "writes_ok": False, "db": str(daemon.db)}  # fmt: skip
    status.write_text(json.dumps(snapshot))
    code, data = ctl_json(daemon, "status")
    assert (code, data["healthy"], data["stale"]) == (1, False, False)
    status.write_text(json.dumps(snapshot | {"healthy": True, "time": 1.0}))
    code, data = ctl_json(daemon, "status")
    assert (code, data["healthy"], data["stale"]) == (1, False, True)  # a hung daemon
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    status.write_text(json.dumps(snapshot | {"pid": int(dead.stdout)}))
    assert ctl(daemon, "status").returncode == 3  # left behind by a process that is gone


def test_exit_codes_for_unreadable_database_and_a_daemon_that_does_not_answer(
    daemon: DaemonProcess, strategies: list[Strategy]
) -> None:
    kill_a_strategy(daemon, strategies)
    assert daemon.stop() == 0
    workdir = daemon.workdir
    missing = posctl(workdir / "none.db", daemon.endpoint, "crashed")
    assert missing.returncode == 3 and missing.stderr.startswith("posctl: no database at")
    assert missing.stderr.count("\n") == 1
    junk = workdir / "junk.db"
    junk.write_bytes(b"this is not an sqlite database, not even close" * 100)
    assert posctl(junk, daemon.endpoint, "sessions").returncode == 3
    # No database here: a change could only go to a daemon, and none listens (the stopped one
    # may have left its socket file behind): 3 at once, not a wait for the timeout.
    nodb = posctl(workdir / "none.db", daemon.endpoint, "resolve", "x", "--closed")
    assert nodb.returncode == 3 and "no daemon listens" in nodb.stderr, nodb.stderr

    # Something holds the daemon's lock but nobody answers on the socket: exit 4.
    lock = open(workdir / "positiond.db.lock", "ab")  # noqa: SIM115 -- held for the test
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        gone = ctl(daemon, "resolve", "pe-1", "--closed")
        assert gone.returncode == 3 and "lock" in gone.stderr and "no daemon listens" in gone.stderr
        with zmq.Context() as ctx, ctx.socket(zmq.ROUTER) as mute:
            mute.setsockopt(zmq.LINGER, 0)
            mute.bind(daemon.endpoint)
            hung = ctl(daemon, "--timeout", "0.3", "resolve", "pe-1", "--closed")
            assert hung.returncode == 4 and "did not answer" in hung.stderr, hung.stderr
            assert mute.poll(int(5000 * UNIT))
            _, raw = mute.recv_multipart()
            sent = json.loads(raw)
            assert (sent["type"], sent["key"], sent["action"], sent["by"]) == (
                "resolve", "pe-1", "close", who(),
            )  # fmt: skip
            assert sent["exit_reason"] == "MANUAL_EXIT" and "session" not in sent
    finally:
        lock.close()
    assert leg_row(daemon, "pe-1")["status"] == "CRASHED"  # nothing was written

    # Usage errors: 2, like argparse.
    assert ctl(daemon).returncode == 2
    assert ctl(daemon, "resolve", "pe-1").returncode == 2  # no decision
    assert ctl(daemon, "resolve", "pe-1", "--review", "x", "--exit-price", "1").returncode == 2
    assert ctl(daemon, "crashed", "--since", "yesterday-ish").returncode == 2


def test_help_documents_every_command_and_the_exit_codes(workdir: Path) -> None:
    db, endpoint = workdir / "x.db", f"ipc://{workdir}/x.sock"
    top = posctl(db, endpoint, "--help")
    assert top.returncode == 0
    for text in ("exit codes:", "0  done", "1  attention", "2  usage", "3  database",
                 "4  the daemon runs but did not answer", "5  refused"):  # fmt: skip
        assert text in top.stdout, text
    commands = ("crashed", "attention", "sessions", "positions", "events", "verify", "resolve",
                "orphans", "resolve-orphan", "prune", "status")  # fmt: skip
    for command in commands:
        assert command in top.stdout
        sub = posctl(db, endpoint, command, "--help")
        assert sub.returncode == 0 and "exit codes:" in sub.stdout
        assert len(sub.stdout.split("options:")[0].splitlines()) > 2  # it says what it does
    script = Path(sys.executable).with_name("posctl")  # the console script, when installed
    if script.exists():
        assert subprocess.run([script, "--help"], capture_output=True).returncode == 0


def test_status_asks_the_daemon_and_sees_a_stuck_database_at_once(workdir: Path) -> None:
    daemon = DaemonProcess(workdir, "--busy-timeout", "0.2", heartbeat_timeout=5.0).start()
    pm = PositionPersistenceManager("s", endpoint=daemon.endpoint, ack_timeout=0.3)
    holder = sqlite3.connect(daemon.db, isolation_level=None)
    try:
        pm.start_session()
        holder.execute("BEGIN IMMEDIATE")  # an operator's write lock: every commit now fails
        pm.save_position_entry(symbol="X", entry_price=1.0, quantity=1)  # not acked: kept

        def unhealthy() -> bool:
            code, data = ctl_json(daemon, "status")
            return code == 1 and data["status"]["writes_ok"] is False

        wait_for(unhealthy, 10, "posctl status to report failing writes")
        holder.execute("ROLLBACK")
        wait_for(lambda: ctl_json(daemon, "status")[0] == 0, 10, "healthy again")
        assert pm.sync(5)
        assert rows(daemon.db, "SELECT COUNT(*) AS n FROM strategy_positions")[0]["n"] == 1
    finally:
        holder.close()
        pm.close()
        daemon.stop()


def test_the_crash_line_names_the_pid_once(
    daemon: DaemonProcess, strategies: list[Strategy]
) -> None:
    kill_a_strategy(daemon, strategies)
    code, data = ctl_json(daemon, "crashed")
    (crash,) = data["crashes"]
    pid, host = crash["client_pid"], crash["client_host"]
    assert code == 1 and crash["crash_reason"] == f"process exited (pid {pid})"
    (why,) = [line for line in ctl(daemon, "crashed").stdout.splitlines() if "why:" in line]
    assert why.strip() == f"why: process exited (pid {pid})   (ran on {host})"


def test_the_crash_line_keeps_a_pid_the_reason_does_not_say() -> None:
    import io

    from rich.console import Console

    from positiond.ctl import render as ctl_render

    def why(crash: dict[str, Any]) -> str:
        out = Console(file=io.StringIO(), width=200)
        leg = {"position_key": "k", "position_id": 1, "symbol": "X", "exchange": "NFO",
               "product": "MIS", "leg_type": None, "side": "BUY", "quantity": 1,
               "entry_time": None, "entry_price": 1.0, "stop_price": None, "current_price": None,
               "highest_price": None, "last_trail_level": None}  # fmt: skip
        base = {"strategy_name": "s", "session_id": 1, "crash_timestamp": None, "legs": [leg]}
        for table in ctl_render.crashed_tables(out, [base | crash]):
            out.print(table)
        text = out.file.getvalue()  # type: ignore[attr-defined]
        return next(line.strip() for line in text.splitlines() if "why:" in line)

    # Another pid namespace (a container): the client's own pid is news, keep it.
    exited = {"crash_reason": "process exited (pid 7)", "client_host": "vm", "client_pid": 4321}
    assert why(exited) == "why: process exited (pid 7)   (ran on vm as pid 4321)"
    silent = {"crash_reason": "missed heartbeats (last seen 15:30:19.8)", "client_host": "vm"}
    assert why(silent | {"client_pid": 12}).endswith("(ran on vm as pid 12)")
    assert why(silent | {"client_pid": None}).endswith("(ran on vm)")  # never "pid None"
    assert why(silent | {"client_pid": 12, "crash_reason": "x (pid 123)"}).endswith("as pid 12)")
