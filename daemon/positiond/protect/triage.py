"""What to do for one newly crashed leg (pure): plan an order, skip it, or fail it.

The positionbook is judged with the recovery rules (positiond_client.recovery.verify_positions):
the leg must be open at the broker in every explanation of the book (``RESUME``) to be
protected; closed at the broker -> SKIPPED; ambiguous (``MISMATCH``) -> SKIPPED and the leg
flagged NEEDS_REVIEW; a refused or unreadable book -> FAILED (never placed blind).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from positiond.openalgo import OpenAlgoError
from positiond.protect.plan import Order, describe, plan_order
from positiond.protect.settings import ProtectConfig
from positiond_client.recovery import (
    CLOSED_AT_BROKER,
    RESUME,
    CrashedLeg,
    verify_positions,
)

__all__ = ["Triage", "triage"]


@dataclass(frozen=True, slots=True)
class Triage:
    state: str  # PLANNED, DRY_RUN, SKIPPED, FAILED
    event: str  # PROTECT_PLANNED, PROTECT_SKIPPED, PROTECT_FAILED
    reason: str
    order: Order | None = None
    review: bool = False  # flag the leg NEEDS_REVIEW


def triage(
    leg: Mapping[str, Any],
    config: ProtectConfig,
    *,
    inside: bool,
    book: Any,
    open_legs: Sequence[Mapping[str, Any]],
) -> Triage:
    """The decision for ``leg`` (a crashed leg row). ``inside``: within the trading window;
    ``book``: the positionbook reply, or the OpenAlgoError that refused it; ``open_legs``:
    every open leg (``query what=open`` rows) for the verdict."""
    order = plan_order(leg, config)
    if order is None:
        return Triage("SKIPPED", "PROTECT_SKIPPED",
                      "no stop saved for this leg: NOT protected, no order placed")  # fmt: skip
    if not inside:
        return Triage(
            "SKIPPED", "PROTECT_SKIPPED",
            f"outside the trading window {config.trading_window} ({config.timezone}): no order "
            "placed (none is placed later by itself; the leg is NOT protected)",
            order,
        )  # fmt: skip
    if isinstance(book, OpenAlgoError):
        return Triage(
            "FAILED", "PROTECT_FAILED",
            f"the positionbook was refused for {config.retry_for:g}s ({book.message}): no order "
            "placed blind; the leg is NOT protected",
            order,
        )  # fmt: skip
    crashed = CrashedLeg.from_row({**leg, "status": "CRASHED"})
    known = [CrashedLeg.from_row(row) for row in open_legs]
    try:
        verdict = verify_positions([crashed], book, known).verdicts[0]
    except ValueError as exc:
        return Triage("FAILED", "PROTECT_FAILED",
                      f"the positionbook is unreadable ({exc}): no order placed; the leg is NOT "
                      "protected", order)  # fmt: skip
    if verdict.verdict == RESUME:
        if config.mode == "dry-run":
            return Triage("DRY_RUN", "PROTECT_PLANNED",
                          f"dry-run: would place {describe(order)}", order)  # fmt: skip
        return Triage("PLANNED", "PROTECT_PLANNED", describe(order), order)
    if verdict.verdict == CLOSED_AT_BROKER:
        return Triage(
            "SKIPPED",
            "PROTECT_SKIPPED",
            f"closed at the broker, no order placed: {verdict.reason}",
            order,
        )
    return Triage(
        "SKIPPED", "PROTECT_SKIPPED",
        f"ambiguous at the broker, no order placed, leg flagged NEEDS_REVIEW: {verdict.reason}",
        order, review=True,
    )  # fmt: skip
