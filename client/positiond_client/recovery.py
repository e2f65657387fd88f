"""Crashed legs and their verification against the broker's positionbook (pure: no I/O).

The broker's positionbook (OpenAlgo ``client.positionbook()``) has no strategy tag: its quantity
for a contract is the account's net across every strategy. So a crashed leg is judged by
comparing, per instrument (symbol, exchange, product), the broker's net quantity with the signed
sum of **every** leg positiond knows open there (ACTIVE, CRASHED or NEEDS_REVIEW, any strategy):

=====================  ==================================================================
verdict                when
=====================  ==================================================================
``RESUME``             broker net == everything positiond knows there: the leg is still open
``CLOSED_AT_BROKER``   broker net == what positiond knows minus the crashed legs there: they
                       were closed at the broker (the exit was missed) — flat is the usual case
``MISMATCH``           anything else (partial quantity, opposite side, unknown fills): a
                       human must look
=====================  ==================================================================

Orphans are broker positions no leg positiond knows can explain: a non-zero net on an instrument
where positiond knows no leg, or an instrument whose live legs (no crashed one) do not add up.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "CLOSED_AT_BROKER",
    "MISMATCH",
    "RESUME",
    "CrashedLeg",
    "KnownLeg",
    "Orphan",
    "Verdict",
    "VerificationReport",
    "parse_positionbook",
    "verify_positions",
]

RESUME = "RESUME"
CLOSED_AT_BROKER = "CLOSED_AT_BROKER"
MISMATCH = "MISMATCH"

Instrument = tuple[str, str, str]


def _instrument(symbol: str, exchange: str, product: str) -> Instrument:
    return (symbol.strip().upper(), exchange.strip().upper(), product.strip().upper())


def _signed(side: str, quantity: int) -> int:
    return quantity if side.upper() == "BUY" else -quantity


@dataclass(frozen=True)
class CrashedLeg:
    """A leg as positiond saved it, with its session's crash; enough to rebuild its monitor."""

    position_id: int
    position_key: str
    session_id: int
    strategy_name: str
    symbol: str
    exchange: str
    product: str
    leg_type: str | None
    side: str
    quantity: int
    entry_price: float
    entry_time: str
    current_price: float | None
    stop_price: float | None
    highest_price: float | None
    last_trail_level: float | None
    state: dict[str, Any]
    status: str
    was_crashed: bool
    crash_timestamp: str | None
    crash_reason: str | None
    review_reason: str | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> CrashedLeg:
        names = cls.__dataclass_fields__
        values: dict[str, Any] = {k: row.get(k) for k in names}
        values["state"] = dict(row.get("state") or {})
        values["was_crashed"] = bool(row.get("was_crashed"))
        return cls(**values)

    @property
    def key(self) -> str:
        """The position key (what every client call takes as the leg handle)."""
        return self.position_key

    @property
    def instrument(self) -> Instrument:
        return _instrument(self.symbol, self.exchange, self.product)

    @property
    def signed_quantity(self) -> int:
        return _signed(self.side, self.quantity)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class KnownLeg:
    """Any leg positiond knows to be open (ACTIVE, CRASHED, NEEDS_REVIEW), of any strategy."""

    position_key: str
    symbol: str
    exchange: str
    product: str
    side: str
    quantity: int
    status: str = "ACTIVE"
    strategy_name: str | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> KnownLeg:
        return cls(**{k: row[k] for k in cls.__dataclass_fields__ if k in row})

    @property
    def instrument(self) -> Instrument:
        return _instrument(self.symbol, self.exchange, self.product)

    @property
    def signed_quantity(self) -> int:
        return _signed(self.side, self.quantity)


@dataclass(frozen=True)
class Verdict:
    leg: CrashedLeg
    verdict: str  # RESUME, CLOSED_AT_BROKER, MISMATCH
    broker_quantity: int  # signed net at the broker for the leg's instrument
    known_quantity: int  # signed sum of every open leg positiond knows there
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "leg": self.leg.to_dict(),
            "verdict": self.verdict,
            "broker_quantity": self.broker_quantity,
            "known_quantity": self.known_quantity,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Orphan:
    symbol: str
    exchange: str
    product: str
    broker_quantity: int
    known_quantity: int
    row: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class VerificationReport:
    """One verdict per crashed leg, and the orphans; ``to_dict()`` is ``posctl verify --json``."""

    verdicts: list[Verdict]
    orphans: list[Orphan]
    # Filled by auto-recovery (start_session(recover=True)): what was done about each verdict.
    actions: dict[str, str] = field(default_factory=dict)
    adopted: dict[str, Any] = field(default_factory=dict)  # position_key -> Leg handle
    session_id: int | None = None

    def by_verdict(self, verdict: str) -> list[Verdict]:
        return [v for v in self.verdicts if v.verdict == verdict]

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdicts": [v.to_dict() for v in self.verdicts],
            "orphans": [o.to_dict() for o in self.orphans],
            **({"actions": dict(self.actions)} if self.actions else {}),
        }


def _quantity(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{where}: quantity {value!r} is not a number")
    try:
        number = float(str(value).strip())
    except ValueError:
        raise ValueError(f"{where}: quantity {value!r} is not a number") from None
    if not math.isfinite(number) or number != int(number):
        raise ValueError(f"{where}: quantity {value!r} is not a whole number")
    return int(number)


def parse_positionbook(book: Any) -> dict[Instrument, tuple[int, list[dict[str, Any]]]]:
    """OpenAlgo's ``positionbook()`` response (or its list of rows) -> net quantity per instrument.

    A response whose ``status`` is not ``success`` is refused: an error must never read as
    "flat at the broker", which would close legs that are still open.
    """
    if isinstance(book, Mapping):
        status = book.get("status", "success")
        if status != "success":
            raise ValueError(f"positionbook response is not a success: {dict(book)!r:.300}")
        rows = book.get("data")
        if rows is None:
            raise ValueError("positionbook response has no 'data'")
    else:
        rows = book
    if not isinstance(rows, Sequence) or isinstance(rows, (str, bytes)):
        raise ValueError("positionbook 'data' must be a list of rows")
    net: dict[Instrument, tuple[int, list[dict[str, Any]]]] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"positionbook row {i} is not an object")
        missing = [k for k in ("symbol", "exchange", "product", "quantity") if k not in row]
        if missing:
            raise ValueError(f"positionbook row {i} lacks {', '.join(missing)}")
        inst = _instrument(str(row["symbol"]), str(row["exchange"]), str(row["product"]))
        qty = _quantity(row["quantity"], f"positionbook row {i}")
        total, seen = net.get(inst, (0, []))
        net[inst] = (total + qty, [*seen, dict(row)])
    return net


def verify_positions(
    crashed: Iterable[CrashedLeg],
    positionbook: Any,
    known_open: Iterable[KnownLeg | CrashedLeg] = (),
) -> VerificationReport:
    """Judge each crashed leg against the positionbook (see the module docstring).

    ``known_open``: every other leg positiond knows open (any strategy); the crashed legs are
    added to it, duplicates by position key counted once.
    """
    crashed = list(crashed)
    book = parse_positionbook(positionbook)
    legs: dict[str, KnownLeg | CrashedLeg] = {leg.position_key: leg for leg in known_open}
    legs.update({leg.position_key: leg for leg in crashed})
    known: dict[Instrument, int] = {}
    crashed_sum: dict[Instrument, int] = {}
    for leg in legs.values():
        known[leg.instrument] = known.get(leg.instrument, 0) + leg.signed_quantity
    for leg in crashed:
        crashed_sum[leg.instrument] = crashed_sum.get(leg.instrument, 0) + leg.signed_quantity

    verdicts = []
    for leg in crashed:
        inst = leg.instrument
        broker = book.get(inst, (0, []))[0]
        mine = known[inst]
        live = mine - crashed_sum[inst]
        if broker == mine:
            verdict, why = RESUME, f"broker net {broker} matches the {mine} positiond knows"
        elif broker == live:
            verdict = CLOSED_AT_BROKER
            why = f"broker net {broker}: the crashed legs ({crashed_sum[inst]}) are not there"
        else:
            verdict = MISMATCH
            why = (
                f"broker net {broker}, positiond knows {mine} "
                f"({crashed_sum[inst]} in crashed legs): review by hand"
            )
        verdicts.append(Verdict(leg, verdict, broker, mine, why))

    orphans = []
    for inst, (broker, rows) in sorted(book.items()):
        mine = known.get(inst, 0)
        has_legs = inst in known
        if broker == 0 or (has_legs and (broker == mine or inst in crashed_sum)):
            continue  # flat, explained, or already judged through a crashed leg's verdict
        symbol, exchange, product = inst
        orphans.append(Orphan(symbol, exchange, product, broker, mine, rows[-1]))
    return VerificationReport(verdicts, orphans)
