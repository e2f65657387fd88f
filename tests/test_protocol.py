"""The wire contract: what decodes, what is refused and with which code."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from positiond_client.errors import ProtocolError
from positiond_client.protocol import MAX_MESSAGE_BYTES, check_fields, decode, encode, validate

ENTRY = {
    "v": 1,
    "type": "entry",
    "seq": 4,
    "session": "abc",
    "key": "ce-1",
    "symbol": "X",
    "exchange": "NFO",
    "product": "MIS",
    "side": "SELL",
    "quantity": 75,
    "entry_price": 100.5,
}


def refused(msg: Any) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode(msg if isinstance(msg, bytes) else orjson.dumps(msg))
    return info.value


def test_round_trip_of_every_type() -> None:
    base = {"v": 1, "session": "abc"}
    messages = [
        {
            **base,
            "type": "start",
            "seq": 1,
            "strategy": "expiry_blast",
            "pid": 5,
            "host": "h",
            "heartbeat_interval": 0.5,
            "time": 1.7e9,
        },
        ENTRY | {"stop_price": None, "state": {"atm": 24000, "nested": {"a": [1, 2]}}},
        {**base, "type": "update", "key": "ce-1", "stop_price": 95, "last_trail_level": -1.5},
        {
            **base,
            "type": "exit",
            "seq": 5,
            "key": "ce-1",
            "exit_reason": "STOP_HIT",
            "exit_price": None,
            "stop_price": 95.0,
        },
        {
            **base,
            "type": "crash",
            "seq": 6,
            "error_type": "KeyError",
            "message": "",
            "traceback": "t",
        },
        {**base, "type": "end", "seq": 7},
        {**base, "type": "sync", "seq": 8},
        {**base, "type": "hb"},
    ]
    for msg in messages:
        assert decode(encode(msg)) == msg


@pytest.mark.parametrize(
    ("change", "code", "words"),
    [
        ({"quantity": -75}, "BAD_FIELD", "entry.quantity"),
        ({"quantity": 1.5}, "BAD_FIELD", "integer"),
        ({"quantity": True}, "BAD_FIELD", "integer"),
        ({"entry_price": -1.0}, "BAD_FIELD", "entry.entry_price"),
        ({"entry_price": "100"}, "BAD_FIELD", "number"),
        ({"side": "buy"}, "BAD_FIELD", "BUY, SELL"),
        ({"symbol": ""}, "BAD_FIELD", "1..64"),
        ({"symbol": "x" * 65}, "BAD_FIELD", "1..64"),
        ({"symbol": "NIFTY\n"}, "BAD_FIELD", "not allowed"),
        ({"session": "a b"}, "BAD_FIELD", "not allowed"),
        ({"seq": 0}, "BAD_FIELD", "seq"),
        ({"state": [1]}, "BAD_FIELD", "object"),
        ({"colour": "red"}, "BAD_FIELD", "unknown field 'colour'"),
        ({"type": "teleport"}, "BAD_TYPE", "teleport"),
        ({"v": 2}, "BAD_VERSION", "version 2"),
    ],
)
def test_bad_fields_are_named(change: dict[str, Any], code: str, words: str) -> None:
    error = refused(ENTRY | change)
    assert error.code == code and words in error.reason
    assert isinstance(error, ValueError)


def test_missing_fields_and_the_seq_of_a_refused_message() -> None:
    msg = dict(ENTRY)
    del msg["symbol"], msg["side"]
    error = refused(msg)
    assert "missing field(s) side, symbol" in error.reason and error.seq == 4
    empty_update = {"v": 1, "type": "update", "session": "abc", "key": "k"}
    assert "names no field" in refused(empty_update).reason


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b"[]",
        b'"text"',
        b"null",
        b'{"v":1,"type":"hb","session":"s","x":NaN}',
        b'{"v":1,"type":"update","session":"s","key":"k","stop_price":Infinity}',
        b"\xff\xfe",
    ],
)
def test_unparseable_bytes_are_bad_messages(raw: bytes) -> None:
    assert refused(raw).code == "BAD_MESSAGE"


def test_nan_and_infinity_that_reach_validation_are_refused() -> None:
    for value in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ProtocolError, match="finite"):
            validate({"v": 1, "type": "update", "session": "s", "key": "k", "stop_price": value})


def test_oversized_message_is_refused_before_parsing() -> None:
    big = {
        "v": 1,
        "type": "update",
        "session": "s",
        "key": "k",
        "state": {"x": "y" * MAX_MESSAGE_BYTES},
    }
    error = refused(big)
    assert error.code == "BAD_MESSAGE" and "exceeds" in error.reason


def test_check_fields_checks_only_what_is_given() -> None:
    check_fields("update", {"stop_price": 1.0})
    with pytest.raises(ProtocolError, match="stop_price must be finite"):
        check_fields("update", {"stop_price": float("nan")})
    with pytest.raises(ProtocolError, match="unknown field"):
        check_fields("update", {"stopprice": 1.0})


def test_unhashable_enum_values_and_deep_state_are_field_errors() -> None:
    for change in ({"side": ["BUY"]}, {"side": {"x": 1}}):
        assert refused(ENTRY | change).code == "BAD_FIELD"
    deep: dict[str, Any] = {}
    inner = deep
    for _ in range(40):
        inner["a"] = inner = {}
    assert "nests deeper" in refused(ENTRY | {"state": deep}).reason
    assert decode(encode(ENTRY | {"state": {"a": {"b": [1, {"c": 2}]}}}))["state"]["a"]["b"][1]


def test_the_size_limit_is_the_callers() -> None:
    hb = encode({"v": 1, "type": "hb", "session": "s", "token": "a" * 32})
    assert decode(hb, limit=len(hb))["type"] == "hb"
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(hb, limit=len(hb) - 1)
