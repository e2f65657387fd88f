"""What the engine asks the store to write: plain records, one per durable change.

The engine decides, the store executes a whole :class:`Batch` in one transaction and returns one
:class:`Result` per op, in order. Nothing here does I/O.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, NamedTuple

__all__ = [
    "CLIENT",
    "DISCONNECT",
    "HEARTBEAT",
    "HOST",
    "LIVE_SESSION_STATUSES",
    "OPERATOR_MESSAGES",
    "PRUNE_CHUNK",
    "PRUNE_MAX_CHUNK",
    "RESTART",
    "REVIVABLE",
    "Batch",
    "CrashOp",
    "EndOp",
    "EntryOp",
    "ExitOp",
    "FencedOp",
    "LegRow",
    "LiveSession",
    "Op",
    "OrphanResolveOp",
    "OrphansOp",
    "ProtectCloseOp",
    "PruneOp",
    "QueryOp",
    "ResolveOp",
    "Result",
    "StallOp",
    "StartOp",
    "SyncOp",
    "TrailEvent",
    "WatchOp",
    "operator_op",
    "token_hash",
]

# Who declared a session crashed (strategy_sessions.crash_source).
CLIENT = "CLIENT"  # the strategy itself, through handle_crash(): final
HEARTBEAT = "HEARTBEAT"  # missed heartbeats: the strategy may come back (REVIVED)
DISCONNECT = "DISCONNECT"  # its ipc connection dropped: the process exited
RESTART = "RESTART"  # did not return after a daemon restart
# PostgreSQL, several hosts: its daemon's lease ran out (another daemon's verdict). The host may
# only be cut off: its strategies revive their sessions as after any other verdict.
HOST = "HOST"
REVIVABLE = frozenset({HEARTBEAT, DISCONNECT, RESTART, HOST})


class LiveSession(NamedTuple):
    """What the daemon loads at start for each session that was live when it last stopped."""

    key: str
    id: int
    strategy: str
    token_hash: str | None
    progress_deadline: float | None
    status: str = "RUNNING"  # RUNNING or STALLED
    heartbeat_interval: float | None = None  # as the client announced it


def token_hash(token: str) -> str:
    """Only a hash of a session's token is stored: reading the database does not grant writes."""
    return hashlib.sha256(token.encode()).hexdigest()


# Session statuses of a strategy that is alive (STALLED: alive, but its main loop is stuck).
LIVE_SESSION_STATUSES = ("RUNNING", "STALLED")


@dataclass(slots=True)
class _Durable:
    rid: bytes | None  # routing id to answer, None for the daemon's own decisions
    seq: int | None
    session_key: str


@dataclass(slots=True)
class _Operator:
    """Recovery and operator ops: from a session, or from a tool that has none (posctl)."""

    rid: bytes | None
    seq: int | None
    session_key: str | None
    by: str  # who asked, for the audit trail


@dataclass(frozen=True, slots=True)
class TrailEvent:
    """The stop or trail level of a leg moved between two flushes."""

    key: str
    session_key: str
    before: tuple[float | None, float | None]  # (stop_price, last_trail_level)
    after: tuple[float | None, float | None]
    price: float | None


@dataclass(slots=True)
class StartOp(_Durable):
    strategy: str
    host: str | None
    pid: int | None
    heartbeat_interval: float | None
    time: float
    peer_uid: int | None = None
    peer_pid: int | None = None
    token: str = ""  # the one the sender offered (resume), else a fresh one (new session)
    progress_deadline: float | None = None
    protect: bool | None = None  # the session's [protect] choice (None: follow the config)


@dataclass(slots=True)
class EntryOp(_Durable):
    key: str
    fields: dict[str, Any]  # symbol, exchange, product, leg_type, side, quantity, prices, state
    time: float


@dataclass(slots=True)
class ExitOp(_Durable):
    key: str
    exit_price: float | None
    exit_reason: str
    time: float
    final_update: dict[str, Any] | None = None  # the leg's pending coalesced update, if any
    # The TRAIL_UPDATE that final update makes (as a flush would have), written before the EXIT.
    trail_events: list[TrailEvent] = field(default_factory=list)

    def carry(self, key: str, older: dict[str, Any]) -> None:
        """Take older update fields of the leg (from a write that failed) under its own."""
        self.final_update = {**older, **(self.final_update or {})}


@dataclass(slots=True)
class CrashOp(_Durable):
    source: str
    reason: str
    time: float
    payload: dict[str, Any] = field(default_factory=dict)
    final_updates: dict[str, dict[str, Any]] = field(default_factory=dict)
    token: str | None = None  # from the strategy; checked against the stored hash
    trail_events: list[TrailEvent] = field(default_factory=list)  # made by the final updates
    strategy: str | None = None  # for the daemon's log
    # The daemon's verdicts: wall time of the session's last sign of life (not written; the
    # crash-detection histogram of positiond.metrics measures from it).
    last_seen: float | None = None

    def carry(self, key: str, older: dict[str, Any]) -> None:
        """Take older update fields of a leg (from a write that failed) under its own."""
        self.final_updates[key] = {**older, **self.final_updates.get(key, {})}


@dataclass(slots=True)
class EndOp(_Durable):
    time: float
    final_updates: dict[str, dict[str, Any]] = field(default_factory=dict)
    token: str | None = None
    trail_events: list[TrailEvent] = field(default_factory=list)  # made by the final updates

    def carry(self, key: str, older: dict[str, Any]) -> None:
        """Take older update fields of a leg (from a write that failed) under its own."""
        self.final_updates[key] = {**older, **self.final_updates.get(key, {})}


@dataclass(slots=True)
class StallOp(_Durable):
    """The session's main loop made no progress within its deadline (or resumed: stalled=False)."""

    stalled: bool
    time: float
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class SyncOp(_Durable):
    """Acked once everything the client sent before it, updates included, is committed."""


@dataclass(slots=True)
class QueryOp(_Operator):
    what: str  # "crashed" or "open"
    strategy: str | None


@dataclass(slots=True)
class ResolveOp(_Operator):
    key: str
    action: str  # adopt, close, review, requeue
    time: float
    exit_price: float | None = None
    exit_reason: str = "CLOSED_AT_BROKER"
    reason: str | None = None
    keep_protection: bool = False  # adopt: leave the leg's protective order to the adopter


@dataclass(slots=True)
class OrphansOp(_Operator):
    rows: list[dict[str, Any]]
    time: float


# Sessions a prune deletes per request, and its most: each request is one short transaction
# in the writer's stream, so live acks wait for at most one chunk (prune more: ask again).
PRUNE_CHUNK = 200
PRUNE_MAX_CHUNK = 10_000


@dataclass(slots=True)
class OrphanResolveOp(_Operator):
    """An operator's decision about one recorded orphan (broker_orphans.id)."""

    orphan_id: int
    action: str  # acknowledge, adopt, close
    time: float
    reason: str
    strategy: str | None = None  # adopt: who takes it over
    adopt_session: int | None = None  # adopt: that strategy's session, if one is named


@dataclass(slots=True)
class PruneOp(_Operator):
    before: float
    limit: int = PRUNE_CHUNK


@dataclass(slots=True)
class ProtectCloseOp(_Durable):
    """A leg's protective stop order filled at the broker: close the leg (PROTECTIVE_STOP).

    ``session_key`` is the live session holding the leg (may be "" when none is live);
    ``holder_id`` the session it was handed to (``protective_orders.release_session``): a leg
    found in any other session is not closed (a stale report).
    """

    key: str
    holder_id: int
    fill_price: float | None
    protect_id: int
    order_id: str | None
    time: float
    final_update: dict[str, Any] | None = None  # the leg's pending coalesced update, if any
    trail_events: list[TrailEvent] = field(default_factory=list)

    def carry(self, key: str, older: dict[str, Any]) -> None:
        """Take older update fields of the leg (from a write that failed) under its own."""
        self.final_update = {**older, **(self.final_update or {})}


@dataclass(slots=True)
class FencedOp(_Operator):
    """Record a write refused because the leg belongs to another session now."""

    key: str
    time: float
    message: dict[str, Any]


@dataclass(slots=True)
class WatchOp(_Operator):
    """A watcher subscribes: the store reads its snapshot in the writer's order, so every
    change committed after it reaches the watcher as a ``changes`` frame (positiond.watch)."""

    strategy: str | None = None


Op = (
    StartOp
    | EntryOp
    | ExitOp
    | CrashOp
    | EndOp
    | SyncOp
    | QueryOp
    | ResolveOp
    | OrphansOp
    | OrphanResolveOp
    | PruneOp
    | FencedOp
    | StallOp
    | ProtectCloseOp
    | WatchOp
)


@dataclass(slots=True)
class Batch:
    """Everything one transaction writes: durable ops in arrival order, then coalesced updates."""

    ops: list[Op] = field(default_factory=list)
    updates: dict[str, dict[str, Any]] = field(default_factory=dict)  # position_key -> fields
    trail_events: list[TrailEvent] = field(default_factory=list)
    heartbeats: dict[str, float] = field(default_factory=dict)  # session_key -> wall time
    time: float = 0.0  # wall clock when the batch was taken
    # position_key -> session_key of each update (not written: a requeue finds its carrier by it)
    update_owners: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.ops or self.updates or self.heartbeats)


@dataclass(frozen=True, slots=True)
class LegRow:
    """An open leg as the engine needs to know it (loaded at start, or on resume)."""

    key: str
    session_key: str
    stop_price: float | None
    last_trail_level: float | None


@dataclass(slots=True)
class Result:
    """The outcome of one op: ``ok`` with data for the ack, or an error code and reason."""

    ok: bool
    data: dict[str, Any] = field(default_factory=dict)
    code: str = ""
    reason: str = ""
    legs: list[LegRow] = field(default_factory=list)  # StartOp: the session's open legs
    released: int = 0  # protective orders this op handed back (the protect worker has work)

    @classmethod
    def error(cls, code: str, reason: str) -> Result:
        return cls(False, code=code, reason=reason)


# Messages that need no session (posctl's, and a strategy's recovery): one op each.
OPERATOR_MESSAGES = ("query", "resolve", "orphans", "resolve_orphan", "prune")


def operator_op(msg: dict[str, Any], rid: bytes | None, by: str, wall: float) -> Op:
    """The op for a validated recovery or operator message (:data:`OPERATOR_MESSAGES`).

    The one place these ops are built: the engine for what arrives on its socket, posctl for
    what it writes directly when no daemon runs. ``by`` is who asked (the audit trail),
    ``wall`` the wall-clock time of the request.
    """
    kind, seq, session = msg["type"], msg.get("seq"), msg.get("session")
    if kind == "query":
        return QueryOp(rid, seq, session, by, msg["what"], msg.get("strategy"))
    if kind == "resolve":
        return ResolveOp(
            rid, seq, session, by, msg["key"], msg["action"], wall, msg.get("exit_price"),
            msg.get("exit_reason", "CLOSED_AT_BROKER"), msg.get("reason"),
            msg.get("keep_protection", False),
        )  # fmt: skip
    if kind == "orphans":
        return OrphansOp(rid, seq, session, by, msg["rows"], wall)
    if kind == "resolve_orphan":
        return OrphanResolveOp(
            rid, seq, session, by, msg["id"], msg["action"], wall, msg["reason"],
            msg.get("strategy"), msg.get("adopt_session"),
        )  # fmt: skip
    if kind == "prune":
        return PruneOp(rid, seq, session, by, msg["before"], msg.get("limit", PRUNE_CHUNK))
    raise ValueError(f"{kind!r} is not a recovery or operator message")
