"""The client library: argument checks in the caller, the asyncio twin, the session helper."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from positiond_client import (
    AsyncPositionPersistenceManager,
    LegError,
    PositionPersistenceManager,
    ProtocolError,
    SessionError,
)
from tests.helpers import DaemonProcess, rows


@pytest.fixture
def pm(daemon: DaemonProcess) -> PositionPersistenceManager:
    manager = PositionPersistenceManager("expiry_blast", endpoint=daemon.endpoint, ack_timeout=5)
    yield manager  # type: ignore[misc]
    manager.close()


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"quantity": -75}, "quantity"),
        ({"entry_price": math.nan}, "finite"),
        ({"stop_price": math.inf}, "finite"),
        ({"symbol": ""}, "symbol"),
        ({"side": "LONG"}, "BUY, SELL"),
        ({"state": ["not", "a", "dict"]}, "object"),
    ],
)
def test_bad_arguments_raise_in_the_caller_and_are_never_sent(
    pm: PositionPersistenceManager, daemon: DaemonProcess, kwargs: dict[str, object], words: str
) -> None:
    pm.start_session()
    args: dict[str, object] = {"symbol": "X", "entry_price": 10.0, "quantity": 1} | kwargs
    with pytest.raises(ValueError, match=words):
        pm.save_position_entry(**args)  # type: ignore[arg-type]
    assert pm.sync(5)
    assert rows(daemon.db, "SELECT COUNT(*) AS n FROM strategy_positions")[0]["n"] == 0


def test_unknown_leg_handles_and_calls_without_a_session(pm: PositionPersistenceManager) -> None:
    with pytest.raises(SessionError, match="start_session"):
        pm.save_position_entry(symbol="X", entry_price=1.0, quantity=1)
    pm.start_session()
    with pytest.raises(LegError, match="no open leg"):
        pm.queue_position_update("never-entered", stop_price=1.0)
    with pytest.raises(LegError):
        pm.queue_position_update(42, stop_price=1.0)  # type: ignore[arg-type]
    leg = pm.save_position_entry(symbol="X", entry_price=1.0, quantity=1)
    with pytest.raises(ProtocolError, match="stop_price"):
        pm.queue_position_update(leg, stop_price=-1.0)
    with pytest.raises(LegError, match="already open"):
        pm.save_position_entry(symbol="X", entry_price=1.0, quantity=1, position_key=leg.key)
    assert pm.save_position_exit(leg, exit_price=1.0, exit_reason="DONE")
    with pytest.raises(LegError):
        pm.queue_position_update(leg, stop_price=1.0)


def test_position_id_is_filled_in_and_session_helper_ends_cleanly(
    pm: PositionPersistenceManager, daemon: DaemonProcess
) -> None:
    with pm.session():
        leg = pm.save_position_entry(symbol="X", entry_price=1.0, quantity=1)
        assert leg.position_id == 1
        assert pm.is_open(leg)
    assert rows(daemon.db, "SELECT status FROM strategy_sessions")[0]["status"] == "COMPLETED"


def test_session_helper_records_a_crash_and_reraises(
    pm: PositionPersistenceManager, daemon: DaemonProcess
) -> None:
    with pytest.raises(ZeroDivisionError), pm.session():
        pm.save_position_entry(symbol="X", entry_price=1.0, quantity=1)
        _ = 1 / 0
    session = rows(daemon.db, "SELECT status, crash_reason FROM strategy_sessions")[0]
    assert (session["status"], session["crash_reason"]) == (
        "CRASHED",
        "ZeroDivisionError: division by zero",
    )
    # A session the strategy reported crashed is final.
    with pytest.raises(SessionError):
        pm.save_position_entry(symbol="Y", entry_price=1.0, quantity=1)


def test_key_conflict_with_another_session_raises(daemon: DaemonProcess) -> None:
    first = PositionPersistenceManager("a", endpoint=daemon.endpoint, ack_timeout=5)
    second = PositionPersistenceManager("b", endpoint=daemon.endpoint, ack_timeout=5)
    try:
        first.start_session()
        second.start_session()
        first.save_position_entry(symbol="X", entry_price=1.0, quantity=1, position_key="shared")
        with pytest.raises(LegError) as info:
            second.save_position_entry(
                symbol="X", entry_price=1.0, quantity=1, position_key="shared"
            )
        assert info.value.code == "KEY_CONFLICT"
    finally:
        first.close()
        second.close()


async def test_async_twin(daemon: DaemonProcess) -> None:
    pm = AsyncPositionPersistenceManager("async_strategy", endpoint=daemon.endpoint, ack_timeout=5)
    try:
        async with pm.session():
            leg = await pm.save_position_entry(symbol="X", entry_price=1.0, quantity=2)
            pm.queue_position_update(leg, stop_price=0.9, last_trail_level=1)
            assert await pm.sync(5)
            stored = rows(daemon.db, "SELECT stop_price FROM strategy_positions")[0]
            assert stored["stop_price"] == 0.9
            assert await pm.save_position_exit(leg, exit_price=1.2, exit_reason="TARGET")
        session = rows(daemon.db, "SELECT status FROM strategy_sessions")[0]
        assert session["status"] == "COMPLETED"
    finally:
        await pm.aclose()


async def test_async_twin_without_daemon_returns_instead_of_raising(workdir: Path) -> None:
    pm = AsyncPositionPersistenceManager(
        "s", endpoint=f"ipc://{workdir}/nobody.sock", ack_timeout=0.05
    )
    try:
        assert await pm.start_session() is None
        leg = await pm.save_position_entry(symbol="X", entry_price=1.0, quantity=1)
        assert leg.position_id is None and pm.unacknowledged == 2
    finally:
        await pm.aclose(0)


def test_a_durable_call_wakes_the_io_thread_only_for_its_ack(
    pm: PositionPersistenceManager,
) -> None:
    """The caller sends its own message (no hand-off to the I/O thread on the way out): one
    I/O round per durable call, for reading the ack (two before the session/I-O split)."""
    pm.start_session()
    channel = pm._channel
    rounds = 0
    step = channel._step

    def counted(*args: Any) -> bool:
        nonlocal rounds
        rounds += 1
        return step(*args)

    channel._step = counted  # type: ignore[method-assign]
    n = 200
    for _ in range(n):
        assert pm.save_position_entry(symbol="X", entry_price=1.0, quantity=1).position_id
    channel._step = step  # type: ignore[method-assign]
    assert rounds <= n * 1.25, rounds  # (a heartbeat timer may add a few)
