"""The strategy-facing API: ``PositionPersistenceManager`` (the seed's names) and its asyncio twin.

Durable calls (start, entry, exit, crash, end) wait for the daemon's ack — sent only after its
transaction committed — up to ``ack_timeout``, while the daemon may answer. When it is known
unreachable (no connection, or no answer: :mod:`positiond_client.link`) they return at once.
Either way they never raise for that reason and never lose the message, which stays in the
outbox and is re-sent until acknowledged; their return value says what happened
(:class:`~positiond_client.pending.Delivery`: only ``STORED`` is true). ``sync(timeout)`` is
the one call that waits its whole timeout for the daemon. Updates never wait: they are
coalesced per leg and sent by the I/O thread. Bad arguments raise at once in the caller
(``ProtocolError`` is a ``ValueError``) and are never sent; a refusal by the daemon raises the
matching :class:`PositiondError`.

``pm.session()`` ends the session ``COMPLETED`` on a normal exit and on a stop the strategy
was asked for, and ``CRASHED`` on an exception: the rule is in :mod:`positiond_client.stop`.
"""

from __future__ import annotations

import atexit
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Literal, TypeVar, overload

from positiond_client.aio import AsyncPositionPersistenceManager
from positiond_client.core import LIVE, UNSET, Core, Leg, Step
from positiond_client.errors import PositiondError, UnavailableError
from positiond_client.pending import Delivery, Pending
from positiond_client.recovery import CrashedLeg, Orphan, VerificationReport
from positiond_client.stop import DEFAULT_STOP_SIGNALS, ends_cleanly

__all__ = ["AsyncPositionPersistenceManager", "Leg", "PositionPersistenceManager"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class PositionPersistenceManager(Core):
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
    about the session (``REVIVED``: it had been declared crashed and is running again;
    ``PROTECTION_RELEASED``, ``PROTECTION_CANCEL_FAILED``, ``LEG_CLOSED``: a leg's protective
    stop order at the broker, see docs/INTEGRATION.md).
    ``ack_timeout`` (2 s) bounds a durable call's wait while the daemon may answer; while it
    is known unreachable the call returns at once (``pm.connected``, ``pm.status()``), and
    the outage is logged when it starts and every ``warn_every`` (30) seconds.
    A manager belongs to the process that created it (:mod:`positiond_client.fork`).
    """

    def _answer(self, pending: Pending) -> dict[str, Any] | None:
        """The ack's data; None if unanswered (in ack_timeout, or the daemon is known
        unreachable); raises the daemon's refusal."""
        return self._settle(pending, self._channel.await_answer(pending, self.ack_timeout))

    def _settle(self, pending: Pending, delivery: Delivery) -> dict[str, Any] | None:
        if not delivery:
            return None
        pending.wait(None)  # answered: its callbacks are finishing on the I/O thread
        if pending.error is not None:
            raise pending.error
        self._finished(pending)
        return pending.result

    def _wait(self, pending: Pending, what: str) -> Delivery:
        delivery = self._channel.await_answer(pending, self.ack_timeout)
        self._settle(pending, delivery)
        if not delivery:
            self._unanswered(pending, what, delivery)
        return delivery

    def install_signal_handlers(
        self, signals: Iterable[int] = DEFAULT_STOP_SIGNALS
    ) -> Callable[[], None]:
        """Make SIGTERM and SIGINT (or ``signals``) a clean stop; returns a function that
        restores the previous handlers. Call it from the main thread.

        The first signal sets :attr:`stop_requested` (the loop checks it and leaves
        ``pm.session()``: session ``COMPLETED``); a second raises
        :class:`~positiond_client.stop.StopRequested` in the main thread, which
        ``pm.session()`` also ends ``COMPLETED``. Rules: :mod:`positiond_client.stop`.
        """
        return self._stop.install(signals)

    def _drive(self, op: Step[T]) -> T:
        try:
            pending = next(op)
            while True:
                try:
                    result = self._answer(pending)
                except PositiondError as exc:
                    pending = op.throw(exc)
                else:
                    pending = op.send(result)
        except StopIteration as stop:
            value: T = stop.value
            return value

    @overload
    def start_session(
        self,
        session_key: str | None = None,
        *,
        recover: Literal[False] = False,
        protect: bool | None = None,
    ) -> int | None: ...

    @overload
    def start_session(
        self,
        session_key: str | None = None,
        *,
        recover: Literal[True],
        positionbook: Any,
        protect: bool | None = None,
        keep_protection: bool = False,
    ) -> VerificationReport: ...

    def start_session(
        self,
        session_key: str | None = None,
        *,
        recover: bool = False,
        positionbook: Any = None,
        protect: bool | None = None,
        keep_protection: bool = False,
    ) -> int | VerificationReport | None:
        """Open a session; return its id (None if the daemon did not answer in time).

        ``recover=True`` (with ``positionbook``: OpenAlgo's response, its rows, or the OpenAlgo
        client itself) then runs :meth:`recover` and returns its report instead
        (``keep_protection``: see :meth:`mark_position_recovered`).

        ``protect``: protective stop orders at the broker for this session's legs if it
        crashes (docs/PROTECT.md). None (default) follows the daemon's ``[protect]``; False
        opts out; True asks, but only where ``[protect]`` allows — a session can only narrow
        it. When given, ``pm.protected`` then says what the daemon will do.
        """
        pending = self._start_pending(session_key, protect)
        stored = self._wait(pending, "session start")
        if not recover:
            return int(pending.result["session_id"]) if stored and pending.result else None
        if not stored:
            raise UnavailableError("cannot recover: positiond did not acknowledge the session")
        return self.recover(positionbook, keep_protection=keep_protection)

    # ---- recovery ------------------------------------------------------------------------

    def get_crashed_positions(
        self, strategy_name: str | None = None, *, all_strategies: bool = False
    ) -> list[CrashedLeg]:
        """Crashed legs (status CRASHED, was_crashed true) of this strategy, newest crash first.

        ``strategy_name`` asks about another strategy, ``all_strategies=True`` about every one.
        Raises :class:`UnavailableError` if the daemon does not answer: "no answer" must never
        read as "nothing crashed".
        """
        return self._drive(self._crashed_op(strategy_name, all_strategies))

    def get_open_positions(self, strategy_name: str | None = None) -> list[CrashedLeg]:
        """Every leg positiond knows open (ACTIVE, CRASHED, NEEDS_REVIEW), of any strategy."""
        return self._drive(self._open_op(strategy_name))

    def verify_with_broker(self, broker: Any) -> VerificationReport:
        """Verdicts for this strategy's crashed legs against ``broker.positionbook()``.

        ``broker`` is an OpenAlgo client (or anything with ``positionbook()``), or a
        positionbook response / list of rows itself. Nothing is changed: see :meth:`recover`.
        """
        return self._drive(self._verify_op(broker))

    def mark_position_recovered(
        self, leg: CrashedLeg | Leg | str, *, keep_protection: bool = False
    ) -> Leg:
        """Adopt a crashed leg into this session (ACTIVE, owned by us; RECOVERY event).

        Returns a handle carrying the saved entry, stop, highest price, trail level and state;
        the old session can no longer write it (FENCED).

        If positiond placed a protective stop order for the leg while it was crashed,
        ``leg.protection`` shows it; positiond cancels it (notice ``PROTECTION_RELEASED``;
        ``leg.protection_pending`` until then), or with ``keep_protection=True`` leaves it live
        for you to manage. If it had filled, the leg is closed (notice ``LEG_CLOSED``, and
        ``LegError`` on the next call for it).
        """
        return self._drive(self._adopt_op(leg, keep_protection))

    def close_crashed_position(
        self,
        leg: CrashedLeg | Leg | str,
        exit_price: float | None = None,
        reason: str | None = None,
    ) -> bool:
        """Record a crashed leg the broker shows flat: CLOSED, exit_reason CLOSED_AT_BROKER."""
        return self._drive(self._resolve_op(leg, "close", exit_price=exit_price, reason=reason))

    def flag_for_review(self, leg: CrashedLeg | Leg | str, reason: str) -> bool:
        """Set a crashed leg NEEDS_REVIEW with the reason (a human decides)."""
        return self._drive(self._resolve_op(leg, "review", reason=reason))

    def record_orphans(self, orphans: list[Orphan]) -> int:
        """Record broker positions nobody explains (``report.orphans``); return how many new."""
        return self._drive(self._orphans_op(orphans))

    def recover(
        self, positionbook: Any, *, keep_protection: bool = False
    ) -> VerificationReport:
        """Verify this strategy's crashed legs and act on what is safe.

        RESUME legs are adopted (their handles in ``report.adopted``), CLOSED_AT_BROKER legs
        closed, MISMATCH legs flagged NEEDS_REVIEW, orphans recorded; ``report.actions`` says
        what happened to each leg.
        """
        return self._drive(self._recover_op(positionbook, keep_protection))

    def save_position_entry(
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
        """Record a leg entered at the broker; return its handle (acked after commit).

        ``position_key`` makes the entry idempotent: the same key never creates a second leg.
        ``leg.delivery`` says whether it is stored yet (``leg.position_id`` comes with the ack).
        """
        if entry_price is UNSET or quantity is UNSET:
            raise ValueError("save_position_entry needs entry_price and quantity")
        leg, pending = self._entry_pending(
            symbol, leg_type, entry_price, stop_price, quantity, exchange, product, side,
            position_key, highest_price, last_trail_level, state,
        )  # fmt: skip
        delivery = self._wait(pending, f"entry of {leg.key}")
        if not pending.answered:  # (a late ack may have made it STORED meanwhile)
            leg.delivery = delivery
        return leg

    def save_position_exit(
        self, leg: Leg | str, exit_price: float | None = None, exit_reason: str = "EXIT"
    ) -> Delivery:
        """Record that the leg was closed at the broker; ``Delivery.STORED`` (true) once
        durably stored, ``QUEUED`` / ``UNANSWERED`` (false) while it waits in the outbox."""
        return self._wait(self._exit_pending(leg, exit_price, exit_reason), "exit")

    def handle_crash(self, error: BaseException | str) -> Delivery:
        """Record the session CRASHED with this error (call it from an ``except`` block)."""
        return self._wait(self._crash_pending(error), "crash report")

    def end_session(self) -> Delivery:
        """Record the session COMPLETED; ``Delivery.STORED`` (true) once durably stored."""
        pending = self._end_pending()
        return self._ended(pending, self._wait(pending, "session end"))

    def sync(self, timeout: float = 1.0) -> bool:
        """True once everything sent so far, updates included, is durably stored (waits up to
        ``timeout`` even while the daemon is unreachable: the way to wait for it)."""
        pending = self._sync_pending()
        deadline = time.monotonic() + timeout
        if not pending.wait(timeout):
            return False
        if pending.error is not None:
            raise pending.error
        for earlier in self._earlier_unacked(pending):
            if not earlier.wait(max(0.0, deadline - time.monotonic())):
                return False
        return True

    @contextmanager
    def session(
        self,
        session_key: str | None = None,
        *,
        recover: bool = False,
        positionbook: Any = None,
        stop_signals: Iterable[int] | None = None,
        protect: bool | None = None,
        keep_protection: bool = False,
    ) -> Iterator[PositionPersistenceManager]:
        """Start a session; ``end_session`` on a normal exit or a requested stop,
        ``handle_crash`` on an exception (the rule: :mod:`positiond_client.stop`).

        ``recover=True, positionbook=...`` runs :meth:`recover` first (inside the session, so
        a failing verification is recorded as the session's crash); the report is
        ``pm.recovery``. ``stop_signals=(signal.SIGTERM, signal.SIGINT)`` installs
        :meth:`install_signal_handlers` for the session's duration.
        """
        restore = self.install_signal_handlers(stop_signals) if stop_signals else None
        try:
            self.start_session(session_key, protect=protect)
            try:
                if recover:
                    self.recover(positionbook, keep_protection=keep_protection)
                yield self
            except BaseException as exc:
                if ends_cleanly(exc, self.stop_requested):
                    self._log_stop(exc)
                    self.end_session()
                else:
                    self.handle_crash(exc)
                raise
            else:
                if self.stop_requested:
                    self._log_stop(None)
                self.end_session()
        finally:
            if restore is not None:
                restore()

    def __enter__(self) -> PositionPersistenceManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@atexit.register
def _close_all() -> None:
    # Give messages queued just before a normal interpreter exit their chance to be acked.
    for manager in list(LIVE):
        try:
            manager.close(0.5)
        except Exception:
            log.debug("closing a manager at exit failed", exc_info=True)
