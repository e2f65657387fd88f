"""Periodic reconciliation against OpenAlgo's positionbook (opt-in: ``[openalgo]
reconcile_interval``).

Its own task, its own database connection (SQLite or PostgreSQL: :mod:`positiond.store.side`;
a lost one is made again at the next check) and its own HTTP client: it never delays a verdict or
an ack. Every ``interval`` seconds, inside the market-hours ``window`` (local time in
``timezone``), it fetches the positionbook (bounded by the OpenAlgo timeout), reads every open
leg and judges them (:func:`positiond.drift.find_drift`). A new drift is written to the alert
outbox as one ``drift`` alert (durable, delivered like every other alert); the same drift is not
alerted twice: the set of signatures last alerted is remembered, and read back from the newest
``drift`` alert when the daemon starts. No leg is ever changed.

A refused positionbook (an error reply, a timeout, no key) is logged and the check retried at
the next interval: it is never read as flat.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import orjson

from positiond.drift import Window, find_drift, in_window, parse_window
from positiond.openalgo import AsyncOpenAlgo, OpenAlgoError, Settings, api_key, settings_of
from positiond.store.dsn import PgDsn
from positiond.store.recovery import read_legs
from positiond.store.schema import iso
from positiond.store.side import SerialThread, broken, connect_side

if TYPE_CHECKING:
    from positiond.config import Config

__all__ = ["Reconciler", "reconciler_of"]

log = logging.getLogger(__name__)


def reconciler_of(config: Config, wake: Callable[[], None] | None) -> Reconciler | None:
    """The configured reconciliation, or None when ``reconcile_interval`` is 0 (off)."""
    settings = settings_of(config)
    if settings is None or config.openalgo_reconcile_interval <= 0:
        return None
    window = config.openalgo_reconcile_window
    return Reconciler(
        config.db, settings, config.openalgo_reconcile_interval,
        None if window is None else parse_window(window), ZoneInfo(config.openalgo_timezone),
        busy_timeout=config.busy_timeout, wake=wake,
    )  # fmt: skip


class Reconciler:
    """Check the legs against the positionbook every ``interval`` seconds (see the module)."""

    def __init__(
        self,
        db: Path | PgDsn,
        settings: Settings,
        interval: float,
        window: Window | None,
        tz: ZoneInfo,
        *,
        busy_timeout: float = 5.0,
        wake: Callable[[], None] | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.db, self.settings, self.interval = db, settings, interval
        self.window, self.tz, self.busy_timeout = window, tz, busy_timeout
        self.wake, self.now = wake, now
        self._conn: sqlite3.Connection | None = None
        self._thread = SerialThread("positiond-reconcile-db")  # every use of _conn, its close
        self._last: set[str] | None = None  # signatures last alerted (None: not read yet)
        self.state: dict[str, Any] = {
            "checks": 0, "refused": 0, "last_check": None, "last_error": None,
            "drift": 0, "alerts": 0,
        }  # fmt: skip

    # ---- the loop ----------------------------------------------------------------------

    async def run(self) -> None:
        """Check, then wait ``interval``; until cancelled. A fault is logged, never fatal."""
        try:
            while True:
                try:
                    if in_window(datetime.fromtimestamp(self.now(), UTC), self.window, self.tz):
                        await self.check()
                except Exception:
                    log.exception("reconcile: check failed; retrying at the next interval")
                    if self._conn is not None and broken(self._conn):  # PostgreSQL: reconnect
                        lost, self._conn = self._conn, None
                        await self._thread.close(lost)
                await asyncio.sleep(self.interval)  # the period of the check itself
        finally:
            # On the connection's thread, after a statement a cancelled check left running.
            conn, self._conn = self._conn, None
            await self._thread.close(conn)

    async def fetch(self) -> Any:
        """The positionbook reply; OpenAlgoError when refused (error, timeout, no key)."""
        client = AsyncOpenAlgo(self.settings, api_key(self.settings))
        try:
            async with asyncio.timeout(self.settings.timeout + 1.0):
                return await client.positionbook()
        except TimeoutError:
            raise OpenAlgoError(
                f"positionbook: no answer within {self.settings.timeout:g}s"
            ) from None
        finally:
            await client.aclose()

    async def check(self) -> list[dict[str, Any]]:
        """One reconciliation: the drift found ([] when the book was refused)."""
        self.state["checks"] += 1
        self.state["last_check"] = iso(self.now())
        try:
            book = await self.fetch()
            legs = await self._thread.run(self._legs)
            drift = find_drift(legs, book)
        except (OpenAlgoError, ValueError) as exc:
            self.state["refused"] += 1
            self.state["last_error"] = str(exc)[:300]
            log.warning("reconcile: positionbook refused, nothing judged (retry in %gs): %s",
                        self.interval, exc)  # fmt: skip
            return []
        self.state["last_error"] = None
        self.state["drift"] = len(drift)
        current = {str(item["signature"]) for item in drift}
        last = self._last if self._last is not None else await self._thread.run(self._recorded)
        if current - last:  # a drift not alerted yet: one alert with every current drift
            await self._thread.run(self._write, drift, current - last)
            self.state["alerts"] += 1
            if self.wake is not None:
                self.wake()
            log.warning("reconcile: drift: %s", "; ".join(d["reason"] for d in drift)[:1000])
        self._last = current  # a drift gone and back later is alerted again
        return drift

    # ---- the database (its own connection, in a thread) --------------------------------

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = connect_side(self.db, self.busy_timeout)
            if isinstance(conn, sqlite3.Connection):  # PostgreSQL's rows read by name already
                conn.row_factory = sqlite3.Row
            self._conn = conn
        return self._conn

    def _legs(self) -> list[dict[str, Any]]:
        found = read_legs(self._db(), "open", None)
        if found["truncated"]:
            raise ValueError("more open legs than one query returns: not reconciled")
        legs: list[dict[str, Any]] = found["legs"]
        return legs

    def _recorded(self) -> set[str]:
        """The signatures of the newest ``drift`` alert (what was last alerted)."""
        row = (
            self._db()
            .execute("SELECT body FROM alert_outbox WHERE kind = 'drift' ORDER BY id DESC LIMIT 1")
            .fetchone()
        )
        if row is None:
            return set()
        body = orjson.loads(row[0])
        return {str(item["signature"]) for item in body.get("drift", [])}

    def _write(self, drift: list[dict[str, Any]], new: set[str]) -> None:
        fresh = [d for d in drift if d["signature"] in new]
        reason = f"{len(fresh)} new drift(s) from the positionbook: " + "; ".join(
            f"{d['kind']} {d['symbol']}: {d['reason']}" for d in fresh
        )
        body = {
            "strategy": None, "session_id": None, "reason": reason[:2000],
            "legs": [leg for d in fresh for leg in d["legs"]], "drift": drift,
        }  # fmt: skip
        self._db().execute(
            "INSERT INTO alert_outbox (alert_id, kind, created_at, body) "
            "VALUES (?, 'drift', ?, ?)",
            (uuid.uuid4().hex, iso(self.now()), orjson.dumps(body).decode()),
        )
