"""Verdicts against OpenAlgo positionbooks: pure logic, no daemon."""

from __future__ import annotations

from typing import Any

import pytest

from positiond_client.recovery import (
    CLOSED_AT_BROKER,
    MISMATCH,
    RESUME,
    CrashedLeg,
    KnownLeg,
    verify_positions,
)

CE = "NIFTY28NOV2524000CE"
PE = "NIFTY28NOV2524000PE"


def crashed(
    key: str,
    symbol: str = CE,
    side: str = "SELL",
    quantity: int = 75,
    strategy: str = "expiry_blast",
    product: str = "MIS",
    status: str = "CRASHED",
    session_status: str = "CRASHED",
) -> CrashedLeg:
    return CrashedLeg.from_row(
        {
            "position_id": 1,
            "position_key": key,
            "session_id": 1,
            "strategy_name": strategy,
            "symbol": symbol,
            "exchange": "NFO",
            "product": product,
            "leg_type": symbol[-2:],
            "side": side,
            "quantity": quantity,
            "entry_price": 100.0,
            "entry_time": "2025-11-28T09:20:00.000Z",
            "current_price": 80.0,
            "stop_price": 110.0,
            "highest_price": 100.0,
            "last_trail_level": 2.0,
            "state": {"atm": 24000},
            "status": status,
            "session_status": session_status,
            "was_crashed": 1,
            "crash_timestamp": "2025-11-28T10:00:22.000Z",
            "crash_reason": "process exited (pid 7)",
        }
    )


def book(*rows: tuple[str, str]) -> dict[str, Any]:
    """OpenAlgo's positionbook() response: strings everywhere, signed quantity."""
    return {
        "status": "success",
        "data": [
            {
                "symbol": s,
                "exchange": "NFO",
                "product": "MIS",
                "quantity": q,
                "average_price": "100.00",
                "ltp": "80.05",
                "pnl": "1496.25",
            }
            for s, q in rows
        ],
    }


def verdicts(report: Any) -> dict[str, str]:
    return {v.leg.position_key: v.verdict for v in report.verdicts}


def test_open_leg_resumes_and_flat_leg_was_closed_at_the_broker() -> None:
    legs = [crashed("ce"), crashed("pe", symbol=PE)]
    report = verify_positions(legs, book((CE, "-75"), (PE, "0")))
    assert verdicts(report) == {"ce": RESUME, "pe": CLOSED_AT_BROKER}
    assert report.orphans == []
    assert report.to_dict()["verdicts"][0]["leg"]["stop_price"] == 110.0


def test_a_leg_missing_from_the_book_is_flat() -> None:
    report = verify_positions([crashed("ce")], {"status": "success", "data": []})
    assert verdicts(report) == {"ce": CLOSED_AT_BROKER}


def test_partial_quantity_and_opposite_side_need_review() -> None:
    partial = verify_positions([crashed("ce")], book((CE, "-50")))
    opposite = verify_positions([crashed("ce")], book((CE, "75")))
    assert verdicts(partial) == verdicts(opposite) == {"ce": MISMATCH}
    assert "broker net -50" in partial.verdicts[0].reason


def test_two_strategies_on_one_instrument_are_summed() -> None:
    mine = crashed("ce")  # SELL 75
    other_live = KnownLeg("other-ce", CE, "NFO", "MIS", "SELL", 150, "ACTIVE", "straddle")
    both_open = verify_positions([mine], book((CE, "-225")), [other_live])
    only_other = verify_positions([mine], book((CE, "-150")), [other_live])
    neither = verify_positions([mine], book((CE, "0")), [other_live])
    assert verdicts(both_open) == {"ce": RESUME}
    assert verdicts(only_other) == {"ce": CLOSED_AT_BROKER}
    # Flat at the broker although another strategy's leg is live: that is not explainable.
    assert verdicts(neither) == {"ce": MISMATCH}
    assert (both_open.verdicts[0].broker_quantity, both_open.verdicts[0].known_quantity) == (
        -225,
        -225,
    )


def test_a_manual_position_is_an_orphan_and_unexplained_live_quantity_too() -> None:
    live = KnownLeg("live", PE, "NFO", "MIS", "BUY", 75)
    report = verify_positions(
        [crashed("ce")],
        book((CE, "-75"), ("BANKNIFTY28NOV2552000CE", "30"), (PE, "150")),
        [live],
    )
    assert verdicts(report) == {"ce": RESUME}
    found = {(o.symbol, o.broker_quantity, o.known_quantity) for o in report.orphans}
    assert found == {("BANKNIFTY28NOV2552000CE", 30, 0), (PE, 150, 75)}
    assert report.orphans[0].row["ltp"] == "80.05"


def test_string_numbers_case_and_rows_without_wrapper() -> None:
    rows = [{"symbol": CE.lower(), "exchange": "nfo", "product": "mis", "quantity": " -75.0 "}]
    assert verdicts(verify_positions([crashed("ce")], rows)) == {"ce": RESUME}


@pytest.mark.parametrize(
    ("response", "words"),
    [
        ({"status": "error", "message": "Invalid API key"}, "not a success"),
        ({"status": "success"}, "no 'data'"),
        ({"status": "success", "data": [{"symbol": CE, "exchange": "NFO"}]}, "lacks"),
        (
            {
                "status": "success",
                "data": [{"symbol": CE, "exchange": "NFO", "product": "MIS", "quantity": "lots"}],
            },
            "not a number",
        ),
        (
            {
                "status": "success",
                "data": [{"symbol": CE, "exchange": "NFO", "product": "MIS", "quantity": "7.5"}],
            },
            "whole number",
        ),
        ("not a book", "list of rows"),
    ],
)
def test_a_broken_positionbook_is_refused_never_read_as_flat(response: Any, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        verify_positions([crashed("ce")], response)


def test_product_separates_instruments() -> None:
    report = verify_positions([crashed("ce", product="NRML")], book((CE, "-75")))
    assert verdicts(report) == {"ce": CLOSED_AT_BROKER}
    assert [(o.product, o.broker_quantity) for o in report.orphans] == [("MIS", -75)]


# ---- issue 9 §1: a net is attributed only when nothing uncertain shares the instrument --------


def test_yesterdays_reviewed_leg_on_the_same_contract_makes_todays_crash_a_mismatch() -> None:
    """Reproduced: y-1 NEEDS_REVIEW, t-1 crashed, broker 75: t-1 was CLOSED_AT_BROKER."""
    yesterday = crashed("y-1", side="BUY", status="NEEDS_REVIEW")
    today = crashed("t-1", side="BUY")
    report = verify_positions([today], book((CE, "75")), [yesterday, today])
    assert verdicts(report) == {"t-1": MISMATCH}
    verdict = report.verdicts[0]
    assert "y-1" in verdict.reason and "NEEDS_REVIEW" in verdict.reason
    assert [o["position_key"] for o in verdict.others] == ["y-1"]
    assert report.orphans == []


def test_two_strategies_crashed_on_one_contract_neither_is_attributed() -> None:
    """Whichever recovers first used to get CLOSED_AT_BROKER, the second RESUME."""
    mine = crashed("a-1", side="BUY", strategy="expiry_blast")
    theirs = crashed("b-1", side="BUY", strategy="straddle")
    first = verify_positions([mine], book((CE, "75")), [mine, theirs])
    assert verdicts(first) == {"a-1": MISMATCH}
    assert "b-1" in first.verdicts[0].reason and "straddle" in first.verdicts[0].reason
    # After the first is flagged for review, the second is still not attributable.
    flagged = crashed("a-1", side="BUY", status="NEEDS_REVIEW")
    second = verify_positions([theirs], book((CE, "75")), [flagged, theirs])
    assert verdicts(second) == {"b-1": MISMATCH}


@pytest.mark.parametrize("session_status", ["STALLED", "COMPLETED", "CRASHED"])
def test_an_active_leg_of_a_session_that_is_not_running_is_uncertain(session_status: str) -> None:
    other = crashed("s-1", side="BUY", status="ACTIVE", session_status=session_status)
    mine = crashed("c-1", side="BUY")
    report = verify_positions([mine], book((CE, "75")), [other, mine])
    assert verdicts(report) == {"c-1": MISMATCH}
    assert f"ACTIVE in a {session_status} session" in report.verdicts[0].reason


def test_a_live_leg_is_certain_so_a_same_sized_crashed_leg_is_attributed() -> None:
    live = crashed("live", side="BUY", status="ACTIVE", session_status="RUNNING")
    mine = crashed("c-1", side="BUY")
    assert verdicts(verify_positions([mine], book((CE, "75")), [live, mine])) == {
        "c-1": CLOSED_AT_BROKER
    }
    assert verdicts(verify_positions([mine], book((CE, "150")), [live, mine])) == {
        "c-1": RESUME
    }


def test_a_leg_open_in_every_explanation_resumes_while_its_twins_are_reviewed() -> None:
    """A 75 and B 75 (one of them open), C 50 open: broker 125 forces C, not A or B."""
    a = crashed("a", side="BUY")
    b = crashed("b", side="BUY", status="NEEDS_REVIEW")
    c = crashed("c", side="BUY", quantity=50, strategy="straddle")
    report = verify_positions([a, c], book((CE, "125")), [a, b, c])
    assert verdicts(report) == {"a": MISMATCH, "c": RESUME}
    assert report.verdicts[0].explanations == 2
    flat = verify_positions([a, c], book((CE, "75")), [a, b, c])
    assert verdicts(flat) == {"a": MISMATCH, "c": CLOSED_AT_BROKER}


def test_a_crashed_leg_is_judged_uncertain_even_if_listed_as_live() -> None:
    """The crashed list wins over a stale copy of the same key in the known legs."""
    stale = crashed("c-1", side="BUY", status="ACTIVE", session_status="RUNNING")
    mine = crashed("c-1", side="BUY")
    assert verdicts(verify_positions([mine], book((CE, "0")), [stale])) == {
        "c-1": CLOSED_AT_BROKER
    }


def test_a_reason_naming_many_legs_fits_what_the_daemon_stores() -> None:
    others = [crashed(f"other-{i:02d}-{'x' * 30}", side="BUY", status="NEEDS_REVIEW")
              for i in range(12)]  # fmt: skip
    mine = crashed("c-1", side="BUY")
    [verdict] = verify_positions([mine], book((CE, "75")), [*others, mine]).verdicts
    assert verdict.verdict == MISMATCH and len(verdict.reason) > 500
    assert len(verdict.stored_reason) == 500 and verdict.stored_reason.endswith("…")
