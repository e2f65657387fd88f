"""The strategy-facing API: ``PositionPersistenceManager`` (the seed's names) and its asyncio twin.

Durable calls (start, entry, exit, crash, end, sync) wait for the daemon's ack — sent only after
its transaction committed — up to ``ack_timeout``. If the daemon is away they log a warning and
return: they never raise for that reason and never lose the message, which stays in the outbox
and is re-sent until acknowledged. Updates never wait: they are coalesced per leg and sent by the
I/O thread. Bad arguments raise at once in the caller (``ProtocolError`` is a ``ValueError``) and
are never sent; a refusal by the daemon raises the matching :class:`PositiondError`.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import socket
import time
import traceback
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from positiond_client.channel import Channel, Pending
from positiond_client.errors import LegError, SessionError
from positiond_client.paths import default_endpoint
from positiond_client.protocol import PROTOCOL_VERSION, check_fields, validate

__all__ = ["AsyncPositionPersistenceManager", "Leg", "PositionPersistenceManager"]

log = logging.getLogger(__name__)

_UNSET: Any = object()
_LIVE: weakref.WeakSet[_Core] = weakref.WeakSet()


class Leg:
    """Handle of one position leg, returned by ``save_position_entry``.

    ``position_id`` is the daemon's integer id, filled in when the entry is acknowledged.
    """

    __slots__ = (
        "__weakref__",
        "entry_price",
        "exchange",
        "key",
        "leg_type",
        "position_id",
        "product",
        "quantity",
        "side",
        "stop_price",
        "symbol",
    )

    def __init__(self, msg: dict[str, Any]) -> None:
        self.key: str = msg["key"]
        self.symbol: str = msg["symbol"]
        self.exchange: str = msg["exchange"]
        self.product: str = msg["product"]
        self.leg_type: str | None = msg.get("leg_type")
        self.side: str = msg["side"]
        self.quantity: int = msg["quantity"]
        self.entry_price: float = msg["entry_price"]
        self.stop_price: float | None = msg.get("stop_price")
        self.position_id: int | None = None

    def __repr__(self) -> str:
        return (
            f"Leg(key={self.key!r}, symbol={self.symbol!r}, side={self.side}, "
            f"quantity={self.quantity}, position_id={self.position_id})"
        )


def _host() -> str:
    try:
        return socket.gethostname()[:255] or "unknown"
    except OSError:
        return "unknown"


class _Core:
    """Message building shared by the sync and asyncio managers; no waiting here."""

    def __init__(
        self,
        strategy_name: str,
        endpoint: str | None = None,
        *,
        heartbeat_interval: float = 0.5,
        ack_timeout: float = 2.0,
        on_notice: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        check_fields("start", {"strategy": strategy_name, "heartbeat_interval": heartbeat_interval})
        if ack_timeout <= 0:
            raise ValueError("ack_timeout must be positive")
        self.strategy_name = strategy_name
        self.endpoint = endpoint or default_endpoint()
        if not self.endpoint.startswith(("ipc://", "tcp://")):
            raise ValueError(f"endpoint {self.endpoint!r} must start with ipc:// or tcp://")
        self.ack_timeout = ack_timeout
        self.heartbeat_interval = heartbeat_interval
        self.session_id: int | None = None
        self.session_key: str | None = None
        self._channel = Channel(
            self.endpoint, heartbeat_interval=heartbeat_interval, on_notice=on_notice
        )
        self._closed = False
        _LIVE.add(self)

    @property
    def connected(self) -> bool:
        """Whether the I/O thread currently has a connection to the daemon."""
        return self._channel.connected

    @property
    def unacknowledged(self) -> int:
        """Durable messages sent but not yet acknowledged (kept and re-sent until they are)."""
        return self._channel.outbox_size

    def is_open(self, leg: Leg | str) -> bool:
        """Whether the leg is open in this session (entered and not exited)."""
        return self._channel.is_open(leg.key if isinstance(leg, Leg) else leg)

    def _base(self, kind: str) -> dict[str, Any]:
        if self.session_key is None:
            raise SessionError("no session: call start_session() first", "NO_SESSION")
        return {"v": PROTOCOL_VERSION, "type": kind, "session": self.session_key}

    def _leg_key(self, leg: Leg | str) -> str:
        key = leg.key if isinstance(leg, Leg) else leg
        if not isinstance(key, str):
            raise LegError(f"not a leg handle: {leg!r}", "UNKNOWN_LEG")
        fenced = self._channel.fenced_reason(key)
        if fenced is not None:
            raise LegError(fenced, "FENCED")
        return key

    def _start_pending(self, session_key: str | None) -> Pending:
        self.session_key = session_key or uuid.uuid4().hex
        self.session_id = None
        msg = {
            **self._base("start"),
            "strategy": self.strategy_name,
            "host": _host(),
            "pid": os.getpid(),
            "heartbeat_interval": self.heartbeat_interval,
            "time": time.time(),
        }
        validate(msg | {"seq": 1})
        pending = self._channel.open_session(msg)
        pending.add_callback(self._on_started)
        return pending

    def _on_started(self, pending: Pending) -> None:
        if pending.result is not None:
            self.session_id = pending.result.get("session_id")

    def _entry_pending(
        self,
        symbol: str,
        leg_type: str | None,
        entry_price: float,
        stop_price: float | None,
        quantity: int,
        exchange: str,
        product: str,
        side: str,
        position_key: str | None,
        highest_price: float | None,
        last_trail_level: float | None,
        state: dict[str, Any] | None,
    ) -> tuple[Leg, Pending]:
        msg = self._base("entry")
        msg.update(
            key=position_key or f"{symbol}-{uuid.uuid4().hex[:16]}",
            symbol=symbol,
            exchange=exchange,
            product=product,
            side=side.upper() if isinstance(side, str) else side,
            quantity=quantity,
            entry_price=entry_price,
            time=time.time(),
        )
        optional = {
            "leg_type": leg_type,
            "stop_price": stop_price,
            "highest_price": highest_price,
            "last_trail_level": last_trail_level,
            "state": state,
        }
        msg.update({k: v for k, v in optional.items() if v is not None})
        validate(msg | {"seq": 1})
        if self._channel.is_open(msg["key"]):
            raise LegError(f"leg {msg['key']!r} is already open in this session", "KEY_CONFLICT")
        leg = Leg(msg)
        pending = self._channel.submit(msg)

        def filled(p: Pending) -> None:
            if p.result is not None:
                leg.position_id = p.result.get("position_id")

        pending.add_callback(filled)
        return leg, pending

    def _update(self, leg: Leg | str, fields: dict[str, Any]) -> None:
        key = self._leg_key(leg)
        fields = {k: v for k, v in fields.items() if v is not _UNSET}
        if not fields:
            return
        check_fields("update", fields)
        self._channel.update(key, fields)

    def _exit_pending(self, leg: Leg | str, exit_price: float | None, exit_reason: str) -> Pending:
        key = self._leg_key(leg)
        msg = self._base("exit")
        msg.update(key=key, exit_reason=exit_reason, time=time.time())
        if exit_price is not None:
            msg["exit_price"] = exit_price
        validate(msg | {"seq": 1})
        return self._channel.submit(msg)

    def _crash_pending(self, error: BaseException | str) -> Pending:
        msg = self._base("crash")
        if isinstance(error, BaseException):
            tb = "".join(traceback.format_exception(error))
            msg.update(
                error_type=type(error).__name__[:200],
                message=str(error)[:4000],
                traceback=tb[-65536:],
            )
        else:
            msg.update(error_type="Error", message=str(error)[:4000])
        msg["time"] = time.time()
        return self._channel.submit(msg, flush_updates=True)

    def _end_pending(self) -> Pending:
        msg = self._base("end")
        msg["time"] = time.time()
        return self._channel.submit(msg, flush_updates=True)

    def _sync_pending(self) -> Pending:
        return self._channel.submit(self._base("sync"), flush_updates=True)

    def _unanswered(self, pending: Pending, what: str) -> None:
        log.warning(
            "%s not acknowledged by positiond within %.1fs (%s); kept and re-sent until it is",
            what,
            self.ack_timeout,
            "connected" if self._channel.connected else f"no daemon at {self.endpoint}",
        )

        def late(p: Pending) -> None:
            if p.error is not None:
                log.error("positiond refused %s after the caller moved on: %s", what, p.error)

        pending.add_callback(late)

    def _finished(self, pending: Pending) -> None:
        if pending.kind in ("crash", "end") and pending.error is None:
            self._channel.session_closed()

    def close(self, timeout: float = 1.0) -> None:
        """Stop the I/O thread, giving unacknowledged messages ``timeout`` seconds first."""
        if not self._closed:
            self._closed = True
            self._channel.close(timeout)


class PositionPersistenceManager(_Core):
    """Persist a strategy's legs through positiond.

    ::

        pm = PositionPersistenceManager(strategy_name="expiry_blast")
        with pm.session():
            leg = pm.save_position_entry(symbol="NIFTY28NOV2524000CE", leg_type="CE",
                                         entry_price=100.0, stop_price=90.0, quantity=75)
            pm.queue_position_update(leg, current_price=104.5, stop_price=95.0)
            pm.save_position_exit(leg, exit_price=95.0, exit_reason="STOP_HIT")

    ``endpoint`` defaults to ``$POSITIOND_ENDPOINT``, else the daemon's default ipc socket.
    ``heartbeat_interval`` must be well below the daemon's heartbeat timeout (default 3 s).
    ``on_notice(code, info)`` is called on the I/O thread when the daemon reports something
    about the session (``REVIVED``: it had been declared crashed and is running again).
    """

    def _wait(self, pending: Pending, what: str) -> dict[str, Any] | None:
        if pending.wait(self.ack_timeout):
            if pending.error is not None:
                raise pending.error
            self._finished(pending)
            return pending.result
        self._unanswered(pending, what)
        return None

    def start_session(self, session_key: str | None = None) -> int | None:
        """Open a session; return its id (None if the daemon did not answer in time)."""
        result = self._wait(self._start_pending(session_key), "session start")
        return None if result is None else int(result["session_id"])

    def save_position_entry(
        self,
        symbol: str,
        leg_type: str | None = None,
        entry_price: float = _UNSET,
        stop_price: float | None = None,
        quantity: int = _UNSET,
        *,
        exchange: str = "NFO",
        product: str = "MIS",
        side: str = "BUY",
        position_key: str | None = None,
        highest_price: float | None = None,
        last_trail_level: float | None = None,
        state: dict[str, Any] | None = None,
    ) -> Leg:
        """Record a leg entered at the broker; return its handle (acked after commit).

        ``position_key`` makes the entry idempotent: the same key never creates a second leg.
        """
        if entry_price is _UNSET or quantity is _UNSET:
            raise ValueError("save_position_entry needs entry_price and quantity")
        leg, pending = self._entry_pending(
            symbol, leg_type, entry_price, stop_price, quantity, exchange, product, side,
            position_key, highest_price, last_trail_level, state,
        )  # fmt: skip
        self._wait(pending, f"entry of {leg.key}")
        return leg

    def queue_position_update(
        self,
        leg: Leg | str,
        *,
        current_price: float | None = _UNSET,
        stop_price: float | None = _UNSET,
        highest_price: float | None = _UNSET,
        last_trail_level: float | None = _UNSET,
        state: dict[str, Any] | None = _UNSET,
    ) -> None:
        """Queue the leg's newest values (never blocks; the daemon coalesces and batches)."""
        self._update(
            leg,
            {
                "current_price": current_price,
                "stop_price": stop_price,
                "highest_price": highest_price,
                "last_trail_level": last_trail_level,
                "state": state,
            },
        )

    def save_position_exit(
        self, leg: Leg | str, exit_price: float | None = None, exit_reason: str = "EXIT"
    ) -> bool:
        """Record that the leg was closed at the broker; True once durably stored."""
        return self._wait(self._exit_pending(leg, exit_price, exit_reason), "exit") is not None

    def handle_crash(self, error: BaseException | str) -> bool:
        """Record the session CRASHED with this error (call it from an ``except`` block)."""
        return self._wait(self._crash_pending(error), "crash report") is not None

    def end_session(self) -> bool:
        """Record the session COMPLETED; True once durably stored."""
        result = self._wait(self._end_pending(), "session end")
        if result is not None and result.get("open_legs"):
            log.warning(
                "session ended with %d leg(s) still open; they stay ACTIVE in positiond",
                result["open_legs"],
            )
        return result is not None

    def sync(self, timeout: float = 1.0) -> bool:
        """True once everything sent so far, updates included, is durably stored."""
        pending = self._sync_pending()
        deadline = time.monotonic() + timeout
        if not pending.wait(timeout):
            return False
        if pending.error is not None:
            raise pending.error
        for earlier in self._channel.unacked():
            if earlier.seq < pending.seq and not earlier.wait(deadline - time.monotonic()):
                return False
        return True

    @contextmanager
    def session(self, session_key: str | None = None) -> Iterator[PositionPersistenceManager]:
        """Start a session; ``handle_crash`` on an exception, ``end_session`` on a normal exit."""
        self.start_session(session_key)
        try:
            yield self
        except BaseException as exc:
            self.handle_crash(exc)
            raise
        else:
            self.end_session()

    def __enter__(self) -> PositionPersistenceManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncPositionPersistenceManager(_Core):
    """The asyncio twin of :class:`PositionPersistenceManager`: durable calls are coroutines.

    Waiting never blocks the event loop (the I/O thread resolves a future). Updates stay a
    plain non-blocking call.
    """

    async def _wait(self, pending: Pending, what: str) -> dict[str, Any] | None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def settle() -> None:
            if not future.done():
                future.set_result(None)

        def resolve(_: Pending) -> None:
            loop.call_soon_threadsafe(settle)

        pending.add_callback(resolve)
        try:
            await asyncio.wait_for(future, self.ack_timeout)
        except TimeoutError:
            self._unanswered(pending, what)
            return None
        if pending.error is not None:
            raise pending.error
        self._finished(pending)
        return pending.result

    async def start_session(self, session_key: str | None = None) -> int | None:
        """Open a session; return its id (None if the daemon did not answer in time)."""
        result = await self._wait(self._start_pending(session_key), "session start")
        return None if result is None else int(result["session_id"])

    async def save_position_entry(
        self,
        symbol: str,
        leg_type: str | None = None,
        entry_price: float = _UNSET,
        stop_price: float | None = None,
        quantity: int = _UNSET,
        *,
        exchange: str = "NFO",
        product: str = "MIS",
        side: str = "BUY",
        position_key: str | None = None,
        highest_price: float | None = None,
        last_trail_level: float | None = None,
        state: dict[str, Any] | None = None,
    ) -> Leg:
        """Record a leg entered at the broker; return its handle (acked after commit)."""
        if entry_price is _UNSET or quantity is _UNSET:
            raise ValueError("save_position_entry needs entry_price and quantity")
        leg, pending = self._entry_pending(
            symbol, leg_type, entry_price, stop_price, quantity, exchange, product, side,
            position_key, highest_price, last_trail_level, state,
        )  # fmt: skip
        await self._wait(pending, f"entry of {leg.key}")
        return leg

    def queue_position_update(
        self,
        leg: Leg | str,
        *,
        current_price: float | None = _UNSET,
        stop_price: float | None = _UNSET,
        highest_price: float | None = _UNSET,
        last_trail_level: float | None = _UNSET,
        state: dict[str, Any] | None = _UNSET,
    ) -> None:
        """Queue the leg's newest values (a plain call: it never blocks)."""
        self._update(
            leg,
            {
                "current_price": current_price,
                "stop_price": stop_price,
                "highest_price": highest_price,
                "last_trail_level": last_trail_level,
                "state": state,
            },
        )

    async def save_position_exit(
        self, leg: Leg | str, exit_price: float | None = None, exit_reason: str = "EXIT"
    ) -> bool:
        """Record that the leg was closed at the broker; True once durably stored."""
        pending = self._exit_pending(leg, exit_price, exit_reason)
        return await self._wait(pending, "exit") is not None

    async def handle_crash(self, error: BaseException | str) -> bool:
        """Record the session CRASHED with this error."""
        return await self._wait(self._crash_pending(error), "crash report") is not None

    async def end_session(self) -> bool:
        """Record the session COMPLETED; True once durably stored."""
        return await self._wait(self._end_pending(), "session end") is not None

    async def sync(self, timeout: float = 1.0) -> bool:  # noqa: ASYNC109 -- the sync twin's API
        """True once everything sent so far, updates included, is durably stored."""
        saved, self.ack_timeout = self.ack_timeout, timeout
        try:
            return await self._wait(self._sync_pending(), "sync") is not None
        finally:
            self.ack_timeout = saved

    @asynccontextmanager
    async def session(
        self, session_key: str | None = None
    ) -> AsyncIterator[AsyncPositionPersistenceManager]:
        """Start a session; ``handle_crash`` on an exception, ``end_session`` on a normal exit."""
        await self.start_session(session_key)
        try:
            yield self
        except BaseException as exc:
            await self.handle_crash(exc)
            raise
        else:
            await self.end_session()

    async def aclose(self, timeout: float = 1.0) -> None:  # noqa: ASYNC109 -- as close()
        """Close without blocking the event loop."""
        await asyncio.get_running_loop().run_in_executor(None, self.close, timeout)


@atexit.register
def _close_all() -> None:
    # Give messages queued just before a normal interpreter exit their chance to be acked.
    for manager in list(_LIVE):
        try:
            manager.close(0.5)
        except Exception:
            log.debug("closing a manager at exit failed", exc_info=True)
