"""posctl's tables at real terminal widths: no number is ever cut, no line is wider than the
terminal, no column silently vanishes — with the long default position keys
(``SYMBOL-<16 hex>``) the client library makes. Pure: rich renders into a string."""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console, RenderableType

from positiond.ctl import render

WIDTHS = (80, 100, 120)
SYMBOLS = ("NIFTY28NOV2524000CE", "BANKNIFTY28NOV2552000PE")


def leg(i: int, symbol: str, **over: Any) -> dict[str, Any]:
    base = {
        "position_id": 1000 + i,
        "position_key": f"{symbol}-3f9a0c1d2e3f4a{i:02d}",  # core.py's default key shape
        "session_id": 4321,
        "strategy_name": "expiry_blast_weekly",
        "symbol": symbol,
        "exchange": "NFO",
        "product": "NRML",
        "leg_type": symbol[-2:],
        "side": "SELL",
        "quantity": 1875,
        "entry_price": 98765.25,
        "entry_time": "2025-11-28T04:00:22.123Z",
        "current_price": 351.75,
        "stop_price": 344.3,
        "highest_price": 1234567.5,
        "last_trail_level": 2.5,
        "status": "CRASHED",
        "exit_price": None,
        "exit_reason": None,
        "review_reason": None,
        "session_status": "CRASHED",
        "crash_timestamp": "2025-11-28T04:10:22.123Z",
        "crash_reason": "process exited (pid 4321)",
    }
    return base | over


LEGS = [leg(i, s) for i, s in enumerate(SYMBOLS)]
NUMBERS = ["1875", "98,765.25", "344.30", "1,234,567.50", "2.5", "351.75"]


def shown(width: int, renderables: Sequence[RenderableType]) -> str:
    buf = io.StringIO()
    out = Console(file=buf, width=width, highlight=False, soft_wrap=False, color_system=None)
    for item in renderables:
        out.print(item)
    return buf.getvalue()


def console(width: int) -> Console:
    return Console(file=io.StringIO(), width=width, color_system=None)


def whole(text: str, number: str) -> int:
    """How many times ``number`` appears as a whole token (not a piece of a longer number)."""
    return len(re.findall(rf"(?<![\w.,#]){re.escape(number)}(?![\w.,])", text))


def check(text: str, width: int, numbers: Sequence[str], times: int) -> None:
    for line in text.splitlines():
        assert len(line.rstrip()) <= width, f"line wider than {width}: {line!r}"
    for number in numbers:
        assert whole(text, number) >= times, f"{number} not shown whole {times}x:\n{text}"


Table = Callable[[Console], list[RenderableType]]
CRASH = {"strategy_name": "expiry_blast_weekly", "session_id": 4321,
         "crash_timestamp": "2025-11-28T04:10:22.123Z", "crash_reason": "process exited",
         "client_host": "trading-box-01", "client_pid": 4321, "legs": LEGS}  # fmt: skip
VERDICT = {
    "verdict": "MISMATCH",
    "broker_quantity": -937,
    "known_quantity": -1875,
    "reason": "broker net -937, positiond knows -1875 (-1875 in crashed legs): review",
}
ORPHAN = {"id": 1077, "symbol": "FINNIFTY28NOV2523500PE", "exchange": "NFO", "product": "NRML",
          "broker_quantity": -40125, "known_quantity": 0, "status": "ORPHANED",
          "detected_at": "2025-11-28T04:20:00.000Z", "detected_by": "posctl alice@trading-box-01",
          "resolved_at": None, "resolved_by": None, "resolution_reason": None,
          "adopted_by": None}  # fmt: skip
SESSION = {"id": 4321, "strategy_name": "expiry_blast_weekly", "status": "CRASHED",
           "start_time": "2025-11-28T03:45:00.000Z", "end_time": None,
           "crash_timestamp": "2025-11-28T04:10:22.123Z", "crash_reason": "missed heartbeats",
           "open_legs": 0, "crashed_legs": 1875, "all_legs": 99999,
           "client_host": "trading-box-01", "client_pid": 123456}  # fmt: skip
EVENT = {
    "id": 98765,
    "event_time": "2025-11-28T04:00:22.123Z",
    "event_type": "TRAIL_UPDATE",
    "session_id": 4321,
    "payload": {"stop_price": [300.5, 344.3], "price": 1234567.5},
}


def attention(c: Console) -> list[RenderableType]:
    review = leg(5, SYMBOLS[0], status="NEEDS_REVIEW", review_reason=VERDICT["reason"])
    stranded = leg(6, SYMBOLS[1], status="ACTIVE", session_status="COMPLETED")
    data = {"crashes": [CRASH], "needs_review": [review], "open_in_finished": [stranded],
            "orphans": [ORPHAN]}  # fmt: skip
    return render.attention_tables(c, data)


def positions(c: Console) -> list[RenderableType]:
    closed = leg(3, SYMBOLS[0], status="CLOSED", exit_reason="CLOSED_AT_BROKER")
    return [render.positions_table(c, [*LEGS, closed])]


# table -> (what to render, the numbers that must appear whole, at least how many times each)
CASES: dict[str, tuple[Table, list[str], int]] = {
    "crashed": (lambda c: render.crashed_tables(c, [CRASH]), NUMBERS, 2),
    "attention": (attention, ["1875", "344.30", "2.5", "-40125", "#1077"], 1),
    "positions": (positions, NUMBERS, 3),
    "sessions": (
        lambda c: [render.sessions_table(c, [SESSION] * 2)],
        ["4321", "0/1875/99999", "123456"],
        2,
    ),
    "events": (lambda c: [render.events_table(c, LEGS[0], [EVENT] * 2)], ["98765", "4321"], 2),
    "verify": (
        lambda c: [render.verify_table(c, [VERDICT | {"leg": x} for x in LEGS])],
        ["1875", "-937", "-1875"],
        2,
    ),
    "orphans": (lambda c: [render.orphan_records_table(c, [ORPHAN] * 2)], ["-40125", "#1077"], 2),
}


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_every_number_whole_and_every_line_fits(name: str, width: int) -> None:
    build, numbers, times = CASES[name]
    text = shown(width, build(console(width)))
    check(text, width, numbers, times)


@pytest.mark.parametrize("width", WIDTHS)
def test_crashed_legs_show_every_level_and_their_id_first(width: int) -> None:
    text = shown(width, render.crashed_tables(console(width), [CRASH]))
    for name in ("entry", "stop", "highest", "trail", "last", "qty"):
        assert name in text, f"column {name} missing at {width}"  # nothing vanishes silently
    for x in LEGS:
        assert f"#{x['position_id']}" in text
        # The key may fold (over the lines of its table cell), but all of it is there, in order.
        key = x["position_key"]
        start = text.index(f"#{x['position_id']}")
        lines = text[start:].splitlines()[:6]
        assert key in text or key in "".join(line.split(" ")[0] for line in lines)


def test_a_wide_terminal_gets_a_table_and_a_narrow_one_blocks() -> None:
    wide = shown(200, render.crashed_tables(console(200), [CRASH]))
    assert "─" in wide and "highest" in wide.splitlines()[1]  # one header row
    narrow = shown(80, render.crashed_tables(console(80), [CRASH]))
    assert "─" not in narrow and narrow.count("highest 1,234,567.50") == 2  # label value


def test_an_unknown_exit_price_is_said_plainly() -> None:
    closed = leg(1, SYMBOLS[0], status="CLOSED", exit_reason="CLOSED_AT_BROKER")
    text = shown(240, [render.positions_table(console(240), [closed])])
    assert "CLOSED_AT_BROKER, exit price unknown" in text and "at —" not in text
    priced = closed | {"exit_price": 344.3, "exit_reason": "MANUAL_EXIT"}
    assert "MANUAL_EXIT at 344.30" in shown(240, [render.positions_table(console(240), [priced])])


KEY_CHARS = st.characters(min_codepoint=33, max_codepoint=126)


@settings(max_examples=150, deadline=None)
@given(
    width=st.integers(40, 220),
    quantity=st.integers(1, 10**9),
    stop=st.integers(1, 10**10).map(lambda c: c / 100),
    highest=st.integers(1, 10**10).map(lambda c: c / 100),
    key=st.text(KEY_CHARS, min_size=1, max_size=128),
    reason=st.text(st.sampled_from("abc de-f 0123456789"), max_size=300),
)
def test_property_no_width_cuts_a_number(
    width: int, quantity: int, stop: float, highest: float, key: str, reason: str
) -> None:
    legs = [
        leg(0, SYMBOLS[0], quantity=quantity, stop_price=stop, highest_price=highest,
            position_key=key, review_reason=reason, status="NEEDS_REVIEW"),
        leg(1, SYMBOLS[1]),
    ]  # fmt: skip
    crash = CRASH | {"legs": legs}
    numbers = [str(quantity), render.price(stop), render.price(highest)]
    for tables in (
        render.crashed_tables(console(width), [crash]),
        [render.positions_table(console(width), legs)],
    ):
        text = shown(width, tables)
        check(text, width, numbers, 1)
        assert "#1000" in text and "#1001" in text
