"""The positiond wire protocol: message kinds, field rules, encode/decode. No sockets here.

Transport: the client's DEALER talks to the daemon's ROUTER; every message is exactly one ZeroMQ
frame holding one JSON object (UTF-8). Every message carries ``v`` (the protocol version) and
``type``. docs/PROTOCOL.md is the prose form of this module; the two change together.

Client -> daemon:

===========  =======  =================================================================
type         acked    purpose
===========  =======  =================================================================
``start``    yes      open (or re-announce) a session
``entry``    yes      a leg was entered at the broker
``update``   no       newest price / stop / highest / trail level / state of a leg
``exit``     yes      a leg was closed at the broker
``crash``    yes      the strategy reports its own crash (``handle_crash``)
``end``      yes      the strategy ends its session cleanly
``sync``     yes      acked once everything sent before it (updates too) is committed
``hb``       no       heartbeat (any message counts as one)
``query``    yes      read crashed legs, or every open leg (recovery); ``session`` optional
``resolve``  yes      adopt / close / flag / requeue a crashed leg; ``session`` optional
``orphans``  yes      record broker positions nobody can explain; ``session`` optional
``resolve_orphan`` yes  acknowledge / adopt / close one recorded orphan; ``session`` optional
``prune``    yes      delete finished sessions older than a cutoff; ``session`` optional
``watch``    yes      subscribe to the change stream: a snapshot in the ack, then ``changes``
``watching`` no       a watcher's progress (the last ``changes`` frame it read)
===========  =======  =================================================================

Daemon -> client: ``ack`` (after commit), ``error``, ``notice`` (something happened to the
session, e.g. it was declared crashed and came back) and ``ping`` (a liveness probe; ignore it);
to a watcher, ``changes`` (what committed since its snapshot), ``health`` (each second) and
``dropped`` (it was unsubscribed).

Durable messages carry ``seq``, a positive integer the client chooses (unique among its
unanswered messages); the ack or error that answers it echoes the same ``seq``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import Any, Final

import orjson

from positiond_client.errors import ProtocolError

__all__ = [
    "CLIENT_ONLY_CODES",
    "DURABLE_TYPES",
    "MAX_MESSAGE_BYTES",
    "NOTICE_CODES",
    "ORPHAN_ACTIONS",
    "PROTOCOL_VERSION",
    "QUERIES",
    "REPLY_TYPES",
    "RESOLUTIONS",
    "SESSIONLESS_TYPES",
    "SESSION_FINAL_CODES",
    "SIDES",
    "TYPES",
    "UPDATE_FIELDS",
    "ErrorCode",
    "ack_reply",
    "changes_frame",
    "check_fields",
    "decode",
    "decode_reply",
    "dropped_frame",
    "encode",
    "error_reply",
    "health_frame",
    "notice_reply",
    "ping_reply",
    "seq_of",
    "validate",
]

PROTOCOL_VERSION: Final = 1
# The daemon refuses (and ZMQ_MAXMSGSIZE disconnects) anything larger.
MAX_MESSAGE_BYTES: Final = 256 * 1024

SIDES: Final = frozenset({"BUY", "SELL"})
MAX_PRICE: Final = 1e12
MAX_QUANTITY: Final = 10**9
MAX_SEQ: Final = 2**53
# Epoch seconds: anything from 1970 to year ~5000 is plausible; beyond is a unit mistake (ms).
MAX_TIME: Final = 1e11

Checker = Callable[[Any], str | None]


class ErrorCode(StrEnum):
    """Every ``code`` the daemon can put in an ``error`` reply (docs/PROTOCOL.md §6).

    tests/test_wire_contract.py checks that this set, the codes found in the daemon's source
    and the codes §6 documents are the same three sets.
    """

    BAD_MESSAGE = "BAD_MESSAGE"  # not JSON, not an object, too large
    BAD_VERSION = "BAD_VERSION"  # ``v`` is not 1
    BAD_TYPE = "BAD_TYPE"  # ``type`` missing or unknown
    BAD_FIELD = "BAD_FIELD"  # a field unknown, missing or out of its rule; strategy mismatch
    BAD_FRAMES = "BAD_FRAMES"  # more than one frame
    BAD_TOKEN = "BAD_TOKEN"  # the session's token is missing or wrong
    NO_SESSION = "NO_SESSION"  # ``resolve adopt`` without a ``session``
    UNKNOWN_SESSION = "UNKNOWN_SESSION"  # the session is not live in the daemon (re-announce)
    SESSION_CLOSED = "SESSION_CLOSED"  # the session is over for good: use a new key
    UNKNOWN_LEG = "UNKNOWN_LEG"  # no (open) leg with this key
    LEG_CLOSED = "LEG_CLOSED"  # the leg was closed by its protective stop at the broker
    KEY_CONFLICT = "KEY_CONFLICT"  # the position key belongs to another session
    FENCED = "FENCED"  # the leg belongs to another session
    BAD_STATE = "BAD_STATE"  # ``resolve``: the leg's status does not allow the action
    UNKNOWN_ORPHAN = "UNKNOWN_ORPHAN"  # ``resolve_orphan``: no orphan record with this id
    NOT_WATCHING = "NOT_WATCHING"  # ``watching`` from a connection that is no watcher (any more)
    BUSY = "BUSY"  # a connection accepted beyond the daemon's connection limit: reconnect later
    INTERNAL = "INTERNAL"  # a bug, or the database refused this one operation


# Codes of the client library's own errors (errors.py): never on the wire.
CLIENT_ONLY_CODES: Final = frozenset({"STORAGE", "UNAVAILABLE"})
# An error answering a session's (re-)announcing ``start`` with one of these ends the session
# for this client: it must stop (other codes answering a ``start`` are passing: announce again).
SESSION_FINAL_CODES: Final = frozenset(
    {
        ErrorCode.SESSION_CLOSED,
        ErrorCode.BAD_TOKEN,
        ErrorCode.BAD_FIELD,
        ErrorCode.BAD_VERSION,
        ErrorCode.BAD_TYPE,
    }
)


def _text(limit: int, pattern: str = r"[^\x00-\x1f\x7f]+") -> Checker:
    rx = re.compile(pattern)

    def check(value: Any) -> str | None:
        if type(value) is not str:
            return "must be a string"
        if not value or len(value) > limit:
            return f"must be 1..{limit} characters"
        if rx.fullmatch(value) is None:
            return "contains characters that are not allowed"
        return None

    return check


def _long_text(limit: int) -> Checker:
    def check(value: Any) -> str | None:
        if type(value) is not str:
            return "must be a string"
        if len(value) > limit:
            return f"must be at most {limit} characters"
        return None

    return check


def _number(low: float, high: float, nullable: bool = False) -> Checker:
    def check(value: Any) -> str | None:
        if value is None and nullable:
            return None
        kind = type(value)
        if kind is not float and kind is not int:  # bool is not a number here
            return "must be a number" + (" or null" if nullable else "")
        if not math.isfinite(value):
            return "must be finite"
        if value < low or value > high:
            return f"must be within [{low:g}, {high:g}]"
        return None

    return check


def _integer(low: int, high: int) -> Checker:
    def check(value: Any) -> str | None:
        if type(value) is not int:
            return "must be an integer"
        if value < low or value > high:
            return f"must be within [{low}, {high}]"
        return None

    return check


def _boolean(value: Any) -> str | None:
    if type(value) is not bool:
        return "must be true or false"
    return None


def _one_of(values: frozenset[str]) -> Checker:
    def check(value: Any) -> str | None:
        # The type first: a list or an object is unhashable, and ``in`` would raise.
        if type(value) is not str or value not in values:
            return "must be one of " + ", ".join(sorted(values))
        return None

    return check


# orjson writes at most 255 levels; a state must survive being stored and sent again.
MAX_DEPTH: Final = 32


def _too_deep(value: Any, depth: int) -> bool:
    if depth > MAX_DEPTH:
        return True
    if type(value) is dict:
        return any(_too_deep(v, depth + 1) for v in value.values())
    if type(value) is list:
        return any(_too_deep(v, depth + 1) for v in value)
    return False


def _object(value: Any) -> str | None:
    if type(value) is not dict:
        return "must be a JSON object"
    if _too_deep(value, 1):
        return f"nests deeper than {MAX_DEPTH} levels"
    return None


_INSTRUMENT = _text(64)
_SIGNED_QTY = _integer(-(10**12), 10**12)


# health: the daemon's own state, answered at once (also while its writer is stuck).
QUERIES: Final = frozenset({"crashed", "open", "health"})
# adopt: into the sending session; close: flat at the broker; review: needs a human;
# requeue: a reviewed leg goes back to CRASHED, ready to be adopted.
RESOLUTIONS: Final = frozenset({"adopt", "close", "review", "requeue"})
MAX_ORPHAN_ROWS: Final = 1000
# acknowledge: known, leave it; adopt: a named strategy takes it over; close: squared off.
ORPHAN_ACTIONS: Final = frozenset({"acknowledge", "adopt", "close"})


def _orphan_rows(value: Any) -> str | None:
    if type(value) is not list or len(value) > MAX_ORPHAN_ROWS:
        return f"must be a list of at most {MAX_ORPHAN_ROWS} objects"
    for row in value:
        if type(row) is not dict:
            return "must hold objects"
        for name in ("symbol", "exchange", "product"):
            if _INSTRUMENT(row.get(name)) is not None:
                return f"rows need {name} (1..64 characters)"
        for name in ("broker_quantity", "known_quantity"):
            if _SIGNED_QTY(row.get(name)) is not None:
                return f"rows need an integer {name}"
        if _object(row.get("row", {})) is not None:
            return "row must be an object nested at most 32 levels"
    return None


_SESSION = _text(64, r"[A-Za-z0-9._:-]+")
_KEY = _text(128)
_PRICE = _number(0.0, MAX_PRICE)
_OPT_PRICE = _number(0.0, MAX_PRICE, nullable=True)
_LEVEL = _number(-MAX_PRICE, MAX_PRICE, nullable=True)
_TIME = _number(0.0, MAX_TIME)
_SEQ = _integer(1, MAX_SEQ)
_VERSION = _integer(0, 2**31)
_TYPE = _long_text(32)

# ``token``: the session's secret (docs/PROTOCOL.md §2.4), proposed by the client in its first
# ``start`` (else chosen by the daemon) and returned in every ``start`` ack; every later message
# of the session carries it (a re-announcing ``start`` too) — no other client can write there.
_TOKEN = _text(64, r"[0-9a-f]+")
_COMMON: dict[str, Checker] = {
    "v": _VERSION,
    "type": _TYPE,
    "session": _SESSION,
    "token": _TOKEN,
}
# (for the sessionless types, ``session`` is optional but checked when present)
_DURABLE: dict[str, Checker] = {**_COMMON, "seq": _SEQ}

UPDATE_FIELDS: Final = ("current_price", "stop_price", "highest_price", "last_trail_level", "state")

# type -> (every allowed field with its rule, the required ones)
_SCHEMAS: dict[str, tuple[dict[str, Checker], frozenset[str]]] = {
    "start": (
        {
            **_DURABLE,
            "strategy": _text(100),
            "host": _text(255),
            "pid": _integer(0, 2**31),
            "heartbeat_interval": _number(0.01, 3600.0),
            "progress_deadline": _number(1.0, 86400.0),
            "time": _TIME,
            # protective stop orders for this session's legs if it crashes (docs/PROTECT.md):
            # absent follows the daemon's [protect]; false opts out; true can only narrow.
            "protect": _boolean,
        },
        frozenset({"strategy"}),
    ),
    "entry": (
        {
            **_DURABLE,
            "key": _KEY,
            "symbol": _text(64),
            "exchange": _text(16),
            "product": _text(16),
            "leg_type": _text(16),
            "side": _one_of(SIDES),
            "quantity": _integer(1, MAX_QUANTITY),
            "entry_price": _PRICE,
            "stop_price": _OPT_PRICE,
            "highest_price": _OPT_PRICE,
            "last_trail_level": _LEVEL,
            "time": _TIME,
            "state": _object,
        },
        frozenset({"key", "symbol", "exchange", "product", "side", "quantity", "entry_price"}),
    ),
    "update": (
        {
            **_COMMON,
            "key": _KEY,
            "current_price": _OPT_PRICE,
            "stop_price": _OPT_PRICE,
            "highest_price": _OPT_PRICE,
            "last_trail_level": _LEVEL,
            "state": _object,
        },
        frozenset({"key"}),
    ),
    "exit": (
        {
            **_DURABLE,
            "key": _KEY,
            "exit_price": _OPT_PRICE,
            "exit_reason": _text(64),
            "time": _TIME,
            # the leg's final state, applied before it is closed
            "current_price": _OPT_PRICE,
            "stop_price": _OPT_PRICE,
            "highest_price": _OPT_PRICE,
            "last_trail_level": _LEVEL,
            "state": _object,
        },
        frozenset({"key", "exit_reason"}),
    ),
    "crash": (
        {
            **_DURABLE,
            "error_type": _text(200),
            "message": _long_text(4000),
            "traceback": _long_text(65536),
            "time": _TIME,
        },
        frozenset({"error_type", "message"}),
    ),
    "end": ({**_DURABLE, "time": _TIME}, frozenset()),
    "sync": (dict(_DURABLE), frozenset()),
    "query": (
        {**_DURABLE, "what": _one_of(QUERIES), "strategy": _text(100), "by": _text(200)},
        frozenset({"what"}),
    ),
    "resolve": (
        {
            **_DURABLE,
            "key": _KEY,
            "action": _one_of(RESOLUTIONS),
            "exit_price": _OPT_PRICE,
            "exit_reason": _text(64),
            "reason": _text(500),
            "by": _text(200),
            # adopt: leave the leg's protective order live for the adopter (default: cancel it)
            "keep_protection": _boolean,
        },
        frozenset({"key", "action"}),
    ),
    "orphans": (
        {**_DURABLE, "rows": _orphan_rows, "by": _text(200)},
        frozenset({"rows"}),
    ),
    "resolve_orphan": (
        {
            **_DURABLE,
            "id": _integer(1, 2**63 - 1),
            "action": _one_of(ORPHAN_ACTIONS),
            "reason": _text(500),
            "strategy": _text(100),
            "adopt_session": _integer(1, 2**63 - 1),
            "by": _text(200),
        },
        frozenset({"id", "action", "reason"}),
    ),
    "prune": (
        {**_DURABLE, "before": _TIME, "limit": _integer(1, 10_000), "by": _text(200)},
        frozenset({"before"}),
    ),
    "hb": (dict(_COMMON), frozenset()),
    # A watcher is no session: neither ``session`` nor ``token`` (docs/PROTOCOL.md §4.14).
    "watch": (
        {"v": _VERSION, "type": _TYPE, "seq": _SEQ, "strategy": _text(100), "by": _text(200)},
        frozenset(),
    ),
    "watching": ({"v": _VERSION, "type": _TYPE, "n": _integer(0, MAX_SEQ)}, frozenset({"n"})),
}
TYPES: Final = frozenset(_SCHEMAS)
# Answered with an ack (after commit) or an error; they carry ``seq``.
DURABLE_TYPES: Final = frozenset(
    {"start", "entry", "exit", "crash", "end", "sync", "query", "resolve", "orphans",
     "resolve_orphan", "prune", "watch"}
)  # fmt: skip
# Operator and recovery messages may come from a tool that has no session (posctl); a watcher
# has none either.
SESSIONLESS_TYPES: Final = frozenset(
    {"query", "resolve", "orphans", "resolve_orphan", "prune", "watch", "watching"}
)
_REQUIRED: dict[str, frozenset[str]] = {
    name: required
    | {"v", "type"}
    | ({"seq"} if name in DURABLE_TYPES else set())
    | (set() if name in SESSIONLESS_TYPES else {"session"})
    for name, (_, required) in _SCHEMAS.items()
}


def _shown(value: Any) -> str:
    """A refused value for an error text: short, and never a recursion through deep nesting."""
    if type(value) in (str, int, float, bool) or value is None:
        return repr(value)[:60]
    return f"<{type(value).__name__}>"


def validate(msg: Mapping[str, Any]) -> None:
    """Check a decoded message against its type's rules; raise ProtocolError naming the field."""
    kind = msg.get("type")
    if msg.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {_shown(msg.get('v'))} is not supported "
            f"(this is {PROTOCOL_VERSION})",
            "BAD_VERSION",
        )
    schema = _SCHEMAS.get(kind) if type(kind) is str else None
    if schema is None:
        raise ProtocolError(f"unknown message type {_shown(kind)}", "BAD_TYPE")
    checkers = schema[0]
    assert type(kind) is str
    for name, value in msg.items():
        check = checkers.get(name)
        if check is None:
            raise ProtocolError(f"{kind}: unknown field {name!r}", "BAD_FIELD")
        problem = check(value)
        if problem is not None:
            raise ProtocolError(f"{kind}.{name} {problem}", "BAD_FIELD")
    missing = _REQUIRED[kind].difference(msg)
    if missing:
        raise ProtocolError(f"{kind}: missing field(s) {', '.join(sorted(missing))}", "BAD_FIELD")
    if kind == "update" and not any(name in msg for name in UPDATE_FIELDS):
        raise ProtocolError("update: names no field to change", "BAD_FIELD")


def check_fields(kind: str, fields: Mapping[str, Any]) -> None:
    """Check some fields of a message of ``kind`` (no required-field check): for callers."""
    checkers = _SCHEMAS[kind][0]
    for name, value in fields.items():
        check = checkers.get(name)
        if check is None:
            raise ProtocolError(f"{kind}: unknown field {name!r}", "BAD_FIELD")
        problem = check(value)
        if problem is not None:
            raise ProtocolError(f"{name} {problem}", "BAD_FIELD")


def decode(raw: bytes, limit: int = MAX_MESSAGE_BYTES) -> dict[str, Any]:
    """Bytes off the wire -> a validated message dict (raises ProtocolError, nothing else).

    ``limit``: the largest message accepted (the daemon's ``max_message_bytes``).
    """
    if len(raw) > limit:
        raise ProtocolError(f"message of {len(raw)} bytes exceeds {limit}", "BAD_MESSAGE")
    try:
        msg = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"not valid JSON: {exc}", "BAD_MESSAGE") from None
    if type(msg) is not dict:
        raise ProtocolError("a message must be a JSON object", "BAD_MESSAGE")
    try:
        validate(msg)
    except ProtocolError as exc:
        exc.seq = seq_of(msg)
        raise
    return msg


def encode(msg: Mapping[str, Any]) -> bytes:
    """A message dict -> one frame of bytes (NaN and inf are refused by validate, not here)."""
    return orjson.dumps(msg)


def ack_reply(seq: int | None, data: Mapping[str, Any] | None = None) -> bytes:
    """The daemon's answer to a durable message once it is committed (``data`` at top level)."""
    msg: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": "ack", "seq": seq}
    if data:
        msg.update(data)
    return orjson.dumps(msg)


def ping_reply() -> bytes:
    """A liveness probe (§5.3): clients ignore it."""
    return orjson.dumps({"v": PROTOCOL_VERSION, "type": "ping"})


def notice_reply(code: str, details: Mapping[str, Any] | None = None) -> bytes:
    """Something happened to the session (§5.4); ``details`` at top level next to ``code``."""
    msg: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": "notice", "code": code}
    if details:
        msg.update(details)
    return orjson.dumps(msg)


# The notices the daemon sends (§5.4), all about a leg's protective stop order at the broker:
# released (cancelled, or kept for the strategy), its cancel refused (a stop may still be live),
# or it filled (the leg is closed: exit_reason PROTECTIVE_STOP).
NOTICE_CODES: Final = frozenset({"PROTECTION_RELEASED", "PROTECTION_CANCEL_FAILED", "LEG_CLOSED"})
def changes_frame(n: int, events: list[dict[str, Any]]) -> bytes:
    """A watcher's ``n``-th frame of committed changes (§5.5)."""
    return orjson.dumps({"v": PROTOCOL_VERSION, "type": "changes", "n": n, "events": events})


def health_frame(n: int, health: Mapping[str, Any], seen: Mapping[str, str]) -> bytes:
    """A watcher's keepalive (§5.5): the daemon's health, ``n`` of the last ``changes`` sent,
    ``seen``: session key -> its latest sign of life written since the previous one."""
    return orjson.dumps(
        {"v": PROTOCOL_VERSION, "type": "health", "n": n, "health": health, "seen": seen}
    )


def dropped_frame(reason: str) -> bytes:
    """The daemon unsubscribed this watcher (§5.6): it may send ``watch`` again."""
    return orjson.dumps({"v": PROTOCOL_VERSION, "type": "dropped", "reason": reason})


REPLY_TYPES: Final = frozenset(
    {"ack", "error", "ping", "notice", "changes", "health", "dropped"}
)


def decode_reply(raw: bytes) -> dict[str, Any]:
    """A daemon -> client frame -> its dict; raise ProtocolError if it is not a reply.

    Checks what a client relies on: ``v`` 1; an ``ack`` has an integer ``seq``; an ``error``
    has string ``code`` and ``reason`` (``seq`` an integer and ``key`` a string when present);
    a ``notice`` has a string ``code``. A ``type`` this module does not know is returned as it
    is: a client must ignore it (§1.3).
    """
    try:
        msg = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"reply is not valid JSON: {exc}", "BAD_MESSAGE") from None
    if type(msg) is not dict:
        raise ProtocolError("a reply must be a JSON object", "BAD_MESSAGE")
    if msg.get("v") != PROTOCOL_VERSION or type(msg.get("v")) is not int:
        raise ProtocolError(f"reply version {_shown(msg.get('v'))} is not 1", "BAD_VERSION")
    kind = msg.get("type")
    problem = None
    if kind == "ack" and type(msg.get("seq")) is not int:
        problem = "an ack needs an integer seq"
    elif kind == "error":
        if type(msg.get("code")) is not str or type(msg.get("reason")) is not str:
            problem = "an error needs string code and reason"
        elif "seq" in msg and type(msg["seq"]) is not int:
            problem = "an error's seq must be an integer"
        elif "key" in msg and type(msg["key"]) is not str:
            problem = "an error's key must be a string"
    elif kind == "notice" and type(msg.get("code")) is not str:
        problem = "a notice needs a string code"
    elif type(kind) is not str:
        problem = "a reply needs a string type"
    if problem is not None:
        raise ProtocolError(problem, "BAD_FIELD")
    return msg


def error_reply(code: str, reason: str, seq: int | None = None, key: str | None = None) -> bytes:
    """The daemon's answer to a message it will not apply (``key``: the leg it named)."""
    msg: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": "error", "code": code, "reason": reason}
    if seq is not None:
        msg["seq"] = seq
    if key is not None:
        msg["key"] = key
    return orjson.dumps(msg)


def seq_of(raw_or_msg: Any) -> int | None:
    """Best-effort ``seq`` of a message that failed validation, so its error can be matched."""
    if type(raw_or_msg) is dict:
        seq = raw_or_msg.get("seq")
        if type(seq) is int and 1 <= seq <= MAX_SEQ:
            return seq
    return None
