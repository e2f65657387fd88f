"""The engine's side of protective stop orders handed back (:mod:`positiond.protect`).

Part of :class:`~positiond.engine.Engine` (a mixin: plain Python, no I/O). The protect worker
reports each settled order of a handed-back leg as a :class:`~positiond.protect.handback.HandBack`;
the engine turns it into a ``notice`` for the client of the session holding the leg, or — the
order filled — a :class:`~positiond.ops.ProtectCloseOp` that closes the leg, whose notice follows
the commit. Adoptions and revivals that released orders are counted for the daemon to wake the
worker (:meth:`HandBacks.take_released`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from positiond.model import Leg, Session
from positiond.ops import ProtectCloseOp, Result, TrailEvent
from positiond.protect.handback import HandBack
from positiond.protect.notices import EXIT_REASON, ClosedByStop, closed_notice, release_notice
from positiond.writequeue import WriteQueue

__all__ = ["HandBacks", "Reply"]

log = logging.getLogger(__name__)

Reply = tuple[bytes, bytes]  # (routing id, payload)


class HandBacks:
    """The hand-back half of the engine (its state is set up in ``Engine.__init__``)."""

    sessions: dict[str, Session]
    legs: dict[str, Leg]
    queue: WriteQueue
    wall: Callable[[], float]
    _protects: Callable[[str, bool | None], bool]
    _closed_by_stop: ClosedByStop
    _released: int

    def take_released(self) -> int:
        """Protective orders handed back (adopted, revived legs) since the last call: the
        protect worker has cancels (or keeps) to make."""
        released, self._released = self._released, 0
        return released

    def _holder(self, session_id: int) -> Session | None:
        return next((s for s in self.sessions.values() if s.id == session_id), None)

    def handback(self, hb: HandBack, wall: float | None = None) -> list[Reply]:
        """The protect worker settled the order of a leg handed to session ``hb.session_id``.

        Cancelled, kept, or its cancel refused: a notice to that session's client (if it is
        connected; if not, its next start or recovery reply shows the order). Triggered: the
        leg is closed (PROTECTIVE_STOP, at the fill) by a durable op and leaves memory now (its
        updates are refused ``LEG_CLOSED``); the notice follows the commit. A report about a
        leg or session that is gone changes nothing.
        """
        wall = self.wall() if wall is None else wall
        session = self._holder(hb.session_id)
        if hb.outcome == "triggered":
            self._close_by_stop(hb, session, wall)
            return []
        notice = release_notice(hb)
        if notice is None:
            log.error("hand-back of leg %s: unknown outcome %r", hb.position_key, hb.outcome)
            return []
        if session is None or session.rid is None:
            log.info(
                "hand-back of leg %s (%s): session %s is not connected; its next start or "
                "recovery reply shows the order", hb.position_key, hb.outcome, hb.session_id,
            )  # fmt: skip
            return []
        return [(session.rid, notice)]

    def _close_by_stop(self, hb: HandBack, session: Session | None, wall: float) -> None:
        key = hb.position_key
        leg = self.legs.get(key)
        if leg is not None and (session is None or leg.session_key != session.key):
            log.warning(
                "protective stop of leg %s filled, but the leg is open in another session "
                "than %s: left to that session", key, hb.session_id,
            )  # fmt: skip
            return
        final: dict[str, Any] | None = None
        trail: list[TrailEvent] = []
        if leg is not None and session is not None:
            final = self.queue.take_update(key)
            trail = self.queue.final_trail({key: final} if final else {}, {key}, self.legs)
            del self.legs[key]
            session.legs.discard(key)
            order = f"order {hb.order_id}" if hb.order_id else "its order"
            self._closed_by_stop.add(
                key, session.key,
                f"leg {key!r} was closed at the broker by its protective stop ({order} filled "
                f"at {hb.fill_price})",
            )  # fmt: skip
        log.warning(
            "protective stop of leg %s filled at %s (order %s): closing the leg",
            key, hb.fill_price, hb.order_id,
        )  # fmt: skip
        holder = session.key if session is not None else ""
        op = ProtectCloseOp(
            None, None, holder, key, hb.session_id, hb.fill_price, hb.protect_id, hb.order_id,
            wall, final, trail,
        )  # fmt: skip
        self.queue.add(op)

    def _protect_closed(self, op: ProtectCloseOp, res: Result) -> list[Reply]:
        other = res.data.get("exit_reason")
        if res.ok and other is not None and other != EXIT_REASON:
            # Two exits at the broker: the leg's own (or an operator's) and its protective stop.
            log.error(
                "leg %s was already closed (%s) when its protective stop order %s filled at %s: "
                "the broker position may now be reversed — check it", op.key, other,
                op.order_id, op.fill_price,
            )  # fmt: skip
        if not res.ok or not res.data.get("closed"):
            return []
        session = self._holder(op.holder_id)
        leg = self.legs.get(op.key)
        if leg is not None and session is not None and leg.session_key == session.key:
            # Taken back into memory after the report (its session revived in between, the
            # leg CRASHED then): closed now, it must not take updates any more.
            self.queue.take_update(op.key)
            del self.legs[op.key]
            session.legs.discard(op.key)
            self._closed_by_stop.add(
                op.key, session.key,
                f"leg {op.key!r} was closed at the broker by its protective stop (order "
                f"{op.order_id} filled at {op.fill_price})",
            )  # fmt: skip
        if session is None or session.rid is None:
            return []
        return [(session.rid, closed_notice(op.key, op.protect_id, op.order_id, op.fill_price))]
