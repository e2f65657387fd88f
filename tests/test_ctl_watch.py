"""``posctl watch`` end to end: the board in a real terminal (a pty read by tests/screen.py)
and ``--json`` on a pipe, against a real daemon and real strategies."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from positiond.ctl.board import Board, render
from positiond_client import PositionPersistenceManager
from tests.helpers import UNIT, DaemonProcess, wait_for
from tests.screen import PtyProgram, Screen
from tests.test_daemon import Strategy

ROOT = Path(__file__).parent.parent


def _posctl(daemon: DaemonProcess, *args: str) -> list[str]:
    return [sys.executable, "-m", "positiond.ctl", "--db", str(daemon.db),
            "--endpoint", daemon.endpoint, *args]  # fmt: skip


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR")}
    return {**env, "TERM": "xterm-256color", "PYTHONPATH": str(ROOT)}


@pytest.fixture
def board(daemon: DaemonProcess) -> Iterator[PtyProgram]:
    program = PtyProgram(_posctl(daemon, "watch"), _env(), rows=30, cols=80)
    yield program
    program.close()


def test_the_board_shows_a_stop_change_and_a_crash_follows_a_restart_and_quits_on_q(
    daemon: DaemonProcess, board: PtyProgram, strategies: list[Strategy]
) -> None:
    board.wait_for(r"● healthy")
    pm = PositionPersistenceManager("alpha", endpoint=daemon.endpoint, ack_timeout=5.0)
    with pm.session():
        leg = pm.save_position_entry(
            symbol="BANKNIFTY25NOV52000CE", leg_type="CE", entry_price=300.0, stop_price=270.0,
            quantity=30,
        )  # fmt: skip
        board.wait_for(r"BANKNIFTY25NOV52000CE +B 30 +300\.00 +270\.00 .*ACTIVE")
        pm.queue_position_update(leg, current_price=330.0, highest_price=330.0, stop_price=310.0,
                                 last_trail_level=2)  # fmt: skip
        # the leg's row and the events both show the new stop
        board.wait_for(r"BANKNIFTY25NOV52000CE +B 30 +300\.00 +310\.00 +330\.00 +2 +330\.00")
        board.wait_for(r"alpha STOP BANKNIFTY25NOV52000CE 270\.00 -> 310\.00")

        other = Strategy(daemon.endpoint, "hold")
        strategies.append(other)
        sid = other.info()["session_id"]
        board.wait_for(rf"{sid} +expiry_blast .* RUNNING")
        other.proc.kill()
        board.wait_for(r"expiry_blast CRASHED \(DISCONNECT\): process exited")
        board.wait_for(rf"! CRASHED: expiry_blast session {sid}")
        board.wait_for(r"NIFTY28NOV2524000CE .* CRASH")
        assert board.shows(r"ATTENTION")

        # the daemon goes away: the board says so and shows the database; then it is back
        daemon.stop()
        board.wait_for(r"● DOWN")
        board.wait_for(r"NIFTY28NOV2524000CE .* CRASH")
        assert board.shows(r"BANKNIFTY25NOV52000CE .* 310\.00")
        daemon.start()
        board.wait_for(r"● healthy", 15)
    board.type(b"q")
    assert board.proc.wait(10 * UNIT) == 0
    assert board.screen.left_alternate  # the terminal is back as it was


def test_the_board_redraws_often_and_ctrl_c_quits_it_cleanly(
    daemon: DaemonProcess, board: PtyProgram
) -> None:
    board.wait_for(r"● healthy")
    # at least twice a second: each redraw starts at the top left (ESC [ H)
    before, began = board.redraws(), time.monotonic()
    wait_for(lambda: board.redraws() - before >= 8, 10, "8 redraws")
    assert (board.redraws() - before) / (time.monotonic() - began) >= 2 / UNIT
    board.type(b"\x03")  # the terminal turns it into SIGINT
    assert board.proc.wait(10 * UNIT) == 0
    assert board.screen.left_alternate


def test_the_board_fits_80_columns() -> None:
    board = Board()
    board.load({
        "sessions": [{"id": 12, "session": "s", "strategy": "expiry_blast_long_name", "status":
                      "RUNNING", "host": "algo-box-1", "pid": 48213}],
        "legs": [{"key": "k", "session": "s", "symbol": "BANKNIFTY25NOV52000CE", "side": "SELL",
                  "quantity": 1500, "entry_price": 12345.5, "stop_price": 12999.95,
                  "highest_price": 13000.0, "last_trail_level": 12, "current_price": 12500.25,
                  "status": "NEEDS_REVIEW", "updated_at": "2025-11-28T10:00:00.000Z"}],
        "orphans": [], "events": [],
    })  # fmt: skip
    console = Console(width=80, record=True, color_system=None)
    console.print(render(board, now=1764324125.0))
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= 80
    (row,) = [line for line in lines if "BANKNIFTY25NOV52000CE" in line]
    assert row.split() == [
        "BANKNIFTY25NOV52000CE", "S", "1500", "12345.50", "12999.95", "13000.00", "12",
        "12500.25", "2m", "REVIEW",
    ]  # fmt: skip


class JsonLines:
    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, env=_env(), text=True)
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))

    def until(self, kind: str, timeout: float = 10.0) -> dict[str, Any]:
        while True:
            try:
                item = self.lines.get(timeout=timeout * UNIT)
            except queue.Empty:
                raise AssertionError(f"no {kind} line in time") from None
            if item["type"] == kind:
                return item


def test_watch_json_streams_the_snapshot_then_the_changes(daemon: DaemonProcess) -> None:
    pm = PositionPersistenceManager("beta", endpoint=daemon.endpoint, ack_timeout=5.0)
    with pm.session():
        first = pm.save_position_entry(
            symbol="A", leg_type="CE", entry_price=10.0, stop_price=9.0, quantity=1
        )
        stream = JsonLines(_posctl(daemon, "watch", "--json", "--strategy", "beta"))
        try:
            snapshot = stream.until("snapshot")["snapshot"]
            assert [leg["key"] for leg in snapshot["legs"]] == [first.key]
            second = pm.save_position_entry(
                symbol="B", leg_type="PE", entry_price=20.0, stop_price=18.0, quantity=2
            )
            while True:
                events = stream.until("changes")["events"]
                if any(e["event"] == "entry" and e["key"] == second.key for e in events):
                    break
            assert stream.until("health")["health"]["healthy"] is True
            daemon.stop()
            down = stream.until("down")
            assert {leg["key"] for leg in down["snapshot"]["legs"]} == {first.key, second.key}
            stream.proc.send_signal(signal.SIGINT)
            assert stream.proc.wait(10 * UNIT) == 0
        finally:
            if stream.proc.poll() is None:
                stream.proc.kill()
            stream.proc.wait()
            if stream.proc.stdout is not None:
                stream.proc.stdout.close()


def test_the_screen_reader_follows_what_a_terminal_does() -> None:
    screen = Screen(rows=3, cols=10)
    screen.feed("\x1b[?1049h\x1b[Hab\x1b[1;31mcd\x1b[0m\r\nxyz\x1b[2;2HQ\x1b[K\n\rlast")
    assert screen.text() == "abcd\nxQ\nlast"
    screen.feed("\x1b[?1049l")
    assert screen.left_alternate and screen.text() == "\n\n"
