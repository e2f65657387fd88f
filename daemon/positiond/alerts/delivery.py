"""The delivery worker: sends the outbox's alerts to the sinks, apart from the hot path.

It runs as its own asyncio task with its own database connection (SQLite, or PostgreSQL through
:mod:`positiond.store.side`; on a worker thread, one short statement at a time; a lost one is
made again at the next step), so receiving, writing and liveness never wait for it; each attempt
runs in its own task, at most ``concurrency`` at once per sink (one that hangs holds up no
other), each bounded by its sink's timeout. A failed attempt is retried with exponential backoff
(1 s doubling up to 5 min) until ``retry_for`` seconds after the alert, then its delivery is
FAILED (``posctl alerts`` shows it). Delivery is at least once: an attempt that succeeded but
whose outcome was not recorded (the daemon killed in between) is repeated after a restart —
sinks dedupe by the alert's ``id``.

Human sinks (``telegram``, ``openalgo``) get one message per burst instead: the first due
alert starts a group, which waits ``group_window`` seconds (and at least
:data:`~positiond.alerts.human.MIN_INTERVAL` after the sink's previous message) for the others,
then sends them all in one message; every alert in it is DELIVERED for that sink when it
succeeds, or retried (each with its own backoff) when it fails. One group at a time per sink.

``now`` is injectable so tests drive time instead of waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sqlite3
import time
from collections.abc import Callable, Coroutine
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from positiond.alerts import outbox
from positiond.alerts.health import HealthWatch, health_body
from positiond.alerts.human import MIN_INTERVAL, HumanSink
from positiond.alerts.settings import AlertsConfig
from positiond.alerts.sinks import Sink, build_sink
from positiond.openalgo import Settings
from positiond.store.dsn import PgDsn
from positiond.store.side import SerialThread, broken, connect_side

__all__ = ["Delivery", "backoff"]

log = logging.getLogger(__name__)

T = TypeVar("T")
POLL = 0.5  # seconds between looks at the outbox when nothing wakes the worker
FIRST_RETRY, MAX_RETRY = 1.0, 300.0
GROUP_MAX = 500  # alerts in one human message at most (a listing and "and N more")


def backoff(attempts: int) -> float:
    """Seconds before the next try after ``attempts`` failed ones (1, 2, 4, ... 300)."""
    return float(min(MAX_RETRY, FIRST_RETRY * 2 ** max(0, attempts - 1)))


class Delivery:
    """Deliver pending alerts to ``config.sinks`` from the database at ``db``."""

    def __init__(
        self,
        db: Path | PgDsn,
        config: AlertsConfig,
        *,
        busy_timeout: float = 5.0,
        now: Callable[[], float] = time.time,
        poll: float = POLL,
        openalgo: Settings | None = None,
        min_interval: float = MIN_INTERVAL,
    ) -> None:
        self.db, self.config, self.busy_timeout = db, config, busy_timeout
        self.now, self.poll, self.openalgo = now, poll, openalgo
        self.min_interval = min_interval  # seconds between two messages of a human sink
        self._grouping: set[str] = set()  # human sinks with a group in the making
        self._last_message: dict[str, float] = {}  # loop time of a human sink's last message
        self.sinks: dict[str, Sink] = {}
        self.counters = {"alerts_delivered": 0, "alerts_retried": 0, "alerts_failed": 0}
        # The same by (sink name, result), every configured sink from 0 (positiond.metrics).
        self.by_sink = {
            (s.name, result): 0
            for s in config.sinks
            for result in ("delivered", "retried", "failed")
        }
        self._conn: sqlite3.Connection | None = None
        self._thread = SerialThread("positiond-alerts-db")  # every use of _conn, and its close
        self._db_lock = asyncio.Lock()  # one statement at a time on the connection
        self._busy: set[tuple[int, str]] = set()
        self._attempts: set[asyncio.Task[None]] = set()
        self._slots = {s.name: asyncio.Semaphore(config.concurrency) for s in config.sinks}
        self._after = 0
        self._woken = asyncio.Event()
        self._health = HealthWatch()

    def observe(self, health: dict[str, Any]) -> None:
        """A health snapshot of the daemon: send ``unhealthy``/``healthy`` when it changes."""
        if self._conn is None:  # not open yet, or closed: nobody to send it
            return
        kind = self._health.change(health)
        if kind is None:
            return
        body = health_body(kind, health, self.now())
        for sink in self.sinks.values():
            if sink.config.wants(kind):
                task = asyncio.get_running_loop().create_task(
                    self._direct(sink, kind, body), name=f"positiond-alert-{sink.config.name}"
                )
                self._attempts.add(task)
                task.add_done_callback(self._attempts.discard)

    async def _direct(self, sink: Sink, kind: str, body: bytes) -> None:
        """Send from memory (not the outbox), retrying with backoff within ``retry_for``."""
        start, attempts = self.now(), 0
        while True:
            async with self._slot(sink.config.name):
                error = await self._send(sink, body)
            attempts += 1
            if error is None:
                self._tally(sink.config.name, "delivered")
                log.info("alert %s delivered to %s", kind, sink.config.name)
                return
            wait = backoff(attempts)
            if self.now() + wait > start + self.config.retry_for:
                self._tally(sink.config.name, "failed")
                log.error("alert %s to %s FAILED for good: %s", kind, sink.config.name, error)
                return
            self._tally(sink.config.name, "retried")
            log.warning("alert %s to %s failed (%s); retrying", kind, sink.config.name, error)
            await asyncio.sleep(wait)

    def _slot(self, sink: str) -> asyncio.Semaphore:
        return self._slots.setdefault(sink, asyncio.Semaphore(self.config.concurrency))

    def wake(self) -> None:
        """Look at the outbox now (the writer committed something), not at the next poll."""
        self._woken.set()

    async def _db(self, work: Callable[[sqlite3.Connection], T]) -> T:
        async with self._db_lock:
            conn = self._conn
            assert conn is not None
            return await self._thread.run(work, conn)

    def _open(self) -> sqlite3.Connection:
        return connect_side(self.db, self.busy_timeout)

    async def open(self) -> None:
        """Connect, build the sinks, skip alerts older than ``retry_for`` (never sent now)."""
        conn = await self._thread.run(self._open)
        try:
            since = self.now() - self.config.retry_for
            self._after = await self._thread.run(outbox.first_recent, conn, since)
        except BaseException:
            await self._thread.close(conn)
            raise
        self._conn = conn
        if not self.sinks:
            self.sinks = {s.name: build_sink(s, self.openalgo) for s in self.config.sinks}

    async def settle(self) -> None:
        """Wait for the attempts in flight (tests, and a stop that may wait)."""
        while self._attempts:
            await asyncio.gather(*list(self._attempts), return_exceptions=True)

    async def run(self) -> None:
        """Deliver until cancelled."""
        try:
            while True:
                # Alerts must never take the daemon down: a fault here is logged and retried.
                try:
                    if self._conn is None:
                        await self.open()
                    await self.step()
                except sqlite3.Error as exc:  # busy, read-only, gone: try again later
                    log.warning("alerts: cannot read the outbox: %s", exc)
                    if self._conn is not None and broken(self._conn):
                        await self._reconnect()
                except Exception:
                    log.exception("alerts: delivery step failed; retrying")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll):
                        await self._woken.wait()
                self._woken.clear()
        finally:
            await self._close()

    async def close(self) -> None:
        """Cancel the attempts in flight (they stay PENDING), close sinks and connection."""
        await self._close()

    async def _close(self) -> None:
        for task in list(self._attempts):
            task.cancel()
        for task in list(self._attempts):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for sink in self.sinks.values():
            await sink.aclose()
        conn, self._conn = self._conn, None
        await self._thread.close(conn)  # after a statement a cancelled step left running

    async def _reconnect(self) -> None:
        """Drop a lost connection (PostgreSQL): the next step opens a new one."""
        async with self._db_lock:
            conn, self._conn = self._conn, None
        await self._thread.close(conn)

    async def step(self) -> int:
        """Enqueue new alerts, start the due attempts and groups; return how many started."""
        sinks, after = self.config.sinks, self._after
        self._after = await self._db(lambda c: outbox.enqueue(c, sinks, after))
        now, items, groups = self.now(), [], 0
        for name, sink in self.sinks.items():  # each its own slots: one that hangs holds none
            if isinstance(sink, HumanSink):
                if name not in self._grouping:
                    query = partial(outbox.due, now=now, sink=name, busy=set(), limit=1)
                    if await self._db(query):
                        self._grouping.add(name)  # now, not when the task first runs
                        self._start(self._group(sink), name)
                        groups += 1
                continue
            busy = {row for row, sink in self._busy if sink == name}
            free = self.config.concurrency - len(busy)
            if free > 0:
                query = partial(outbox.due, now=now, sink=name, busy=busy, limit=free)
                items += await self._db(query)
        for item in items:
            self._busy.add((item.row, item.sink))
            self._start(self._attempt(item), item.sink)
        return len(items) + groups

    def _start(self, work: Coroutine[Any, Any, None], sink: str) -> None:
        task = asyncio.get_running_loop().create_task(work, name=f"positiond-alert-{sink}")
        self._attempts.add(task)
        task.add_done_callback(self._attempts.discard)

    async def _group(self, sink: HumanSink) -> None:
        """Wait for the burst, send it as one message, record every alert in it."""
        name, loop = sink.config.name, asyncio.get_running_loop()
        try:
            earliest = self._last_message.get(name, -math.inf) + self.min_interval
            await asyncio.sleep(max(sink.config.group_window, earliest - loop.time()))
            query = partial(outbox.due, now=self.now(), sink=name, busy=set(), limit=GROUP_MAX)
            items = await self._db(query)
            if not items:
                return
            async with self._slot(name):
                error = await self._send(sink, [item.body for item in items])
            self._last_message[name] = loop.time()
            now = self.now()
            outcomes = []
            for item in items:
                retry_at: float | None = now + backoff(item.attempts + 1)
                if retry_at is not None and retry_at > item.created + self.config.retry_for:
                    retry_at = None
                outcomes.append((item, retry_at))
            states = await self._db(lambda c: outbox.record_many(c, outcomes, error, now))
            log.info("alerts: %d in one message to %s", len(items), name)
            for item, state in zip(items, states, strict=True):
                self._count(item, state, error)
        except sqlite3.Error as exc:
            log.warning("alerts: cannot record a delivery to %s: %s", name, exc)
        finally:
            self._grouping.discard(name)
            self._woken.set()  # alerts that came meanwhile: the next group now

    async def _attempt(self, item: outbox.Due) -> None:
        sink = self.sinks.get(item.sink)
        try:
            if sink is None:  # a sink removed from the config: its rows stay PENDING
                return
            async with self._slot(item.sink):
                error = await self._send(sink, item.body)
                now = self.now()
                retry_at: float | None = now + backoff(item.attempts + 1)
                if retry_at is not None and retry_at > item.created + self.config.retry_for:
                    retry_at = None  # retried long enough: FAILED
                state = await self._db(lambda c: outbox.record(c, item, error, now, retry_at))
            self._count(item, state, error)
        except sqlite3.Error as exc:
            log.warning("alerts: cannot record a delivery to %s: %s", item.sink, exc)
        finally:
            self._busy.discard((item.row, item.sink))

    async def _send(self, sink: Sink, body: bytes | list[bytes]) -> str | None:
        # The sink bounds itself; this bounds a sink that does not (a hung DNS lookup...).
        try:
            async with asyncio.timeout(sink.config.timeout + 1.0):
                if isinstance(body, list):
                    assert isinstance(sink, HumanSink)
                    return await sink.send_many(body)
                return await sink.send(body)
        except TimeoutError:
            return f"no answer within {sink.config.timeout:g}s"

    def _tally(self, sink: str, result: str) -> None:
        self.counters[f"alerts_{result}"] += 1
        self.by_sink[(sink, result)] = self.by_sink.get((sink, result), 0) + 1

    def _count(self, item: outbox.Due, state: str, error: str | None) -> None:
        if state == "DELIVERED":
            self._tally(item.sink, "delivered")
            log.info("alert %s delivered to %s", item.row, item.sink)
        elif state == "FAILED":
            self._tally(item.sink, "failed")
            log.error("alert %s to %s FAILED for good: %s", item.row, item.sink, error)
        else:
            self._tally(item.sink, "retried")
            log.warning("alert %s to %s failed (%s); retrying", item.row, item.sink, error)
