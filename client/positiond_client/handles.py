"""What the client API hands back: the ``Leg`` handle and ``ClientStatus`` (``pm.status()``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from positiond_client.pending import Delivery

__all__ = ["ClientStatus", "Leg"]


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
        # What became of the entry: STORED once acknowledged (it turns STORED when a late
        # ack arrives), QUEUED / UNANSWERED while it waits in the outbox.
        stored = self.position_id is not None
        self.delivery: Delivery = Delivery.STORED if stored else Delivery.QUEUED

    @classmethod
    def from_saved(cls, row: dict[str, Any]) -> Leg:
        """A handle for a leg as positiond saved it (an adopted crashed leg)."""
        return cls({**row, "key": row["position_key"]})

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
