"""The protect worker: a protective stop order at the broker for each crashed leg (docs/PROTECT.md).

Its own asyncio task, database connection (calls serialized, each in a thread) and HTTP client,
apart from receiving, writing and liveness: it can never delay a verdict or an ack. The server
wakes it after every commit; it also looks every ``poll_interval`` seconds.

1. **Plan**: CRASHED legs whose latest crash has no row yet, in sessions the config protects.
   No stop, outside the trading window, closed at the broker (the positionbook, judged with
   the recovery rules) -> SKIPPED; ambiguous book -> SKIPPED and the leg flagged NEEDS_REVIEW;
   the book refused for ``retry_for`` -> FAILED (never placed blind). Dry-run -> DRY_RUN.
2. **Place**: the PLANNED row (and its event) is committed before ``placeorder``. A transient
   failure is retried within ``retry_for``; after an answer that may hide a placement (timeout,
   no answer, 5xx) the orderbook is searched for our order before placing again. PLANNED rows
   left by a killed daemon are reconciled the same way, once ``timeout`` has passed.
3. **Watch**: PLACED rows are polled with ``orderstatus``: complete -> TRIGGERED (the leg is
   closed through the engine, or handed to its new session's engine path); cancelled or
   rejected at the broker -> CANCELLED.
4. **Release**: ``release = 'CANCEL'`` -> ``cancelorder`` -> CANCELLED; ``'KEEP'`` -> KEPT; the
   hand-back callback hears of each settled row that has a ``release_session``.

``placeorder`` and ``cancelorder`` share one rate limit (``rate`` per second). No other order
call exists here: never ``closeposition``, ``placesmartorder`` or ``cancelallorder``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

from positiond.drift import in_window, parse_window
from positiond.openalgo import (
    AsyncOpenAlgo,
    OpenAlgoError,
    Settings,
    api_key,
    transient,
)
from positiond.ops import Op, ResolveOp
from positiond.protect import db
from positiond.protect.handback import HandBack
from positiond.protect.plan import (
    DONE_CANCELLED,
    Order,
    RateLimit,
    adoptable,
    describe,
    fill_price,
    status_of,
)
from positiond.protect.settings import ProtectConfig
from positiond.protect.triage import Triage, triage
from positiond.store.dsn import PgDsn
from positiond.store.schema import iso
from positiond.store.side import broken

__all__ = ["BY", "Protector"]

log = logging.getLogger(__name__)
T = TypeVar("T")
BY = "positiond protect"  # who, in the legs' audit trail
CANCEL_REFUSED = "cancel refused: "


def _row_order(row: dict[str, Any]) -> Order:
    return Order(
        row["symbol"], row["exchange"], row["product"], row["action"], int(row["quantity"]),
        row["pricetype"], float(row["trigger_price"]), row["price"], row["tag"],
    )  # fmt: skip


class Protector:
    """The worker (see the module). ``submit`` queues an op for the engine's writer;
    ``handback`` hears of every settled order of a handed-back leg."""

    def __init__(
        self,
        path: Path | PgDsn,
        config: ProtectConfig,
        settings: Settings,
        *,
        submit: Callable[[Op], None],
        handback: Callable[[HandBack], None],
        busy_timeout: float = 5.0,
        concurrency: int = 8,
        now: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path, self.config, self.settings = path, config, settings
        self.submit, self.handback, self.busy_timeout = submit, handback, busy_timeout
        self.now, self.monotonic = now, monotonic
        self.window = None if config.trading_window is None else parse_window(config.trading_window)
        self.tz = ZoneInfo(config.timezone)
        self.rate = RateLimit(config.rate)
        self._rate_lock = asyncio.Lock()
        # One thread for every database call, in order: a call still running when the task is
        # cancelled (a stop) finishes before the connection is closed, in that same thread.
        self._executor: ThreadPoolExecutor | None = None  # made by run()
        self._slots = asyncio.Semaphore(concurrency)
        self._wake = asyncio.Event()
        self._conn: sqlite3.Connection | None = None
        self._client: AsyncOpenAlgo | None = None
        self._busy: set[int] = set()  # rows a task of ours is placing now
        self._tasks: set[asyncio.Task[None]] = set()
        self._book_refused_since: float | None = None  # monotonic: the book is refused since
        self._reported: set[int] = set()  # rows whose cancel_failed was reported
        self.state: dict[str, Any] = {
            "mode": config.mode, "planned": 0, "placed": 0, "failed": 0, "skipped": 0,
            "triggered": 0, "cancelled": 0, "last_error": None,
        }  # fmt: skip

    def wake(self) -> None:
        """Look now (a commit may have crashed a session, or set a release)."""
        self._wake.set()

    # ---- the loop ----------------------------------------------------------------------

    async def run(self) -> None:
        """Plan, settle and watch; wait for a wake or ``poll_interval``; until cancelled."""
        self._executor = executor = _executor()
        try:
            while True:
                self._wake.clear()
                try:
                    await self.cycle()
                except Exception as exc:  # a fault is logged, never fatal
                    self.state["last_error"] = str(exc)[:300]
                    log.exception("protect: cycle failed; retrying")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.config.poll_interval):
                        await self._wake.wait()
        finally:
            for task in list(self._tasks):
                task.cancel()
            for task in list(self._tasks):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            executor.submit(self._close_db)
            executor.shutdown(wait=False)
            if self._client is not None:
                await self._client.aclose()
                self._client = None

    async def cycle(self) -> None:
        """One look: new crashed legs, PLANNED rows nobody is placing, PLACED rows."""
        await self.plan()
        for row in await self._db(db.live_rows):
            if row["id"] in self._busy:
                continue
            if row["state"] == "PLANNED":
                self._reconcile(row)
            else:
                await self.watch(row)

    async def drain(self) -> None:
        """Wait for the placements in flight (tests, bench)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # ---- helpers -----------------------------------------------------------------------

    async def _db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop, executor = asyncio.get_running_loop(), self._executor
        assert executor is not None, "database calls run inside run()"
        return await loop.run_in_executor(executor, partial(self._in_thread, fn, *args,
                                                                  **kwargs))  # fmt: skip

    def _in_thread(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self._conn is None:
            self._conn = db.connect(self.path, self.busy_timeout)
        try:
            return fn(self._conn, *args, **kwargs)
        except sqlite3.Error:
            if broken(self._conn):  # a lost PostgreSQL connection: the next call makes one
                self._close_db()
            raise

    def _close_db(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _call(self, what: Callable[[AsyncOpenAlgo], Awaitable[T]], name: str) -> T:
        if self._client is None:
            self._client = AsyncOpenAlgo(self.settings, api_key(self.settings))
        try:
            async with asyncio.timeout(self.settings.timeout + 1.0):
                return await what(self._client)
        except TimeoutError:
            raise OpenAlgoError(
                f"OpenAlgo {name}: no answer within {self.settings.timeout:g}s"
            ) from None

    async def _order_call(self, what: Callable[[AsyncOpenAlgo], Awaitable[T]], name: str) -> T:
        """An order call (placeorder, cancelorder): after the rate limit lets it go."""
        async with self._rate_lock:
            wait = self.rate.delay(self.monotonic())
            while wait > 0:
                await asyncio.sleep(wait)
                wait = self.rate.delay(self.monotonic())
        return await self._call(what, name)

    def _iso(self) -> str:
        return iso(self.now())

    def _spawn(self, row_id: int, work: Awaitable[None]) -> None:
        self._busy.add(row_id)

        async def guarded() -> None:
            try:
                async with self._slots:
                    await work
            except Exception:
                log.exception("protect: protective order %d: unexpected fault", row_id)
            finally:
                self._busy.discard(row_id)
                self._wake.set()  # look again: a release may wait for this row

        task = asyncio.get_running_loop().create_task(guarded(), name=f"protect-{row_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- 1. plan -------------------------------------------------------------------------

    async def plan(self) -> None:
        work = [
            w for w in await self._db(db.new_work)
            if self.config.protects(w["strategy_name"], None if w["protect"] is None
                                    else bool(w["protect"]))
        ]  # fmt: skip
        if not work:
            self._book_refused_since = None
            return
        now = datetime.fromtimestamp(self.now(), UTC)
        inside = in_window(now, self.window, self.tz)
        book: Any = None
        legs: list[dict[str, Any]] = []
        if inside and any(w["stop_price"] is not None for w in work):
            try:
                book = await self._call(lambda c: c.positionbook(), "positionbook")
                legs = await self._db(db.open_legs)
                self._book_refused_since = None
            except OpenAlgoError as exc:
                first = self._book_refused_since or self.monotonic()
                self._book_refused_since = first
                self.state["last_error"] = exc.message[:300]
                if self.monotonic() - first < self.config.retry_for:
                    log.warning("protect: positionbook refused, nothing placed yet: %s", exc)
                    return
                book = exc  # refused for good: the legs FAIL (never placed blind)
        for leg in work:
            found = triage(leg, self.config, inside=inside, book=book, open_legs=legs)
            await self._record(leg, found)

    async def _record(self, leg: dict[str, Any], found: Triage) -> None:
        cfg = self.config
        payload: dict[str, Any] = {"reason": found.reason, "by": BY}
        if found.order is not None:
            payload["order"] = describe(found.order)
        row_id = await self._db(
            db.insert, leg, state=found.state, mode=cfg.mode, order=found.order,
            pricetype=cfg.pricetype, tag=cfg.tag, reason=found.reason, event=found.event,
            payload=payload, now=self._iso(),
        )  # fmt: skip
        if row_id is None:
            return  # adopted meanwhile, or planned by an earlier look
        key = leg["position_key"]
        counter = {"PLANNED": "planned", "DRY_RUN": "planned", "FAILED": "failed"}
        self.state[counter.get(found.state, "skipped")] += 1
        if found.state == "PLANNED":
            log.warning("protect: leg %s: placing %s", key, found.reason)
            assert found.order is not None
            self._spawn(row_id, self._place(row_id, found.order, ambiguous=False))
        elif found.state == "FAILED":
            log.error("protect: leg %s is NOT protected: %s", key, found.reason)
        else:
            log.warning("protect: leg %s: %s: %s", key, found.state, found.reason)
        if found.review:
            self.submit(ResolveOp(None, None, None, BY, key, "review", self.now(),
                                  reason=found.reason[:500]))  # fmt: skip

    # ---- 2. place ------------------------------------------------------------------------

    def _reconcile(self, row: dict[str, Any]) -> None:
        """A PLANNED row nobody here is placing (the daemon was killed mid-placement): once
        an in-flight request must have landed, find it in the orderbook or place it."""
        planned = datetime.fromisoformat(row["planned_at"].replace("Z", "+00:00")).timestamp()
        if self.now() < planned + self.settings.timeout + 1.0:
            return  # a request sent just before the kill may still land: look later
        if row["id"] in self._busy:
            return  # a stale snapshot: our own task took it meanwhile
        self._spawn(row["id"], self._place(row["id"], _row_order(row), ambiguous=True))

    async def _place(self, row_id: int, order: Order, *, ambiguous: bool) -> None:
        deadline = self.monotonic() + self.config.retry_for
        backoff = 0.25
        last = ""
        while True:
            if ambiguous:
                try:
                    rows = await self._call(lambda c: c.orderbook(), "orderbook")
                    claimed = await self._db(db.claimed)
                    found = adoptable(rows, order, claimed)
                except OpenAlgoError as exc:
                    found, last = None, f"orderbook refused: {exc.message}"
                else:
                    if found is not None:
                        await self._placed(row_id, order, found, adopted=True)
                        return
                    ambiguous = False
            if not ambiguous:
                if not await self._db(self._attempt, row_id):
                    return  # no longer PLANNED: settled by another look (never a 2nd order)
                try:
                    order_id = await self._order_call(
                        lambda c: c.placeorder(**order.fields()), "placeorder"
                    )
                except OpenAlgoError as exc:
                    last = exc.message
                    if not transient(exc):
                        await self._failed(row_id, f"refused by the broker: {exc.message}")
                        return
                    ambiguous = exc.status_code is None or exc.status_code >= 500
                    log.warning("protect: placeorder failed (retrying): %s", exc)
                else:
                    await self._placed(row_id, order, order_id, adopted=False)
                    return
            if self.monotonic() + backoff > deadline:
                note = " (the last try may have reached the broker: check its orderbook)"
                await self._failed(
                    row_id, f"not placed within {self.config.retry_for:g}s: {last}"
                    + (note if ambiguous else "")
                )  # fmt: skip
                return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    @staticmethod
    def _attempt(conn: sqlite3.Connection, row_id: int) -> bool:
        """Count an attempt, if the row is still PLANNED (the guard against a second order)."""
        cur = conn.execute(
            "UPDATE protective_orders SET attempts = attempts + 1 "
            "WHERE id = ? AND state = 'PLANNED'", (row_id,),
        )  # fmt: skip
        return cur.rowcount == 1

    async def _placed(self, row_id: int, order: Order, order_id: str, *, adopted: bool) -> None:
        how = "found in the orderbook after an unanswered placement" if adopted else "accepted"
        done = await self._db(
            db.change, row_id, ("PLANNED",),
            {"state": "PLACED", "order_id": order_id, "placed_at": self._iso(), "reason": how},
            now=self._iso(), event="PROTECT_PLACED",
            payload={"order_id": order_id, "order": describe(order), "reason": how, "by": BY},
        )  # fmt: skip
        if done:
            self.state["placed"] += 1
            log.warning("protect: order %s placed (%s): %s", order_id, how, describe(order))

    async def _failed(self, row_id: int, reason: str) -> None:
        done = await self._db(
            db.change, row_id, ("PLANNED",), {"state": "FAILED", "reason": reason[:1000]},
            now=self._iso(), event="PROTECT_FAILED", payload={"reason": reason[:1000], "by": BY},
        )  # fmt: skip
        if done:
            self.state["failed"] += 1
            log.error("protect: protective order %d FAILED, the leg is unprotected: %s",
                      row_id, reason)  # fmt: skip
            row = await self._db(_row, row_id)
            if row is not None and row["release_session"] is not None:
                self._tell(row, "cancelled", None, "no order was placed: " + reason)

    # ---- 3. watch, 4. release --------------------------------------------------------------

    async def watch(self, row: dict[str, Any]) -> None:
        """One look at a PLACED row: its release, else its status at the broker."""
        order_id = str(row["order_id"])
        if row["release"] == "KEEP":
            await self._settle(row, "KEPT", "PROTECT_KEPT", "kept", "left live for the strategy")
            return
        refused = (row["reason"] or "").startswith(CANCEL_REFUSED)
        if row["release"] == "CANCEL" and not refused:
            try:
                await self._order_call(lambda c: c.cancelorder(row["tag"], order_id),
                                       "cancelorder")  # fmt: skip
            except OpenAlgoError as exc:
                if transient(exc):
                    log.warning("protect: cancelorder %s failed (retrying): %s", order_id, exc)
                    return
                await self._after_refused_cancel(row, exc.message)
                return
            await self._settle(row, "CANCELLED", "PROTECT_CANCELLED", "cancelled",
                               "cancelled: the leg was handed back or closed")  # fmt: skip
            return
        try:
            data = await self._call(lambda c: c.orderstatus(row["tag"], order_id), "orderstatus")
        except OpenAlgoError as exc:
            log.warning("protect: orderstatus %s refused (looking again later): %s",
                        order_id, exc)  # fmt: skip
            return
        await self._judge(row, data)

    async def _judge(self, row: dict[str, Any], data: dict[str, Any]) -> None:
        status = status_of(data)
        if status == "complete":
            await self._triggered(row, fill_price(data))
        elif status in DONE_CANCELLED:
            await self._settle(row, "CANCELLED", "PROTECT_CANCELLED", "cancelled",
                               f"{status} at the broker (not by positiond): the leg is "
                               "unprotected")  # fmt: skip

    async def _after_refused_cancel(self, row: dict[str, Any], message: str) -> None:
        try:
            data = await self._call(
                lambda c: c.orderstatus(row["tag"], str(row["order_id"])), "orderstatus"
            )
        except OpenAlgoError:
            data = {}
        if status_of(data) == "complete" or status_of(data) in DONE_CANCELLED:
            await self._judge(row, data)
            return
        reason = CANCEL_REFUSED + message
        await self._db(
            db.change,
            row["id"],
            ("PLACED",),
            {"reason": reason[:1000]},
            now=self._iso(),
            event="PROTECT_FAILED",
            payload={"reason": reason[:1000], "order_id": row["order_id"], "by": BY},
        )
        log.error("protect: cancelling order %s refused for good, it may still be live: %s",
                  row["order_id"], message)  # fmt: skip
        if row["release_session"] is not None and row["id"] not in self._reported:
            self._reported.add(row["id"])
            self._tell(row, "cancel_failed", None, reason)

    async def _settle(
        self, row: dict[str, Any], state: str, event: str, outcome: str, reason: str
    ) -> None:
        done = await self._db(
            db.change, row["id"], ("PLACED",), {"state": state, "reason": reason},
            now=self._iso(), event=event,
            payload={"order_id": row["order_id"], "reason": reason, "by": BY},
        )  # fmt: skip
        if not done:
            return
        if state == "CANCELLED":
            self.state["cancelled"] += 1
        log.warning("protect: order %s of leg %s %s: %s", row["order_id"], row["position_key"],
                    state, reason)  # fmt: skip
        # Read again: the leg may have been handed (again) since ``row`` was read.
        fresh = await self._db(_row, row["id"]) or row
        if fresh["release_session"] is not None:
            self._tell(fresh, outcome, None, reason)

    async def _triggered(self, row: dict[str, Any], fill: float | None) -> None:
        reason = f"the broker filled the protective order at {fill if fill is not None else '?'}"
        done = await self._db(
            db.change, row["id"], ("PLACED",),
            {"state": "TRIGGERED", "fill_price": fill, "reason": reason}, now=self._iso(),
            event="PROTECT_TRIGGERED",
            payload={"order_id": row["order_id"], "fill_price": fill, "reason": reason, "by": BY},
        )  # fmt: skip
        if not done:
            return
        self.state["triggered"] += 1
        log.warning("protect: order %s of leg %s TRIGGERED at %s", row["order_id"],
                    row["position_key"], fill)  # fmt: skip
        # The leg is closed by whoever holds it NOW (read after this commit: a revival or an
        # adoption may have come between reading ``row`` and here, and a later one finds the
        # order TRIGGERED, not live, so hands nothing back): the engine's protective close,
        # checked against that holder when it commits, for a crashed leg as for a live one.
        now = await self._db(db.leg_status, row["position_id"])
        if now is None:
            return
        status, _key, holder = now
        if status == "CLOSED":
            log.error("protect: order %s of leg %s filled after the leg was closed otherwise: "
                      "the broker position may now be reversed — check it", row["order_id"],
                      row["position_key"])  # fmt: skip
            return
        self._tell({**row, "release_session": holder}, "triggered", fill, reason)

    def _tell(self, row: dict[str, Any], outcome: str, fill: float | None, reason: str) -> None:
        try:
            self.handback(HandBack(
                row["position_key"], int(row["release_session"]), outcome, int(row["id"]),
                row["order_id"], row["trigger_price"], fill, reason,
            ))  # fmt: skip
        except Exception:
            log.exception("protect: the hand-back of order %s failed", row["order_id"])


def _executor() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(1, thread_name_prefix="positiond-protect-db")


def _row(conn: sqlite3.Connection, row_id: int) -> dict[str, Any] | None:
    found = conn.execute(
        "SELECT o.*, p.position_key FROM protective_orders o "
        "JOIN strategy_positions p ON p.position_id = o.position_id WHERE o.id = ?",
        (row_id,),
    ).fetchone()
    return None if found is None else dict(found)
