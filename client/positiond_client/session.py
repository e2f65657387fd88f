"""The client's connection logic, sans I/O: bytes and events in, bytes to send and effects out.

:class:`ClientSession` knows the session, the outbox, every open leg's newest state and the
link; it never touches a socket, a thread or a clock (every method that needs the time takes
``now``, a monotonic reading). :class:`~positiond_client.channel.Channel` is the thin driver:
its I/O thread owns the socket and calls these methods under one lock, and runs the returned
:data:`Effect` s (callers' acks, notices) after releasing it.

The connection's state is one :class:`Phase`; every transition happens in :meth:`_to`:

=============  ===============================================  ===========================
from           event                                            to
=============  ===============================================  ===========================
any            connection lost (:meth:`lost`)                   OFFLINE
OFFLINE        handshake (:meth:`connected`), no session        IDLE
OFFLINE        handshake, a session to announce                 ANNOUNCE
IDLE           :meth:`open_session`                             ANNOUNCE
ANNOUNCE       its ``start`` taken by the socket (:meth:`sent`) ANNOUNCING
ANNOUNCING     ``start`` acked (``revived``: fence legs)        READY (outbox replayed)
ANNOUNCING     no ack within ``resend_interval`` (:meth:`tick`) ANNOUNCE (lost ack)
ANNOUNCING     passing refusal (storage, internal, busy)        ANNOUNCE
ANNOUNCING     final refusal (:data:`FINAL_SESSION_ERRORS`)     IDLE (outbox failed)
READY          ``UNKNOWN_SESSION`` (daemon restarted/forgot)    ANNOUNCE
READY          :meth:`open_session` (a new session)             ANNOUNCE
any connected  session ended or crashed (:meth:`session_closed`) IDLE
=============  ===============================================  ===========================

IDLE sends the queue as it is (reads before any session); ANNOUNCE sends only the ``start``;
ANNOUNCING sends nothing but heartbeats; READY sends the outbox in order, each open leg's state
right after its entry, then updates. Updates are encoded only when the socket takes them: while
it would block (:meth:`blocked`, until :meth:`writable`) they keep coalescing, one pending
state per open leg, so memory stays flat whatever the daemon does.
"""

from __future__ import annotations

import logging
from typing import Any

from positiond_client.errors import PositiondError, ProtocolError, SessionError, error_for
from positiond_client.link import Link
from positiond_client.pending import Pending
from positiond_client.protocol import PROTOCOL_VERSION, decode_reply, encode
from positiond_client.session_replies import FINAL_SESSION_ERRORS, Phase, Replies

__all__ = ["FINAL_SESSION_ERRORS", "OUTBOX_WARN", "ClientSession", "Effect", "Phase"]

log = logging.getLogger(__name__)

# Outbox size past which every new durable message logs a warning (nothing is dropped).
OUTBOX_WARN = 10_000
# What the driver runs after releasing its lock: ("finish", pending, result, error) or
# ("notice", code, info).
Effect = tuple[Any, ...]


def _closed_text(msg: dict[str, Any]) -> str:
    order = msg.get("order_id") or "?"
    return (
        f"leg {msg['key']!r} was closed at the broker by its protective stop order {order} "
        f"(filled at {msg.get('exit_price')}): it is no longer open"
    )


class ClientSession(Replies):
    """Session, outbox, leg states and link of one client connection; no I/O."""

    def __init__(
        self,
        now: float,
        *,
        endpoint: str = "",
        heartbeat_interval: float = 0.5,
        resend_interval: float = 5.0,
        ack_timeout: float = 2.0,
        warn_every: float = 30.0,
        outbox_warn: int = OUTBOX_WARN,
    ) -> None:
        self.endpoint = endpoint
        self.heartbeat_interval = heartbeat_interval
        self.resend_interval = resend_interval
        self.ack_timeout = ack_timeout
        self.outbox_warn = outbox_warn
        self.link = Link(now, grace=ack_timeout, answer_timeout=ack_timeout, warn_every=warn_every)
        self.phase = Phase.OFFLINE
        self.is_blocked = False  # the socket would block: send nothing until it is writable
        self._seq = 0
        self._outbox: dict[int, Pending] = {}  # seq -> unacked durable message, in seq order
        self._outq: list[bytes | Pending] = []  # ready to send, in order
        self._updates: dict[str, dict[str, Any]] = {}  # leg key -> fields not yet sent
        self._legs: dict[str, dict[str, Any]] = {}  # leg key -> newest full state
        self._fenced: dict[str, str] = {}
        self._closed: dict[str, str] = {}  # legs the daemon closed (protective stop filled)
        self._session: str | None = None
        self._token: str | None = None
        self._start: Pending | None = None  # the session's start (the announce to re-send)
        self._announce: Pending | None = None  # the start sent on this connection
        self._closed_reason: PositiondError | None = None
        self._head: tuple[str, Any] | None = None  # what next_send() returned
        self._last_send = 0.0
        self._next_resend = now + resend_interval
        self._error_window, self._error_count, self._errors_suppressed = 0.0, 0, 0

    def _to(self, phase: Phase) -> None:
        """The one place the phase changes (see the table in the module docstring)."""
        if phase is not self.phase:
            log.debug("client session %s -> %s", self.phase.value, phase.value)
            self.phase = phase
        if phase is not Phase.ANNOUNCING:
            self._announce = None

    def _connected_phase(self) -> Phase:
        return Phase.ANNOUNCE if self._session is not None else Phase.IDLE

    # ---- link events ---------------------------------------------------------------------

    def connected(self, now: float) -> None:
        """A connection completed its handshake."""
        self.link.handshake(now)
        self.is_blocked = False
        self._head = None
        self._to(self._connected_phase())

    def lost(self, now: float, *, definite: bool = True) -> None:
        """A connection attempt failed or the connection was lost (``definite``: see Link)."""
        self.link.lost(now, definite=definite)
        self._head = None
        self._to(Phase.OFFLINE)

    def blocked(self) -> None:
        """The socket would not take what :meth:`next_send` returned: keep it for later."""
        self.is_blocked = True
        self._head = None

    def writable(self) -> None:
        self.is_blocked = False

    @property
    def online(self) -> bool:
        return self.phase is not Phase.OFFLINE

    def unreachable(self, now: float) -> bool:
        return self.link.unreachable(now)

    def overdue(self, now: float) -> None:
        """A durable call waited its whole timeout in vain: the daemon is unresponsive."""
        self.link.overdue(now)

    # ---- callers' operations -------------------------------------------------------------

    def open_session(self, msg: dict[str, Any]) -> Pending:
        """Queue the session's start; it is (re-)announced on every connection."""
        self._session = msg["session"]
        self._token = msg.get("token")
        self._closed_reason = None
        pending = self._submit(msg)
        self._start = pending
        if self.online:
            self._to(Phase.ANNOUNCE)
        return pending

    def submit(self, msg: dict[str, Any], *, flush_updates: bool = False) -> Pending:
        """Queue a durable message after what came before it (``flush_updates``: every
        pending update goes first; an exit carries its leg's final state itself)."""
        if self._closed_reason is not None:
            raise self._closed_reason
        if msg["type"] == "entry":
            self._legs[msg["key"]] = {
                "current_price": msg["entry_price"],
                "stop_price": msg.get("stop_price"),
                "highest_price": msg.get("highest_price", msg["entry_price"]),
                "last_trail_level": msg.get("last_trail_level"),
                "state": msg.get("state", {}),
            }
        elif msg["type"] == "exit":
            final = self._legs.pop(msg["key"], None)
            self._updates.pop(msg["key"], None)
            if final is not None:
                msg.update(final)
        if flush_updates and self.phase is Phase.READY:
            # (Otherwise the next announce sends every open leg's state before this.)
            for key, fields in self._updates.items():
                self._outq.append(encode(self._update_msg(key, fields)))
            self._updates = {}
        return self._submit(msg)

    def _submit(self, msg: dict[str, Any]) -> Pending:
        self._seq += 1
        msg["seq"] = self._seq
        pending = Pending(self._seq, msg)
        self._outbox[self._seq] = pending
        self._outq.append(pending)
        if len(self._outbox) > self.outbox_warn:
            log.warning(
                "%d durable messages are waiting for the daemon (%s); none is dropped",
                len(self._outbox),
                self.endpoint,
            )
        return pending

    def update(self, key: str, fields: dict[str, Any]) -> bool:
        """Coalesce an update for an open leg; True if the socket could take it now."""
        state = self._legs.get(key)
        if state is None:
            raise error_for("UNKNOWN_LEG", f"no open leg {key!r} in this session")
        state.update(fields)
        pending = self._updates.get(key)
        if pending is None:
            self._updates[key] = fields
        else:
            pending.update(fields)
        return self.phase is not Phase.OFFLINE and not self.is_blocked

    def open_leg(self, key: str, state: dict[str, Any]) -> None:
        """Open a leg adopted from a crashed session: updates for it are accepted from now on."""
        self._legs[key] = state
        self._fenced.pop(key, None)
        self._closed.pop(key, None)

    def forget(self, pending: Pending) -> None:
        """Drop an unanswered read from the outbox (a stale answer would help nobody)."""
        self._outbox.pop(pending.seq, None)

    def session_closed(self) -> None:
        """The session ended or crashed by its own report: stop heartbeats and re-announces."""
        self._session = None
        self._start = None
        self._legs.clear()
        self._updates.clear()
        if self.online:
            self._to(Phase.IDLE)

    def is_open(self, key: str) -> bool:
        return key in self._legs

    def leg_state(self, key: str) -> dict[str, Any] | None:
        state = self._legs.get(key)
        return dict(state) if state is not None else None

    def fenced_reason(self, key: str) -> str | None:
        return self._fenced.get(key)

    def closed_reason(self, key: str) -> str | None:
        """Why the daemon closed this leg (its protective stop filled), if it did."""
        return self._closed.get(key)

    def session_key(self) -> str | None:
        return self._session

    @property
    def unacknowledged(self) -> int:
        return len(self._outbox)

    def unacked(self) -> list[Pending]:
        return list(self._outbox.values())

    def queued(self) -> dict[str, int]:
        """What waits in this process (the regression test of flat memory reads it)."""
        return {
            "send_queue": len(self._outq),
            "send_queue_bytes": sum(
                len(i.payload) if isinstance(i, Pending) else len(i) for i in self._outq
            ),
            "pending_updates": len(self._updates),
            "unacknowledged": len(self._outbox),
        }

    # ---- what to send --------------------------------------------------------------------

    def _update_msg(self, key: str, fields: dict[str, Any]) -> dict[str, Any]:
        msg = {"v": PROTOCOL_VERSION, "type": "update", "session": self._session}
        msg.update(token=self._token, key=key)
        msg.update(fields)
        return msg

    def next_send(self, now: float) -> bytes | None:
        """The next frame for the socket, or None. Call :meth:`sent` once the socket took
        it, :meth:`blocked` if it would not: nothing else may happen in between."""
        self._head = None
        if self.phase is Phase.OFFLINE or self.is_blocked:
            return None
        if self.phase is Phase.ANNOUNCE:
            start = self._start
            assert start is not None
            if start.done:  # (acked once: this announce is internal, nobody waits on it)
                msg = dict(start.msg)
                self._seq += 1
                msg["seq"] = self._seq
                start = Pending(self._seq, msg)
            self._head = ("announce", start)
            return start.payload
        if self.phase is not Phase.ANNOUNCING:
            if self._outq:
                item = self._outq[0]
                self._head = ("queue", item)
                return item.payload if isinstance(item, Pending) else item
            if self._updates:
                key = next(iter(self._updates))
                self._head = ("update", key)
                return encode(self._update_msg(key, self._updates[key]))
        if self._session is not None and now - self._last_send >= self.heartbeat_interval:
            self._head = ("hb", None)
            return encode(
                {
                    "v": PROTOCOL_VERSION,
                    "type": "hb",
                    "session": self._session,
                    "token": self._token,
                }
            )
        return None

    def sent(self, now: float) -> None:
        """The socket took what :meth:`next_send` returned."""
        head, self._head = self._head, None
        assert head is not None, "sent() without next_send()"
        what, item = head
        self._last_send = now
        if what == "announce":
            item.sent_at = now
            self.link.asked(now)
            self._to(Phase.ANNOUNCING)
            self._announce = item
        elif what == "queue":
            self._outq.pop(0)
            if isinstance(item, Pending):
                item.sent_at = now
                self.link.asked(now)
        elif what == "update":
            self._updates.pop(item, None)

    # ---- time ----------------------------------------------------------------------------

    def next_deadline(self, now: float) -> float:
        """Seconds until :meth:`tick` or :meth:`next_send` may have something to do."""
        wait = self._next_resend - now
        if self._session is not None and self.online and not self.is_blocked:
            wait = min(wait, self._last_send + self.heartbeat_interval - now)
        return max(wait, 0.0)

    def tick(self, now: float) -> None:
        """Safety net every ``resend_interval``: announce again if the start's ack is lost,
        re-queue durable messages unanswered that long (they are idempotent)."""
        if now < self._next_resend:
            return
        self._next_resend = now + self.resend_interval
        announce = self._announce
        if (
            self.phase is Phase.ANNOUNCING
            and announce is not None
            and announce.sent_at is not None
            and now - announce.sent_at > self.resend_interval
        ):
            self._to(Phase.ANNOUNCE)  # its ack was lost: announce again
        if self.phase is not Phase.READY or self.is_blocked:
            return  # (not lost: re-sent after the next announce or resend interval)
        queued = {id(p) for p in self._outq if isinstance(p, Pending)}
        for pending in self._outbox.values():
            if (
                pending.sent_at is not None
                and now - pending.sent_at > self.resend_interval
                and id(pending) not in queued
            ):
                pending.sent_at = now
                self._outq.append(pending)

    # ---- replies -------------------------------------------------------------------------

    def receive(self, raw: bytes, now: float) -> list[Effect]:
        """A frame from the daemon; returns what the driver must run outside its lock."""
        try:
            msg = decode_reply(raw)
        except ProtocolError as exc:
            log.error("unreadable reply from positiond (%s): %r", exc, raw[:200])
            return []
        kind = msg["type"]
        if kind == "ack":
            return self._on_ack(msg, now)
        if kind == "error":
            return self._on_error(msg, now)
        if kind == "notice":
            if msg["code"] == "LEG_CLOSED" and type(msg.get("key")) is str:
                self._close_leg(msg["key"], _closed_text(msg))
            return [("notice", msg["code"], msg)]
        return []  # ping, or a type this client does not know (§1.3)

    def _refused_for_good(self, code: str, reason: str) -> list[Pending]:
        self._closed_reason = SessionError(reason, code)
        self._session = None
        self._start = None
        failed = list(self._outbox.values())
        self._outbox.clear()
        self._outq = []  # (what was refused is not sent again outside the session)
        self._updates = {}
        self._to(Phase.IDLE)
        return failed

    def _ready(self) -> None:
        self._to(Phase.READY)
        self._replay()

    def _reannounce(self) -> None:
        self._to(Phase.ANNOUNCE)

    def _on_session_acked(self) -> None:
        self._session = None
        self._start = None
        if self.online:
            self._to(Phase.IDLE)

    def error_budget(self, error: PositiondError, now: float) -> None:
        """Log a refusal with no seq, at most 10 per 10 s."""
        if now - self._error_window > 10.0:
            if self._errors_suppressed:
                log.error("%d more errors from positiond suppressed", self._errors_suppressed)
            self._error_window, self._error_count, self._errors_suppressed = now, 0, 0
        self._error_count += 1
        if self._error_count <= 10:
            log.error("positiond refused a message: %s", error)
        else:
            self._errors_suppressed += 1
