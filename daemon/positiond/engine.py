"""The daemon's decisions: which messages are valid, what to write, who is dead, what to answer.

Plain Python with an injected clock and no I/O. The server feeds it decoded messages and peer
events and carries out what it returns: replies to send now, a :class:`~positiond.ops.Batch` for
the store, and replies to send once that batch has committed.

Every ``now`` handed in is monotonic time; liveness and progress deadlines are judged on the
daemon's observed time (:class:`~positiond.liveness.DaemonClock`), so a gap in the daemon's
own progress (stopped, suspended, starved) never turns into a verdict.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time as _time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from positiond.liveness import MIN_HEARTBEATS, DaemonClock, Liveness, Verdict
from positiond.ops import (
    CLIENT,
    DISCONNECT,
    Batch,
    CrashOp,
    EndOp,
    EntryOp,
    ExitOp,
    FencedOp,
    LegRow,
    LiveSession,
    Op,
    ResolveOp,
    Result,
    StallOp,
    StartOp,
    SyncOp,
    TrailEvent,
    operator_op,
    token_hash,
)
from positiond_client.protocol import PROTOCOL_VERSION, UPDATE_FIELDS, encode, error_reply

__all__ = ["Engine", "Leg", "Peer", "Session"]

log = logging.getLogger(__name__)

Reply = tuple[bytes, bytes]  # (routing id, payload)


@dataclass(slots=True)
class Session:
    key: str
    strategy: str
    id: int | None = None
    confirmed: bool = False  # its start (or resume) has committed
    rid: bytes | None = None
    legs: set[str] = field(default_factory=set)
    token: str | None = None  # every message must carry it
    token_hash: str | None = None  # loaded from the database until the token is seen again
    progress_deadline: float | None = None
    last_progress: float = 0.0  # observed time of its last entry/update/exit
    stalled: bool = False
    last_wall: float = 0.0  # wall time of its latest message (for the crash reason)

    def authentic(self, token: object) -> bool:
        """Does the message's token prove it comes from the session's own client?"""
        if self.token is not None:
            return isinstance(token, str) and hmac.compare_digest(token, self.token)
        if self.token_hash is not None:
            if not isinstance(token, str) or not hmac.compare_digest(
                self.token_hash, token_hash(token)
            ):
                return False
            self.token = token  # verified once: compare plainly from now on
        return True  # a session from before tokens existed


@dataclass(slots=True)
class Leg:
    key: str
    session_key: str
    stop_price: float | None = None
    last_trail_level: float | None = None
    pending_entry: EntryOp | None = None  # set until the entry commits


@dataclass(slots=True)
class Peer:
    rid: bytes
    fd: int = -1
    uid: int | None = None
    pid: int | None = None
    sessions: set[str] = field(default_factory=set)


_Handler = Callable[["Engine", Session | None, bytes, dict[str, Any], float], bytes | None]


def _ack(seq: int | None, data: dict[str, Any]) -> bytes:
    msg: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": "ack", "seq": seq}
    msg.update(data)
    return encode(msg)


def _final_carrier(
    ops: list[Op], key: str, session_key: str | None
) -> ExitOp | CrashOp | EndOp | None:
    """The op that took a leg out of memory: its exit, or its session's crash or end."""
    for op in ops:
        if isinstance(op, ExitOp) and op.key == key:
            return op
        if isinstance(op, CrashOp | EndOp) and op.session_key == session_key:
            return op
    return None


def _clock_text(wall: float) -> str:
    return _time.strftime("%H:%M:%S", _time.localtime(wall)) + f".{int(wall * 10) % 10}"


class Engine:
    """In-memory model of live sessions and open legs, and the rules applied to each message.

    ``monotonic`` drives liveness (through the observed :attr:`clock`), ``wall`` stamps what is
    stored; both are injectable.
    """

    def __init__(
        self,
        heartbeat_timeout: float,
        flush_interval: float,
        *,
        monotonic: Callable[[], float] = _time.monotonic,
        wall: Callable[[], float] = _time.time,
    ) -> None:
        self.liveness = Liveness(heartbeat_timeout)
        self.clock = DaemonClock(monotonic())
        self.flush_interval = flush_interval
        self.monotonic = monotonic
        self.wall = wall
        self.sessions: dict[str, Session] = {}
        self.legs: dict[str, Leg] = {}
        self.peers: dict[bytes, Peer] = {}
        self._ops: list[Op] = []
        self._updates: dict[str, dict[str, Any]] = {}
        self._heartbeats: dict[str, float] = {}
        self._trail_backlog: list[TrailEvent] = []
        self._fenced_seen: set[tuple[str, str, str]] = set()
        self._progress_watch: set[str] = set()  # sessions with a progress deadline
        # The daemon's health snapshot (set by the server), for ``query what=health``.
        self.health: Callable[[], dict[str, Any]] | None = None
        self._last_update_flush = monotonic()
        self.counters: dict[str, int] = {"messages": 0, "updates": 0, "errors": 0}

    # ---- loading -------------------------------------------------------------------------

    def load(self, sessions: Iterable[LiveSession], legs: Iterable[LegRow]) -> None:
        """Adopt what the database says was live when the daemon last stopped.

        Each RUNNING session gets one heartbeat timeout to come back from now on; a STALLED one
        is still stalled until its next update.
        """
        # Observation starts here: opening the database before was no gap in the daemon's
        # progress, and nothing was watched yet.
        self.clock = DaemonClock(self.monotonic())
        now = self.clock.now()
        wall = self.wall()
        for live in sessions:
            key = live.key
            session = Session(
                key, live.strategy, id=live.id, confirmed=True, token_hash=live.token_hash
            )
            session.stalled = live.status == "STALLED"
            session.last_wall = wall
            self._watch_progress(session, live.progress_deadline, now)
            self.sessions[key] = session
            self.liveness.expect_return(key, now)
            self.liveness.announce(key, live.heartbeat_interval)
        for row in legs:
            owner = self.sessions.get(row.session_key)
            if owner is not None:
                self._add_leg(row, owner)

    def _watch_progress(self, session: Session, deadline: float | None, now: float) -> None:
        session.progress_deadline = deadline
        session.last_progress = now
        if deadline is None:
            self._progress_watch.discard(session.key)
        else:
            self._progress_watch.add(session.key)

    def _add_leg(self, row: LegRow, session: Session) -> None:
        self.legs[row.key] = Leg(row.key, row.session_key, row.stop_price, row.last_trail_level)
        session.legs.add(row.key)

    # ---- peers ---------------------------------------------------------------------------

    def add_peer(self, rid: bytes, fd: int, uid: int | None, pid: int | None) -> Peer:
        peer = Peer(rid, fd, uid, pid)
        self.peers[rid] = peer
        return peer

    def peers_on_fd(self, fd: int) -> list[Peer]:
        return [p for p in self.peers.values() if p.fd == fd]

    def peer_gone(self, rid: bytes) -> None:
        """The peer's process exited (its ipc connection dropped): crash its live sessions."""
        peer = self.peers.pop(rid, None)
        if peer is None:
            return
        for key in peer.sessions:
            session = self.sessions.get(key)
            if session is not None and session.rid == rid:
                pid = f" (pid {peer.pid})" if peer.pid else ""
                self._declare_crashed(
                    session, DISCONNECT, f"process exited{pid}", {"peer_pid": peer.pid}
                )

    # ---- messages ------------------------------------------------------------------------

    def receive(self, rid: bytes, msg: dict[str, Any], now: float, wall: float) -> bytes | None:
        """Apply one validated message; return an immediate reply (an error) or None."""
        self.counters["messages"] += 1
        kind = msg["type"]
        key = msg.get("session")  # absent only on operator messages (posctl)
        session = self.sessions.get(key) if key is not None else None
        if session is not None and key is not None:
            if not session.authentic(msg.get("token")) and not (
                kind == "start" and not session.confirmed and session.rid == rid
            ):
                return self._error(
                    msg, "BAD_TOKEN", f"session {key!r} belongs to another client (wrong token)"
                )
            now = self.clock.observe(now)
            self.liveness.seen(key, now)
            self._heartbeats[key] = wall
            session.last_wall = wall
            if session.rid != rid:
                self._attach(session, rid)
            if kind == "update":
                session.last_progress = now
                if session.stalled:
                    self._progress(session)
                return self._update(session, msg)
            if kind == "hb":
                return None
            if kind == "entry" or kind == "exit":
                session.last_progress = now
                if session.stalled:
                    self._progress(session)
        handler = self._HANDLERS[kind]
        return handler(self, session, rid, msg, wall)

    def _attach(self, session: Session, rid: bytes) -> None:
        old = self.peers.get(session.rid) if session.rid is not None else None
        if old is not None:
            old.sessions.discard(session.key)
        session.rid = rid
        peer = self.peers.get(rid)
        if peer is not None:
            peer.sessions.add(session.key)

    def _error(self, msg: dict[str, Any], code: str, reason: str) -> bytes:
        self.counters["errors"] += 1
        return error_reply(code, reason, msg.get("seq"), msg.get("key"))

    def _unknown_session(self, msg: dict[str, Any]) -> bytes:
        return self._error(
            msg,
            "UNKNOWN_SESSION",
            f"session {msg['session']!r} is not live here; send start to (re)announce it",
        )

    def _update(self, session: Session, msg: dict[str, Any]) -> bytes | None:
        key = msg["key"]
        leg = self.legs.get(key)
        if leg is None or leg.session_key != session.key:
            return self._leg_error(msg, leg, session)
        self.counters["updates"] += 1
        pending = self._updates.get(key)
        if pending is None:
            self._updates[key] = msg
        else:
            for name in UPDATE_FIELDS:
                if name in msg:
                    pending[name] = msg[name]
        return None

    def _leg_error(self, msg: dict[str, Any], leg: Leg | None, writer: Session) -> bytes:
        if leg is None:
            return self._error(msg, "UNKNOWN_LEG", f"no open leg {msg['key']!r}")
        # Two monitors on one leg is how double exits happen: refuse, and keep a record of the
        # first refused write of each kind from each session (an exit is a fact at the broker).
        mark = (leg.key, writer.key, msg["type"])
        if mark not in self._fenced_seen:
            self._fenced_seen.add(mark)
            log.error(
                "refused %s for leg %s from session %s (%s): the leg belongs to another session",
                msg["type"], leg.key, writer.id, writer.strategy,
            )  # fmt: skip
            message = {k: v for k, v in msg.items() if k not in ("v", "session", "token")}
            self._ops.append(
                FencedOp(None, None, writer.key, self._by(writer), leg.key, self.wall(), message)
            )
        return self._error(
            msg,
            "FENCED",
            f"leg {msg['key']!r} belongs to another session; this one may not write it",
        )

    def _on_hb(
        self, session: Session | None, rid: bytes, msg: dict[str, Any], wall: float
    ) -> bytes | None:
        return self._unknown_session(msg)

    def _on_update(
        self, session: Session | None, rid: bytes, msg: dict[str, Any], wall: float
    ) -> bytes | None:
        return self._unknown_session(msg)

    def _on_start(
        self, session: Session | None, rid: bytes, msg: dict[str, Any], wall: float
    ) -> bytes | None:
        key = msg["session"]
        now = self.clock.observe(self.monotonic())
        if session is None:
            # A token offered is checked against the stored hash when the start commits; a new
            # session gets a fresh one, sent back in the ack.
            session = Session(key, msg["strategy"], token=msg.get("token") or secrets.token_hex(16))
            self.sessions[key] = session
            self.liveness.seen(key, now)
            session.last_wall = wall
            self._attach(session, rid)
        elif session.strategy != msg["strategy"]:
            return self._error(
                msg, "BAD_FIELD", f"session {key!r} belongs to strategy {session.strategy!r}"
            )
        interval = msg.get("heartbeat_interval")
        # A timeout shorter than a few of its heartbeats would declare it dead between two of
        # them: such a session is given MIN_HEARTBEATS intervals instead (the ack says so).
        self.liveness.announce(key, interval)
        if interval is not None and interval * MIN_HEARTBEATS > self.liveness.timeout:
            log.warning(
                "session %s (%s) heartbeats every %gs, too seldom for the %gs heartbeat timeout: "
                "it is given %gs instead",
                key,
                msg["strategy"],
                interval,
                self.liveness.timeout,
                self.liveness.timeout_for(key),
            )
        peer = self.peers.get(rid)
        self._ops.append(
            StartOp(
                rid,
                msg["seq"],
                key,
                msg["strategy"],
                msg.get("host"),
                msg.get("pid"),
                msg.get("heartbeat_interval"),
                msg.get("time", wall),
                peer.uid if peer else None,
                peer.pid if peer else None,
                # a session from before tokens takes the one this start carries (or a new one)
                session.token or msg.get("token") or secrets.token_hex(16),
                msg.get("progress_deadline"),
            )
        )
        self._watch_progress(session, msg.get("progress_deadline"), now)
        return None

    def _on_entry(
        self, session: Session | None, rid: bytes, msg: dict[str, Any], wall: float
    ) -> bytes | None:
        if session is None:
            return self._unknown_session(msg)
        key = msg["key"]
        leg = self.legs.get(key)
        if leg is not None and leg.session_key != session.key:
            return self._error(
                msg, "KEY_CONFLICT", f"position key {key!r} is an open leg of another session"
            )
        fields = {
            name: value
            for name, value in msg.items()
            if name not in ("v", "type", "session", "token", "seq", "key", "time")
        }
        op = EntryOp(rid, msg["seq"], session.key, key, fields, msg.get("time", wall))
        if leg is None:
            leg = Leg(key, session.key, fields.get("stop_price"), fields.get("last_trail_level"))
            leg.pending_entry = op
            self.legs[key] = leg
            session.legs.add(key)
        self._ops.append(op)
        return None

    def _on_exit(
        self, session: Session | None, rid: bytes, msg: dict[str, Any], wall: float
    ) -> bytes | None:
        if session is None:
            return self._unknown_session(msg)
        key = msg["key"]
        leg = self.legs.get(key)
        if leg is not None and leg.session_key != session.key:
            return self._leg_error(msg, leg, session)
        final = self._updates.pop(key, None)
        carried: dict[str, Any] = {name: msg[name] for name in UPDATE_FIELDS if name in msg}
        if carried:
            final = {**final, **carried} if final else carried
        trail = self._final_trail({key: final} if final else {}, {key})
        if leg is not None:
            del self.legs[key]
            session.legs.discard(key)
        self._ops.append(
            ExitOp(
                rid,
                msg["seq"],
                session.key,
                key,
                msg.get("exit_price"),
                msg["exit_reason"],
                msg.get("time", wall),
                final,
                trail,
            )
        )
        return None

    def _on_sync(
        self, session: Session | None, rid: bytes, msg: dict[str, Any], wall: float
    ) -> bytes | None:
        self._ops.append(SyncOp(rid, msg["seq"], msg["session"]))
        return None

    def _on_crash(
        self, session: Session | None, rid: bytes, msg: dict[str, Any], wall: float
    ) -> bytes | None:
        reason = f"{msg['error_type']}: {msg['message']}" if msg["message"] else msg["error_type"]
        payload = {"error_type": msg["error_type"], "message": msg["message"]}
        if "traceback" in msg:
            payload["traceback"] = msg["traceback"]
        op = CrashOp(
            rid, msg["seq"], msg["session"], CLIENT, reason, msg.get("time", wall), payload,
            token=msg.get("token"),
        )  # fmt: skip
        if session is not None:
            op.final_updates, op.trail_events = self._retire(session)
            op.strategy = session.strategy
        self._ops.append(op)
        return None

    def _on_end(
        self, session: Session | None, rid: bytes, msg: dict[str, Any], wall: float
    ) -> bytes | None:
        op = EndOp(rid, msg["seq"], msg["session"], msg.get("time", wall), token=msg.get("token"))
        if session is not None:
            op.final_updates, op.trail_events = self._retire(session)
        self._ops.append(op)
        return None

    @staticmethod
    def _by(session: Session | None, asked_by: str | None = None) -> str:
        who = f"session {session.id} ({session.strategy})" if session is not None else None
        parts = [p for p in (who, asked_by) if p]
        return ": ".join(parts) if parts else "unknown"

    def _on_query(
        self, session: Session | None, rid: bytes, msg: dict[str, Any], wall: float
    ) -> bytes | None:
        if msg["what"] == "health":
            # Answered now, from memory: a stuck database must not hang the health check.
            health = self.health() if self.health is not None else {}
            return _ack(msg["seq"], {"health": health})
        self._ops.append(operator_op(msg, rid, self._by(session, msg.get("by")), wall))
        return None

    def _on_resolve(
        self, session: Session | None, rid: bytes, msg: dict[str, Any], wall: float
    ) -> bytes | None:
        key, action = msg["key"], msg["action"]
        if action == "adopt" and session is None:
            return self._unknown_session(msg) if "session" in msg else self._error(
                msg, "NO_SESSION", "adopting a leg needs the session that takes it"
            )  # fmt: skip
        leg = self.legs.get(key)
        if leg is not None and (session is None or leg.session_key != session.key):
            return self._error(
                msg,
                "BAD_STATE" if action != "adopt" else "FENCED",
                f"leg {key!r} is open in a live session; only its owner may act on it",
            )
        self._ops.append(operator_op(msg, rid, self._by(session, msg.get("by")), wall))
        return None

    def _on_orphans(
        self, session: Session | None, rid: bytes, msg: dict[str, Any], wall: float
    ) -> bytes | None:
        self._ops.append(operator_op(msg, rid, self._by(session, msg.get("by")), wall))
        return None

    def _on_resolve_orphan(
        self, session: Session | None, rid: bytes, msg: dict[str, Any], wall: float
    ) -> bytes | None:
        if msg["action"] == "adopt" and "strategy" not in msg:
            return self._error(msg, "BAD_FIELD", "resolve_orphan: adopt needs strategy")
        self._ops.append(operator_op(msg, rid, self._by(session, msg.get("by")), wall))
        return None

    def _on_prune(
        self, session: Session | None, rid: bytes, msg: dict[str, Any], wall: float
    ) -> bytes | None:
        self._ops.append(operator_op(msg, rid, self._by(session, msg.get("by")), wall))
        return None

    _HANDLERS: ClassVar[dict[str, _Handler]] = {
        "query": _on_query,
        "resolve": _on_resolve,
        "orphans": _on_orphans,
        "resolve_orphan": _on_resolve_orphan,
        "prune": _on_prune,
        "hb": _on_hb,
        "update": _on_update,
        "start": _on_start,
        "entry": _on_entry,
        "exit": _on_exit,
        "crash": _on_crash,
        "end": _on_end,
        "sync": _on_sync,
    }

    def _retire(self, session: Session) -> tuple[dict[str, dict[str, Any]], list[TrailEvent]]:
        """Forget a session and its legs in memory; return their pending updates.

        With them, the TRAIL_UPDATE events those last updates make, exactly as a flush would
        have: the legs leave memory here, so no later flush can compare them any more.
        """
        self.sessions.pop(session.key, None)
        self.liveness.forget(session.key)
        self._progress_watch.discard(session.key)
        self._heartbeats.pop(session.key, None)
        if session.rid is not None and (peer := self.peers.get(session.rid)) is not None:
            peer.sessions.discard(session.key)
        finals = {}
        for key in sorted(session.legs):  # one order every run
            pending = self._updates.pop(key, None)
            if pending is not None:
                finals[key] = pending
        trail = self._final_trail(finals, session.legs)
        for key in session.legs:
            self.legs.pop(key, None)
        return finals, trail

    def _declare_crashed(
        self, session: Session, source: str, reason: str, payload: dict[str, Any]
    ) -> None:
        log.warning("session %s (%s) crashed: %s", session.id, session.strategy, reason)
        finals, trail = self._retire(session)
        payload = {**payload, "legs": sorted(session.legs)}
        self._ops.append(
            CrashOp(None, None, session.key, source, reason, self.wall(), payload, finals,
                    trail_events=trail)
        )  # fmt: skip

    # ---- time ----------------------------------------------------------------------------

    def tick(self, now: float) -> bool:
        """Declare expired sessions crashed; True when a batch is due (ops, or flush time).

        ``now`` is monotonic; the deadlines are judged on the daemon's observed time.
        """
        raw = now
        now = self.clock.observe(raw)
        for dead in self.liveness.expired(now):
            session = self.sessions.get(dead.session_key)
            if session is None:
                continue
            last_wall = session.last_wall
            if dead.verdict is Verdict.NOT_RETURNED:
                reason = "did not return after daemon restart"
            else:
                reason = f"missed heartbeats (last seen {_clock_text(last_wall)})"
            self._declare_crashed(
                session,
                dead.verdict.value,
                reason,
                {"last_seen": last_wall, "timeout": dead.timeout},
            )
        for key in self._progress_watch:
            session = self.sessions[key]
            deadline = session.progress_deadline
            if (
                deadline is not None
                and not session.stalled
                and session.legs
                and now - session.last_progress > deadline
            ):
                session.stalled = True
                last = self.wall() - (raw - self.clock.raw(session.last_progress))
                log.warning(
                    "session %s (%s) STALLED: no update for %.1fs with %d leg(s) open",
                    session.id, session.strategy, now - session.last_progress, len(session.legs),
                )  # fmt: skip
                payload = {
                    "last_progress": last,
                    "deadline": deadline,
                    "legs": sorted(session.legs),
                }
                self._ops.append(StallOp(None, None, key, True, self.wall(), payload))
        return self.batch_due(now)

    def _progress(self, session: Session) -> None:
        session.stalled = False
        log.info("session %s (%s) makes progress again", session.id, session.strategy)
        self._ops.append(StallOp(None, None, session.key, False, self.wall()))

    def batch_due(self, now: float) -> bool:
        if self._ops:
            return True
        return bool(self._updates or self._heartbeats) and (
            now - self._last_update_flush >= self.flush_interval
        )

    @property
    def pending_ops(self) -> int:
        return len(self._ops)

    @property
    def pending_updates(self) -> int:
        return len(self._updates)

    def take_batch(self, now: float, *, flush_updates: bool = False) -> Batch:
        """Hand the store what is due: all durable ops, and the updates when their time came."""
        batch = Batch(ops=self._ops, time=self.wall())
        self._ops = []
        # A sync is acked with this batch: everything received before it must be in it too.
        if (
            flush_updates
            or now - self._last_update_flush >= self.flush_interval
            or any(type(op) is SyncOp for op in batch.ops)
        ):
            self._last_update_flush = now
            batch.updates, self._updates = self._updates, {}
            batch.heartbeats, self._heartbeats = self._heartbeats, {}
            batch.trail_events = self._trail_backlog + self._trail_events(batch.updates)
            self._trail_backlog = []
        return batch

    def _trail_events(self, updates: dict[str, dict[str, Any]]) -> list[TrailEvent]:
        """One event per leg whose stop or trail level these updates move (legs in memory)."""
        events = []
        for key, upd in updates.items():
            if "stop_price" not in upd and "last_trail_level" not in upd:
                continue
            leg = self.legs.get(key)
            if leg is None:
                continue
            before = (leg.stop_price, leg.last_trail_level)
            after = (upd.get("stop_price", before[0]), upd.get("last_trail_level", before[1]))
            leg.stop_price, leg.last_trail_level = after  # as sent: 2 stays an int
            if after != before:  # 2 -> 2.0 is no move
                events.append(
                    TrailEvent(key, leg.session_key, before, after, upd.get("current_price"))
                )
        return events

    def _final_trail(
        self, finals: dict[str, dict[str, Any]], leaving: set[str]
    ) -> list[TrailEvent]:
        """The events of legs' last updates, taken before the legs leave memory (exit, crash,
        end): the same rule as a flush, so the audit trail does not end one move early. Moves
        still waiting from a failed write go first, so they too precede the EXIT or CRASH."""
        waiting: list[TrailEvent] = []
        if self._trail_backlog:
            waiting = [e for e in self._trail_backlog if e.key in leaving]
            self._trail_backlog = [e for e in self._trail_backlog if e.key not in leaving]
        return waiting + (self._trail_events(finals) if finals else [])

    # ---- after commit --------------------------------------------------------------------

    def committed(self, batch: Batch, results: list[Result]) -> list[Reply]:
        """Apply the store's verdicts to the model; return the acks and errors to send."""
        replies: list[Reply] = []
        for op, res in zip(batch.ops, results, strict=True):
            if isinstance(op, StartOp):
                self._start_committed(op, res)
            elif isinstance(op, EntryOp):
                self._entry_committed(op, res)
            elif isinstance(op, ResolveOp) and res.ok and res.legs:
                self._adopted(res.legs)
            elif (
                isinstance(op, CrashOp) and op.source == CLIENT and res.ok
                and not res.data.get("duplicate")
            ):  # fmt: skip
                # The daemon's own verdicts are logged when made; a strategy's report, once it
                # took: every crash is in the daemon's log, and so is every revival.
                log.warning(
                    "session %s (%s) crashed, reported by the strategy: %s (%d leg(s) CRASHED)",
                    res.data.get("session_id"), op.strategy or op.session_key, op.reason,
                    res.data.get("legs", 0),
                )  # fmt: skip
            if op.rid is None:
                continue
            if res.ok:
                replies.append((op.rid, _ack(op.seq, res.data)))
            else:
                self.counters["errors"] += 1
                key = getattr(op, "key", None)
                replies.append((op.rid, error_reply(res.code, res.reason, op.seq, key)))
        return replies

    def _start_committed(self, op: StartOp, res: Result) -> None:
        session = self.sessions.get(op.session_key)
        if session is None:
            return
        if not res.ok:
            self._retire(session)
            return
        session.id = res.data["session_id"]
        session.confirmed = True
        session.token = res.data.get("token") or session.token
        revived = res.data.get("revived")
        if revived:
            # As loud as the crash it takes back: whoever saw that one must see this one.
            log.warning(
                "session %s (%s) REVIVED: alive after all, RUNNING again with %d leg(s) ACTIVE "
                "(it was declared crashed at %s: %s)",
                session.id, session.strategy, len(revived.get("legs", ())),
                revived.get("crash_timestamp"), revived.get("crash_reason"),
            )  # fmt: skip
        res.data["heartbeat_timeout"] = self.liveness.timeout_for(session.key)
        for row in res.legs:
            if row.key not in self.legs:
                self._add_leg(row, session)

    def _adopted(self, rows: list[LegRow]) -> None:
        for row in rows:
            session = self.sessions.get(row.session_key)
            if session is not None:
                self._add_leg(row, session)

    def _entry_committed(self, op: EntryOp, res: Result) -> None:
        leg = self.legs.get(op.key)
        if leg is None or leg.pending_entry is not op:
            return
        leg.pending_entry = None
        if not res.ok or res.data.get("status", "ACTIVE") != "ACTIVE":
            # Refused, or a repeat of a leg that is no longer open: it must not take updates.
            self.legs.pop(op.key, None)
            self._updates.pop(op.key, None)
            session = self.sessions.get(op.session_key)
            if session is not None:
                session.legs.discard(op.key)

    def requeue(self, batch: Batch) -> None:
        """The batch could not commit (storage fault): take it back, to be retried first.

        Nothing in it was acknowledged. Updates received since it was taken are newer and win.
        """
        since = self._ops
        self._ops = batch.ops + since
        carriers: dict[str, ExitOp | CrashOp | EndOp] = {}
        for key, upd in batch.updates.items():
            if key not in self.legs:
                # It left memory since (its exit, its session's crash or end): the op that took
                # its last update writes these older fields too, under its own newer ones.
                carrier = _final_carrier(since, key, upd.get("session"))
                if carrier is not None:
                    carrier.carry(key, {n: upd[n] for n in UPDATE_FIELDS if n in upd})
                    carriers[key] = carrier
                continue
            newer = self._updates.get(key)
            if newer is not None:
                for name in UPDATE_FIELDS:
                    if name in newer:
                        upd[name] = newer[name]
            self._updates[key] = upd
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
