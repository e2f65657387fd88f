"""The daemon's decisions: which messages are valid, what to write, who is dead, what to answer.

Plain Python, no I/O. The router feeds it decoded messages and peer events and carries out what
it returns: replies to send now (or a :class:`HealthQuery` for the daemon to answer), a
:class:`~positiond.ops.Batch` for the store (taken from its
:class:`~positiond.writequeue.WriteQueue`), and replies to send once that batch has committed.

It knows nothing of the daemon around it: time comes in as parameters (the injected clocks
are only the defaults for callers that pass none), settings change through
:meth:`Engine.set_heartbeat_timeout` and :meth:`Engine.set_flush_interval`, peers through
:meth:`Engine.add_peer`, :meth:`Engine.peer_gone` and :meth:`Engine.forget_peer`, and its
counters are its own (the daemon's health merges them with the others').

Every ``now`` handed in is monotonic time; liveness and progress deadlines are judged on the
daemon's observed time (:class:`~positiond.liveness.DaemonClock`), so a gap in the daemon's
own progress (stopped, suspended, starved) never turns into a verdict.
"""

from __future__ import annotations

import logging
import secrets
import time as _time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

from positiond.commands import (
    HealthQuery,
    Refusal,
    WatchProgress,
    by_whom,
    command_op,
    unknown_session,
)
from positiond.handbacks import HandBacks, Reply
from positiond.liveness import MIN_HEARTBEATS, DaemonClock, Liveness, Verdict
from positiond.model import Leg, Peer, Session
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
    ProtectCloseOp,
    ResolveOp,
    Result,
    StallOp,
    StartOp,
    SyncOp,
    TrailEvent,
    WatchOp,
)
from positiond.progress import ProgressWatch
from positiond.protect.notices import ClosedByStop
from positiond.writequeue import WriteQueue, update_fields
from positiond_client.protocol import ack_reply, error_reply

__all__ = ["Engine", "HealthQuery", "Leg", "Peer", "Session", "WatchProgress", "health_reply"]

log = logging.getLogger(__name__)



Immediate = bytes | HealthQuery | WatchProgress | None  # what a message gets back at once
_Handler = Callable[["Engine", Session | None, bytes, dict[str, Any], float, float], Immediate]


def health_reply(seq: int | None, health: dict[str, Any]) -> bytes:
    """The ack of a :class:`HealthQuery`."""
    return ack_reply(seq, {"health": health})


def _clock_text(wall: float) -> str:
    return _time.strftime("%H:%M:%S", _time.localtime(wall)) + f".{int(wall * 10) % 10}"


class Engine(HandBacks):
    """In-memory model of live sessions and open legs, and the rules applied to each message.

    Monotonic time drives liveness (through the observed :attr:`clock`), wall time stamps what
    is stored. The daemon passes both to every call; ``monotonic`` and ``wall`` are only the
    defaults for callers that leave them out (tests, benchmarks).
    """

    def __init__(
        self,
        heartbeat_timeout: float,
        flush_interval: float,
        *,
        monotonic: Callable[[], float] = _time.monotonic,
        wall: Callable[[], float] = _time.time,
        protects: Callable[[str, bool | None], bool] | None = None,
    ) -> None:
        self.liveness = Liveness(heartbeat_timeout)
        # [protect]: would this strategy's session, with this choice, be protected?
        self._protects = protects or (lambda strategy, choice: False)
        self._closed_by_stop = ClosedByStop()
        self._released = 0  # protective orders handed back since take_released()
        self.clock = DaemonClock(monotonic())
        self.monotonic = monotonic
        self.wall = wall
        self.sessions: dict[str, Session] = {}
        self.legs: dict[str, Leg] = {}
        self._peers: dict[bytes, Peer] = {}
        self.queue = WriteQueue(flush_interval, monotonic())
        self.progress = ProgressWatch()
        self._fenced_seen: set[tuple[str, str, str]] = set()
        # Its own: the daemon's health merges them with the router's, the listener's, ...
        self.counters: dict[str, int] = {"messages": 0, "updates": 0, "errors": 0, "acks": 0}
        # Messages by type (positiond.metrics); every type a valid message can have, from 0.
        self.by_type: dict[str, int] = dict.fromkeys(self._HANDLERS, 0)

    # ---- settings (SIGHUP) ---------------------------------------------------------------

    @property
    def flush_interval(self) -> float:
        return self.queue.flush_interval

    def set_flush_interval(self, seconds: float) -> None:
        self.queue.flush_interval = seconds

    def set_heartbeat_timeout(self, seconds: float) -> None:
        """The timeout from now on, for every session (a longer announced interval still wins)."""
        self.liveness.timeout = seconds

    # ---- loading -------------------------------------------------------------------------

    def load(
        self,
        sessions: Iterable[LiveSession],
        legs: Iterable[LegRow],
        now: float | None = None,
        wall: float | None = None,
    ) -> None:
        """Adopt what the database says was live when the daemon last stopped.

        Each RUNNING session gets one heartbeat timeout to come back from now on; a STALLED one
        is still stalled until its next update.
        """
        # Observation starts here: opening the database before was no gap in the daemon's
        # progress, and nothing was watched yet.
        self.clock = DaemonClock(self.monotonic() if now is None else now)
        now = self.clock.now()
        wall = self.wall() if wall is None else wall
        for live in sessions:
            key = live.key
            session = Session(
                key, live.strategy, id=live.id, confirmed=True, token_hash=live.token_hash
            )
            session.last_wall = wall
            self.progress.watch(key, live.progress_deadline, now)
            if live.status == "STALLED":
                self.progress.mark_stalled(key)
            self.sessions[key] = session
            self.liveness.expect_return(key, now)
            self.liveness.announce(key, live.heartbeat_interval)
        for row in legs:
            owner = self.sessions.get(row.session_key)
            if owner is not None:
                self._add_leg(row, owner)

    def _add_leg(self, row: LegRow, session: Session) -> None:
        self.legs[row.key] = Leg(row.key, row.session_key, row.stop_price, row.last_trail_level)
        session.legs.add(row.key)

    # ---- peers ---------------------------------------------------------------------------

    @property
    def peers(self) -> Mapping[bytes, Peer]:
        """The connected peers by routing id (read-only: changed only through the methods)."""
        return self._peers

    def peer(self, rid: bytes) -> Peer | None:
        return self._peers.get(rid)

    def add_peer(self, rid: bytes, fd: int, uid: int | None, pid: int | None) -> Peer:
        peer = Peer(rid, fd, uid, pid)
        self._peers[rid] = peer
        return peer

    def peers_on_fd(self, fd: int) -> list[Peer]:
        return [p for p in self._peers.values() if p.fd == fd]

    def forget_peer(self, rid: bytes) -> None:
        """The peer's connection is gone but not known to be its process (tcp://): heartbeats
        decide about its sessions."""
        self._peers.pop(rid, None)

    def peer_gone(self, rid: bytes, wall: float | None = None) -> None:
        """The peer's process exited (its ipc connection dropped): crash its live sessions."""
        peer = self._peers.pop(rid, None)
        if peer is None:
            return
        for key in peer.sessions:
            session = self.sessions.get(key)
            if session is not None and session.rid == rid:
                pid = f" (pid {peer.pid})" if peer.pid else ""
                self._declare_crashed(
                    session, DISCONNECT, f"process exited{pid}", {"peer_pid": peer.pid}, wall
                )

    # ---- messages ------------------------------------------------------------------------

    def receive(self, rid: bytes, msg: dict[str, Any], now: float, wall: float) -> Immediate:
        """Apply one validated message; return an immediate reply (an error), a
        :class:`HealthQuery` to answer, or None. ``now`` is monotonic, ``wall`` the time."""
        self.counters["messages"] += 1
        raw = now
        kind = msg["type"]
        self.by_type[kind] = self.by_type.get(kind, 0) + 1
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
            self.queue.heartbeat(key, wall)
            session.last_wall = wall
            if session.rid != rid:
                self._attach(session, rid)
            if kind == "update":
                if self.progress.progress(key, now):
                    self._progress_again(session, wall)
                return self._update(session, msg, wall)
            if kind == "hb":
                return None
            if (kind == "entry" or kind == "exit") and self.progress.progress(key, now):
                self._progress_again(session, wall)
        handler = self._HANDLERS[kind]
        return handler(self, session, rid, msg, raw, wall)

    def _attach(self, session: Session, rid: bytes) -> None:
        old = self._peers.get(session.rid) if session.rid is not None else None
        if old is not None:
            old.sessions.discard(session.key)
        session.rid = rid
        peer = self._peers.get(rid)
        if peer is not None:
            peer.sessions.add(session.key)

    def _error(self, msg: dict[str, Any], code: str, reason: str) -> bytes:
        self.counters["errors"] += 1
        return error_reply(code, reason, msg.get("seq"), msg.get("key"))

    def _unknown_session(self, msg: dict[str, Any]) -> bytes:
        refusal = unknown_session(msg)
        return self._error(msg, refusal.code, refusal.reason)

    def _update(self, session: Session, msg: dict[str, Any], wall: float) -> bytes | None:
        key = msg["key"]
        leg = self.legs.get(key)
        if leg is None or leg.session_key != session.key:
            return self._leg_error(msg, leg, session, wall)
        self.counters["updates"] += 1
        self.queue.update(session.key, key, msg)
        return None

    def _leg_error(
        self, msg: dict[str, Any], leg: Leg | None, writer: Session, wall: float
    ) -> bytes:
        if leg is None:
            closed = self._closed_by_stop.reason(msg["key"], writer.key)
            if closed is not None:
                return self._error(msg, "LEG_CLOSED", closed)
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
            self.queue.add(
                FencedOp(None, None, writer.key, by_whom(writer), leg.key, wall, message)
            )
        return self._error(
            msg,
            "FENCED",
            f"leg {msg['key']!r} belongs to another session; this one may not write it",
        )

    def _on_hb(
        self, session: Session | None, rid: bytes, msg: dict[str, Any], now: float, wall: float
    ) -> Immediate:
        return self._unknown_session(msg)

    def _on_update(
        self, session: Session | None, rid: bytes, msg: dict[str, Any], now: float, wall: float
    ) -> Immediate:
        return self._unknown_session(msg)

    def _on_start(
        self, session: Session | None, rid: bytes, msg: dict[str, Any], now: float, wall: float
    ) -> Immediate:
        key = msg["session"]
        now = self.clock.observe(now)
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
        self.queue.add(
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
                msg.get("protect"),
            )
        )
        self.progress.watch(key, msg.get("progress_deadline"), now)
        return None

    def _on_entry(
        self, session: Session | None, rid: bytes, msg: dict[str, Any], now: float, wall: float
    ) -> Immediate:
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
        self.queue.add(op)
        return None

    def _on_exit(
        self, session: Session | None, rid: bytes, msg: dict[str, Any], now: float, wall: float
    ) -> Immediate:
        if session is None:
            return self._unknown_session(msg)
        key = msg["key"]
        leg = self.legs.get(key)
        if leg is not None and leg.session_key != session.key:
            return self._leg_error(msg, leg, session, wall)
        final = self.queue.take_update(key)
        carried = update_fields(msg)
        if carried:
            final = {**final, **carried} if final else carried
        trail = self.queue.final_trail({key: final} if final else {}, {key}, self.legs)
        if leg is not None:
            del self.legs[key]
            session.legs.discard(key)
        self.queue.add(
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
        self, session: Session | None, rid: bytes, msg: dict[str, Any], now: float, wall: float
    ) -> Immediate:
        self.queue.add(SyncOp(rid, msg["seq"], msg["session"]))
        return None

    def _on_crash(
        self, session: Session | None, rid: bytes, msg: dict[str, Any], now: float, wall: float
    ) -> Immediate:
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
        self.queue.add(op)
        return None

    def _on_end(
        self, session: Session | None, rid: bytes, msg: dict[str, Any], now: float, wall: float
    ) -> Immediate:
        op = EndOp(rid, msg["seq"], msg["session"], msg.get("time", wall), token=msg.get("token"))
        if session is not None:
            op.final_updates, op.trail_events = self._retire(session)
        self.queue.add(op)
        return None

    def _on_command(
        self, session: Session | None, rid: bytes, msg: dict[str, Any], now: float, wall: float
    ) -> Immediate:
        out = command_op(session, rid, msg, wall, self.legs)
        if isinstance(out, Refusal):
            return self._error(msg, out.code, out.reason)
        if isinstance(out, HealthQuery):
            return out
        self.queue.add(out)
        return None

    def _on_watch(
        self, session: Session | None, rid: bytes, msg: dict[str, Any], now: float, wall: float
    ) -> Immediate:
        # Read in the writer's order: the snapshot and the later changes fit together.
        by = msg.get("by", "watcher")
        self.queue.add(WatchOp(rid, msg["seq"], None, by, msg.get("strategy")))
        return None

    def _on_watching(
        self, session: Session | None, rid: bytes, msg: dict[str, Any], now: float, wall: float
    ) -> Immediate:
        return WatchProgress(msg["n"])

    _HANDLERS: ClassVar[dict[str, _Handler]] = {
        "query": _on_command,
        "resolve": _on_command,
        "orphans": _on_command,
        "resolve_orphan": _on_command,
        "prune": _on_command,
        "hb": _on_hb,
        "update": _on_update,
        "start": _on_start,
        "entry": _on_entry,
        "exit": _on_exit,
        "crash": _on_crash,
        "end": _on_end,
        "sync": _on_sync,
        "watch": _on_watch,
        "watching": _on_watching,
    }

    def _retire(self, session: Session) -> tuple[dict[str, dict[str, Any]], list[TrailEvent]]:
        """Forget a session and its legs in memory; return their pending updates.

        With them, the TRAIL_UPDATE events those last updates make, exactly as a flush would
        have: the legs leave memory here, so no later flush can compare them any more.
        """
        self.sessions.pop(session.key, None)
        self.liveness.forget(session.key)
        self.progress.forget(session.key)
        self.queue.forget_heartbeat(session.key)
        if session.rid is not None and (peer := self._peers.get(session.rid)) is not None:
            peer.sessions.discard(session.key)
        finals = {}
        for key in sorted(session.legs):  # one order every run
            pending = self.queue.take_update(key)
            if pending is not None:
                finals[key] = pending
        trail = self.queue.final_trail(finals, session.legs, self.legs)
        for key in session.legs:
            self.legs.pop(key, None)
        return finals, trail

    def _declare_crashed(
        self,
        session: Session,
        source: str,
        reason: str,
        payload: dict[str, Any],
        wall: float | None = None,
    ) -> None:
        log.warning("session %s (%s) crashed: %s", session.id, session.strategy, reason)
        finals, trail = self._retire(session)
        payload = {**payload, "legs": sorted(session.legs)}
        self.queue.add(
            CrashOp(None, None, session.key, source, reason,
                    self.wall() if wall is None else wall, payload, finals,
                    trail_events=trail, last_seen=session.last_wall)
        )  # fmt: skip

    # ---- time ----------------------------------------------------------------------------

    def tick(self, now: float, wall: float | None = None) -> bool:
        """Declare expired sessions crashed and overdue ones stalled; True when a batch is due.

        ``now`` is monotonic; the deadlines are judged on the daemon's observed time.
        """
        raw = now
        wall = self.wall() if wall is None else wall
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
                wall,
            )
        sessions = self.sessions
        for late in self.progress.overdue(now, lambda key: bool(sessions[key].legs)):
            session = sessions[late.key]
            last = wall - (raw - self.clock.raw(late.last))
            log.warning(
                "session %s (%s) STALLED: no update for %.1fs with %d leg(s) open",
                session.id, session.strategy, late.idle, len(session.legs),
            )  # fmt: skip
            payload = {
                "last_progress": last,
                "deadline": late.deadline,
                "legs": sorted(session.legs),
            }
            self.queue.add(StallOp(None, None, late.key, True, wall, payload))
        return self.queue.due(now)

    def _progress_again(self, session: Session, wall: float) -> None:
        log.info("session %s (%s) makes progress again", session.id, session.strategy)
        self.queue.add(StallOp(None, None, session.key, False, wall))

    def batch_due(self, now: float) -> bool:
        return self.queue.due(now)

    @property
    def pending_ops(self) -> int:
        return self.queue.pending_ops

    @property
    def pending_updates(self) -> int:
        return self.queue.pending_updates

    def take_batch(
        self, now: float, *, wall: float | None = None, flush_updates: bool = False
    ) -> Batch:
        """Hand the store what is due: all durable ops, and the updates when their time came."""
        wall = self.wall() if wall is None else wall
        return self.queue.take(now, wall, self.legs, flush_updates=flush_updates)

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
            elif isinstance(op, ProtectCloseOp):
                replies += self._protect_closed(op, res)
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
            self._released += res.released
            if op.rid is None:
                continue
            if res.ok:
                self.counters["acks"] += 1
                replies.append((op.rid, ack_reply(op.seq, res.data)))
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
        if op.protect is not None:  # what the daemon will do if this session crashes
            res.data["protect"] = self._protects(session.strategy, op.protect)
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
            self.queue.take_update(op.key)
            session = self.sessions.get(op.session_key)
            if session is not None:
                session.legs.discard(op.key)

    def submit(self, op: Op) -> None:
        """An op of the daemon's own making (the protect worker's close or review): in the
        next batch, answered to nobody (``rid`` None)."""
        self.queue.add(op)

    def requeue(self, batch: Batch) -> None:
        """The batch could not commit (storage fault): take it back, to be retried first."""
        self.queue.requeue(batch, self.legs)
