"""What a session's client is told about its legs' protective stop orders (pure, no I/O).

The daemon's ``notice`` messages (docs/PROTOCOL.md §5.4), built from a
:class:`~positiond.protect.handback.HandBack` or from a committed protective close:

=============================  =================================================================
code                           details
=============================  =================================================================
``PROTECTION_RELEASED``        ``key``, ``protect_id``, ``order_id``, ``outcome`` (``cancelled``:
                               gone at the broker; ``kept``: live, the strategy's to manage now)
``PROTECTION_CANCEL_FAILED``   ``key``, ``protect_id``, ``order_id``, ``reason``: the cancel was
                               refused, a stop may still be live at the broker
``LEG_CLOSED``                 ``key``, ``protect_id``, ``order_id``, ``exit_reason``
                               (``PROTECTIVE_STOP``), ``exit_price``: the order filled, the leg
                               is closed and takes no more calls
=============================  =================================================================

:class:`ClosedByStop` remembers (bounded) which legs their protective stop closed, so that an
``update`` for one is answered ``LEG_CLOSED`` rather than ``UNKNOWN_LEG``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from positiond.protect.handback import HandBack
from positiond_client.protocol import notice_reply

__all__ = ["EXIT_REASON", "ClosedByStop", "closed_notice", "release_notice"]

EXIT_REASON = "PROTECTIVE_STOP"
# Legs remembered as closed by their stop (the oldest forgotten first): far more than a day has.
REMEMBERED = 10_000


def release_notice(hb: HandBack) -> bytes | None:
    """The notice for a cancelled, kept or refused-cancel hand-back (None for other outcomes)."""
    details: dict[str, Any] = {
        "key": hb.position_key,
        "protect_id": hb.protect_id,
        "order_id": hb.order_id,
    }
    if hb.outcome in ("cancelled", "kept"):
        return notice_reply("PROTECTION_RELEASED", details | {"outcome": hb.outcome})
    if hb.outcome == "cancel_failed":
        reason = hb.reason or "the broker refused the cancel"
        return notice_reply("PROTECTION_CANCEL_FAILED", details | {"reason": reason})
    return None


def closed_notice(
    key: str, protect_id: int, order_id: str | None, exit_price: float | None
) -> bytes:
    """The notice that a leg's protective order filled and the leg is closed."""
    return notice_reply(
        "LEG_CLOSED",
        {
            "key": key,
            "protect_id": protect_id,
            "order_id": order_id,
            "exit_reason": EXIT_REASON,
            "exit_price": exit_price,
        },
    )


class ClosedByStop:
    """Legs closed by their protective stop: position key -> (session key, reason)."""

    def __init__(self, limit: int = REMEMBERED) -> None:
        self.limit = limit
        self._legs: OrderedDict[str, tuple[str, str]] = OrderedDict()

    def add(self, key: str, session_key: str, reason: str) -> None:
        self._legs[key] = (session_key, reason)
        self._legs.move_to_end(key)
        while len(self._legs) > self.limit:
            self._legs.popitem(last=False)

    def reason(self, key: str, session_key: str) -> str | None:
        """Why this session's leg is closed, if its stop closed it; else None."""
        found = self._legs.get(key)
        if found is None or found[0] != session_key:
            return None
        return found[1]
