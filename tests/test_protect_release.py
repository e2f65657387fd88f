"""Releasing protective orders (the contract with the hand-back side): rows the writer marked
``release = 'CANCEL'`` or ``'KEEP'`` with the session that holds the leg now are settled at the
broker and reported, one :class:`HandBack` each, through the callback the server gives the
worker. In-process worker, real SQLite database, the fake OpenAlgo."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from positiond.ops import Op, ResolveOp
from positiond.protect.handback import OUTCOMES, HandBack
from positiond.protect.worker import Protector
from tests.fake_openalgo import FakeOpenAlgo, Reply
from tests.helpers import UNIT
from tests.test_protect_model import KEY, SYMBOLS, Clock, live_rows, make_db, protector


@pytest.fixture
def fake() -> Iterator[FakeOpenAlgo]:
    with FakeOpenAlgo(api_key=KEY) as server:
        server.orders.set_position(SYMBOLS[0], 75)
        server.orders.set_position(SYMBOLS[1], -75)
        server.orders.set_position(SYMBOLS[2], 75)
        yield server
        assert server.forbidden() == []


async def until(worker: Protector, done: Callable[[], object], what: str) -> None:
    task = asyncio.get_running_loop().create_task(worker.run())
    try:
        async with asyncio.timeout(10 * UNIT):
            while not done():
                await asyncio.sleep(0.02)
                worker.wake()
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def release(db: Path, symbol: str, how: str, session: int | None = 7) -> None:
    """As an adoption by ``session`` does (the leg moves to it, ACTIVE; None: a resolve)."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute(
            "UPDATE protective_orders SET release = ?, release_session = ? WHERE position_id = "
            "(SELECT position_id FROM strategy_positions WHERE symbol = ?)", (how, session, symbol),
        )  # fmt: skip
        if session is not None:
            conn.execute(
                "INSERT OR IGNORE INTO strategy_sessions (id, session_key, strategy_name, status, "
                "start_time) VALUES (?, 'adopter', 'guarded', 'RUNNING', '2026-01-01T00:00:00Z')",
                (session,),
            )
            conn.execute(
                "UPDATE strategy_positions SET session_id = ?, status = 'ACTIVE' WHERE symbol = ?",
                (session, symbol),
            )
    finally:
        conn.close()


def test_each_released_order_is_settled_and_reported_once(
    fake: FakeOpenAlgo, tmp_path: Path
) -> None:
    db, key_file = tmp_path / "positiond.db", tmp_path / "key"
    key_file.write_text(KEY)
    make_db(db)
    clock, ops, told = Clock(), list[Op](), list[HandBack]()
    state = lambda: {r["leg_symbol"]: r for r in live_rows(db)}  # noqa: E731

    async def scenario() -> None:
        worker = protector(db, key_file, fake, clock, ops, told)
        await until(worker, lambda: len(state()) == 3 and all(
            r["state"] == "PLACED" for r in state().values()), "three orders placed")  # fmt: skip
        orders = {s: r["order_id"] for s, r in state().items()}
        # Handed back: cancel one (default), keep one; the third filled before its release.
        release(db, SYMBOLS[0], "CANCEL")
        release(db, SYMBOLS[1], "KEEP")
        fake.orders.trigger(orders[SYMBOLS[2]], 93.4)
        release(db, SYMBOLS[2], "CANCEL")
        worker = protector(db, key_file, fake, clock, ops, told)
        await until(worker, lambda: len(told) == 3, "three hand-backs")
        got = {h.position_key: h for h in told}
        assert {k: h.outcome for k, h in got.items()} == {
            "leg0": "cancelled", "leg1": "kept", "leg2": "triggered"}  # fmt: skip
        assert all(h.session_id == 7 and h.outcome in OUTCOMES for h in told)
        assert got["leg2"].fill_price == 93.4 and got["leg2"].order_id == orders[SYMBOLS[2]]
        assert got["leg0"].trigger_price == 90.0
        assert {s: r["state"] for s, r in state().items()} == {
            SYMBOLS[0]: "CANCELLED", SYMBOLS[1]: "KEPT", SYMBOLS[2]: "TRIGGERED"}  # fmt: skip
        live = {o["symbol"] for o in fake.orders.live()}
        assert live == {SYMBOLS[1]}  # kept for the strategy; the cancelled one is gone
        # A handed-back leg is closed by its new owner's engine path, never by a ResolveOp here.
        assert [op for op in ops if isinstance(op, ResolveOp)] == []
        # Looking again reports nothing twice.
        await until(protector(db, key_file, fake, clock, ops, told), lambda: True, "a look")
        assert len(told) == 3

    asyncio.run(scenario())


def test_a_refused_cancel_is_reported_and_the_order_still_watched(
    fake: FakeOpenAlgo, tmp_path: Path
) -> None:
    db, key_file = tmp_path / "positiond.db", tmp_path / "key"
    key_file.write_text(KEY)
    make_db(db)
    clock, ops, told = Clock(), list[Op](), list[HandBack]()

    async def scenario() -> None:
        worker = protector(db, key_file, fake, clock, ops, told)
        await until(worker, lambda: len(live_rows(db)) == 3 and all(
            r["state"] == "PLACED" for r in live_rows(db)), "placed")  # fmt: skip
        fake.reply("cancelorder", Reply({"status": "error", "message": "OMS: not allowed"}, 400))
        release(db, SYMBOLS[0], "CANCEL")
        await until(worker, lambda: told, "cancel_failed")
        assert [(h.position_key, h.outcome) for h in told] == [("leg0", "cancel_failed")]
        assert "OMS: not allowed" in told[0].reason
        row = next(r for r in live_rows(db) if r["leg_symbol"] == SYMBOLS[0])
        assert row["state"] == "PLACED" and row["reason"].startswith("cancel refused")
        # It still fills: the hand-back hears of it.
        fake.orders.trigger(row["order_id"], 89.9)
        await until(worker, lambda: len(told) == 2, "triggered")
        assert told[1].outcome == "triggered" and told[1].fill_price == 89.9

    asyncio.run(scenario())


def test_a_fill_of_a_crashed_leg_closes_it_through_the_engine(
    fake: FakeOpenAlgo, tmp_path: Path
) -> None:
    db, key_file = tmp_path / "positiond.db", tmp_path / "key"
    key_file.write_text(KEY)
    make_db(db)
    clock, ops, told = Clock(), list[Op](), list[HandBack]()

    async def scenario() -> None:
        worker = protector(db, key_file, fake, clock, ops, told)
        await until(worker, lambda: len(live_rows(db)) == 3 and all(
            r["state"] == "PLACED" for r in live_rows(db)), "placed")  # fmt: skip
        row = next(r for r in live_rows(db) if r["leg_symbol"] == SYMBOLS[1])
        fake.orders.cancel_by_broker(next(
            r["order_id"] for r in live_rows(db) if r["leg_symbol"] == SYMBOLS[0]))  # fmt: skip
        fake.orders.trigger(row["order_id"], 91.6)
        await until(worker, lambda: told, "the close")
        # The engine closes it (a protective close checked against the leg's holder when it
        # commits), whoever holds the leg when the fill is seen: here its crashed session.
        (hb,) = told
        conn = sqlite3.connect(db)
        holder = conn.execute(
            "SELECT session_id FROM strategy_positions WHERE position_key = 'leg1'"
        ).fetchone()[0]
        conn.close()
        assert (hb.position_key, hb.outcome, hb.fill_price, hb.session_id) == (
            "leg1", "triggered", 91.6, holder)  # fmt: skip
        assert ops == []
        await until(worker, lambda: next(r for r in live_rows(db) if r["leg_symbol"]
                                         == SYMBOLS[0])["state"] == "CANCELLED", "cancelled")
        gone = next(r for r in live_rows(db) if r["leg_symbol"] == SYMBOLS[0])
        assert "at the broker (not by positiond)" in gone["reason"]
        assert len(told) == 1

    asyncio.run(scenario())
