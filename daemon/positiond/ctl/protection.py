"""posctl: each leg's protective order (docs/PROTECT.md), read from ``protective_orders``.

The newest row per leg: its state, the broker's order id, the trigger and the fill. Databases
older than schema 7 have no protective orders: every leg reads as none.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, MutableMapping
from typing import Any

__all__ = ["attach", "protection_text", "protections"]

_FIELDS = ("id", "state", "mode", "order_id", "action", "pricetype", "trigger_price", "price",
           "fill_price", "reason", "release", "planned_at", "updated_at")  # fmt: skip


def protections(conn: sqlite3.Connection, position_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
    """position_id -> its newest protective order row (legs without one are absent)."""
    ids = sorted(set(position_ids))
    if not ids:
        return {}
    try:
        found = conn.execute(
            f"SELECT position_id, {', '.join(_FIELDS)} FROM protective_orders "
            f"WHERE id IN (SELECT max(id) FROM protective_orders WHERE position_id IN "
            f"({', '.join('?' * len(ids))}) GROUP BY position_id)",
            ids,
        ).fetchall()
    except sqlite3.OperationalError as exc:  # an older database: no such table
        if "no such table" in str(exc):
            return {}
        raise
    return {row[0]: dict(zip(_FIELDS, row[1:], strict=True)) for row in found}


def attach(conn: sqlite3.Connection, legs: Iterable[MutableMapping[str, Any]]) -> None:
    """Set each leg's ``protection`` (None: no protective order)."""
    legs = list(legs)
    found = protections(conn, (leg["position_id"] for leg in legs))
    for leg in legs:
        leg["protection"] = found.get(leg["position_id"])


def protection_text(protection: dict[str, Any] | None) -> str:
    """``PLACED 2508280001 SL-M @104`` / ``TRIGGERED @103.9`` / ``SKIPPED: no stop ...`` / ``—``."""
    if protection is None:
        return ""
    state = protection["state"]
    parts = [state]
    if protection["order_id"]:
        parts.append(str(protection["order_id"]))
    if state == "TRIGGERED" and protection["fill_price"] is not None:
        parts.append(f"filled @{protection['fill_price']:g}")
    elif protection["trigger_price"] is not None and state in ("PLANNED", "PLACED", "DRY_RUN"):
        parts.append(f"{protection['pricetype']} @{protection['trigger_price']:g}")
    text = " ".join(parts)
    if state in ("SKIPPED", "FAILED") and protection["reason"]:
        text += f": {protection['reason']}"
    return text
