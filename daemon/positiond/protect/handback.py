"""What the protect worker tells the engine when a handed-back leg's protective order is settled.

A leg is handed back when a session takes it over (adoption: ``mark_position_recovered``,
``start_session(recover=True)``; or the crashed session itself revives): the writer marks its
live protective order ``release = 'CANCEL'`` (or ``'KEEP'``) with ``release_session``, in the very
transaction of the hand-back. The protect worker then settles the order at the broker and reports
one :class:`HandBack` to the engine, which tells that session's client (a ``notice``) and, when
the order had already filled, closes the leg.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["OUTCOMES", "HandBack"]

# cancelled: the order is gone at the broker; the strategy manages the leg again.
# kept: left live at the broker for the strategy to manage (keep_protection=True).
# triggered: it had filled: the position is closed at the broker; the leg is closed
#   (exit_reason PROTECTIVE_STOP, exit_price = fill_price) and must not be managed.
# cancel_failed: the cancel was refused for good; the order may still be live at the broker.
OUTCOMES = ("cancelled", "kept", "triggered", "cancel_failed")


@dataclass(frozen=True, slots=True)
class HandBack:
    """One settled protective order of a leg that a live session holds now."""

    position_key: str
    session_id: int  # protective_orders.release_session: who holds the leg now
    outcome: str  # one of OUTCOMES
    protect_id: int  # protective_orders.id
    order_id: str | None
    trigger_price: float | None
    fill_price: float | None = None  # triggered only
    reason: str = ""
