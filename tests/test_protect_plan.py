"""The pure parts of protective orders: the OpenAlgo order calls' requests, the order planned
for a leg, which broker order is ours, the rate limit and the positionbook triage (hypothesis
where it is a safety property)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from positiond import openalgo
from positiond.openalgo import (
    OpenAlgoError,
    OpenAlgoTimeout,
    OpenAlgoUnavailable,
    cancelorder_request,
    orderbook_request,
    orderstatus_request,
    placeorder_request,
    transient,
)
from positiond.protect.plan import Order, RateLimit, adoptable, matches, plan_order
from positiond.protect.settings import ProtectConfig
from positiond.protect.triage import triage
from tests.fake_openalgo import ACCOUNT_WIDE, FakeOpenAlgo

KEY = "oa-secret-key-9d1"
PACKAGE = Path(openalgo.__file__).parent
ON = ProtectConfig(mode="on", strategies=("*",))


def test_the_order_requests_carry_what_openalgo_documents_and_hide_the_key() -> None:
    order = placeorder_request(
        KEY, strategy="positiond-protect", symbol="X", exchange="NFO", product="MIS",
        action="SELL", quantity=75, pricetype="SL-M", trigger_price=92.5,
    )  # fmt: skip
    assert order.path == "/api/v1/placeorder"
    assert order.body == {
        "apikey": KEY, "strategy": "positiond-protect", "symbol": "X", "action": "SELL",
        "exchange": "NFO", "pricetype": "SL-M", "product": "MIS", "quantity": "75",
        "price": "0.0", "trigger_price": "92.5", "disclosed_quantity": "0",
    }  # fmt: skip
    assert cancelorder_request(KEY, "t", "42").body == {"apikey": KEY, "strategy": "t",
                                                        "orderid": "42"}  # fmt: skip
    assert orderstatus_request(KEY, "t", "42").name == "orderstatus"
    assert orderbook_request(KEY).body == {"apikey": KEY}
    for request in (order, cancelorder_request(KEY, "t", "1"), orderbook_request(KEY)):
        assert KEY not in repr(request)


def test_no_request_for_an_account_wide_call_exists_anywhere_in_the_daemon() -> None:
    names: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Request":
                first = node.args[0] if node.args else None
                assert isinstance(first, ast.Constant), f"{path}: a Request name not literal"
                names.add(str(first.value))
            if isinstance(node, ast.Constant) and node.value in ACCOUNT_WIDE:
                raise AssertionError(f"{path} names {node.value!r}")
    assert names == {"positionbook", "telegram/notify", "placeorder", "cancelorder",
                     "orderstatus", "orderbook"}  # fmt: skip
    assert not [n for n in openalgo.__all__ if any(w in n for w in ACCOUNT_WIDE)]


def test_which_failures_are_retried() -> None:
    assert transient(OpenAlgoTimeout("no answer"))
    assert transient(OpenAlgoError("cannot reach"))  # no HTTP status: no answer
    assert transient(OpenAlgoError("rate limit", 429))
    assert transient(OpenAlgoError("bad gateway", 502))
    assert not transient(OpenAlgoError("RMS: margin exceeds", 400))
    assert not transient(OpenAlgoError("Invalid openalgo apikey", 403))
    assert not transient(OpenAlgoError("status 'error'", 200))
    assert not transient(OpenAlgoUnavailable("no key"))


def test_the_sync_client_against_the_fake_order_book() -> None:
    with FakeOpenAlgo(api_key=KEY) as fake:
        settings = openalgo.Settings(fake.url, None, 2.0)
        with openalgo.OpenAlgo(settings, KEY) as client:
            order_id = client.placeorder(
                strategy="t", symbol="X", exchange="NFO", product="MIS", action="BUY",
                quantity=10, pricetype="SL-M", trigger_price=101.0,
            )  # fmt: skip
            assert client.orderstatus("t", order_id)["order_status"] == "trigger pending"
            (row,) = client.orderbook()
            assert (row["orderid"], row["quantity"], row["trigger_price"]) == (order_id, "10",
                                                                                101.0)  # fmt: skip
            fake.orders.trigger(order_id, 101.2)
            status = client.orderstatus("t", order_id)
            assert (status["order_status"], status["average_price"]) == ("complete", 101.2)
            assert fake.orders.positionbook()[0]["quantity"] == "10"  # the fill moved the book
            with pytest.raises(OpenAlgoError, match="cannot be cancelled") as refused:
                client.cancelorder("t", order_id)
            assert refused.value.status_code == 400 and not transient(refused.value)
            fake.orders.reject = "RMS: no margin"
            with pytest.raises(OpenAlgoError, match="RMS: no margin"):
                client.placeorder(strategy="t", symbol="X", exchange="NFO", product="MIS",
                                  action="BUY", quantity=1, pricetype="MARKET")  # fmt: skip
            fake.orders.reject, fake.orders.rate = None, 1
            with pytest.raises(OpenAlgoError, match="Rate limit") as limited:
                client.placeorder(strategy="t", symbol="X", exchange="NFO", product="MIS",
                                  action="BUY", quantity=1, pricetype="MARKET")  # fmt: skip
            assert limited.value.status_code == 429 and transient(limited.value)


# ---- the order for a leg -------------------------------------------------------------------

sides = st.sampled_from(["BUY", "SELL"])
prices = st.floats(0.05, 1e5, allow_nan=False)


def a_leg(side: str, quantity: int, stop: float | None) -> dict[str, Any]:
    return {"symbol": "X", "exchange": "NFO", "product": "NRML", "side": side,
            "quantity": quantity, "stop_price": stop}  # fmt: skip


@given(sides, st.integers(1, 10_000), prices, st.floats(0.05, 50))
def test_the_order_is_the_opposite_side_the_legs_quantity_and_fills_past_its_stop(
    side: str, quantity: int, stop: float, offset: float
) -> None:
    order = plan_order(a_leg(side, quantity, stop), ON)
    assert order is not None
    assert order.action != side and order.quantity == quantity
    assert (order.pricetype, order.trigger_price, order.price) == ("SL-M", stop, None)
    assert (order.symbol, order.exchange, order.product, order.tag) == (
        "X", "NFO", "NRML", "positiond-protect")  # fmt: skip
    sl = plan_order(a_leg(side, quantity, stop),
                    ProtectConfig(mode="on", strategies=("*",), pricetype="SL",
                                  limit_offset=offset))  # fmt: skip
    assert sl is not None and sl.price is not None
    if sl.action == "SELL":  # a long leg's stop sells: the limit sits below the trigger
        assert sl.price <= stop
    else:
        assert sl.price >= stop


def test_a_leg_without_a_stop_gets_no_order() -> None:
    assert plan_order(a_leg("BUY", 75, None), ON) is None
    assert plan_order(a_leg("BUY", 75, 0.0), ON) is None


def book_row(order: Order, **change: Any) -> dict[str, Any]:
    return {
        "orderid": "7", "symbol": order.symbol, "exchange": order.exchange,
        "product": order.product, "action": order.action, "quantity": str(order.quantity),
        "pricetype": order.pricetype, "trigger_price": order.trigger_price, "price": 0.0,
        "order_status": "trigger pending", **change,
    }  # fmt: skip


@given(sides, st.integers(1, 5000), prices)
def test_only_our_own_unclaimed_live_order_is_adopted(
    side: str, quantity: int, stop: float
) -> None:
    order = plan_order(a_leg(side, quantity, stop), ON)
    assert order is not None
    assert matches(book_row(order), order)
    assert adoptable([book_row(order)], order, set()) == "7"
    assert adoptable([book_row(order)], order, {"7"}) is None  # another row holds it
    for change in ({"symbol": "Y"}, {"quantity": str(quantity + 1)}, {"action": side},
                   {"trigger_price": stop * 1.01 + 0.05}, {"pricetype": "LIMIT"},
                   {"order_status": "rejected"}, {"order_status": "cancelled"},
                   {"strategy": "someone-else"}, {"product": "CNC"}):  # fmt: skip
        assert not matches(book_row(order, **change), order), change


@given(st.integers(1, 10), st.lists(st.floats(0, 0.3), min_size=1, max_size=60))
def test_the_rate_limit_never_lets_more_than_rate_calls_into_one_second(
    rate: int, gaps: list[float]
) -> None:
    limit, now, sent = RateLimit(rate), 0.0, []
    for gap in gaps:
        now += gap
        while (wait := limit.delay(now)) > 0:
            now += wait
        sent.append(now)
    for start in sent:
        assert sum(1 for t in sent if start <= t < start + 1.0) <= rate


# ---- the positionbook decides ------------------------------------------------------------


def crashed(key: str, side: str, quantity: int, stop: float | None = 90.0) -> dict[str, Any]:
    return {"position_id": 1, "position_key": key, "session_id": 3, "strategy_name": "s",
            "symbol": "X", "exchange": "NFO", "product": "MIS", "side": side,
            "quantity": quantity, "stop_price": stop, "status": "CRASHED",
            "session_status": "CRASHED", "entry_price": 100.0, "entry_time": "t"}  # fmt: skip


def positionbook(net: int | None) -> dict[str, Any]:
    rows = [] if net is None else [{"symbol": "X", "exchange": "NFO", "product": "MIS",
                                    "quantity": str(net)}]  # fmt: skip
    return {"status": "success", "data": rows}


@given(sides, st.integers(1, 500), st.one_of(st.none(), st.integers(-1000, 1000)),
       st.lists(st.tuples(sides, st.integers(1, 500)), max_size=3))  # fmt: skip
def test_no_order_unless_the_book_shows_the_leg_open_in_every_explanation(
    side: str, quantity: int, net: int | None, others: list[tuple[str, int]]
) -> None:
    me = crashed("me", side, quantity)
    known = [me] + [crashed(f"o{i}", s, q) for i, (s, q) in enumerate(others)]
    found = triage(me, ON, inside=True, book=positionbook(net), open_legs=known)
    signed = quantity if side == "BUY" else -quantity
    if found.state == "PLANNED":
        assert net is not None and net != 0
        # the book holds the leg: the net minus this leg is made of the other crashed legs
        rest = net - signed
        sums = {0}
        for s, q in others:
            sums |= {x + (q if s == "BUY" else -q) for x in sums}
        assert rest in sums
    if net in (None, 0) and not others:
        assert found.state == "SKIPPED" and "closed at the broker" in found.reason
    if not others and net not in (None, 0, signed):
        assert found.state == "SKIPPED" and found.review  # partial or opposite: a person looks


def test_a_refused_book_fails_and_dry_run_only_plans() -> None:
    me = crashed("me", "BUY", 75)
    refused = triage(me, ON, inside=True, book=OpenAlgoError("HTTP 500"), open_legs=[me])
    assert refused.state == "FAILED" and "no order placed blind" in refused.reason
    dry = ProtectConfig(mode="dry-run", strategies=("*",))
    found = triage(me, dry, inside=True, book=positionbook(75), open_legs=[me])
    assert found.state == "DRY_RUN" and found.reason.startswith("dry-run: would place SELL 75")
    assert triage(me, ON, inside=False, book=None, open_legs=[]).state == "SKIPPED"
    assert "no stop" in triage(crashed("n", "BUY", 5, None), ON, inside=True, book=None,
                               open_legs=[]).reason  # fmt: skip
