"""What waits to be written: durable ops, coalesced leg updates, heartbeats, trail events.

Durable ops (starts, entries, exits, crashes, operator commands) go into every batch, in arrival
order: their clients wait for the ack. Leg updates are kept per leg, only their fields (the
message's envelope, its token among it, is dropped), each newer one overwriting the older
fields, and leave once per flush interval (or with a sync, or at shutdown). A batch that could not
commit comes back with :meth:`WriteQueue.requeue`, in front, without losing what arrived since.

Pure bookkeeping: time comes in as parameters, legs (whose stop and trail level the trail events
compare and move) as a mapping the caller owns.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from positiond.model import Leg
from positiond.ops import Batch, CrashOp, EndOp, ExitOp, Op, ProtectCloseOp, SyncOp, TrailEvent
from positiond_client.protocol import UPDATE_FIELDS

__all__ = ["WriteQueue", "update_fields"]


def update_fields(msg: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of an update (or an exit's last update) without the message's envelope."""
    return {name: msg[name] for name in UPDATE_FIELDS if name in msg}


def _final_carrier(
    ops: list[Op], key: str, session_key: str | None
) -> ExitOp | ProtectCloseOp | CrashOp | EndOp | None:
    """The op that took a leg out of memory: its exit (or its protective stop's fill), or its
    session's crash or end."""
    for op in ops:
        if isinstance(op, ExitOp | ProtectCloseOp) and op.key == key:
            return op
        if isinstance(op, CrashOp | EndOp) and op.session_key == session_key:
            return op
    return None


class WriteQueue:
    """The next batch, taken by the writer with :meth:`take`."""

    def __init__(self, flush_interval: float, now: float) -> None:
        self.flush_interval = flush_interval
        self._ops: list[Op] = []
        self._updates: dict[str, dict[str, Any]] = {}  # leg key -> fields
        self._owners: dict[str, str] = {}  # leg key -> session key, of the pending updates
        self._heartbeats: dict[str, float] = {}  # session key -> wall time of its latest message
        self._trail_backlog: list[TrailEvent] = []  # from batches that failed
        self._last_flush = now

    # ---- in ------------------------------------------------------------------------------

    def add(self, op: Op) -> None:
        """A durable op: in the next batch."""
        self._ops.append(op)

    def update(self, session_key: str, key: str, msg: Mapping[str, Any]) -> None:
        """A leg update: its fields over the ones still waiting for that leg."""
        pending = self._updates.get(key)
        if pending is None:
            self._updates[key] = update_fields(msg)
            self._owners[key] = session_key
        else:
            for name in UPDATE_FIELDS:
                if name in msg:
                    pending[name] = msg[name]

    def heartbeat(self, session_key: str, wall: float) -> None:
        self._heartbeats[session_key] = wall

    def take_update(self, key: str) -> dict[str, Any] | None:
        """Take a leg's waiting update out (its exit or its session's end writes it)."""
        self._owners.pop(key, None)
        return self._updates.pop(key, None)

    def forget_heartbeat(self, session_key: str) -> None:
        self._heartbeats.pop(session_key, None)

    # ---- state ---------------------------------------------------------------------------

    @property
    def pending_ops(self) -> int:
        return len(self._ops)

    @property
    def pending_updates(self) -> int:
        return len(self._updates)

    def due(self, now: float) -> bool:
        """Is a batch due: durable ops, or updates or heartbeats whose flush time came?"""
        if self._ops:
            return True
        return bool(self._updates or self._heartbeats) and (
            now - self._last_flush >= self.flush_interval
        )

    # ---- out -----------------------------------------------------------------------------

    def take(
        self, now: float, wall: float, legs: Mapping[str, Leg], *, flush_updates: bool = False
    ) -> Batch:
        """Everything due: all durable ops, and the updates when their time came."""
        batch = Batch(ops=self._ops, time=wall)
        self._ops = []
        # A sync is acked with this batch: everything received before it must be in it too.
        if (
            flush_updates
            or now - self._last_flush >= self.flush_interval
            or any(type(op) is SyncOp for op in batch.ops)
        ):
            self._last_flush = now
            batch.updates, self._updates = self._updates, {}
            batch.update_owners, self._owners = self._owners, {}
            batch.heartbeats, self._heartbeats = self._heartbeats, {}
            batch.trail_events = self._trail_backlog + trail_events(batch.updates, legs)
            self._trail_backlog = []
        return batch

    def final_trail(
        self, finals: dict[str, dict[str, Any]], leaving: set[str], legs: Mapping[str, Leg]
    ) -> list[TrailEvent]:
        """The events of legs' last updates, taken before the legs leave memory (exit, crash,
        end): the same rule as a flush, so the audit trail does not end one move early. Moves
        still waiting from a failed write go first, so they too precede the EXIT or CRASH."""
        waiting: list[TrailEvent] = []
        if self._trail_backlog:
            waiting = [e for e in self._trail_backlog if e.key in leaving]
            self._trail_backlog = [e for e in self._trail_backlog if e.key not in leaving]
        return waiting + (trail_events(finals, legs) if finals else [])

    def requeue(self, batch: Batch, legs: Mapping[str, Leg]) -> None:
        """The batch could not commit (storage fault): take it back, to be retried first.

        Nothing in it was acknowledged. Updates received since it was taken are newer and win.
        """
        since = self._ops
        self._ops = batch.ops + since
        carriers: dict[str, ExitOp | ProtectCloseOp | CrashOp | EndOp] = {}
        for key, upd in batch.updates.items():
            owner = batch.update_owners.get(key)
            if key not in legs:
                # It left memory since (its exit, its session's crash or end): the op that took
                # its last update writes these older fields too, under its own newer ones.
                carrier = _final_carrier(since, key, owner)
                if carrier is not None:
                    carrier.carry(key, update_fields(upd))
                    carriers[key] = carrier
                continue
            newer = self._updates.get(key)
            if newer is not None:
                upd.update(newer)
            self._updates[key] = upd
            if owner is not None:
                self._owners[key] = owner
        for key, wall in batch.heartbeats.items():
            self._heartbeats.setdefault(key, wall)
        backlog = []
        for event in reversed(batch.trail_events):  # reversed: each goes in front, order kept
            carrier = carriers.get(event.key)
            if carrier is None:
                backlog.append(event)
            else:
                carrier.trail_events.insert(0, event)  # written before the leg's last move
        self._trail_backlog = backlog[::-1] + self._trail_backlog


def trail_events(updates: dict[str, dict[str, Any]], legs: Mapping[str, Leg]) -> list[TrailEvent]:
    """One event per leg whose stop or trail level these updates move (legs in memory); the
    legs then hold the new values."""
    events = []
    for key, upd in updates.items():
        if "stop_price" not in upd and "last_trail_level" not in upd:
            continue
        leg = legs.get(key)
        if leg is None:
            continue
        before = (leg.stop_price, leg.last_trail_level)
        after = (upd.get("stop_price", before[0]), upd.get("last_trail_level", before[1]))
        leg.stop_price, leg.last_trail_level = after  # as sent: 2 stays an int
        if after != before:  # 2 -> 2.0 is no move
            events.append(TrailEvent(key, leg.session_key, before, after, upd.get("current_price")))
    return events
