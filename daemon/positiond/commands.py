"""Operator commands (posctl's messages): ``query``, ``resolve``, ``orphans``,
``resolve_orphan``, ``prune``.

They need no session (a strategy may send them too): each becomes one durable op for the store,
a :class:`HealthQuery` answered at once from memory, or a :class:`Refusal`. Pure functions of the
message and the open legs; :class:`~positiond.engine.Engine` queues what they return.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from positiond.model import Leg, Session
from positiond.ops import PRUNE_CHUNK, Op, OrphanResolveOp, OrphansOp, PruneOp, QueryOp, ResolveOp

__all__ = ["COMMANDS", "HealthQuery", "Refusal", "by_whom", "command_op", "unknown_session"]


@dataclass(frozen=True, slots=True)
class HealthQuery:
    """``query what=health``: answered at once by whoever holds the daemon's health
    (:func:`positiond.engine.health_reply`), from memory: a stuck database must not hang the
    health check."""

    seq: int | None


@dataclass(frozen=True, slots=True)
class Refusal:
    """The error to answer instead of an op."""

    code: str
    reason: str


def by_whom(session: Session | None, asked_by: str | None = None) -> str:
    """Who sent it, for the record: the session, and the ``by`` the operator gave."""
    who = f"session {session.id} ({session.strategy})" if session is not None else None
    parts = [p for p in (who, asked_by) if p]
    return ": ".join(parts) if parts else "unknown"


def unknown_session(msg: Mapping[str, Any]) -> Refusal:
    return Refusal(
        "UNKNOWN_SESSION",
        f"session {msg['session']!r} is not live here; send start to (re)announce it",
    )


Outcome = Op | HealthQuery | Refusal
_Command = Callable[[Session | None, bytes, Mapping[str, Any], float, Mapping[str, Leg]], Outcome]


def _query(
    session: Session | None, rid: bytes, msg: Mapping[str, Any], wall: float,
    legs: Mapping[str, Leg],
) -> Outcome:  # fmt: skip
    if msg["what"] == "health":
        return HealthQuery(msg["seq"])
    return QueryOp(rid, msg["seq"], msg.get("session"), by_whom(session, msg.get("by")),
                   msg["what"], msg.get("strategy"))  # fmt: skip


def _resolve(
    session: Session | None, rid: bytes, msg: Mapping[str, Any], wall: float,
    legs: Mapping[str, Leg],
) -> Outcome:  # fmt: skip
    key, action = msg["key"], msg["action"]
    if action == "adopt" and session is None:
        return unknown_session(msg) if "session" in msg else Refusal(
            "NO_SESSION", "adopting a leg needs the session that takes it"
        )  # fmt: skip
    leg = legs.get(key)
    if leg is not None and (session is None or leg.session_key != session.key):
        return Refusal(
            "BAD_STATE" if action != "adopt" else "FENCED",
            f"leg {key!r} is open in a live session; only its owner may act on it",
        )
    return ResolveOp(
        rid, msg["seq"], msg.get("session"), by_whom(session, msg.get("by")), key, action,
        wall, msg.get("exit_price"), msg.get("exit_reason", "CLOSED_AT_BROKER"),
        msg.get("reason"),
    )  # fmt: skip


def _orphans(
    session: Session | None, rid: bytes, msg: Mapping[str, Any], wall: float,
    legs: Mapping[str, Leg],
) -> Outcome:  # fmt: skip
    by = by_whom(session, msg.get("by"))
    return OrphansOp(rid, msg["seq"], msg.get("session"), by, msg["rows"], wall)


def _resolve_orphan(
    session: Session | None, rid: bytes, msg: Mapping[str, Any], wall: float,
    legs: Mapping[str, Leg],
) -> Outcome:  # fmt: skip
    if msg["action"] == "adopt" and "strategy" not in msg:
        return Refusal("BAD_FIELD", "resolve_orphan: adopt needs strategy")
    return OrphanResolveOp(
        rid, msg["seq"], msg.get("session"), by_whom(session, msg.get("by")), msg["id"],
        msg["action"], wall, msg["reason"], msg.get("strategy"), msg.get("adopt_session"),
    )  # fmt: skip


def _prune(
    session: Session | None, rid: bytes, msg: Mapping[str, Any], wall: float,
    legs: Mapping[str, Leg],
) -> Outcome:  # fmt: skip
    by = by_whom(session, msg.get("by"))
    limit = msg.get("limit", PRUNE_CHUNK)
    return PruneOp(rid, msg["seq"], msg.get("session"), by, msg["before"], limit)


COMMANDS: dict[str, _Command] = {
    "query": _query,
    "resolve": _resolve,
    "orphans": _orphans,
    "resolve_orphan": _resolve_orphan,
    "prune": _prune,
}


def command_op(
    session: Session | None,
    rid: bytes,
    msg: Mapping[str, Any],
    wall: float,
    legs: Mapping[str, Leg],
) -> Outcome:
    """What the operator command ``msg`` becomes (its type one of :data:`COMMANDS`)."""
    return COMMANDS[msg["type"]](session, rid, msg, wall, legs)
