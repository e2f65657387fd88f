"""Stopping a strategy is not a crash (positiond_client.stop): real strategy processes, signals,
a real daemon. SIGTERM/SIGINT with the handlers and sys.exit(0) end the session COMPLETED; a
kill, a non-zero exit, an exception or an unrequested KeyboardInterrupt are crashes."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from positiond_client.stop import StopRequested, ends_cleanly
from tests.client_support import ClientProc
from tests.helpers import DaemonProcess, rows, wait_for

UNIT_FILE = Path(__file__).parent.parent / "systemd" / "examples" / "strategy@.service"


@pytest.fixture
def procs() -> Iterator[list[ClientProc]]:
    started: list[ClientProc] = []
    yield started
    for proc in started:
        proc.close()


def start(daemon: DaemonProcess, procs: list[ClientProc], mode: str) -> tuple[ClientProc, int]:
    proc = ClientProc(daemon.workdir, daemon.endpoint, mode)
    procs.append(proc)
    info = proc.json()
    return proc, int(info["session_id"])


def session(daemon: DaemonProcess, sid: int) -> dict[str, object]:
    row = rows(
        daemon.db,
        "SELECT status, crash_reason, crash_source FROM strategy_sessions WHERE id = ?",
        (sid,),
    )[0]
    return dict(row)


def legs(daemon: DaemonProcess, sid: int) -> list[tuple[str, int]]:
    found = rows(
        daemon.db,
        "SELECT status, was_crashed FROM strategy_positions WHERE session_id = ? "
        "ORDER BY position_key",
        (sid,),
    )
    return [(r["status"], r["was_crashed"]) for r in found]


@pytest.mark.parametrize("mode", ["loop", "async"])
def test_sigterm_with_the_stop_handlers_ends_the_session_completed(
    daemon: DaemonProcess, procs: list[ClientProc], mode: str
) -> None:
    proc, sid = start(daemon, procs, mode)
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 0, proc.stderr()
    assert proc.json_until("ended")["ended"]  # the loop saw pm.stop_requested and left
    completed = {"status": "COMPLETED", "crash_reason": None, "crash_source": None}
    assert session(daemon, sid) == completed
    # Open legs stay open (ACTIVE, never crashed) and are listed as open at the end.
    assert set(legs(daemon, sid)) == {("ACTIVE", 0)}
    assert "stop requested" in proc.stderr()
    if mode == "loop":
        assert "still open" in proc.stderr()


def test_sigkill_is_still_a_crash(daemon: DaemonProcess, procs: list[ClientProc]) -> None:
    proc, sid = start(daemon, procs, "loop")
    proc.proc.send_signal(signal.SIGKILL)
    proc.wait()
    wait_for(lambda: session(daemon, sid)["status"] == "CRASHED", 5, "CRASHED")
    assert session(daemon, sid)["crash_source"] == "DISCONNECT"
    assert set(legs(daemon, sid)) == {("CRASHED", 1)}


@pytest.mark.parametrize(("mode", "code"), [("exit0", 0), ("exit3", 3)])
def test_sys_exit_from_a_signal_handler_zero_is_a_stop_anything_else_a_crash(
    daemon: DaemonProcess, procs: list[ClientProc], mode: str, code: int
) -> None:
    proc, sid = start(daemon, procs, mode)
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.wait() == code, proc.stderr()
    found = session(daemon, sid)
    if code == 0:
        assert found["status"] == "COMPLETED"
        assert set(legs(daemon, sid)) == {("ACTIVE", 0)}
    else:
        assert (found["status"], found["crash_reason"], found["crash_source"]) == (
            "CRASHED",
            "SystemExit: 3",
            "CLIENT",
        )
        assert set(legs(daemon, sid)) == {("CRASHED", 1)}


@pytest.mark.parametrize(
    ("sig", "reason", "source"),
    [
        (signal.SIGINT, "KeyboardInterrupt", "CLIENT"),  # raised anywhere: recovery decides
        (signal.SIGTERM, "process exited", "DISCONNECT"),  # Python's default: killed
    ],
)
def test_without_the_handlers_a_signal_is_a_crash(
    daemon: DaemonProcess, procs: list[ClientProc], sig: int, reason: str, source: str
) -> None:
    proc, sid = start(daemon, procs, "plain")
    proc.proc.send_signal(sig)
    proc.wait()
    wait_for(lambda: session(daemon, sid)["status"] == "CRASHED", 5, "CRASHED")
    found = session(daemon, sid)
    assert str(found["crash_reason"]).startswith(reason) and found["crash_source"] == source


@pytest.mark.parametrize("mode", ["stuck", "async-stuck"])
def test_a_second_signal_interrupts_a_loop_that_never_looks_and_still_completes(
    daemon: DaemonProcess, procs: list[ClientProc], mode: str
) -> None:
    proc, sid = start(daemon, procs, mode)
    proc.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "stop requested" in proc.stderr(), 5, "the stop request to be logged")
    # The first signal only asks: the loop does not look, so the strategy runs on.
    assert proc.proc.poll() is None
    assert session(daemon, sid)["status"] == "RUNNING"
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 0, proc.stderr()  # StopRequested is a SystemExit(0)
    assert "again: interrupting" in proc.stderr() or "again: cancelling" in proc.stderr()
    assert session(daemon, sid)["status"] == "COMPLETED"
    assert set(legs(daemon, sid)) == {("ACTIVE", 0)}


@pytest.mark.parametrize(
    ("exc", "requested", "clean"),
    [
        (SystemExit(0), False, True),
        (SystemExit(None), False, True),
        (SystemExit(1), False, False),
        (SystemExit("fatal: no config"), False, False),
        (StopRequested("SIGTERM"), False, True),
        (KeyboardInterrupt(), False, False),
        (KeyboardInterrupt(), True, True),
        (asyncio.CancelledError(), False, False),
        (asyncio.CancelledError(), True, True),
        (ValueError("bug"), True, False),
    ],
)
def test_which_exits_end_a_session_cleanly(
    exc: BaseException, requested: bool, clean: bool
) -> None:
    assert ends_cleanly(exc, requested) is clean


def test_the_strategy_unit_example_says_what_sigterm_really_does() -> None:
    text = UNIT_FILE.read_text()
    assert "install_signal_handlers" in text and "stop_signals" in text
    assert "COMPLETED" in text and "CRASHED" in text
    assert "TimeoutStopSec=" in text
