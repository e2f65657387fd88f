"""Crashed legs and their verification against the broker's positionbook (pure: no I/O).

The broker's positionbook (OpenAlgo ``client.positionbook()``) has no strategy tag: its quantity
for a contract is the account's net across every strategy. So a net can only be attributed to a
leg when nothing else uncertain shares the instrument (symbol, exchange, product).

Legs positiond knows open on an instrument are of two kinds:

- **certain**: ``ACTIVE`` in a session that is alive now (``RUNNING``): its strategy manages it,
  it is at the broker;
- **uncertain**: ``CRASHED`` (any strategy), ``NEEDS_REVIEW``, and ``ACTIVE`` legs of a session
  that is not ``RUNNING`` (``STALLED``, or a session that ended or crashed with the leg open):
  nobody is watching them, each may or may not still be at the broker.

An *explanation* of an instrument's broker net is a choice of which uncertain legs are still open
such that the certain legs plus those add up to the net exactly. Every uncertain leg of the
instrument is judged together, and each crashed leg gets:

=====================  ==================================================================
verdict                when
=====================  ==================================================================
``RESUME``             the leg is open in **every** explanation (with nothing else uncertain
                       there: broker net == everything positiond knows)
``CLOSED_AT_BROKER``   the leg is open in **no** explanation (the usual case: flat at the broker,
                       the exit was missed)
``MISMATCH``           no explanation at all (partial quantity, opposite side, a manual trade),
                       or explanations both with and without the leg (another uncertain leg of
                       the same size shares the instrument): a human must look; the reason
                       names the other legs involved
=====================  ==================================================================

So, whatever the truth at the broker, verification never calls a leg that is open there
``CLOSED_AT_BROKER`` and never calls a leg that is closed there ``RESUME``, as long as the
broker's net on the instrument is made of whole legs positiond knows; when the book cannot tell
two legs apart, both are ``MISMATCH``. (A position opened by hand on the same instrument is
outside that model: it can only show up as an orphan or a mismatch.)

Orphans are broker positions no explanation covers: a non-zero net on an instrument where no
choice of the legs positiond knows adds up to it, and no crashed leg under verification sits.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from positiond_client.handles import Protection

__all__ = [
    "CLOSED_AT_BROKER",
    "MISMATCH",
    "RESUME",
    "Attribution",
    "CrashedLeg",
    "KnownLeg",
    "Orphan",
    "Verdict",
    "VerificationReport",
    "attribute",
    "parse_positionbook",
    "stranded",
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


def _certain(status: str, session_status: str | None) -> bool:
    return status == "ACTIVE" and session_status == "RUNNING"


FINISHED_SESSION_STATUSES = ("COMPLETED", "CRASHED")


def stranded(legs: Iterable[CrashedLeg], strategy: str | None = None) -> list[CrashedLeg]:
    """Legs left ACTIVE by a session that is over (it ended with them open, e.g. on a requested
    stop): nobody manages them, so recovery judges and adopts them like crashed legs.
    ``strategy``: only that strategy's."""
    return [
        leg for leg in legs
        if leg.status == "ACTIVE"
        and leg.session_status in FINISHED_SESSION_STATUSES
        and strategy in (None, leg.strategy_name)
    ]  # fmt: skip


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
    # The status of the session the leg belongs to (RUNNING, STALLED, CRASHED, COMPLETED):
    # an ACTIVE leg is certain at the broker only while its session is RUNNING.
    session_status: str | None = None
    # The protective stop order positiond placed for it at the broker (None: none).
    protection: Protection | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> CrashedLeg:
        names = cls.__dataclass_fields__
        values: dict[str, Any] = {k: row.get(k) for k in names}
        values["state"] = dict(row.get("state") or {})
        values["was_crashed"] = bool(row.get("was_crashed"))
        values["protection"] = Protection.from_wire(row.get("protection"))
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

    @property
    def certain(self) -> bool:
        """At the broker for sure: ACTIVE in a session that is alive now."""
        return _certain(self.status, self.session_status)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class KnownLeg:
    """Any leg known to be open (ACTIVE, CRASHED, NEEDS_REVIEW), of any strategy.

    ``session_status`` defaults to ``RUNNING``: a leg you describe yourself as ``ACTIVE`` is taken
    as managed by a live strategy (certain at the broker); pass the real status when it is not.
    """

    position_key: str
    symbol: str
    exchange: str
    product: str
    side: str
    quantity: int
    status: str = "ACTIVE"
    strategy_name: str | None = None
    session_status: str | None = "RUNNING"

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> KnownLeg:
        return cls(**{k: row[k] for k in cls.__dataclass_fields__ if k in row})

    @property
    def instrument(self) -> Instrument:
        return _instrument(self.symbol, self.exchange, self.product)

    @property
    def signed_quantity(self) -> int:
        return _signed(self.side, self.quantity)

    @property
    def certain(self) -> bool:
        """At the broker for sure: ACTIVE in a session that is alive now."""
        return _certain(self.status, self.session_status)


REASON_LIMIT = 500  # what the protocol stores of a reason (resolve's ``reason``: text(500))


@dataclass(frozen=True)
class Verdict:
    leg: CrashedLeg
    verdict: str  # RESUME, CLOSED_AT_BROKER, MISMATCH
    broker_quantity: int  # signed net at the broker for the leg's instrument
    known_quantity: int  # signed sum of every open leg positiond knows there
    reason: str
    live_quantity: int = 0  # signed sum of the certain legs there (ACTIVE in a RUNNING session)
    # The other uncertain legs on the instrument: key, status, strategy, signed quantity.
    others: tuple[dict[str, Any], ...] = ()
    explanations: int = 1  # 0: none, 1: exactly one, 2: two or more

    @property
    def stored_reason(self) -> str:
        """The reason cut to what the daemon stores (a review reason, an exit's audit)."""
        if len(self.reason) <= REASON_LIMIT:
            return self.reason
        return self.reason[: REASON_LIMIT - 1] + "…"

    def to_dict(self) -> dict[str, Any]:
        return {
            "leg": self.leg.to_dict(),
            "verdict": self.verdict,
            "broker_quantity": self.broker_quantity,
            "known_quantity": self.known_quantity,
            "live_quantity": self.live_quantity,
            "others": [dict(o) for o in self.others],
            "explanations": self.explanations,
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


# Beyond this many distinct partial sums on one instrument nothing there is attributed (MISMATCH):
# far more uncertain legs than a desk ever has on one contract.
MAX_PARTIAL_SUMS = 1 << 16

AnyLeg = KnownLeg | CrashedLeg


@dataclass(frozen=True)
class Attribution:
    """How the uncertain legs of one instrument can explain its broker net (see ``attribute``)."""

    explanations: int  # subsets of the uncertain legs that add up to the rest: 0, 1, 2 (= 2+)
    can_be_open: tuple[bool, ...]  # per uncertain leg: open in at least one explanation
    can_be_closed: tuple[bool, ...]  # per uncertain leg: closed in at least one explanation


def _partial_sums(quantities: Sequence[int]) -> list[dict[int, int]] | None:
    """[i] -> {sum of a subset of quantities[:i]: number of such subsets, capped at 2}."""
    sums: list[dict[int, int]] = [{0: 1}]
    for q in quantities:
        prev = sums[-1]
        nxt = dict(prev)
        for total, count in prev.items():
            nxt[total + q] = min(2, nxt.get(total + q, 0) + count)
        if len(nxt) > MAX_PARTIAL_SUMS:
            return None
        sums.append(nxt)
    return sums


def attribute(quantities: Sequence[int], target: int) -> Attribution | None:
    """Which subsets of the uncertain legs' signed quantities add up to ``target``, per leg.

    Exact, by partial sums from both ends (no enumeration of subsets); ``None`` when there are
    too many distinct sums to tell.
    """
    prefix = _partial_sums(quantities)
    suffix = _partial_sums(quantities[::-1])
    if prefix is None or suffix is None:
        return None
    n = len(quantities)
    can_open: list[bool] = []
    can_close: list[bool] = []
    for i, q in enumerate(quantities):
        before, after = prefix[i], suffix[n - 1 - i]
        small, large = (before, after) if len(before) <= len(after) else (after, before)
        can_close.append(any(target - s in large for s in small))
        can_open.append(any(target - q - s in large for s in small))
    return Attribution(prefix[n].get(target, 0), tuple(can_open), tuple(can_close))


def _describe(leg: AnyLeg) -> dict[str, Any]:
    return {
        "position_key": leg.position_key,
        "status": leg.status,
        "session_status": leg.session_status,
        "strategy_name": leg.strategy_name,
        "quantity": leg.signed_quantity,
    }


def _named(others: Sequence[dict[str, Any]]) -> str:
    def one(o: dict[str, Any]) -> str:
        status = o["status"]
        if status == "ACTIVE":
            status = f"ACTIVE in a {o['session_status'] or 'finished'} session"
        who = f", {o['strategy_name']}" if o["strategy_name"] else ""
        return f"{o['position_key']} ({status}{who}, {o['quantity']:+d})"

    return "; ".join(one(o) for o in others)


@dataclass
class _Instrument:
    """Every leg positiond knows on one instrument, and the broker's net there."""

    broker: int
    certain: list[AnyLeg] = field(default_factory=list)
    uncertain: list[AnyLeg] = field(default_factory=list)
    _attribution: Attribution | None = None
    _judged: bool = False

    @property
    def live(self) -> int:
        return sum(leg.signed_quantity for leg in self.certain)

    @property
    def known(self) -> int:
        return self.live + sum(leg.signed_quantity for leg in self.uncertain)

    def attribution(self) -> Attribution | None:
        if not self._judged:
            quantities = [leg.signed_quantity for leg in self.uncertain]
            self._attribution = attribute(quantities, self.broker - self.live)
            self._judged = True
        return self._attribution

    def explained(self) -> bool:
        found = self.attribution()
        return found is not None and found.explanations > 0

    def judge(self, leg: CrashedLeg) -> Verdict:
        index = next(i for i, u in enumerate(self.uncertain) if u.position_key == leg.position_key)
        others = tuple(_describe(u) for i, u in enumerate(self.uncertain) if i != index)
        broker, live, known = self.broker, self.live, self.known
        rest = broker - live
        also = f"; other uncertain legs there: {_named(others)}" if others else ""
        found = self.attribution()
        if found is None:
            return Verdict(
                leg, MISMATCH, broker, known,
                f"broker net {broker}: too many uncertain legs on {leg.symbol} to attribute it "
                f"(more than {MAX_PARTIAL_SUMS} combinations): review by hand{also}",
                live, others, 2,
            )  # fmt: skip
        count = found.explanations
        if count == 0:
            verdict = MISMATCH
            why = (
                f"broker net {broker}, positiond knows {known} ({live} in live legs): no "
                f"combination of the uncertain legs adds up to the rest ({rest}): partial fill, "
                f"opposite side or a trade positiond does not know — review by hand{also}"
            )
        elif found.can_be_open[index] and not found.can_be_closed[index]:
            verdict = RESUME
            why = (
                f"broker net {broker} matches the {known} positiond knows"
                if not others and count == 1 and rest == known - live
                else f"broker net {broker} ({live} in live legs) is explained only with this "
                f"leg open{also}"
            )
        elif found.can_be_closed[index] and not found.can_be_open[index]:
            verdict = CLOSED_AT_BROKER
            why = (
                f"broker net {broker} ({live} in live legs) leaves no room for this leg "
                f"({leg.signed_quantity:+d}): it is not there{also}"
            )
        else:
            verdict = MISMATCH
            why = (
                f"broker net {broker} ({live} in live legs) is explained both with and without "
                f"this leg ({leg.signed_quantity:+d}): the book cannot tell it from "
                f"{_named(others)} — review by hand"
            )
        return Verdict(leg, verdict, broker, known, why, live, others, min(count, 2))


def verify_positions(
    crashed: Iterable[CrashedLeg],
    positionbook: Any,
    known_open: Iterable[AnyLeg] = (),
) -> VerificationReport:
    """Judge each crashed leg against the positionbook (see the module docstring).

    ``known_open``: every other leg positiond knows open (any strategy, with its session's
    status); the crashed legs are added to it, duplicates by position key counted once. A crashed
    leg is always judged as uncertain, whatever ``known_open`` says of it.
    """
    crashed = list(crashed)
    book = parse_positionbook(positionbook)
    legs: dict[str, AnyLeg] = {leg.position_key: leg for leg in known_open}
    legs.update({leg.position_key: leg for leg in crashed})
    judged = {leg.position_key for leg in crashed}
    instruments: dict[Instrument, _Instrument] = {}
    for key in sorted(legs):
        leg = legs[key]
        broker = book.get(leg.instrument, (0, []))[0]
        inst = instruments.setdefault(leg.instrument, _Instrument(broker))
        if leg.certain and key not in judged:
            inst.certain.append(leg)
        else:
            inst.uncertain.append(leg)

    verdicts = [instruments[leg.instrument].judge(leg) for leg in crashed]

    orphans = []
    crashed_instruments = {leg.instrument for leg in crashed}
    for inst_key, (broker, rows) in sorted(book.items()):
        if broker == 0 or inst_key in crashed_instruments:
            continue  # flat, or already judged through a crashed leg's verdict
        inst = instruments.get(inst_key) or _Instrument(broker)
        if inst.explained():
            continue
        symbol, exchange, product = inst_key
        orphans.append(Orphan(symbol, exchange, product, broker, inst.known, rows[-1]))
    return VerificationReport(verdicts, orphans)
