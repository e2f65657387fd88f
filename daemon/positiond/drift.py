"""Drift between the legs positiond knows open and the broker's positionbook (pure: no I/O).

The periodic reconciliation (:mod:`positiond.reconcile`) judges with the same rule as
``posctl verify`` (:mod:`positiond_client.recovery`): a leg ``ACTIVE`` in a ``RUNNING`` session is
certain at the broker, every other open leg (``CRASHED``, ``NEEDS_REVIEW``, stranded) is
uncertain. Per instrument (symbol, exchange, product), a drift is:

- ``missing``: the broker no longer shows a leg (live legs on an instrument the broker has flat;
  an uncertain leg that no explanation of the broker's net keeps open);
- ``unknown``: the broker holds a position on an instrument where positiond knows no open leg;
- ``quantity``: anything else the legs cannot explain (partial quantity, opposite side), or a
  net the book cannot attribute between two uncertain legs.

Nothing here changes a leg: drift is reported (alert ``drift``), a human decides.

Each drift has a ``signature``: the same drift (same instrument, kind, broker net, known net and
legs) has the same signature, so the daemon alerts once per change, not once per check.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import datetime, time
from typing import Any
from zoneinfo import ZoneInfo

from positiond_client.recovery import (
    CLOSED_AT_BROKER,
    MISMATCH,
    CrashedLeg,
    parse_positionbook,
    verify_positions,
)

__all__ = ["Window", "find_drift", "in_window", "parse_window", "signature"]

Window = tuple[time, time]
_WINDOW = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


def parse_window(text: str) -> Window:
    """``"09:15-15:30"`` -> (09:15, 15:30); ValueError when malformed or empty."""
    found = _WINDOW.match(text)
    if found is None:
        raise ValueError(f"{text!r} is not HH:MM-HH:MM")
    h1, m1, h2, m2 = (int(g) for g in found.groups())
    try:
        start, end = time(h1, m1), time(h2, m2)
    except ValueError:
        raise ValueError(f"{text!r} is not HH:MM-HH:MM") from None
    if start == end:
        raise ValueError(f"{text!r} is an empty window")
    return start, end


def in_window(now: datetime, window: Window | None, tz: ZoneInfo) -> bool:
    """Is the aware datetime ``now`` inside ``window`` (local time in ``tz``; start included,
    end excluded; a window past midnight wraps)? No window: always."""
    if window is None:
        return True
    local = now.astimezone(tz).time().replace(tzinfo=None)
    start, end = window
    if start < end:
        return start <= local < end
    return local >= start or local < end


def _leg(leg: CrashedLeg) -> dict[str, Any]:
    return {
        "position_key": leg.position_key,
        "strategy": leg.strategy_name,
        "session_id": leg.session_id,
        "status": leg.status,
        "session_status": leg.session_status,
        "side": leg.side,
        "quantity": leg.quantity,
    }


def signature(item: Mapping[str, Any]) -> str:
    """What makes a drift the same drift (its reason text and leg details aside)."""
    keys = ",".join(sorted(str(leg["position_key"]) for leg in item.get("legs", [])))
    return (
        f"{item['kind']}|{item['symbol']}|{item['exchange']}|{item['product']}|"
        f"{item['broker_quantity']}|{item['known_quantity']}|{keys}"
    )


def _item(
    kind: str, inst: tuple[str, str, str], broker: int, known: int, legs: list[CrashedLeg],
    reason: str,
) -> dict[str, Any]:  # fmt: skip
    symbol, exchange, product = inst
    item: dict[str, Any] = {
        "kind": kind, "symbol": symbol, "exchange": exchange, "product": product,
        "broker_quantity": broker, "known_quantity": known, "legs": [_leg(g) for g in legs],
        "reason": reason,
    }  # fmt: skip
    item["signature"] = signature(item)
    return item


def find_drift(open_legs: Iterable[Mapping[str, Any]], positionbook: Any) -> list[dict[str, Any]]:
    """Every drift between ``open_legs`` (rows as ``query what=open`` gives them: every
    ``ACTIVE``, ``CRASHED`` and ``NEEDS_REVIEW`` leg with its ``session_status``) and the
    positionbook reply. ValueError when the reply is not a success or malformed: a refused
    positionbook is never read as flat."""
    legs = [CrashedLeg.from_row(row) for row in open_legs]
    book = parse_positionbook(positionbook)  # raises first: nothing is judged on an error
    uncertain = [leg for leg in legs if not leg.certain]
    report = verify_positions(uncertain, positionbook, legs)
    drift: list[dict[str, Any]] = []
    by_inst: dict[tuple[str, str, str], list[CrashedLeg]] = {}
    for leg in legs:
        by_inst.setdefault(leg.instrument, []).append(leg)
    for v in report.verdicts:
        if v.verdict == CLOSED_AT_BROKER:
            drift.append(_item("missing", v.leg.instrument, v.broker_quantity, v.known_quantity,
                               [v.leg], v.reason))  # fmt: skip
        elif v.verdict == MISMATCH:
            drift.append(_item("quantity", v.leg.instrument, v.broker_quantity,
                               v.known_quantity, [v.leg], v.reason))  # fmt: skip
    judged = {leg.instrument for leg in uncertain}
    for inst, here in sorted(by_inst.items()):
        if inst in judged:
            continue  # its uncertain legs' verdicts say it
        broker = book.get(inst, (0, []))[0]
        live = sum(leg.signed_quantity for leg in here)
        if broker == live:
            continue
        kind = "missing" if broker == 0 else "quantity"
        reason = f"broker net {broker}, the live legs positiond knows add up to {live}: " + (
            "the broker no longer shows them" if broker == 0 else "review by hand"
        )
        drift.append(_item(kind, inst, broker, live, here, reason))
    for orphan in report.orphans:
        inst = (orphan.symbol, orphan.exchange, orphan.product)
        if inst in by_inst:
            continue  # an instrument with legs: reported above
        drift.append(_item("unknown", inst, orphan.broker_quantity, orphan.known_quantity, [],
                           f"broker net {orphan.broker_quantity}: a position positiond knows no "
                           "leg of"))  # fmt: skip
    return sorted(drift, key=lambda d: str(d["signature"]))
