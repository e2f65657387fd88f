"""Operator commands (posctl's messages): ``query``, ``resolve``, ``orphans``,
``resolve_orphan``, ``prune``.

They need no session (a strategy may send them too): each becomes one durable op for the store,
a :class:`HealthQuery` answered at once from memory, or a :class:`Refusal`. Pure functions of the
message and the open legs; :class:`~positiond.engine.Engine` queues what they return.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from positiond.model import Leg, Session
from positiond.ops import Op, operator_op

__all__ = [
    "COMMANDS",
    "HealthQuery",
    "Refusal",
    "WatchProgress",
    "by_whom",
    "command_op",
    "unknown_session",
]


@dataclass(frozen=True, slots=True)
class HealthQuery:
    """``query what=health``: answered at once by whoever holds the daemon's health
    (:func:`positiond.engine.health_reply`), from memory: a stuck database must not hang the
    health check."""

    seq: int | None


@dataclass(frozen=True, slots=True)
class WatchProgress:
    """``watching``: a watcher read its ``n``-th ``changes`` frame; answered by whoever holds
    the watchers (:class:`positiond.watch.WatchHub`), not the engine: a watcher is no session."""

    n: int


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


def _refusal(
    session: Session | None, msg: Mapping[str, Any], legs: Mapping[str, Leg]
) -> Refusal | None:
    """Why this command is refused before any op is built, if it is."""
    if msg["type"] == "resolve":
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
    if msg["type"] == "resolve_orphan" and msg["action"] == "adopt" and "strategy" not in msg:
        return Refusal("BAD_FIELD", "resolve_orphan: adopt needs strategy")
    return None


def command_op(
    session: Session | None,
    rid: bytes | None,
    msg: Mapping[str, Any],
    wall: float,
    legs: Mapping[str, Leg],
) -> Outcome:
    """What the operator command ``msg`` becomes (its type one of :data:`COMMANDS`): a health
    query answered from memory, a refusal, or the op built by :func:`positiond.ops.operator_op`
    (the one place these ops are built, for the engine and for posctl's direct writes)."""
    if msg["type"] == "query" and msg["what"] == "health":
        return HealthQuery(msg["seq"])
    refused = _refusal(session, msg, legs)
    if refused is not None:
        return refused
    return operator_op(dict(msg), rid, by_whom(session, msg.get("by")), wall)


COMMANDS = frozenset({"query", "resolve", "orphans", "resolve_orphan", "prune"})
