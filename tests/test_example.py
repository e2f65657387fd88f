"""examples/expiry_blast.py end to end: it dies by SIGKILL with two legs open, the daemon marks
it CRASHED, and the next run finds, verifies, adopts and resumes both legs where they stopped."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.helpers import UNIT, DaemonProcess, rows, session_status, wait_for
from tests.inprocess import insert_protective_order
from tests.test_daemon import SEED_CRASH_QUERY

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "expiry_blast.py"
# Seed 19: both legs open at tick 55, each one trail level up; resumed, CE stops at tick 60,
# PE trails a level further and stops at tick 109.
SEED, CRASH_AT = 19, 55
RUNS = itertools.count()


class Example:
    """``examples/expiry_blast.py --json`` as a subprocess; its events read from its output."""

    def __init__(self, daemon: DaemonProcess, state_dir: Path, *extra: str) -> None:
        self.out = state_dir.parent / f"{state_dir.name}-{next(RUNS)}.out"
        args = [sys.executable, str(EXAMPLE), "--endpoint", daemon.endpoint, "--json"]
        args += ["--state-dir", str(state_dir), "--seed", str(SEED), "--tick-interval", "0.001"]
        with open(self.out, "w") as stdout:
            self.proc = subprocess.Popen([*args, *extra], stdout=stdout)

    def events(self) -> list[Any]:
        lines = self.out.read_text().split("\n")[:-1]  # complete lines only: it may be writing
        return [json.loads(line) for line in lines]

    def finish(self) -> tuple[int, list[Any]]:
        try:
            wait_for(lambda: self.proc.poll() is not None, 30, "the example to end")
        finally:
            self.kill()
        return self.proc.returncode, self.events()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def run_example(daemon: DaemonProcess, state_dir: Path, *extra: str) -> tuple[int, list[Any]]:
    """Run the example to its end (or its death); return its exit code and its JSON events."""
    return Example(daemon, state_dir, *extra).finish()


def events(log: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in log if e["event"] == kind]


def test_crashed_example_resumes_both_legs_where_they_stopped(
    daemon: DaemonProcess, workdir: Path
) -> None:
    state = workdir / "broker"
    code, first = run_example(daemon, state, "--crash-after", str(CRASH_AT))
    assert code == -signal.SIGKILL, first
    [crash] = events(first, "crash")
    assert crash["tick"] == CRASH_AT and crash["count"] == 2
    at_crash = {leg["leg"]: leg for leg in crash["legs"]}
    assert {n: at_crash[n]["level"] for n in at_crash} == {"CE": 1, "PE": 1}
    assert len(events(first, "entry")) == 2

    # It died without a word: the crash is the daemon's verdict (ipc disconnect).
    old = events(first, "session")[0]["session_id"]
    wait_for(lambda: session_status(daemon.db, old) == "CRASHED", 5, "the session CRASHED")
    [session] = rows(daemon.db, "SELECT * FROM strategy_sessions WHERE id = ?", (old,))
    assert session["crash_source"] == "DISCONNECT"
    assert session["crash_reason"].startswith("process exited")
    saved = {r["leg_type"]: r for r in rows(daemon.db, SEED_CRASH_QUERY)}
    assert sorted(saved) == ["CE", "PE"]
    for name, leg in saved.items():
        assert (leg["stop_price"], leg["last_trail_level"]) == (
            at_crash[name]["stop"],
            at_crash[name]["level"],
        )
        assert leg["crash_reason"] == session["crash_reason"]

    # The simulated broker still holds both legs, in OpenAlgo's positionbook format.
    show = [sys.executable, str(EXAMPLE), "--state-dir", str(state), "--positionbook"]
    book = json.loads(
        subprocess.run(show, capture_output=True, check=True, timeout=30 * UNIT).stdout
    )
    assert book["status"] == "success"
    assert [(r["symbol"][-2:], r["quantity"]) for r in book["data"]] == [("CE", "75"), ("PE", "75")]
    assert all(isinstance(v, str) for r in book["data"] for v in r.values())

    code, second = run_example(daemon, state, "--crash-after", str(CRASH_AT))
    assert code == 0, second
    new = events(second, "session")[0]
    assert new["crashed"] == 2 and new["session_id"] != old
    found = {e["leg"]: e for e in events(second, "found")}
    resumed = {e["leg"]: e for e in events(second, "resume")}
    assert {n: (e["verdict"], e["action"]) for n, e in found.items()} == {
        "CE": ("RESUME", "adopted"),
        "PE": ("RESUME", "adopted"),
    }
    for name in ("CE", "PE"):
        levels = {k: at_crash[name][k] for k in ("stop", "level", "highest")}
        assert {k: found[name][k] for k in levels} == levels  # what positiond saved
        assert {k: resumed[name][k] for k in levels} == levels  # what the monitor runs with
        assert found[name]["session_id"] == old
    assert events(second, "entry") == []  # adopted, not entered again
    assert {e["leg"]: (e["tick"], e["reason"]) for e in events(second, "exit")} == {
        "CE": (60, "STOP_HIT"),
        "PE": (109, "STOP_HIT"),
    }

    legs = rows(daemon.db, "SELECT * FROM strategy_positions")
    assert len(legs) == 2  # no duplicate entry
    assert {(leg["status"], leg["session_id"], leg["was_crashed"]) for leg in legs} == {
        ("CLOSED", new["session_id"], 1)
    }
    assert session_status(daemon.db, new["session_id"]) == "COMPLETED"
    entries = rows(daemon.db, "SELECT * FROM position_events WHERE event_type = 'ENTRY'")
    assert len(entries) == 2
    assert len(rows(daemon.db, "SELECT * FROM position_events WHERE event_type = 'RECOVERY'")) == 2
    closed = events(second, "end")[0]["positionbook"]
    assert [row["quantity"] for row in closed] == ["0", "0"]  # closed rows stay, with "0"

    # Where it stopped, exactly: the same day without the crash ends with the same exits.
    code, straight = run_example(daemon, workdir / "uninterrupted")
    assert code == 0, straight
    assert events(straight, "exit") == events(second, "exit")


def test_example_does_not_trade_when_positiond_does_not_answer(workdir: Path) -> None:
    absent = DaemonProcess(workdir)  # never started: nobody at its endpoint
    code, log = run_example(absent, workdir / "broker")
    assert code == 2
    assert events(log, "error") and not events(log, "entry")
    assert not (workdir / "broker" / "broker.json").exists()  # no order was placed


def test_example_does_not_enter_while_another_session_holds_its_legs(
    daemon: DaemonProcess, workdir: Path
) -> None:
    first = Example(daemon, workdir / "first", "--tick-interval", "0.2")
    try:
        wait_for(lambda: len(events(first.events(), "entry")) == 2, 10, "the first run's entries")
        code, second = run_example(daemon, workdir / "second")
    finally:
        first.kill()
    assert code == 0, second
    assert events(second, "entry") == []
    held = events(second, "held")
    assert sorted((e["leg"], e["status"]) for e in held) == [("CE", "ACTIVE"), ("PE", "ACTIVE")]
    assert {e["session_id"] for e in held} == {events(first.events(), "session")[0]["session_id"]}


def test_protected_example_is_handed_its_protective_orders_and_does_not_exit_over_them(
    daemon: DaemonProcess, workdir: Path
) -> None:
    """--protect: the session asks for protection (stored); after its crash the next run is
    shown the protective orders positiond placed (written here as the protect worker writes
    them), positiond is told to cancel them, and while that is pending the strategy does not
    exit a leg itself: a second exit at the broker could sell twice."""
    state = workdir / "broker"
    code, first = run_example(daemon, state, "--protect", "--crash-after", str(CRASH_AT))
    assert code == -signal.SIGKILL, first
    old = events(first, "session")[0]["session_id"]
    [session] = rows(daemon.db, "SELECT protect FROM strategy_sessions WHERE id = ?", (old,))
    assert session["protect"] == 1
    wait_for(lambda: session_status(daemon.db, old) == "CRASHED", 5, "the session CRASHED")
    crashed = rows(daemon.db, "SELECT leg_type, position_key FROM strategy_positions")
    saved = {r["leg_type"]: r["position_key"] for r in crashed}
    orders = {
        name: insert_protective_order(daemon.db, key, order_id=f"OA-{name}", trigger_price=80.0)
        for name, key in saved.items()
    }

    code, second = run_example(daemon, state, "--protect", "--crash-after", str(CRASH_AT))
    assert code == 0, second
    new = events(second, "session")[0]["session_id"]
    shown = {e["leg"]: e for e in events(second, "protected")}
    assert {n: (e["order_id"], e["state"], e["what"]) for n, e in shown.items()} == {
        "CE": ("OA-CE", "PLACED", "positiond cancels it"),
        "PE": ("OA-PE", "PLACED", "positiond cancels it"),
    }
    released = rows(daemon.db, "SELECT id, release, release_session FROM protective_orders")
    assert {(r["id"], r["release"], r["release_session"]) for r in released} == {
        (orders["CE"], "CANCEL", new), (orders["PE"], "CANCEL", new)
    }
    # Nobody settles the orders here (no protect worker): the stops hit, the legs are held.
    assert events(second, "exit") == []
    assert {e["leg"] for e in events(second, "hold")} == {"CE", "PE"}
    legs = rows(daemon.db, "SELECT status, session_id FROM strategy_positions")
    assert {(leg["status"], leg["session_id"]) for leg in legs} == {("ACTIVE", new)}
