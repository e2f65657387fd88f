"""The asyncio twin keeps the sync twin's semantics: ``async with``, the open-legs warning at
the end, ``sync()`` waiting for earlier unacknowledged messages, concurrent ``sync()`` calls."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest

from positiond_client import AsyncPositionPersistenceManager, PositionPersistenceManager
from positiond_client.core import Core
from positiond_client.pending import Pending
from tests.helpers import DaemonProcess, rows


async def test_async_with_closes_the_manager(daemon: DaemonProcess) -> None:
    async with AsyncPositionPersistenceManager("a", endpoint=daemon.endpoint) as pm:
        assert await pm.start_session()
        assert await pm.end_session()
    assert pm._closed and not pm._channel._thread.is_alive()


async def test_ending_with_open_legs_warns_as_the_sync_twin_does(
    daemon: DaemonProcess, caplog: pytest.LogCaptureFixture
) -> None:
    async with AsyncPositionPersistenceManager("a", endpoint=daemon.endpoint) as pm:
        await pm.start_session()
        await pm.save_position_entry(symbol="X", entry_price=1.0, quantity=1)
        with caplog.at_level(logging.WARNING, "positiond_client.core"):
            assert await pm.end_session()
    assert any("1 leg(s) still open" in r.getMessage() for r in caplog.records), caplog.text


@pytest.fixture
def ghost() -> Iterator[list[Pending]]:
    """An earlier durable message still unacknowledged when a later sync is acked (what a
    message refused while the daemon did not know the session is), put in the outbox."""
    made: list[Pending] = []
    yield made
    for pending in made:
        pending._finish({}, None)


def _haunt(pm: Core, ghost: list[Pending]) -> Pending:
    pending = Pending(0, {"type": "sync"})
    with pm._channel._lock:
        pm._channel._s._outbox[0] = pending
    ghost.append(pending)
    return pending


def _exorcise(pm: Core, pending: Pending) -> None:
    with pm._channel._lock:
        del pm._channel._s._outbox[0]
    pending._finish({}, None)


async def test_async_sync_waits_for_earlier_unacknowledged_messages(
    daemon: DaemonProcess, ghost: list[Pending]
) -> None:
    async with AsyncPositionPersistenceManager("a", endpoint=daemon.endpoint) as pm:
        await pm.start_session()
        earlier = _haunt(pm, ghost)
        assert not await pm.sync(0.3)  # the sync itself is acked, the earlier one is not
        loop = asyncio.get_running_loop()
        loop.call_later(0.1, _exorcise, pm, earlier)
        assert await pm.sync(5)
        await pm.end_session()


def test_sync_twin_waits_for_earlier_unacknowledged_messages(
    daemon: DaemonProcess, ghost: list[Pending]
) -> None:
    with PositionPersistenceManager("s", endpoint=daemon.endpoint) as pm:
        pm.start_session()
        earlier = _haunt(pm, ghost)
        assert not pm.sync(0.3)
        _exorcise(pm, earlier)
        assert pm.sync(5)
        pm.end_session()


async def test_concurrent_syncs_neither_change_nor_depend_on_ack_timeout(
    daemon: DaemonProcess,
) -> None:
    async with AsyncPositionPersistenceManager(
        "a", endpoint=daemon.endpoint, ack_timeout=3.0
    ) as pm:
        await pm.start_session()
        leg = await pm.save_position_entry(symbol="X", entry_price=1.0, quantity=1)
        pm.queue_position_update(leg, stop_price=0.5)
        first = asyncio.ensure_future(pm.sync(7.0))
        second = asyncio.ensure_future(pm.sync(5.0))
        await asyncio.sleep(0)  # both are awaiting now
        assert pm.ack_timeout == 3.0
        assert await asyncio.gather(first, second) == [True, True]
        assert pm.ack_timeout == 3.0
        assert rows(daemon.db, "SELECT stop_price FROM strategy_positions")[0][0] == 0.5
        await pm.end_session()
