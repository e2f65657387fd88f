"""The pure part of the protect worker: what order protects a leg, which broker order is ours,
what an order status means, and the rate the worker keeps. No I/O, clocks injected.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from positiond.protect.settings import ProtectConfig

__all__ = [
    "DONE_CANCELLED",
    "LIVE_STATUSES",
    "Order",
    "RateLimit",
    "adoptable",
    "describe",
    "fill_price",
    "matches",
    "plan_order",
    "status_of",
]

# OpenAlgo's order_status, lowercase; brokers pass their own words through ("trigger pending").
LIVE_STATUSES = (
    "open", "pending", "trigger pending", "validation pending", "put order req received",
    "modify pending", "open pending", "after market order req received",
)  # fmt: skip
DONE_CANCELLED = ("cancelled", "canceled", "rejected", "expired", "lapsed")


@dataclass(frozen=True, slots=True)
class Order:
    """The protective order for one leg: the opposite side, its own quantity, at its stop."""

    symbol: str
    exchange: str
    product: str
    action: str  # BUY or SELL: the opposite of the leg
    quantity: int
    pricetype: str  # SL-M or SL
    trigger_price: float
    price: float | None  # SL: the limit; SL-M: None
    tag: str

    def fields(self) -> dict[str, Any]:
        """The keyword arguments of ``placeorder_request`` (without the key)."""
        return {
            "strategy": self.tag, "symbol": self.symbol, "exchange": self.exchange,
            "product": self.product, "action": self.action, "quantity": self.quantity,
            "pricetype": self.pricetype, "trigger_price": self.trigger_price,
            "price": self.price or 0.0,
        }  # fmt: skip


def plan_order(leg: Mapping[str, Any], config: ProtectConfig) -> Order | None:
    """The order protecting ``leg`` (a strategy_positions row); None when it has no stop.

    An SL order's limit sits ``limit_offset`` past the trigger on the side that lets it fill:
    below it for a SELL (a long leg's stop), above it for a BUY (a short leg's stop).
    """
    stop = leg.get("stop_price")
    if stop is None or isinstance(stop, bool) or not float(stop) > 0:
        return None
    trigger = float(stop)
    action = "SELL" if leg["side"] == "BUY" else "BUY"
    price = None
    if config.pricetype == "SL":
        offset = config.limit_offset if action == "BUY" else -config.limit_offset
        price = round(max(trigger + offset, 0.0), 8)
    return Order(
        str(leg["symbol"]), str(leg["exchange"]), str(leg["product"]), action,
        int(leg["quantity"]), config.pricetype, trigger, price, config.tag,
    )  # fmt: skip


def describe(order: Order) -> str:
    """``SELL 75 NIFTY..CE NFO/MIS SL-M trigger 104`` (logs, alerts, dry-run)."""
    limit = f" limit {order.price:g}" if order.price is not None else ""
    return (
        f"{order.action} {order.quantity} {order.symbol} {order.exchange}/{order.product} "
        f"{order.pricetype} trigger {order.trigger_price:g}{limit} (strategy {order.tag!r})"
    )


def _number(value: Any) -> float | None:
    try:
        return float(str(value).strip())
    except (TypeError, ValueError):
        return None


def status_of(data: Mapping[str, Any]) -> str:
    """An order's ``order_status``, lowercase and trimmed ('' when missing)."""
    return str(data.get("order_status") or data.get("status") or "").strip().lower()


def fill_price(data: Mapping[str, Any]) -> float | None:
    """The average fill price of a complete order (None when the broker gave none)."""
    price = _number(data.get("average_price"))
    return price if price is not None and price > 0 else None


def matches(row: Mapping[str, Any], order: Order) -> bool:
    """Is this orderbook row the order we placed (an answer lost to a timeout or a kill)?

    Every field we sent must agree: instrument, side, quantity, price type, trigger (and the
    strategy tag when the broker echoes it). A cancelled or rejected row is not ours to adopt:
    a live placement is what matters.
    """
    if str(row.get("symbol")) != order.symbol or str(row.get("exchange")) != order.exchange:
        return False
    if str(row.get("product")) != order.product:
        return False
    if str(row.get("action", "")).upper() != order.action:
        return False
    if str(row.get("pricetype", "")).upper() != order.pricetype:
        return False
    quantity = _number(row.get("quantity"))
    trigger = _number(row.get("trigger_price"))
    if quantity != order.quantity or trigger is None:
        return False
    if abs(trigger - order.trigger_price) > 1e-6 * max(1.0, abs(order.trigger_price)):
        return False
    if "strategy" in row and row["strategy"] not in (None, "", order.tag):
        return False
    return status_of(row) not in DONE_CANCELLED


def adoptable(rows: Iterable[Mapping[str, Any]], order: Order, claimed: set[str]) -> str | None:
    """The id of the first matching order no other protective row holds (None: none)."""
    for row in rows:
        order_id = str(row.get("orderid") or "")
        if order_id and order_id not in claimed and matches(row, order):
            return order_id
    return None


class RateLimit:
    """At most ``rate`` calls in any one second, by an injected clock: a moving window, as
    OpenAlgo's own limiter counts (a token bucket would let a full burst follow a full second).
    ``margin`` seconds of slack absorb the jitter between our clock and the broker's arrivals."""

    def __init__(self, rate: float, margin: float = 0.05) -> None:
        self.size = max(1, int(rate))
        self.span = 1.0 if rate >= 1 else 1.0 / rate
        self.margin = margin
        self.times: list[float] = []

    def delay(self, now: float) -> float:
        """Seconds to wait before the next call; 0: take it now (it is counted)."""
        if len(self.times) >= self.size:
            wait = self.times[-self.size] + self.span + self.margin - now
            if wait > 1e-9:
                return wait
        self.times.append(now)
        del self.times[: -self.size]
        return 0.0
