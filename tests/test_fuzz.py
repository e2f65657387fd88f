"""Guarantee 4: bad input never hurts the daemon. Property-based fuzzing with hypothesis.

The decoder: for any bytes, any JSON value and any mutation of a valid message,
``protocol.decode`` returns a message that passes ``validate`` or raises ``ProtocolError`` —
nothing else. The daemon, over a real socket: tens of thousands of mutated messages (wrong
types, missing and unknown fields, NaN/inf as raw tokens, huge strings, negative quantities,
unknown types, extra frames, oversized frames) from a raw DEALER, each answered with the error
the decoder predicts (or, when valid, as a valid message), then the same messages as a
pipelined flood; meanwhile a well-behaved strategy keeps its entry round trips (p99 printed).
Afterwards the daemon is up, ``integrity_check`` is ok and no row exists that a valid,
acknowledged message did not create.

Deterministic: hypothesis runs derandomized with no example database.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest
import zmq
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from zmq.utils.monitor import recv_monitor_message

from positiond_client import PositionPersistenceManager
from positiond_client.errors import CODES, ProtocolError
from positiond_client.protocol import (
    DURABLE_TYPES,
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    TYPES,
    decode,
    encode,
    validate,
)
from tests import conftest
from tests.conftest import Soak
from tests.faults.support import StrategyProcess, integrity_ok, reap, start
from tests.helpers import UNIT, DaemonProcess, rows, wait_for

T = TypeVar("T")

FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ---- generation ----------------------------------------------------------------------------
#
# Every message is built by one generator written against a small "chooser": hypothesis'
# ``draw`` (rich, shrinkable, ~2 ms a message) or a ``random.Random`` seeded by a number
# hypothesis draws (~0.1 ms a message) for the bulk. Same mutations both ways.

SESSIONS = ["fz-a", "fz-b", "fz-c"]
TOKENS = {key: f"{i:032x}" for i, key in enumerate(SESSIONS, 1)}
LEG_KEYS = ["fz-leg-0", "fz-leg-1", "fz-leg-2", "fz-leg-3"]
SESSIONLESS = ("query", "resolve", "orphans", "resolve_orphan", "prune")
WATCHER = ("watch", "watching")  # no session ever (a watcher is none)
# Every field name any message type knows (docs/PROTOCOL.md §4), for "a known field, wrong value".
FIELDS = sorted(
    {"v", "type", "session", "token", "seq", "strategy", "host", "pid", "heartbeat_interval",
     "progress_deadline", "time", "key", "symbol", "exchange", "product", "leg_type", "side",
     "quantity", "entry_price", "stop_price", "highest_price", "last_trail_level", "state",
     "current_price", "exit_price", "exit_reason", "error_type", "message", "traceback", "what",
     "action", "reason", "by", "rows", "before", "id", "adopt_session"}
)  # fmt: skip
NUMBER_FIELDS = ["entry_price", "quantity", "stop_price", "seq", "v", "time", "pid", "before"]
# Raw tokens that are not JSON numbers (NaN/inf as some encoders write them) or overflow.
RAW_TOKENS = [
    b"NaN", b"-NaN", b"nan", b"Infinity", b"-Infinity", b"inf", b"1e400", b"-1e400", b"1E999",
    b"0x10", b"01", b"+1", b".5", b"1.", b"--1", b"1e", b"undefined", b"None", b"True",
    b"18446744073709551616", b"-9223372036854775809", b"1" * 400,
]  # fmt: skip
ODD_NUMBERS = [-1, -0.0, -1e-300, 0, 5e-324, 10**12 + 1, 2**53 + 1, 1.5, 75.0, True, False,
               1e308, -(2**63), 2**64 - 1, 1e11 + 1, -1e12 - 1]  # fmt: skip
ODD_SIZES = [0, 17, 33, 65, 101, 129, 201, 256, 501, 4001, 65537, 70_000]
ODD_CHARS = ["x", "\x00", "\x7f", "\n", " ", "é", "\U0001f4a9", "\ud800"]
NAMES = ["NIFTY28NOV2524000CE", "X", "BANKNIFTY", "é€", "a b", "0", "-", "x" * 64]

json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
# Python's json writes NaN/Infinity tokens and integers of any size: what a sloppy client sends.
loose_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


class Chooser:
    """The choices a message generator makes; hypothesis or a seeded Random makes them."""

    def choice(self, options: Sequence[T]) -> T:
        raise NotImplementedError

    def integer(self, low: int, high: int) -> int:
        raise NotImplementedError

    def real(self, low: float, high: float) -> float:
        raise NotImplementedError

    def value(self) -> Any:
        """Any JSON value (no NaN, 64-bit integers)."""
        raise NotImplementedError

    def text(self, max_size: int) -> str:
        raise NotImplementedError

    def binary(self, max_size: int) -> bytes:
        raise NotImplementedError

    def boolean(self) -> bool:
        return self.integer(0, 1) == 1


class Drawn(Chooser):
    def __init__(self, draw: st.DrawFn) -> None:
        self.draw = draw

    def choice(self, options: Sequence[T]) -> T:
        return self.draw(st.sampled_from(options))

    def integer(self, low: int, high: int) -> int:
        return self.draw(st.integers(low, high))

    def real(self, low: float, high: float) -> float:
        return self.draw(st.floats(low, high, allow_nan=False))

    def value(self) -> Any:
        return self.draw(json_values)

    def text(self, max_size: int) -> str:
        return self.draw(st.text(max_size=max_size))

    def binary(self, max_size: int) -> bytes:
        return self.draw(st.binary(max_size=max_size))


class Seeded(Chooser):
    _CHARS = 'abcXYZ019 _-.:/é€\U0001f4a9\x00\x01\x1f\x7f\x85\u2028\ufeff"\\'

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def choice(self, options: Sequence[T]) -> T:
        return options[self.rng.randrange(len(options))]

    def integer(self, low: int, high: int) -> int:
        return self.rng.randint(low, high)

    def real(self, low: float, high: float) -> float:
        return self.choice([low, high, self.rng.uniform(low, high), float(round(low))])

    def value(self, depth: int = 0) -> Any:
        kind = self.rng.randrange(8 if depth < 2 else 6)
        if kind == 0:
            return None
        if kind == 1:
            return self.boolean()
        if kind == 2:
            return self.choice(
                [0, 1, -1, 2**63 - 1, -(2**63), 2**64 - 1, self.rng.randint(-99, 99)]
            )
        if kind == 3:
            return self.choice([0.0, -0.0, 1.5, -2.5, 1e300, 5e-324, self.rng.random()])
        if kind in (4, 5):
            return self.text(12)
        if kind == 6:
            return [self.value(depth + 1) for _ in range(self.rng.randrange(4))]
        return {self.text(6): self.value(depth + 1) for _ in range(self.rng.randrange(4))}

    def text(self, max_size: int) -> str:
        return "".join(self.choice(self._CHARS) for _ in range(self.rng.randrange(max_size + 1)))

    def binary(self, max_size: int) -> bytes:
        return self.rng.randbytes(self.rng.randrange(max_size + 1))


def valid_message(c: Chooser) -> dict[str, Any]:
    """A message valid as far as its shape goes (the daemon may still refuse it)."""
    kind = c.choice(sorted(TYPES))
    msg: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": kind}
    if kind not in WATCHER and (kind not in SESSIONLESS or c.boolean()):
        session = c.choice(SESSIONS)
        msg["session"] = session
        msg["token"] = TOKENS[session]
    if kind in DURABLE_TYPES:
        msg["seq"] = c.choice([1, 2, 3, 2**53, c.integer(1, 2**53)])
    key = c.choice(LEG_KEYS)

    def price() -> float:
        return c.choice([0.0, 1e12, 100.0, 99.95, c.real(0.0, 1e12), c.integer(0, 10**12)])

    def maybe(**fields: Callable[[], Any]) -> None:
        for name, make in fields.items():
            if c.boolean():
                msg[name] = make()

    name = lambda: c.choice(NAMES)  # noqa: E731
    state = lambda: {c.text(6): c.value() for _ in range(c.integer(0, 2))}  # noqa: E731
    level = lambda: c.choice([None, 0.0, -3.0, c.real(-1e12, 1e12)])  # noqa: E731
    when = lambda: c.real(0.0, 1e11)  # noqa: E731
    if kind == "start":
        msg["strategy"] = "fuzz"
        maybe(host=name, pid=lambda: c.integer(0, 2**31), time=when,
              heartbeat_interval=lambda: c.real(0.01, 3600.0))  # fmt: skip
    elif kind == "entry":
        msg.update(key=key, symbol=name(), exchange="NFO", product="MIS",
                   side=c.choice(["BUY", "SELL"]), quantity=c.integer(1, 10**9),
                   entry_price=price())  # fmt: skip
        maybe(stop_price=price, highest_price=price, last_trail_level=level,
              leg_type=lambda: c.choice(["CE", "PE"]), time=when, state=state)  # fmt: skip
    elif kind == "update":
        msg.update(key=key, stop_price=c.choice([None, price()]))
        maybe(current_price=price, highest_price=price, last_trail_level=level, state=state)
    elif kind == "exit":
        msg.update(key=key, exit_reason=c.choice(["STOP_HIT", "EXIT", "T"]))
        maybe(exit_price=price, time=when, stop_price=price, state=state)
    elif kind == "crash":
        msg.update(error_type="KeyError", message=c.text(20))
    elif kind == "end":
        maybe(time=when)
    elif kind == "query":
        msg["what"] = c.choice(["crashed", "open", "health"])
    elif kind == "resolve":
        msg.update(key=key, action=c.choice(["adopt", "close", "review", "requeue"]))
    elif kind == "orphans":
        msg["rows"] = [{"symbol": "X", "exchange": "NFO", "product": "MIS",
                        "broker_quantity": c.integer(-5, 5), "known_quantity": 0}]  # fmt: skip
    elif kind == "resolve_orphan":
        msg.update(id=c.integer(1, 3), action=c.choice(["acknowledge", "adopt", "close"]),
                   reason=c.choice(["why", "manual hedge", "x"]))  # fmt: skip
        maybe(strategy=lambda: "fuzz", adopt_session=lambda: c.integer(1, 3))
    elif kind == "prune":
        msg["before"] = when()
    elif kind == "watch":
        maybe(strategy=lambda: "fuzz")
    elif kind == "watching":
        msg["n"] = c.integer(0, 2**53)
    return msg


def mutate(c: Chooser, msg: dict[str, Any]) -> dict[str, Any]:
    """One way of breaking a message (or none: valid messages are part of the flood too)."""
    how = c.integer(0, 9)
    # half the time a field the message has (its own rule is hit), else any known field
    name = c.choice(sorted(msg)) if c.boolean() else c.choice(FIELDS)
    if how == 0:  # a field missing
        return {k: v for k, v in msg.items() if k != name}
    if how == 1:  # an unknown field
        return {**msg, c.text(10): c.value()}
    if how == 2:  # a field with a value of any type
        return {**msg, name: c.choice([c.value(), [], {}, [c.value()], {"k": c.value()}])}
    if how == 3:  # a number where there is none, negative, too large, a float for an integer
        return {**msg, name: c.choice(ODD_NUMBERS)}
    if how == 4:  # strings beyond their limits, empty, control characters, lone surrogates
        return {**msg, name: c.choice(ODD_CHARS) * c.choice(ODD_SIZES)}
    if how == 5:  # an unknown or wrong type
        return {**msg, "type": c.choice([*sorted(TYPES), "ack", "error", "ping", c.text(40)])}
    if how == 6:  # another version
        return {**msg, "v": c.choice([0, 2, -1, 2**31 + 1, 1.0, True, "1", c.value()])}
    if how == 7:  # a session, token, seq or key that is not ours, or malformed
        value = c.choice([c.text(70), c.value(), "fz-zz", "0" * 32, 0, 2**53 + 1])
        return {**msg, c.choice(["session", "token", "seq", "key"]): value}
    if how == 8:  # a state that is not an object, or nests (see also the "deep" spoiler)
        return {**msg, "state": c.choice([c.value(), [[[[[[[[]]]]]]]], {"a": {"b": {"c": {}}}}])}
    return msg


def _raw_token(msg: dict[str, Any], name: str, token: bytes) -> bytes:
    marker = "\x01RAW\x01"
    return _encode({**msg, name: marker}).replace(orjson.dumps(marker), token, 1)


def _encode(msg: dict[str, Any]) -> bytes:
    try:
        return encode(msg)
    except (orjson.JSONEncodeError, TypeError):  # a lone surrogate: write it as Python's json does
        return json.dumps(msg).encode()


SPOILERS = ["json"] * 8 + ["token", "truncate", "garbage", "nonobject", "utf8", "bom", "loose",
                           "pad", "deep"]  # fmt: skip
# JSON nesting around orjson's limits: it encodes 255 levels, decodes 1024.
DEPTHS = [2, 100, 253, 254, 255, 256, 300, 1000, 1022, 1023, 1024, 1025, 5000]


BROKER_ROW = (
    b'[{"symbol":"X","exchange":"NFO","product":"MIS","broker_quantity":1,"known_quantity":0,'
    b'"row":%s}]'
)


def nested(depth: int, opener: bytes = b'{"a":', closer: bytes = b"}") -> bytes:
    """A JSON value ``depth`` containers deep."""
    return opener * (depth - 1) + b"{}" + closer * (depth - 1)


def payload(c: Chooser, loose: Callable[[], Any] | None = None) -> tuple[bytes, str]:
    """One frame's bytes: a mutated message, encoded, perhaps spoiled; and how."""
    msg = valid_message(c)
    for _ in range(c.integer(0, 2)):
        msg = mutate(c, msg)
    how = c.choice(SPOILERS)
    if how == "token":
        return _raw_token(msg, c.choice(NUMBER_FIELDS), c.choice(RAW_TOKENS)), how
    if how == "truncate":
        raw = _encode(msg)
        return raw[: c.integer(0, max(0, len(raw) - 1))], how
    if how == "garbage":
        return c.binary(64), how
    if how == "nonobject":
        return _encode(c.choice([[msg], c.value(), "x", 1, None, []])), how  # type: ignore[dict-item]
    if how == "utf8":
        bad = c.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\\ud800", b"\x00", b"\xc0\xaf"])
        return _encode({**msg, "symbol": "\x01"}).replace(b"\\u0001", bad, 1), how
    if how == "bom":
        return b"\xef\xbb\xbf" + _encode(msg), how
    if how == "deep":  # a state (or any field) nested deep
        opener, closer = c.choice([(b'{"a":', b"}"), (b"[", b"]")])
        value = nested(c.choice(DEPTHS), opener, closer)
        name = c.choice(["state", "state", "rows", "row", c.choice(FIELDS)])
        if name == "row":  # a broker row (orphans) is stored as JSON too
            name, value = "rows", BROKER_ROW % value
        return _raw_token(msg, name, value), how
    if how == "loose":  # NaN/Infinity/any-size integers, as Python's json writes them
        value = loose() if loose is not None else c.choice([math.nan, math.inf, 10**30, -math.inf])
        return json.dumps({**msg, c.choice(FIELDS): value}).encode(), how
    # pad: whitespace up to (or just beyond) the size limit
    raw = _encode(msg)
    size = c.choice([MAX_MESSAGE_BYTES, MAX_MESSAGE_BYTES + 1, MAX_MESSAGE_BYTES + 1024])
    return raw[:-1] + b" " * max(0, size - len(raw)) + raw[-1:], how


@dataclass
class Wire:
    """What goes on the socket: frames, and how the payload was spoiled."""

    frames: list[bytes]
    how: str

    @property
    def oversized(self) -> bool:
        # ZMQ_MAXMSGSIZE limits each frame
        return any(len(frame) > MAX_MESSAGE_BYTES + 1024 for frame in self.frames)


FRAMINGS = ["one"] * 60 + ["delimiter", "extra", "empty", "oversized"]


def wire(c: Chooser, loose: Callable[[], Any] | None = None) -> Wire:
    raw, how = payload(c, loose)
    framing = c.choice(FRAMINGS)
    if framing == "delimiter":  # a REQ-style envelope
        return Wire([b"", raw], how + "+delimiter")
    if framing == "extra":
        return Wire([raw, c.binary(16)], how + "+extra")
    if framing == "empty":
        return Wire([b""], "empty")
    if framing == "oversized":  # beyond ZMQ_MAXMSGSIZE: libzmq drops the connection
        return Wire([raw + b" " * (MAX_MESSAGE_BYTES + 2048)], how + "+oversized")
    return Wire([raw], how)


@st.composite
def payloads(draw: st.DrawFn) -> tuple[bytes, str]:
    return payload(Drawn(draw), lambda: draw(loose_json_values))


@st.composite
def wires(draw: st.DrawFn) -> Wire:
    return wire(Drawn(draw), lambda: draw(loose_json_values))


@st.composite
def valid_messages(draw: st.DrawFn) -> dict[str, Any]:
    return valid_message(Drawn(draw))


@st.composite
def batches(draw: st.DrawFn, drawn: int, seeded: int) -> list[Wire]:
    """``drawn`` wires chosen by hypothesis, ``seeded`` by a Random it seeds."""
    out = [draw(wires()) for _ in range(drawn)]
    c = Seeded(random.Random(draw(st.integers(0, 2**64))))
    out += [wire(c) for _ in range(seeded)]
    return out


# orjson writes JSON at most this deep (it reads 1024 levels).
ORJSON_MAX_DEPTH = 255


def decode_as_the_daemon(raw: bytes) -> dict[str, Any]:
    """decode() under Python's default recursion limit, as in the daemon (hypothesis raises it
    while a test runs, which would hide a RecursionError the daemon meets)."""
    raised = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    try:
        return decode(raw)
    finally:
        sys.setrecursionlimit(raised)


# ---- the decoder -----------------------------------------------------------------------------


def decodes_or_refuses(raw: bytes) -> dict[str, Any] | ProtocolError:
    """The property: a valid message, or ProtocolError with a known code — nothing else."""
    try:
        msg = decode_as_the_daemon(raw)
    except ProtocolError as exc:
        assert exc.code in CODES, exc.code
        assert exc.seq is None or (type(exc.seq) is int and exc.seq >= 1)
        return exc
    assert type(msg) is dict
    validate(msg)  # what decode returns passes validate
    assert msg == orjson.loads(raw)
    return msg


@settings(FUZZ, max_examples=conftest.SOAK.count(2000))
@given(st.binary(max_size=300))
@example(b"")
@example(b"\xef\xbb\xbf{}")
@example(b'{"v":1,"type":"hb","session":"s","v":2}')
def test_decode_arbitrary_bytes(raw: bytes) -> None:
    decodes_or_refuses(raw)


@settings(FUZZ, max_examples=conftest.SOAK.count(1000))
@given(
    loose_json_values
    | st.builds(
        lambda kind, fields: {"v": 1, "type": kind, **fields},
        st.sampled_from(sorted(TYPES)),
        st.dictionaries(st.sampled_from(FIELDS), loose_json_values, max_size=8),
    )
)
def test_decode_arbitrary_json_values(value: Any) -> None:
    decodes_or_refuses(json.dumps(value).encode())  # NaN/Infinity tokens, big integers


@settings(FUZZ, max_examples=conftest.SOAK.count(1000))
@given(payloads())
def test_decode_mutated_messages(spoiled: tuple[bytes, str]) -> None:
    got = decodes_or_refuses(spoiled[0])
    if isinstance(got, dict):  # what is accepted can be written again (stored, re-sent)
        assert decode(encode(got)) == got


@settings(FUZZ, max_examples=conftest.SOAK.count(100))
@given(st.integers(0, 2**64))
def test_decode_mutated_messages_in_bulk(seed: int) -> None:
    c = Seeded(random.Random(seed))
    for _ in range(200):
        decodes_or_refuses(payload(c)[0])


@settings(FUZZ, max_examples=conftest.SOAK.count(300))
@given(valid_messages())
def test_valid_messages_decode_to_themselves(msg: dict[str, Any]) -> None:
    assert decode(encode(msg)) == msg


@pytest.mark.parametrize(
    "msg",
    [
        {"v": 1, "type": "query", "seq": 1, "what": []},
        {"v": 1, "type": "resolve", "seq": 1, "key": "k", "action": {}},
        {
            "v": 1,
            "type": "entry",
            "session": "s",
            "seq": 1,
            "key": "k",
            "symbol": "X",
            "exchange": "NFO",
            "product": "MIS",
            "side": ["BUY"],
            "quantity": 1,
            "entry_price": 1.0,
        },
    ],
    ids=["query.what", "resolve.action", "entry.side"],
)
def test_an_unhashable_value_in_an_enum_field_is_a_protocol_error(msg: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode(encode(msg))
    assert caught.value.code == "BAD_FIELD"


# ---- the daemon --------------------------------------------------------------------------


@dataclass
class Tally:
    sent: int = 0
    answered: int = 0
    valid: int = 0
    disconnects: int = 0
    refused: int = 0  # sent, and refused by the decoder or for its frames (probes included)
    hows: Counter[str] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)
    # What acknowledged valid messages may have created.
    sessions: set[str] = field(default_factory=set)
    legs: set[str] = field(default_factory=set)
    orphans: int = 0
    invalid_payloads: list[bytes] = field(default_factory=list)


class Fuzzer:
    """A raw DEALER that sends one message at a time and checks what the daemon answers."""

    PROBE = b"{}"  # always answered at once: BAD_VERSION

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.ctx = zmq.Context()
        self.tally = Tally()
        self._connect()

    def _connect(self) -> None:
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.sock.connect(self.endpoint)

    def _reconnect(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=0)
        self._connect()

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=0)
        self.ctx.term()

    def reply(self, timeout: float = 5.0) -> dict[str, Any]:
        while True:
            if not self.sock.poll(int(timeout * UNIT * 1000)):
                raise AssertionError("the daemon did not answer")
            msg: dict[str, Any] = orjson.loads(self.sock.recv())
            # a fuzzed valid ``watch`` subscribes this socket: its stream is no answer
            if msg.get("type") not in ("ping", "changes", "health", "dropped"):
                return msg

    def check_error(self, reply: dict[str, Any], code: str | None = None) -> None:
        assert reply["type"] == "error", reply
        assert reply["code"] in CODES, reply
        assert reply["code"] != "INTERNAL", reply
        if code is not None:
            assert reply["code"] == code, reply
        self.tally.codes[reply["code"]] += 1

    def send(self, wire: Wire) -> None:
        tally = self.tally
        tally.sent += 1
        tally.hows[wire.how] += 1
        if wire.oversized:
            self.sock.send_multipart(wire.frames)
            # libzmq drops a connection that sends more than ZMQ_MAXMSGSIZE, without a word.
            event = (
                recv_monitor_message(self.monitor) if self.monitor.poll(int(5000 * UNIT)) else None
            )
            assert event is not None and event["event"] == zmq.EVENT_DISCONNECTED, wire.how
            tally.disconnects += 1
            while self.sock.poll(0):  # a ping may come (PROTOCOL.md §5.3), an answer may not
                got = orjson.loads(self.sock.recv())
                assert got.get("type") in ("ping", "changes", "health", "dropped"), (
                    f"an oversized message was answered: {got}"
                )
            self._reconnect()
            return
        if len(wire.frames) > 1:
            self.sock.send_multipart(wire.frames)
            self.check_error(self.reply(), "BAD_FRAMES")
            tally.answered += 1
            tally.refused += 1
            return
        raw = wire.frames[0]
        try:
            msg = decode_as_the_daemon(raw)
        except ProtocolError as exc:
            self.sock.send(raw)
            reply = self.reply()
            self.check_error(reply, exc.code)
            assert reply.get("seq") == exc.seq, (reply, exc.seq)
            tally.answered += 1
            tally.refused += 1
            tally.invalid_payloads.append(raw)
            return
        except Exception as exc:  # its contract is ProtocolError or a message, nothing else
            raise AssertionError(f"decode() raised {exc!r}") from exc
        tally.valid += 1
        self.sock.send(raw)
        if msg["type"] in DURABLE_TYPES:
            reply = self.reply()
            assert reply.get("seq") == msg["seq"], (reply, msg)
            tally.answered += 1
            if reply["type"] == "error":
                self.check_error(reply)
            else:
                self.acked(msg, reply)
            return
        # hb / update: no answer unless refused; a probe behind it bounds the wait.
        self.sock.send(self.PROBE)
        tally.refused += 1
        while True:
            reply = self.reply()
            if reply.get("reason", "").startswith("protocol version None"):
                break
            self.check_error(reply)
            tally.answered += 1

    def acked(self, msg: dict[str, Any], reply: dict[str, Any]) -> None:
        assert reply["type"] == "ack", reply
        kind = msg["type"]
        if kind == "start":
            self.tally.sessions.add(msg["session"])
        elif kind == "entry":
            self.tally.legs.add(msg["key"])
        elif kind == "orphans":
            self.tally.orphans += reply["recorded"]

    def counters(self) -> dict[str, int]:
        """The daemon's counters (``query what=health``, answered at once)."""
        self.sock.send(encode({"v": 1, "type": "query", "seq": 1, "what": "health"}))
        reply = self.reply()
        assert reply["type"] == "ack", reply
        counters: dict[str, int] = reply["health"]["counters"]
        return counters

    def flood(self, payloads: list[bytes]) -> tuple[int, float]:
        """Send invalid messages as fast as the socket takes them, reading replies meanwhile;
        return (replies received, seconds)."""
        sock, got, i = self.sock, 0, 0
        t0 = time.monotonic()
        deadline = t0 + 60 * UNIT
        while (i < len(payloads) or got < len(payloads)) and time.monotonic() < deadline:
            while i < len(payloads):
                try:
                    sock.send(payloads[i], zmq.NOBLOCK)
                except zmq.Again:
                    break
                i += 1
            while sock.poll(0 if i < len(payloads) else int(200 * UNIT)):
                reply = orjson.loads(sock.recv())
                if reply.get("type") not in ("ping", "changes", "health", "dropped"):
                    self.check_error(reply)
                    got += 1
            if i == len(payloads) and not sock.poll(int(1000 * UNIT)):  # all answered or dropped
                break
        return got, time.monotonic() - t0


def log_around(log: str, when: float, before: float = 1.0, after: float = 3.0) -> str:
    """The daemon's log lines from ``before`` seconds before ``when`` to ``after`` after."""
    lines = []
    for line in log.splitlines():
        try:
            stamp = time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S"))
        except ValueError:
            continue
        if when - before - 1 <= stamp <= when + after:
            lines.append(line[:300])
    return "\n".join(lines[-40:])


def percentile(samples: list[float], q: float) -> float:  # (nearest rank)
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, math.floor(len(ordered) * q))]


@pytest.fixture
def fuzz_daemon(workdir: Path) -> Iterator[DaemonProcess]:
    daemon = start(DaemonProcess(workdir, "--flush-interval", "0.05", "--log-level", "INFO"))
    try:
        yield daemon
    finally:
        reap(daemon)


def test_daemon_under_fuzzed_messages_and_a_flood(
    fuzz_daemon: DaemonProcess, workdir: Path, soak: Soak
) -> None:
    daemon = fuzz_daemon
    examples, per_example = soak.count(150), 150
    good = StrategyProcess(workdir, "latency", daemon.endpoint, "--prefix", "good-",
                           "--ack-timeout", "2.0")  # fmt: skip
    fuzzer = Fuzzer(daemon.endpoint)
    try:
        wait_for(lambda: good.journal.of("ready"), 10, "the well-behaved strategy")
        # Its undisturbed latency first: a measurement window, not a wait for something.
        quiet = (time.time(), time.time() + 1.0 * UNIT)
        time.sleep(1.0 * UNIT)
        failures: list[tuple[Wire, str]] = []
        before = fuzzer.counters()

        @settings(FUZZ, max_examples=examples)
        @given(batches(drawn=10, seeded=per_example - 10))
        def fuzz(batch: list[Wire]) -> None:
            for wire in batch:
                try:
                    fuzzer.send(wire)
                except AssertionError as exc:
                    # Kept, not raised: hypothesis would replay it on a socket whose
                    # conversation it cannot rewind. A fresh connection resynchronises.
                    failures.append((wire, str(exc)[:300]))
                    fuzzer._reconnect()

        fuzz_window = (time.time(), 0.0)
        fuzz()
        fuzz_window = (fuzz_window[0], time.time())
        fuzz_seconds = fuzz_window[1] - fuzz_window[0]
        assert daemon.proc is not None and daemon.proc.poll() is None, daemon.output()
        assert not failures, "\n".join(
            f"{wire.how}: {[f[:200] for f in wire.frames]} -> {why}" for wire, why in failures[:10]
        )

        # The same invalid messages again, pipelined: one peer flooding the daemon.
        small = [raw for raw in fuzzer.tally.invalid_payloads if len(raw) < 4096]
        count = soak.count(30_000)
        flood = (small * (count // len(small) + 1))[:count]
        fuzz_codes = Counter(fuzzer.tally.codes)
        between = fuzzer.counters()
        flood_started = time.time()
        answered, flood_seconds = fuzzer.flood(flood)
        flood_window = (flood_started, time.time())
        after = fuzzer.counters()
        assert daemon.proc.poll() is None, daemon.output()

        assert good.finish() == 0, good.output()
        result = good.journal.of("latency")[0]
        assert result["synced"] and good.journal.of("end")[0]["ok"], result["late"]
        samples = result["samples"]
        tally = fuzzer.tally
        # Still serving: a fresh connection is answered.
        fuzzer._reconnect()
        fuzzer.sock.send(b"{}")
        fuzzer.check_error(fuzzer.reply(), "BAD_VERSION")
    finally:
        fuzzer.close()
        good.close()
    assert daemon.stop() == 0, daemon.output()
    assert "Traceback" not in daemon.output(), daemon.output()[-3000:]

    integrity_ok(daemon.db)
    for row in rows(daemon.db, "SELECT session_key FROM strategy_sessions"):
        assert row["session_key"] in tally.sessions | {"good-session"}, row["session_key"]
    good_legs = 0
    for row in rows(daemon.db, "SELECT position_key, status FROM strategy_positions"):
        key = row["position_key"]
        assert key.startswith("good-") or key in tally.legs, key
        if key.startswith("good-"):
            assert row["status"] == "CLOSED", key
            good_legs += 1
    assert good_legs == result["entered"], "the well-behaved strategy lost legs"
    orphans = rows(daemon.db, "SELECT COUNT(*) AS n FROM broker_orphans")[0]["n"]
    assert orphans <= tally.orphans

    def during(window: tuple[float, float]) -> list[float]:
        return [seconds for when, seconds in samples if window[0] <= when <= window[1]]

    def figures(window: tuple[float, float]) -> str:
        took = during(window)
        return (
            f"{len(took)} entries, p50 {percentile(took, 0.5) * 1000:.2f} ms, "
            f"p99 {percentile(took, 0.99) * 1000:.2f} ms, max {max(took) * 1000:.1f} ms"
        )

    print(
        f"\nfuzzed {tally.sent} messages in {fuzz_seconds:.1f}s ({tally.valid} valid, "
        f"{tally.disconnects} oversized disconnects), "
        f"answers {dict(fuzz_codes.most_common())}; "
        f"then a flood of {len(flood)} from one peer in {flood_seconds:.1f}s ({answered} "
        f"answered, {after['dropped_replies'] - between['dropped_replies']} answers dropped: "
        f"peer too slow): {tally.sent + len(flood)} messages in all. A well-behaved strategy's "
        f"entry round trip: quiet {figures(quiet)}; during the fuzzing {figures(fuzz_window)}; "
        f"during the flood {figures(flood_window)}; calls acked after their 2 s ack_timeout: "
        f"{len(result['late'])} of {2 * result['entered']}; load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    for when in result["late"][:3]:  # what the daemon was doing then
        print(f"a call sent at {time.strftime('%H:%M:%S', time.localtime(when))} was late:")
        print(log_around(daemon.output(), when))
    assert tally.sent >= 0.9 * examples * per_example
    # Every refused message was counted; every flood message answered, or its answer dropped
    # (and counted) because the flooding peer did not read fast enough.
    assert between["bad_messages"] - before["bad_messages"] == tally.refused
    assert after["bad_messages"] - between["bad_messages"] == len(flood)
    dropped = after["dropped_replies"] - between["dropped_replies"]
    assert answered + dropped == len(flood), (answered, dropped)
    # Sanity only (figures are printed): nobody starves while one peer floods.
    for window in (fuzz_window, flood_window):
        assert during(window), "the well-behaved strategy made no progress"
        assert percentile(during(window), 0.99) < 1.0 * UNIT


# ---- hand-written nasty cases -------------------------------------------------------------


def padded_hb(size: int) -> bytes:
    """A valid heartbeat (for a session nobody started) padded with whitespace to ``size``."""
    raw = encode({"v": 1, "type": "hb", "session": "nobody"})
    return raw[:-1] + b" " * (size - len(raw)) + raw[-1:]


def test_size_limits_at_the_boundaries(fuzz_daemon: DaemonProcess) -> None:
    fuzzer = Fuzzer(fuzz_daemon.endpoint)
    try:
        for size, code in [
            (MAX_MESSAGE_BYTES, "UNKNOWN_SESSION"),  # read and handled
            (MAX_MESSAGE_BYTES + 1, "BAD_MESSAGE"),
            (MAX_MESSAGE_BYTES + 1024, "BAD_MESSAGE"),
        ]:
            fuzzer.sock.send(padded_hb(size))
            fuzzer.check_error(fuzzer.reply(), code)
        fuzzer.send(Wire([padded_hb(MAX_MESSAGE_BYTES + 1025)], "oversized"))
        assert fuzzer.tally.disconnects == 1
        fuzzer.sock.send(b"{}")
        fuzzer.check_error(fuzzer.reply(), "BAD_VERSION")
    finally:
        fuzzer.close()
    assert fuzz_daemon.stop() == 0


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 100_000,
        b'{"v":1,"type":"hb","session":"s","x":' + nested(2000) + b"}",
        b'{"v":1,"type":"hb","session":"s"' + b' ,"x":1' * 30_000 + b"}",
        b'{"v":1,"type":"hb","session":"s","session":"t","v":1}',  # duplicated keys: last wins
        b'{"v":1,"type":"hb","session":"s\\u0000"}',
        b'{"v":1,"type":"hb","session":"' + b"\xf0\x9f\x92" + b'"}',  # cut inside a code point
    ],
    ids=["open-brackets", "nested-2000", "30k-fields", "duplicate-keys", "nul", "cut-utf8"],
)
def test_hostile_documents_are_refused_without_harm(fuzz_daemon: DaemonProcess, raw: bytes) -> None:
    try:
        expected = decode(raw)["type"]
    except ProtocolError as exc:
        expected = exc.code
    fuzzer = Fuzzer(fuzz_daemon.endpoint)
    try:
        fuzzer.sock.send(raw)
        reply = fuzzer.reply()
        # the daemon answers exactly what its decoder says (a valid hb: session unknown)
        fuzzer.check_error(reply, "UNKNOWN_SESSION" if expected == "hb" else expected)
        fuzzer.sock.send(b"{}")
        fuzzer.check_error(fuzzer.reply(), "BAD_VERSION")
    finally:
        fuzzer.close()
    assert fuzz_daemon.stop() == 0


def test_the_daemon_survives_an_unhashable_enum_value(fuzz_daemon: DaemonProcess) -> None:
    fuzzer = Fuzzer(fuzz_daemon.endpoint)
    try:
        fuzzer.sock.send(b'{"v":1,"type":"query","seq":7,"what":[]}')
        reply = fuzzer.reply(2.0)
        fuzzer.check_error(reply, "BAD_FIELD")
        assert reply["seq"] == 7
        fuzzer.sock.send(b"{}")
        fuzzer.check_error(fuzzer.reply(2.0), "BAD_VERSION")
    finally:
        fuzzer.close()
    assert fuzz_daemon.stop(timeout=5) == 0


def test_a_deeply_nested_state_is_stored_or_refused(fuzz_daemon: DaemonProcess) -> None:
    token = "ab" * 16
    entry = encode(
        {"v": 1, "type": "entry", "session": "deep", "token": token, "seq": 2, "key": "k",
         "symbol": "X", "exchange": "NFO", "product": "MIS", "side": "BUY", "quantity": 1,
         "entry_price": 1.0, "state": "\x01RAW\x01"}
    ).replace(orjson.dumps("\x01RAW\x01"), nested(ORJSON_MAX_DEPTH + 45))  # fmt: skip
    fuzzer = Fuzzer(fuzz_daemon.endpoint)
    try:
        fuzzer.sock.send(encode({"v": 1, "type": "start", "session": "deep", "token": token,
                                 "seq": 1, "strategy": "s"}))  # fmt: skip
        assert fuzzer.reply()["type"] == "ack"
        fuzzer.sock.send(entry)
        reply = fuzzer.reply(2.0)  # an ack, or a refusal (BAD_FIELD): anything but silence
        assert reply["seq"] == 2 and reply.get("code") != "INTERNAL", reply
        fuzzer.sock.send(encode({"v": 1, "type": "sync", "session": "deep", "token": token,
                                 "seq": 3}))  # fmt: skip
        assert fuzzer.reply(3.0) == {"v": 1, "type": "ack", "seq": 3}
    finally:
        fuzzer.close()
    assert fuzz_daemon.stop(timeout=5) == 0


@pytest.mark.parametrize(("limit", "size"), [(4096, 4500), (1 << 20, 300_000)])
def test_max_message_bytes_is_the_limit(workdir: Path, limit: int, size: int) -> None:
    daemon = start(DaemonProcess(workdir, "--max-message-bytes", str(limit)))
    fuzzer = Fuzzer(daemon.endpoint)
    try:
        fuzzer.sock.send(padded_hb(size))
        fuzzer.check_error(fuzzer.reply(), "BAD_MESSAGE" if size > limit else "UNKNOWN_SESSION")
    finally:
        fuzzer.close()
        reap(daemon)


def test_a_deep_state_is_refused_in_the_caller(fuzz_daemon: DaemonProcess) -> None:
    deep: dict[str, Any] = {}
    inner = deep
    for _ in range(ORJSON_MAX_DEPTH + 45):
        inner["a"] = inner = {}
    pm = PositionPersistenceManager("deep", endpoint=fuzz_daemon.endpoint, ack_timeout=2.0)
    try:
        pm.start_session()
        leg = pm.save_position_entry(symbol="X", entry_price=1.0, quantity=1)
        assert leg.position_id is not None
        with pytest.raises(ValueError):
            pm.queue_position_update(leg, state=deep)
        assert pm.sync(2.0), "the client stopped working"
    finally:
        pm.close()
    assert fuzz_daemon.stop() == 0


@pytest.mark.parametrize(
    "depth",
    [
        30,
        100,
        ORJSON_MAX_DEPTH + 45,
    ],
)
def test_a_deep_broker_row_is_stored_or_refused(fuzz_daemon: DaemonProcess, depth: int) -> None:
    rows_ = BROKER_ROW % nested(depth)
    msg = b'{"v":1,"type":"orphans","seq":5,"rows":%s}' % rows_
    fuzzer = Fuzzer(fuzz_daemon.endpoint)
    try:
        fuzzer.sock.send(msg)
        reply = fuzzer.reply(2.0)  # recorded, or refused (BAD_FIELD): never INTERNAL
        assert reply["seq"] == 5 and reply.get("code") in (None, "BAD_FIELD"), reply
        try:
            expected = decode(msg)["type"]
        except ProtocolError as exc:
            expected = exc.code
        assert reply["type"] == ("ack" if expected == "orphans" else "error"), reply
    finally:
        fuzzer.close()
    assert fuzz_daemon.stop() == 0


DEEP_LIST = b"[" * 1000 + b"]" * 1000
# Plain tests, not hypothesis ones: hypothesis raises the recursion limit while it runs.
DEEP_VALUES = [
    (b'{"v":1,"type":' + DEEP_LIST + b"}", "BAD_TYPE"),
    (b'{"v":' + DEEP_LIST + b',"type":"hb"}', "BAD_VERSION"),
]


@pytest.mark.parametrize(("raw", "code"), DEEP_VALUES, ids=["type", "v"])
def test_a_deep_value_in_type_or_version_is_a_protocol_error(raw: bytes, code: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode(raw)
    assert caught.value.code == code
    assert len(str(caught.value)) < 1000  # the refusal does not echo the whole value


@pytest.mark.parametrize(("raw", "code"), DEEP_VALUES, ids=["type", "v"])
def test_the_daemon_answers_a_deep_type_or_version_with_its_code(
    fuzz_daemon: DaemonProcess, raw: bytes, code: str
) -> None:
    fuzzer = Fuzzer(fuzz_daemon.endpoint)
    try:
        fuzzer.sock.send(raw)
        fuzzer.check_error(fuzzer.reply(), code)
    finally:
        fuzzer.close()
    assert fuzz_daemon.stop() == 0
