"""A real positiond running inside the test process (its own asyncio loop on a thread), on a real
ipc socket and a real SQLite file; and a raw DEALER client for wire-level steps.

For what only the daemon's own code can cause — here the protect worker's
:class:`~positiond.protect.handback.HandBack` reports, which nothing on the wire may trigger —
the test calls the daemon's callback on its loop (:meth:`InProcessDaemon.handback`), exactly as
the worker does.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path
from typing import Any

import zmq

from positiond.config import Config
from positiond.protect.handback import HandBack
from positiond.protect.settings import ProtectConfig
from positiond.server import Daemon
from positiond_client.protocol import decode_reply, encode
from tests.helpers import UNIT, wait_for

__all__ = ["InProcessDaemon", "RawClient", "insert_protective_order", "wait_until_crashed"]


class _WithoutWorker(Daemon):
    """The daemon with the test standing in for its protect worker (the worker's own tests run
    it against the fake broker: tests/test_protect*.py)."""

    def open_protector(self, db: Path) -> None:
        return None


class InProcessDaemon:
    """``Daemon`` on a loop thread; ``stop()`` to end it (the fixture does)."""

    def __init__(self, workdir: Path, protect: ProtectConfig | None = None) -> None:
        protect = protect or ProtectConfig(mode="dry-run", strategies=("*",))
        self.db = workdir / "positiond.db"
        self.endpoint = f"ipc://{workdir}/positiond.sock"
        self.config = Config(
            db=self.db,
            endpoint=self.endpoint,
            heartbeat_timeout=3.0 * UNIT,
            openalgo_host="http://127.0.0.1:9" if protect.enabled else None,
            protect=protect,
        )
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="inprocess-daemon")
        self.thread.start()
        self.daemon: Daemon = self.call(self._start())
        self.wakes = 0  # protect worker wakes

    async def _start(self) -> Daemon:
        daemon = _WithoutWorker(self.config)
        daemon.protect_wake = self._woken
        await daemon.start()
        return daemon

    def _woken(self) -> None:
        self.wakes += 1

    def call(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout * UNIT)

    def handback(self, hb: HandBack) -> None:
        """What the protect worker does once it settled an order: the daemon's callback, on
        the daemon's loop."""
        self.loop.call_soon_threadsafe(self.daemon.handback, hb)

    def stop(self) -> None:
        try:
            self.call(self.daemon.stop(), timeout=20.0)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10 * UNIT)
            self.loop.close()


class RawClient:
    """One DEALER connection speaking the wire protocol by hand."""

    def __init__(self, endpoint: str) -> None:
        self.sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, msg: dict[str, Any]) -> None:
        self.sock.send(encode({"v": 1, **msg}))

    def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next reply that is not a ping; fails after ``timeout`` units."""
        while True:
            assert self.sock.poll(int(timeout * UNIT * 1000)), "no reply from positiond"
            reply = decode_reply(self.sock.recv())
            if reply["type"] != "ping":
                return reply

    def ask(self, msg: dict[str, Any]) -> dict[str, Any]:
        self.send(msg)
        return self.recv()

    def close(self) -> None:
        self.sock.close(linger=0)


def insert_protective_order(
    db: Path,
    key: str,
    *,
    state: str = "PLACED",
    order_id: str | None = "OA-1001",
    trigger_price: float | None = 9.5,
) -> int:
    """Write a leg's protective order as the protect worker does after placing it (the worker is
    built apart): one row per crash of the leg, tied to the leg's newest CRASH event."""
    conn = sqlite3.connect(db, timeout=10)
    try:
        leg = conn.execute(
            "SELECT position_id, session_id, symbol, exchange, product, side, quantity "
            "FROM strategy_positions WHERE position_key = ?",
            (key,),
        ).fetchone()
        assert leg is not None, f"no leg {key}"
        crash = conn.execute(
            "SELECT max(id) FROM position_events WHERE position_id = ? AND event_type = 'CRASH'",
            (leg[0],),
        ).fetchone()[0]
        assert crash is not None, f"leg {key} never crashed"
        action = "SELL" if leg[5] == "BUY" else "BUY"
        now = "2026-11-28T10:00:00.000Z"
        cur = conn.execute(
            "INSERT INTO protective_orders (position_id, session_id, crash_event_id, state, mode, "
            "symbol, exchange, product, action, quantity, pricetype, trigger_price, tag, "
            "order_id, planned_at, placed_at, updated_at, attempts) "
            "VALUES (?, ?, ?, ?, 'on', ?, ?, ?, ?, ?, 'SL-M', ?, 'positiond-protect', ?, ?, ?, "
            "?, 1)",
            (leg[0], leg[1], crash, state, leg[2], leg[3], leg[4], action, leg[6],
             trigger_price, order_id, now, now, now),
        )  # fmt: skip
        conn.commit()
        assert cur.lastrowid is not None
        return cur.lastrowid
    finally:
        conn.close()


def wait_until_crashed(db: Path, session_key: str) -> None:
    def crashed() -> bool:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            row = conn.execute(
                "SELECT status FROM strategy_sessions WHERE session_key = ?", (session_key,)
            ).fetchone()
        finally:
            conn.close()
        return row is not None and row[0] == "CRASHED"

    wait_for(crashed, what=f"session {session_key} CRASHED")
