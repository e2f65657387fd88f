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
            "status": "CRASHED",
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
