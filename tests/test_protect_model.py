"""Never two orders for one leg, under any interleaving of kills and lost answers hypothesis can
draw: the protect worker (positiond.protect.worker.Protector) runs in-process on a real SQLite
database against the fake OpenAlgo, and is killed (its task cancelled, mid-call or not) and
started again, with placeorder answers that hang past the timeout and land in the book or
never do. The wall clock is injected so that a restarted worker may reconcile at once."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from positiond.openalgo import Settings
from positiond.ops import Op
from positiond.protect.handback import HandBack
from positiond.protect.settings import ProtectConfig
from positiond.protect.worker import Protector
from positiond.store.schema import iso, migrate
from tests.fake_openalgo import FakeOpenAlgo
from tests.helpers import UNIT

KEY = "oa-model-key"
SYMBOLS = ["NIFTY28NOV2524000CE", "NIFTY28NOV2524000PE", "BANKNIFTY28NOV2552000CE"]


def make_db(path: Path) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        migrate(conn)
        now = iso(1.7e9)
        conn.execute(
            "INSERT INTO strategy_sessions (session_key, strategy_name, status, start_time) "
            "VALUES ('s1', 'guarded', 'CRASHED', ?)", (now,),
        )  # fmt: skip
        for i, symbol in enumerate(SYMBOLS):
            conn.execute(
                "INSERT INTO strategy_positions (position_key, session_id, symbol, exchange, "
                "product, side, quantity, entry_price, entry_time, stop_price, status, "
                "was_crashed, updated_at) VALUES (?, 1, ?, 'NFO', 'MIS', ?, 75, 100, ?, ?, "
                "'CRASHED', 1, ?)",
                (f"leg{i}", symbol, "BUY" if i % 2 == 0 else "SELL", now, 90.0 + i, now),
            )  # fmt: skip
            conn.execute(
                "INSERT INTO position_events (position_id, session_id, event_type, event_time) "
                "VALUES (?, 1, 'CRASH', ?)", (i + 1, now),
            )  # fmt: skip
    finally:
        conn.close()


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAlgo]:
    with FakeOpenAlgo(api_key=KEY) as server:
        yield server


class Clock:
    def __init__(self) -> None:
        self.wall = 1.8e9

    def __call__(self) -> float:
        return self.wall


def protector(db: Path, key_file: Path, fake: FakeOpenAlgo, clock: Clock,
              ops: list[Op], handbacks: list[HandBack]) -> Protector:  # fmt: skip
    config = ProtectConfig(mode="on", strategies=("guarded",), retry_for=30.0,
                           poll_interval=0.05)  # fmt: skip
    return Protector(db, config, Settings(fake.url, key_file, 0.2), submit=ops.append,
                     handback=handbacks.append, now=clock)  # fmt: skip


async def run_for(worker: Protector, seconds: float) -> None:
    """Run the worker, then kill it (cancel its task wherever it is)."""
    task = asyncio.get_running_loop().create_task(worker.run())
    await asyncio.sleep(seconds)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def live_rows(db: Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(
            "SELECT o.*, p.symbol AS leg_symbol FROM protective_orders o "
            "JOIN strategy_positions p ON p.position_id = o.position_id")]  # fmt: skip
    finally:
        conn.close()


steps = st.lists(
    st.tuples(st.sampled_from([0.0, 0.5]), st.booleans(), st.floats(0.0, 0.6)),
    min_size=1, max_size=4,
)  # fmt: skip


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(steps)
def test_kills_and_lost_answers_never_make_two_orders_for_one_leg(
    fake: FakeOpenAlgo, tmp_path_factory: pytest.TempPathFactory,
    plan: list[tuple[float, bool, float]],
) -> None:  # fmt: skip
    work = tmp_path_factory.mktemp("model")
    db, key_file = work / "positiond.db", work / "key"
    key_file.write_text(KEY)
    make_db(db)
    with fake.orders.lock:
        fake.orders.orders.clear()
        fake.orders.strategy.clear()
        fake.orders.order_times.clear()
    fake.orders.set_position(SYMBOLS[0], 75)
    fake.orders.set_position(SYMBOLS[1], -75)
    fake.orders.set_position(SYMBOLS[2], 75)
    fake.orders.rate = 1000
    clock, ops, handbacks = Clock(), list[Op](), list[HandBack]()

    async def scenario() -> None:
        for hang, lands, alive in plan:
            fake.orders.hang, fake.orders.hang_lands = hang, lands
            await run_for(protector(db, key_file, fake, clock, ops, handbacks), alive * UNIT)
            clock.wall += 5.0  # the restarted daemon may reconcile what was in flight
        fake.orders.hang = 0.0
        worker = protector(db, key_file, fake, clock, ops, handbacks)
        task = asyncio.get_running_loop().create_task(worker.run())
        try:
            async with asyncio.timeout(20 * UNIT):
                while not (rows := live_rows(db)) or len(rows) < len(SYMBOLS) or any(
                    r["state"] == "PLANNED" for r in rows
                ):  # fmt: skip
                    await asyncio.sleep(0.05)
                    clock.wall += 0.5
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(scenario())
    rows = live_rows(db)
    placed = fake.orders.placed()
    for row in rows:
        mine = [o for o in placed if o["symbol"] == row["leg_symbol"]]
        assert len(mine) <= 1, (plan, mine)  # never two orders for one leg
        assert row["state"] == "PLACED", (plan, row)
        assert [o["orderid"] for o in mine] == [row["order_id"]]
    assert fake.forbidden() == []
