"""``AsyncPositionPersistenceManager``: the asyncio twin of the sync manager (same calls as
coroutines; waiting never blocks the event loop: the I/O thread resolves futures)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any, Literal, TypeVar, overload

from positiond_client.core import UNSET, Core, Leg, Step
from positiond_client.errors import PositiondError, UnavailableError
from positiond_client.pending import Delivery, Pending
from positiond_client.recovery import CrashedLeg, Orphan, VerificationReport
from positiond_client.stop import DEFAULT_STOP_SIGNALS, StopRequested, ends_cleanly

__all__ = ["AsyncPositionPersistenceManager"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class AsyncPositionPersistenceManager(Core):
    """The asyncio twin of :class:`PositionPersistenceManager`: durable calls are coroutines.

    Waiting never blocks the event loop (the I/O thread resolves a future). Updates stay a
    plain non-blocking call.
    """

    async def _await_answer(
        self, pending: Pending, seconds: float, *, whatever_the_link: bool = False
    ) -> Delivery:
        """As ``Channel.await_answer``, without blocking the event loop (``sync`` waits its
        whole timeout ``whatever_the_link``)."""
        if pending.answered:
            return Delivery.STORED
        if self._channel.unreachable() and not whatever_the_link:
            return Delivery.QUEUED
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def settle() -> None:
            if not future.done():
                future.set_result(None)

        def wake(*_: object) -> None:
            loop.call_soon_threadsafe(settle)

        pending.add_callback(wake)
        if not whatever_the_link:
            self._channel.add_link_waiter(wake)
        try:
            if whatever_the_link or not self._channel.unreachable():
                await asyncio.wait_for(future, seconds)
        except TimeoutError:
            if pending.answered:
                return Delivery.STORED
            if not whatever_the_link:
                self._channel.note_unanswered()
            return Delivery.UNANSWERED
        finally:
            self._channel.remove_link_waiter(wake)
        return Delivery.STORED if pending.answered else Delivery.QUEUED

    def _settle(self, pending: Pending, delivery: Delivery) -> dict[str, Any] | None:
        if not delivery:
            return None
        pending.wait(None)  # answered: its callbacks are finishing on the I/O thread
        if pending.error is not None:
            raise pending.error
        self._finished(pending)
        return pending.result

    async def _answer(self, pending: Pending) -> dict[str, Any] | None:
        return self._settle(pending, await self._await_answer(pending, self.ack_timeout))

    async def _wait(self, pending: Pending, what: str) -> Delivery:
        delivery = await self._await_answer(pending, self.ack_timeout)
        self._settle(pending, delivery)
        if not delivery:
            self._unanswered(pending, what, delivery)
        return delivery

    def install_signal_handlers(
        self, signals: Iterable[int] = DEFAULT_STOP_SIGNALS
    ) -> Callable[[], None]:
        """The sync twin's, on the running loop: the first signal sets
        :attr:`stop_requested`, a second cancels the task that called this (``pm.session()``
        then ends the session ``COMPLETED`` and raises ``StopRequested``, exit status 0).
        Returns a function removing the handlers."""
        loop = asyncio.get_running_loop()
        return self._stop.install_async(loop, asyncio.current_task(), signals)

    async def stopped(self) -> None:
        """Return once a stop is requested (to ``await`` beside the strategy's own work)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def settle() -> None:
            if not future.done():
                future.set_result(None)

        def wake() -> None:
            loop.call_soon_threadsafe(settle)

        self._stop.add_listener(wake)
        try:
            if not self.stop_requested:
                await future
        finally:
            self._stop.remove_listener(wake)

    async def _drive(self, op: Step[T]) -> T:
        try:
            pending = next(op)
            while True:
                try:
                    result = await self._answer(pending)
                except PositiondError as exc:
                    pending = op.throw(exc)
                else:
                    pending = op.send(result)
        except StopIteration as stop:
            value: T = stop.value
            return value

    async def get_crashed_positions(
        self, strategy_name: str | None = None, *, all_strategies: bool = False
    ) -> list[CrashedLeg]:
        """Crashed legs of this strategy (or another, or all), newest crash first."""
        return await self._drive(self._crashed_op(strategy_name, all_strategies))

    async def get_open_positions(self, strategy_name: str | None = None) -> list[CrashedLeg]:
        """Every leg positiond knows open (ACTIVE, CRASHED, NEEDS_REVIEW), of any strategy."""
        return await self._drive(self._open_op(strategy_name))

    async def mark_position_recovered(
        self, leg: CrashedLeg | Leg | str, *, keep_protection: bool = False
    ) -> Leg:
        """Adopt a crashed leg into this session; returns its handle with the saved state."""
        return await self._drive(self._adopt_op(leg, keep_protection))

    async def close_crashed_position(
        self,
        leg: CrashedLeg | Leg | str,
        exit_price: float | None = None,
        reason: str | None = None,
    ) -> bool:
        """Record a crashed leg the broker shows flat: CLOSED, exit_reason CLOSED_AT_BROKER."""
        return await self._drive(
            self._resolve_op(leg, "close", exit_price=exit_price, reason=reason)
        )

    async def flag_for_review(self, leg: CrashedLeg | Leg | str, reason: str) -> bool:
        """Set a crashed leg NEEDS_REVIEW with the reason."""
        return await self._drive(self._resolve_op(leg, "review", reason=reason))

    async def recover(
        self, positionbook: Any, *, keep_protection: bool = False
    ) -> VerificationReport:
        """Verify this strategy's crashed legs and act on what is safe (see the sync twin)."""
        return await self._drive(self._recover_op(positionbook, keep_protection))

    @overload
    async def start_session(
        self,
        session_key: str | None = None,
        *,
        recover: Literal[False] = False,
        protect: bool | None = None,
    ) -> int | None: ...

    @overload
    async def start_session(
        self,
        session_key: str | None = None,
        *,
        recover: Literal[True],
        positionbook: Any,
        protect: bool | None = None,
        keep_protection: bool = False,
    ) -> VerificationReport: ...

    async def start_session(
        self,
        session_key: str | None = None,
        *,
        recover: bool = False,
        positionbook: Any = None,
        protect: bool | None = None,
        keep_protection: bool = False,
    ) -> int | VerificationReport | None:
        """Open a session; return its id, or with ``recover=True`` the recovery report."""
        pending = self._start_pending(session_key, protect)
        stored = await self._wait(pending, "session start")
        if not recover:
            return int(pending.result["session_id"]) if stored and pending.result else None
        if not stored:
            raise UnavailableError("cannot recover: positiond did not acknowledge the session")
        return await self.recover(positionbook, keep_protection=keep_protection)

    async def verify_with_broker(self, broker: Any) -> VerificationReport:
        """Verdicts for this strategy's crashed legs against the broker (changes nothing)."""
        return await self._drive(self._verify_op(broker))

    async def record_orphans(self, orphans: list[Orphan]) -> int:
        """Record broker positions nobody explains; return how many new."""
        return await self._drive(self._orphans_op(orphans))

    async def save_position_entry(
        self,
        symbol: str,
        leg_type: str | None = None,
        entry_price: float = UNSET,
        stop_price: float | None = None,
        quantity: int = UNSET,
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
        if entry_price is UNSET or quantity is UNSET:
            raise ValueError("save_position_entry needs entry_price and quantity")
        leg, pending = self._entry_pending(
            symbol, leg_type, entry_price, stop_price, quantity, exchange, product, side,
            position_key, highest_price, last_trail_level, state,
        )  # fmt: skip
        delivery = await self._wait(pending, f"entry of {leg.key}")
        if not pending.answered:
            leg.delivery = delivery
        return leg

    async def save_position_exit(
        self, leg: Leg | str, exit_price: float | None = None, exit_reason: str = "EXIT"
    ) -> Delivery:
        """Record that the leg was closed at the broker; ``Delivery.STORED`` once stored."""
        return await self._wait(self._exit_pending(leg, exit_price, exit_reason), "exit")

    async def handle_crash(self, error: BaseException | str) -> Delivery:
        """Record the session CRASHED with this error."""
        return await self._wait(self._crash_pending(error), "crash report")

    async def end_session(self) -> Delivery:
        """Record the session COMPLETED; ``Delivery.STORED`` once durably stored (a warning
        if legs are still open, as in the sync twin)."""
        pending = self._end_pending()
        return self._ended(pending, await self._wait(pending, "session end"))

    async def sync(self, timeout: float = 1.0) -> bool:  # noqa: ASYNC109 -- the sync twin's API
        """True once everything sent so far, updates included, is durably stored: the sync's
        ack, then every earlier message still unacknowledged, all within ``timeout`` (waited
        even while the daemon is unreachable: the way to wait for it). Concurrent calls are
        independent: nothing of the manager changes while one awaits."""
        pending = self._sync_pending()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if not await self._await_answer(pending, timeout, whatever_the_link=True):
            return False
        pending.wait(None)  # answered: its callbacks are finishing on the I/O thread
        if pending.error is not None:
            raise pending.error
        for earlier in self._earlier_unacked(pending):
            left = max(0.0, deadline - loop.time())
            if not await self._await_answer(earlier, left, whatever_the_link=True):
                return False
        return True

    @asynccontextmanager
    async def session(
        self,
        session_key: str | None = None,
        *,
        recover: bool = False,
        positionbook: Any = None,
        stop_signals: Iterable[int] | None = None,
        protect: bool | None = None,
        keep_protection: bool = False,
    ) -> AsyncIterator[AsyncPositionPersistenceManager]:
        """Start a session (and recover, see the sync twin); end it on a normal exit or a
        requested stop (a cancellation after a stop request included), crash it otherwise."""
        restore = self.install_signal_handlers(stop_signals) if stop_signals else None
        try:
            await self.start_session(session_key, protect=protect)
            try:
                if recover:
                    await self.recover(positionbook, keep_protection=keep_protection)
                yield self
            except BaseException as exc:
                if ends_cleanly(exc, self.stop_requested):
                    self._log_stop(exc)
                    await self._shielded(self.end_session())
                    if isinstance(exc, asyncio.CancelledError):
                        # The second stop signal's cancellation: leave as the sync twin does.
                        raise StopRequested(self._stop.reason or "requested") from exc
                else:
                    await self._shielded(self.handle_crash(exc))
                raise
            else:
                if self.stop_requested:
                    self._log_stop(None)
                await self.end_session()
        finally:
            if restore is not None:
                restore()

    async def _shielded(self, call: Awaitable[Delivery]) -> None:
        """Await the session's last message even while the task is being cancelled."""
        task = asyncio.current_task()
        if task is not None:
            while task.uncancel():  # the cancellation is what we are handling now
                pass
        await call

    async def __aenter__(self) -> AsyncPositionPersistenceManager:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self, timeout: float = 1.0) -> None:  # noqa: ASYNC109 -- as close()
        """Close without blocking the event loop."""
        await asyncio.get_running_loop().run_in_executor(None, self.close, timeout)
