"""The fake OpenAlgo's order book (:class:`Orders`): what ``placeorder``, ``cancelorder``,
``orderstatus`` and ``orderbook`` answer, in the shapes of OpenAlgo's docs (docs/api in
marketcalls/openalgo): ``{"status": "success", "orderid": ...}``; ``orderstatus`` ``data`` with
``order_status`` lowercase (``open``, ``pending``, ``complete``, ``cancelled``, ``rejected``),
``average_price``; ``orderbook`` ``data.orders[]`` with ``quantity`` a string, plus
``statistics``; errors ``{"status": "error", "message": ...}`` with HTTP 400 (or 429 for the
rate limit: "Rate limit exceeded. Please try again later.").

The test drives the broker: :meth:`Orders.trigger` fills an order at a price (the positionbook
moves by it), :meth:`Orders.cancel_by_broker` cancels one as someone else would,
:attr:`Orders.reject` refuses every new order, :attr:`Orders.hang` holds ``placeorder`` answers
(with the order landing in the book or not: :attr:`Orders.hang_lands`), :attr:`Orders.rate`
is the order calls allowed per second (a moving one-second window, as OpenAlgo's limiter).
``order_times`` keeps when each accepted order call arrived (the rate the client kept).
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

__all__ = ["LIVE", "Orders"]

LIVE = ("open", "pending", "trigger pending")  # not done yet: cancellable, may fill
RATE_LIMITED = {"status": "error", "message": "Rate limit exceeded. Please try again later."}
_PRICETYPES = ("MARKET", "LIMIT", "SL", "SL-M")


def _error(message: str, status: int = 400) -> tuple[int, dict[str, Any], float]:
    return status, {"status": "error", "message": message}, 0.0


class Orders:
    """The account's orders and net positions (thread-safe: the fake serves from threads)."""

    CALLS = ("placeorder", "cancelorder", "orderstatus", "orderbook")
    ORDER_CALLS = ("placeorder", "cancelorder")  # OpenAlgo's ORDER_RATE_LIMIT applies to these

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.orders: dict[str, dict[str, Any]] = {}
        self.strategy: dict[str, str] = {}  # order id -> the strategy field it was placed with
        self.positions: dict[tuple[str, str, str], int] = {}
        self.reject: str | None = None  # set: every placeorder is refused with this message
        self.hang = 0.0  # seconds placeorder answers are held
        self.hang_lands = True  # a held placeorder still puts its order in the book
        self.rate = 10.0  # order calls per second
        self.order_times: list[float] = []  # monotonic arrival of each accepted order call
        self.echo_strategy = False  # real OpenAlgo's orderbook does not echo it
        self._ids = itertools.count(250828000185001)

    # ---- what the test does --------------------------------------------------------------

    def set_position(
        self, symbol: str, quantity: int, exchange: str = "NFO", product: str = "MIS"
    ) -> None:
        """The account's net on one instrument (signed: a short is negative)."""
        with self.lock:
            self.positions[(symbol, exchange, product)] = quantity

    def positionbook(self) -> list[dict[str, Any]]:
        """The positionbook rows (every instrument traded, flat ones with quantity "0")."""
        with self.lock:
            return [
                {"symbol": s, "exchange": e, "product": p, "quantity": str(q),
                 "average_price": "0.00", "ltp": "0.00", "pnl": "0.00"}
                for (s, e, p), q in sorted(self.positions.items())
            ]  # fmt: skip

    def trigger(self, order_id: str, price: float) -> None:
        """The stop was hit: the order fills at ``price`` and the position moves."""
        with self.lock:
            order = self.orders[order_id]
            assert order["order_status"] in LIVE, order
            order["order_status"] = "complete"
            order["average_price"] = price
            inst = (order["symbol"], order["exchange"], order["product"])
            qty = int(order["quantity"]) * (1 if order["action"] == "BUY" else -1)
            self.positions[inst] = self.positions.get(inst, 0) + qty

    def cancel_by_broker(self, order_id: str, status: str = "cancelled") -> None:
        """Someone else cancelled it (or the exchange rejected it): ``status``."""
        with self.lock:
            self.orders[order_id]["order_status"] = status

    def placed(self) -> list[dict[str, Any]]:
        """Every order in the book, oldest first (with the strategy field it came with)."""
        with self.lock:
            return [o | {"strategy": self.strategy[i]} for i, o in self.orders.items()]

    def live(self) -> list[dict[str, Any]]:
        return [o for o in self.placed() if o["order_status"] in LIVE]

    # ---- the REST calls ------------------------------------------------------------------

    def call(self, name: str, body: dict[str, Any]) -> tuple[int, Any, float]:
        """(HTTP status, JSON body, delay) of one call."""
        with self.lock:
            if name in self.ORDER_CALLS:
                now = time.monotonic()
                recent = [t for t in self.order_times if t > now - 1.0]
                if len(recent) >= self.rate:
                    return 429, RATE_LIMITED, 0.0
                self.order_times.append(now)
            return getattr(self, f"_{name}")(body)

    def _placeorder(self, body: dict[str, Any]) -> tuple[int, Any, float]:
        missing = [k for k in ("symbol", "exchange", "action", "product", "quantity",
                               "pricetype", "strategy") if k not in body]  # fmt: skip
        if missing:
            return _error(f"missing mandatory field(s): {', '.join(missing)}")
        if body["action"] not in ("BUY", "SELL") or body["pricetype"] not in _PRICETYPES:
            return _error("invalid action or pricetype")
        try:
            quantity = int(str(body["quantity"]))
            trigger = float(body.get("trigger_price", 0) or 0)
            price = float(body.get("price", 0) or 0)
        except ValueError:
            return _error("quantity, price and trigger_price must be numbers")
        if quantity <= 0:
            return _error("quantity must be positive")
        if body["pricetype"] in ("SL", "SL-M") and trigger <= 0:
            return _error("trigger_price is required for SL and SL-M orders")
        if self.reject is not None:
            return _error(self.reject)
        order_id = str(next(self._ids))
        order = {
            "action": body["action"], "symbol": body["symbol"], "exchange": body["exchange"],
            "orderid": order_id, "product": body["product"], "quantity": str(quantity),
            "price": price, "pricetype": body["pricetype"],
            "order_status": "trigger pending" if body["pricetype"] in ("SL", "SL-M") else "open",
            "trigger_price": trigger, "average_price": 0.0,
            "timestamp": time.strftime("%d-%b-%Y %H:%M:%S"),
        }  # fmt: skip
        if self.hang and not self.hang_lands:
            return 200, {"status": "success", "orderid": order_id}, self.hang  # never lands
        self.orders[order_id] = order
        self.strategy[order_id] = str(body["strategy"])
        inst = (order["symbol"], order["exchange"], order["product"])
        self.positions.setdefault(inst, 0)
        return 200, {"status": "success", "orderid": order_id}, self.hang

    def _cancelorder(self, body: dict[str, Any]) -> tuple[int, Any, float]:
        order = self.orders.get(str(body.get("orderid")))
        if order is None:
            return _error(f"order {body.get('orderid')!r} not found")
        if order["order_status"] not in LIVE:
            return _error(f"order is {order['order_status']}: it cannot be cancelled")
        order["order_status"] = "cancelled"
        return 200, {"status": "success", "orderid": order["orderid"]}, 0.0

    def _orderstatus(self, body: dict[str, Any]) -> tuple[int, Any, float]:
        order = self.orders.get(str(body.get("orderid")))
        if order is None:
            return _error(f"order {body.get('orderid')!r} not found")
        return 200, {"status": "success", "data": dict(order)}, 0.0

    def _orderbook(self, body: dict[str, Any]) -> tuple[int, Any, float]:
        rows = []
        for order_id, order in self.orders.items():
            row = {k: v for k, v in order.items() if k != "average_price"}
            if self.echo_strategy:
                row["strategy"] = self.strategy[order_id]
            rows.append(row)
        statuses = [o["order_status"] for o in self.orders.values()]
        stats = {
            "total_buy_orders": float(sum(o["action"] == "BUY" for o in self.orders.values())),
            "total_sell_orders": float(sum(o["action"] == "SELL" for o in self.orders.values())),
            "total_completed_orders": float(statuses.count("complete")),
            "total_open_orders": float(sum(s in LIVE for s in statuses)),
            "total_rejected_orders": float(statuses.count("rejected")),
        }
        return 200, {"status": "success", "data": {"orders": rows, "statistics": stats}}, 0.0
