"""Watchers: ``posctl watch`` and scripts following what the daemon commits (docs/PROTOCOL.md
§4.14, §5.5).

A watcher sends ``watch`` on the daemon's own socket. Its snapshot is read by the writer, in the
writer's order (:class:`~positiond.ops.WatchOp`), and sent as the ack; from the batch that read
it on, :meth:`WatchHub.publish` turns each committed batch into change events for every watcher.

Why on the ROUTER and not a PUB socket: one endpoint, one set of permissions (the socket file,
CURVE), the snapshot and the stream in one ordered channel, and the daemon sees each watcher's
progress (a PUB socket drops silently and cannot tell a subscriber it lost frames).

What a watcher may cost, at most:

- nothing while nobody watches: :meth:`WatchHub.publish` returns after one scan of the batch's
  ops (for a ``WatchOp``), and the tick after one truth test;
- per watcher, coalesced changes: a leg's updates between two frames are merged into one event
  (so at most one per open leg) and other events are capped at :data:`MAX_PENDING`;
- at most :data:`RATE` frames a second: ``changes``, and a ``health`` frame (the daemon's
  health, the last ``n``, the sessions seen since the last one) every :data:`KEEPALIVE`
  seconds even when nothing changes;
- a watcher reports its progress (``watching n``) at least every few seconds: one more than
  :data:`WINDOW` ``changes`` frames behind, silent for :data:`SILENCE` seconds, with more
  pending than :data:`MAX_PENDING`, or whose queue in ZeroMQ is full, is dropped (told with a
  ``dropped`` frame if it can still take one; a later ``watching`` from it gets
  ``NOT_WATCHING``). It may subscribe again. So a stuck watcher holds at most WINDOW frames
  and SILENCE seconds of health frames in ZeroMQ's queue.

Watchers are not sessions: no heartbeat verdict, no crash, nothing stored; at most
:data:`MAX_WATCHERS` at a time (more get ``BUSY``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from positiond.ops import (
    Batch,
    CrashOp,
    EndOp,
    EntryOp,
    ExitOp,
    OrphanResolveOp,
    OrphansOp,
    ProtectCloseOp,
    ResolveOp,
    Result,
    StallOp,
    StartOp,
    TrailEvent,
    WatchOp,
)
from positiond.store.schema import iso
from positiond_client.protocol import changes_frame, dropped_frame, error_reply, health_frame

__all__ = [
    "HEALTH_FIELDS",
    "KEEPALIVE",
    "MAX_PENDING",
    "MAX_WATCHERS",
    "RATE",
    "SILENCE",
    "WINDOW",
    "WatchHub",
    "Watcher",
]

log = logging.getLogger(__name__)

RATE = 10.0  # frames per second per watcher, at most
KEEPALIVE = 1.0  # a ``health`` frame this often
WINDOW = 40  # ``changes`` frames sent and not reported read, at most (4 s at the full rate)
SILENCE = 10.0  # seconds without a ``watching`` report, at most
MAX_PENDING = 2000  # events waiting for a watcher's next frame, at most
MAX_WATCHERS = 32
# What of the daemon's health goes to watchers (the rest is for posctl status).
HEALTH_FIELDS = (
    "pid", "version", "uptime", "healthy", "sessions", "legs", "pending_ops", "pending_updates",
    "last_flush_age", "writer_stalled", "db_size", "storage_fault", "endpoint", "db",
)  # fmt: skip

Send = Callable[[bytes, bytes], bool]


@dataclass(slots=True)
class Watcher:
    rid: bytes
    strategy: str | None
    sent: int = 0  # the n of the last frame sent
    read: int = 0  # the n the watcher last reported read
    heard: float = 0.0  # monotonic: its last ``watching`` (or its subscription)
    next_frame: float = 0.0  # monotonic: no frame before this
    last_health: float = 0.0
    beat: bool = False  # the last frame sent was a health frame
    legs: dict[str, dict[str, Any]] = field(default_factory=dict)  # coalesced updates by leg
    events: list[dict[str, Any]] = field(default_factory=list)
    seen: dict[str, str] = field(default_factory=dict)  # session key -> its last heartbeat


class WatchHub:
    """Every watcher of one daemon: who they are, what each has still to get."""

    def __init__(
        self,
        send: Send,
        *,
        rate: float = RATE,
        window: int = WINDOW,
        max_pending: int = MAX_PENDING,
        max_watchers: int = MAX_WATCHERS,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.send = send
        self.monotonic = monotonic
        self.interval = 1.0 / rate
        self.window = window
        self.max_pending = max_pending
        self.max_watchers = max_watchers
        self.watchers: dict[bytes, Watcher] = {}
        self._strategies: dict[str, str] = {}  # session key -> strategy, for the filter
        self.counters: dict[str, int] = {"watch_frames": 0, "watchers_dropped": 0}

    def __bool__(self) -> bool:
        return bool(self.watchers)

    # ---- the writer's side ---------------------------------------------------------------

    def publish(self, batch: Batch, results: list[Result], now: float) -> None:
        """Take a committed batch before its acks are sent: register its new watchers (one
        beyond :data:`MAX_WATCHERS` gets ``BUSY`` instead of its snapshot), queue its changes
        for every watcher (frames go out at the next :meth:`tick`, after the acks)."""
        if not self.watchers and not any(type(op) is WatchOp for op in batch.ops):
            return
        when = iso(batch.time)
        for op, res in zip(batch.ops, results, strict=True):
            if not res.ok:
                continue
            if type(op) is WatchOp:
                self._register(op, res, now)
                continue
            event = self._event(op, res, when)
            if event is not None:
                # the stop moves its last update made, written before the exit, crash or end
                for trail in getattr(op, "trail_events", ()):
                    self._queue(_trail(trail, when, self._strategies.get(trail.session_key)))
                self._queue(event)
                for key, fields in getattr(op, "final_updates", {}).items():
                    self._queue_update(key, op.session_key or "", {**fields, "time": when})
        owners = batch.update_owners
        for key, fields in batch.updates.items():
            self._queue_update(key, owners.get(key, ""), {**fields, "time": when})
        for trail in batch.trail_events:
            self._queue(_trail(trail, when, self._strategies.get(trail.session_key)))
        for session, wall in batch.heartbeats.items():  # "last seen": in the health frames
            self._queue_seen(session, iso(wall))

    def _register(self, op: WatchOp, res: Result, now: float) -> None:
        assert op.rid is not None
        if op.rid not in self.watchers and len(self.watchers) >= self.max_watchers:
            res.ok, res.data = False, {}
            res.code, res.reason = "BUSY", f"too many watchers (at most {self.max_watchers})"
            return
        for row in res.data.get("snapshot", {}).get("sessions", ()):
            self._strategies[row["session"]] = row["strategy"]
        self.watchers[op.rid] = Watcher(
            op.rid, op.strategy, heard=now, next_frame=now, last_health=now
        )
        log.info("watcher subscribed (%d watching)", len(self.watchers))

    def _event(self, op: Any, res: Result, when: str) -> dict[str, Any] | None:
        data = res.data
        if data.get("duplicate"):
            return None
        if isinstance(op, StartOp):
            self._strategies[op.session_key] = op.strategy
            event = {
                "event": "session", "session": op.session_key, "strategy": op.strategy,
                "id": data.get("session_id"), "status": data.get("status", "RUNNING"),
                "host": op.host, "pid": op.pid, "revived": bool(data.get("revived")),
                "time": when,
            }  # fmt: skip
            if data.get("revived"):  # its CRASHED legs are ACTIVE again
                event["legs"] = list(data["revived"].get("legs", ()))
            return event
        strategy = self._strategies.get(op.session_key) if op.session_key else None
        base = {"session": op.session_key, "strategy": strategy, "time": when}
        if isinstance(op, EntryOp):
            if data.get("status", "ACTIVE") != "ACTIVE":
                return None
            return {"event": "entry", "key": op.key, **base, **op.fields, "status": "ACTIVE"}
        if isinstance(op, ExitOp):
            return {
                "event": "exit", "key": op.key, **base, "exit_price": op.exit_price,
                "exit_reason": op.exit_reason, **(op.final_update or {}),
            }  # fmt: skip
        if isinstance(op, ProtectCloseOp):  # the leg's protective stop filled at the broker
            if not data.get("closed"):
                return None
            return {
                "event": "exit", "key": op.key, **base, "exit_price": op.fill_price,
                "exit_reason": "PROTECTIVE_STOP", "order_id": op.order_id,
            }  # fmt: skip
        if isinstance(op, CrashOp):
            return {"event": "crash", **base, "source": op.source, "reason": op.reason}
        if isinstance(op, EndOp):
            self._strategies.pop(op.session_key, None)
            return {"event": "end", **base}
        if isinstance(op, StallOp):
            return {"event": "status", **base, "status": "STALLED" if op.stalled else "RUNNING"}
        if isinstance(op, ResolveOp):
            return {
                "event": "resolve", "key": op.key, **base, "action": op.action,
                "status": data.get("status"), "by": op.by,
            }  # fmt: skip
        if isinstance(op, OrphansOp | OrphanResolveOp):
            return {"event": "orphans", **base, "by": op.by}
        return None

    def _wants(self, watcher: Watcher, event: Mapping[str, Any]) -> bool:
        # a session it does not know is not its strategy's (they all were in its snapshot)
        strategy = event.get("strategy")
        return (
            watcher.strategy is None
            or strategy == watcher.strategy
            # no strategy known: orphans, an operator's resolve of a leg not live (a board that
            # does not show that leg ignores it)
            or (strategy is None and event["event"] in ("orphans", "resolve"))
        )

    def _queue(self, event: dict[str, Any]) -> None:
        for watcher in self.watchers.values():
            if self._wants(watcher, event):
                watcher.events.append(event)

    def _queue_update(self, key: str, session: str, fields: dict[str, Any]) -> None:
        strategy = self._strategies.get(session)
        for watcher in self.watchers.values():
            if watcher.strategy is not None and strategy != watcher.strategy:
                continue
            pending = watcher.legs.get(key)
            if pending is None:
                watcher.legs[key] = {
                    "event": "update", "key": key, "session": session, "strategy": strategy,
                    **fields,
                }  # fmt: skip
            else:
                pending.update(fields)

    def _queue_seen(self, session: str, when: str) -> None:
        strategy = self._strategies.get(session)
        for watcher in self.watchers.values():
            if watcher.strategy is None or strategy == watcher.strategy:
                watcher.seen[session] = when

    # ---- the watcher's side --------------------------------------------------------------

    def progress(self, rid: bytes, n: int) -> bytes | None:
        """``watching n`` from ``rid``: None, or the error for one that is no watcher."""
        watcher = self.watchers.get(rid)
        if watcher is None:
            return error_reply(
                "NOT_WATCHING",
                "not subscribed (dropped, or the daemon restarted): send watch again",
            )
        watcher.read = max(watcher.read, min(n, watcher.sent))
        watcher.heard = self.monotonic()
        return None

    def tick(
        self, now: float, alive: Callable[[bytes], bool], health: Callable[[], dict[str, Any]]
    ) -> None:
        """Send each watcher what is due (at most one frame); drop the stuck and the gone."""
        if not self.watchers:
            return
        shown: dict[str, Any] | None = None
        for rid, watcher in list(self.watchers.items()):
            reason = self._stuck(watcher, now)
            if reason is not None or not alive(rid):
                self._drop(watcher, reason)
                continue
            if now < watcher.next_frame:
                continue
            pending = bool(watcher.events or watcher.legs)
            # health when due, but never twice in a row while changes wait (slow ticks)
            if now - watcher.last_health >= KEEPALIVE and not (pending and watcher.beat):
                if shown is None:
                    full = health()
                    shown = {k: full[k] for k in HEALTH_FIELDS if k in full}
                frame = health_frame(watcher.sent, shown, watcher.seen)
                watcher.last_health, watcher.seen, watcher.beat = now, {}, True
            elif pending:
                events = watcher.events + list(watcher.legs.values())
                frame = changes_frame(watcher.sent + 1, events)
                watcher.sent += 1
                watcher.events, watcher.legs, watcher.beat = [], {}, False
            else:
                continue
            if not self.send(rid, frame):
                self._drop(watcher, None)  # its queue is full (or it is gone): cannot tell it
                continue
            self.counters["watch_frames"] += 1
            watcher.next_frame = now + self.interval

    def _stuck(self, watcher: Watcher, now: float) -> str | None:
        if watcher.sent - watcher.read > self.window:
            return f"more than {self.window} changes frames not read"
        if now - watcher.heard > SILENCE:
            return f"no watching report for {SILENCE:g}s"
        if len(watcher.events) + len(watcher.legs) > self.max_pending:
            return f"more than {self.max_pending} changes waiting"
        return None

    def drop_all(self) -> None:
        """Forget every watcher (each learns it from ``NOT_WATCHING`` or its silence)."""
        self.counters["watchers_dropped"] += len(self.watchers)
        self.watchers.clear()
        self._strategies.clear()

    def _drop(self, watcher: Watcher, reason: str | None) -> None:
        del self.watchers[watcher.rid]
        self.counters["watchers_dropped"] += 1
        if reason is not None:
            self.send(watcher.rid, dropped_frame(reason))
        log.log(
            logging.WARNING if reason else logging.INFO,
            "watcher dropped: %s (%d watching)",
            reason or "gone, or its queue is full",
            len(self.watchers),
        )
        if not self.watchers:
            self._strategies.clear()


def _trail(event: TrailEvent, when: str, strategy: str | None) -> dict[str, Any]:
    return {
        "event": "trail", "key": event.key, "session": event.session_key, "strategy": strategy,
        "stop_price": list(event.before[:1] + event.after[:1]),
        "last_trail_level": [event.before[1], event.after[1]], "price": event.price,
        "time": when,
    }  # fmt: skip
