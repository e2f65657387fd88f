"""What the client API hands back: the ``Leg`` handle, its ``Protection`` and ``ClientStatus``
(``pm.status()``)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from positiond_client.pending import Delivery

__all__ = ["PROTECTION_LIVE_STATES", "ClientStatus", "Leg", "Protection"]

# A protective order in these states may still be live at the broker.
PROTECTION_LIVE_STATES = frozenset({"PLANNED", "PLACED", "KEPT", "CANCEL_FAILED"})


@dataclass(frozen=True)
class Protection:
    """The protective stop order positiond placed at the broker for a leg while its strategy
    was dead (docs/PROTECT.md), as the leg's reply showed it, updated by the daemon's notices.

    ``state``: ``PLANNED`` (about to be placed), ``PLACED`` (live at the broker), ``TRIGGERED``
    (it filled: the leg is closed); after a notice: ``CANCELLED`` (gone), ``KEPT`` (live, yours
    to manage now: ``keep_protection=True``), ``CANCEL_FAILED`` (the cancel was refused: a stop
    may still be live at the broker — look at ``order_id`` there). ``release``: ``CANCEL`` or
    ``KEEP`` once the leg was handed to a session, None while it only protects.
    """

    id: int
    state: str
    order_id: str | None
    trigger_price: float | None
    pricetype: str
    release: str | None = None

    @classmethod
    def from_wire(cls, value: Any) -> Protection | None:
        """The ``protection`` object of a leg on the wire (null: None)."""
        if not isinstance(value, dict):
            return None
        return cls(
            id=int(value.get("id") or 0),
            state=str(value.get("state")),
            order_id=value.get("order_id"),
            trigger_price=value.get("trigger_price"),
            pricetype=str(value.get("pricetype") or "SL-M"),
            release=value.get("release"),
        )

    @property
    def live(self) -> bool:
        """A stop order may still be live at the broker for this leg."""
        return self.state in PROTECTION_LIVE_STATES

    @property
    def pending(self) -> bool:
        """Handed back and not settled yet: positiond is still cancelling (or handing over)
        the order. Until it is, the broker may fill it: do not exit the leg yourself."""
        return self.state in ("PLANNED", "PLACED")

    def settled(self, state: str) -> Protection:
        """The same order in another state (after a notice)."""
        return replace(self, state=state)


@dataclass(frozen=True)
class ClientStatus:
    """``pm.status()``: what the client knows about the daemon, and what waits for it."""

    connected: bool
    """Connected and answering (``pm.connected``)."""
    link: str
    """``up``, ``connecting`` (a fresh client, first connect attempt under way), ``down`` (no
    connection) or ``unresponsive`` (connected, but no answer within ``ack_timeout``)."""
    unreachable: bool
    """Known unreachable: durable calls return at once (``Delivery.QUEUED``)."""
    unreachable_for: float | None
    """Seconds since the daemon became known unreachable; None while it is not."""
    unacknowledged: int
    """Durable messages not yet acknowledged (kept, re-sent until they are)."""
    pending_updates: int
    """Legs whose newest values are not sent yet (at most one pending state per leg)."""
    send_queue: int
    """Messages encoded and waiting for the socket (bounded by the two counts above)."""
    send_queue_bytes: int
    session_key: str | None
    session_id: int | None
    stop_requested: bool


class Leg:
    """Handle of one position leg, returned by ``save_position_entry`` and
    ``mark_position_recovered``.

    ``position_id`` is the daemon's integer id, filled in when the entry is acknowledged. The
    price fields are the values at entry, or — for an adopted leg — as saved before the crash:
    everything needed to rebuild the leg's monitor "as if it never crashed".
    """

    __slots__ = (
        "__weakref__",
        "current_price",
        "delivery",
        "entry_price",
        "entry_time",
        "exchange",
        "highest_price",
        "key",
        "last_trail_level",
        "leg_type",
        "position_id",
        "product",
        "protection",
        "quantity",
        "side",
        "state",
        "stop_price",
        "symbol",
        "was_crashed",
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
        self.highest_price: float | None = msg.get("highest_price", self.entry_price)
        self.last_trail_level: float | None = msg.get("last_trail_level")
        self.current_price: float | None = msg.get("current_price", self.entry_price)
        self.state: dict[str, Any] = dict(msg.get("state") or {})
        self.entry_time: str | None = msg.get("entry_time")
        self.was_crashed: bool = bool(msg.get("was_crashed", False))
        self.position_id: int | None = msg.get("position_id")
        # The protective stop order positiond placed while the leg's strategy was dead (None:
        # none). Updated by the daemon's notices (PROTECTION_RELEASED, LEG_CLOSED, ...).
        self.protection: Protection | None = Protection.from_wire(msg.get("protection"))
        # What became of the entry: STORED once acknowledged (it turns STORED when a late
        # ack arrives), QUEUED / UNANSWERED while it waits in the outbox.
        stored = self.position_id is not None
        self.delivery: Delivery = Delivery.STORED if stored else Delivery.QUEUED

    @classmethod
    def from_saved(cls, row: dict[str, Any]) -> Leg:
        """A handle for a leg as positiond saved it (an adopted crashed leg)."""
        return cls({**row, "key": row["position_key"]})

    @property
    def protection_pending(self) -> bool:
        """positiond still has to cancel (or hand over) this leg's protective stop order: a
        broker stop is live until the ``PROTECTION_RELEASED`` notice. Do not exit the leg at the
        broker yourself meanwhile (docs/INTEGRATION.md)."""
        return self.protection is not None and self.protection.pending

    def snapshot(self) -> dict[str, Any]:
        """The leg's mutable state, as the I/O thread re-sends it after a reconnect."""
        return {
            "current_price": self.current_price,
            "stop_price": self.stop_price,
            "highest_price": self.highest_price,
            "last_trail_level": self.last_trail_level,
            "state": self.state,
        }

    def __repr__(self) -> str:
        return (
            f"Leg(key={self.key!r}, symbol={self.symbol!r}, side={self.side}, "
            f"quantity={self.quantity}, position_id={self.position_id})"
        )
