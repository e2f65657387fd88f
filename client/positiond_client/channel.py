"""The client's I/O thread: it alone owns the ZeroMQ socket; callers never touch zmq.

Callers hand messages over under a lock and wake the thread through a pipe that it polls
together with the socket, so a hand-off costs no poll interval. Durable messages stay in the
outbox until acked and are re-sent after every reconnect; updates are coalesced per leg, and
the newest full state of every open leg is re-sent after a reconnect, so nothing the daemon
had only in memory is lost when it restarts.

After each (re)connection the thread first re-announces the session (a ``start`` with the same
session key) and sends nothing else until that is acked; then the outbox in order, each open
leg's state right after its entry, then normal traffic.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson
import zmq
from zmq.utils.monitor import parse_monitor_message

from positiond_client.errors import PositiondError, SessionError, error_for
from positiond_client.protocol import PROTOCOL_VERSION, encode

__all__ = ["Channel", "Pending"]

log = logging.getLogger(__name__)

# Refusals of a session's start that end it for good; anything else is retried.
FINAL_SESSION_ERRORS = frozenset(
    {"SESSION_CLOSED", "BAD_FIELD", "BAD_VERSION", "BAD_TYPE", "BAD_TOKEN"}
)
# Outbox size past which every new durable message logs a warning (nothing is dropped).
OUTBOX_WARN = 10_000


class Pending:
    """A durable message waiting for its ack (or error)."""

    __slots__ = (
        "_answered",
        "_done",
        "_lock",
        "callbacks",
        "error",
        "key",
        "kind",
        "msg",
        "payload",
        "result",
        "sent_at",
        "seq",
    )

    def __init__(self, seq: int, msg: dict[str, Any]) -> None:
        self.seq = seq
        self.msg = msg
        self.kind: str = msg["type"]
        self.key: str | None = msg.get("key")
        self.payload = encode(msg)
        self.result: dict[str, Any] | None = None
        self.error: PositiondError | None = None
        self.sent_at: float | None = None
        self.callbacks: list[Callable[[Pending], None]] = []
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._answered = False

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None) -> bool:
        """True once answered (ack or error) within ``timeout`` seconds."""
        return self._done.wait(timeout)

    def add_callback(self, fn: Callable[[Pending], None]) -> None:
        """Call ``fn(self)`` on the I/O thread when answered (at once if already answered)."""
        with self._lock:
            answered = self._answered
            if not answered:
                self.callbacks.append(fn)
        if answered:
            fn(self)

    def _finish(self, result: dict[str, Any] | None, error: PositiondError | None) -> None:
        with self._lock:
            self.result, self.error = result, error
            self._answered = True
            callbacks, self.callbacks = self.callbacks, []
        for fn in callbacks:
            try:
                fn(self)
            except Exception:
                log.exception("callback for %s failed", self.kind)
        # Waiters wake only now, so what the callbacks fill in (position_id...) is there.
        self._done.set()


class Channel:
    """One DEALER connection to the daemon, driven by a background thread."""

    def __init__(
        self,
        endpoint: str,
        *,
        heartbeat_interval: float = 0.5,
        resend_interval: float = 5.0,
        on_notice: Callable[[str, dict[str, Any]], None] | None = None,
        curve: tuple[bytes, bytes, bytes] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.curve = curve  # (server public, client public, client secret) for tcp://
        self.heartbeat_interval = heartbeat_interval
        self.resend_interval = resend_interval
        self.on_notice = on_notice
        self._lock = threading.Lock()
        self._seq = 0
        self._outbox: dict[int, Pending] = {}  # seq -> unacked durable message, in seq order
        self._outq: list[bytes | Pending] = []  # ready to send, in order
        self._updates: dict[str, dict[str, Any]] = {}  # leg key -> fields not yet sent
        self._legs: dict[str, dict[str, Any]] = {}  # leg key -> newest full state
        self._fenced: dict[str, str] = {}
        self._session: str | None = None
        self._token: str | None = None
        self._start: Pending | None = None  # the session's start (the announce to re-send)
        self._closed_reason: PositiondError | None = None
        self._wake_pending = False
        self._connected = False
        self._announce: Pending | None = None  # start sent on this connection, not yet acked
        self._announced = False
        self._last_send = 0.0
        self._stop = False
        self._error_window, self._error_count, self._errors_suppressed = 0.0, 0, 0
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._wfd, False)
        self._thread = threading.Thread(target=self._run, name="positiond-client-io", daemon=True)
        self._ready = threading.Event()
        self._thread.start()
        self._ready.wait(5.0)

    # ---- caller side (any thread) --------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def outbox_size(self) -> int:
        return len(self._outbox)

    def session_key(self) -> str | None:
        return self._session

    def fenced_reason(self, key: str) -> str | None:
        return self._fenced.get(key)

    def _wake(self) -> None:
        # A full pipe means the thread is already due to wake.
        with contextlib.suppress(BlockingIOError):
            os.write(self._wfd, b"\0")

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def open_session(self, msg: dict[str, Any]) -> Pending:
        """Queue the session's start; it is (re-)announced on every connection."""
        with self._lock:
            self._session = msg["session"]
            self._token = msg.get("token")
            self._closed_reason = None
            pending = self._submit_locked(msg)
            self._start = pending
            self._announced = False
            self._announce = None
        self._wake()
        return pending

    def submit(self, msg: dict[str, Any], *, flush_updates: bool = False) -> Pending:
        """Queue a durable message (entry, exit, crash, end, sync) after what came before it.

        ``flush_updates`` sends every pending update first (crash, end, sync need the newest
        state stored). An exit carries its leg's final state itself.
        """
        with self._lock:
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
            if flush_updates and self._connected and self._announced:
                # (Not connected: the re-announce sends every open leg's state before this.)
                self._queue_updates_locked()
            pending = self._submit_locked(msg)
            wake = not self._wake_pending
            self._wake_pending = True
        if wake:
            self._wake()
        return pending

    def _submit_locked(self, msg: dict[str, Any]) -> Pending:
        seq = self._next_seq()
        msg["seq"] = seq
        pending = Pending(seq, msg)
        self._outbox[seq] = pending
        self._outq.append(pending)
        if len(self._outbox) > OUTBOX_WARN:
            log.warning(
                "%d durable messages are waiting for the daemon (%s); none is dropped",
                len(self._outbox),
                self.endpoint,
            )
        return pending

    def update(self, key: str, fields: dict[str, Any]) -> None:
        """Coalesce an update for an open leg (never blocks, never does I/O but a wake-up)."""
        with self._lock:
            state = self._legs.get(key)
            if state is None:
                raise error_for("UNKNOWN_LEG", f"no open leg {key!r} in this session")
            state.update(fields)
            pending = self._updates.get(key)
            if pending is None:
                self._updates[key] = fields
            else:
                pending.update(fields)
            if self._wake_pending or not self._connected:
                return  # no daemon: the state waits in _legs/_updates, a reconnect sends it
            self._wake_pending = True
        self._wake()

    def open_leg(self, key: str, state: dict[str, Any]) -> None:
        """Open a leg adopted from a crashed session: updates for it are accepted from now on."""
        with self._lock:
            self._legs[key] = state
            self._fenced.pop(key, None)

    def forget(self, pending: Pending) -> None:
        """Drop an unanswered read from the outbox (a stale answer would help nobody)."""
        with self._lock:
            self._outbox.pop(pending.seq, None)

    def is_open(self, key: str) -> bool:
        return key in self._legs

    def leg_state(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            state = self._legs.get(key)
            return dict(state) if state is not None else None

    def session_closed(self) -> None:
        """The session ended or crashed by its own report: stop heartbeats and re-announces."""
        with self._lock:
            self._session = None
            self._start = None
            self._legs.clear()
            self._updates.clear()

    def unacked(self) -> list[Pending]:
        with self._lock:
            return list(self._outbox.values())

    def close(self, timeout: float = 1.0) -> None:
        """Give unacked messages up to ``timeout`` to be acked, then stop the thread."""
        deadline = time.monotonic() + timeout
        for pending in self.unacked():
            if not pending.wait(max(0.0, deadline - time.monotonic())):
                break
        left = len(self._outbox)
        if left:
            log.warning("closing with %d durable message(s) not acknowledged by positiond", left)
        self._stop = True
        self._wake()
        self._thread.join(5.0)
        os.close(self._rfd)
        os.close(self._wfd)

    # ---- I/O thread ----------------------------------------------------------------------

    def _queue_updates_locked(self) -> None:
        session = self._session
        for key, fields in self._updates.items():
            msg = {
                "v": PROTOCOL_VERSION,
                "type": "update",
                "session": session,
                "token": self._token,
                "key": key,
            }
            msg.update(fields)
            self._outq.append(encode(msg))
        self._updates = {}

    def _run(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        # Queue only to a live connection: while the daemon is away our own outbox and the
        # coalesced leg states hold everything, instead of a pipe full of stale updates.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        if self.curve is not None:
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = self.curve
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        sock.connect(self.endpoint)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        poller.register(self._rfd, zmq.POLLIN)
        self._sock = sock
        self._ready.set()
        next_resend = time.monotonic() + self.resend_interval
        try:
            while not self._stop:
                try:
                    next_resend = self._step(sock, monitor, poller, next_resend)
                except Exception:  # one bad iteration must not end the strategy's persistence
                    log.exception("positiond client I/O thread: unexpected error, going on")
                    time.sleep(0.01)  # not a hot loop if it repeats
        finally:
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)
            ctx.term()

    def _step(
        self,
        sock: zmq.Socket[bytes],
        monitor: zmq.Socket[bytes],
        poller: zmq.Poller,
        next_resend: float,
    ) -> float:
        """One round of the I/O thread: wait, read, send what is due; the next resend time."""
        now = time.monotonic()
        wait = next_resend - now
        if self._session is not None and self._connected:
            wait = min(wait, self._last_send + self.heartbeat_interval - now)
        events = dict(poller.poll(max(1, int(min(max(wait, 0.0), 1.0) * 1000) + 1)))
        if self._rfd in events:
            os.read(self._rfd, 65536)
        if monitor in events:
            self._on_monitor(monitor)
        if sock in events:
            self._on_replies(sock)
        self._pump(sock)
        now = time.monotonic()
        if now >= next_resend:
            next_resend = now + self.resend_interval
            self._resend_stale(sock, now)
        if (
            self._session is not None
            and self._connected
            and now - self._last_send >= self.heartbeat_interval
        ):
            self._send(
                sock,
                encode(
                    {
                        "v": PROTOCOL_VERSION,
                        "type": "hb",
                        "session": self._session,
                        "token": self._token,
                    }
                ),
            )
        return next_resend

    def _send(self, sock: zmq.Socket[bytes], payload: bytes) -> bool:
        try:
            sock.send(payload, zmq.NOBLOCK)
        except zmq.Again:
            return False
        self._last_send = time.monotonic()
        return True

    def _on_monitor(self, monitor: zmq.Socket[bytes]) -> None:
        while True:
            try:
                event = parse_monitor_message(monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                log.debug("connected to positiond at %s", self.endpoint)
                with self._lock:
                    self._connected = True
                    self._announced = False
                    self._announce = None
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                log.debug("disconnected from positiond at %s", self.endpoint)
                with self._lock:
                    self._connected = False
                    self._announced = False
                    self._announce = None

    def _pump(self, sock: zmq.Socket[bytes]) -> None:
        """Send what is due: the announce, or (once announced) the queue and the updates."""
        with self._lock:
            self._wake_pending = False
            if not self._connected:
                return
            if self._session is not None and not self._announced:
                if self._announce is None:
                    self._send_announce_locked(sock)
                return
            self._queue_updates_locked()
            queue, self._outq = self._outq, []
        for i, item in enumerate(queue):
            if not self._send(sock, item.payload if isinstance(item, Pending) else item):
                with self._lock:  # the connection went away: keep the rest, in order
                    self._outq[:0] = queue[i:]
                return
            if isinstance(item, Pending):
                item.sent_at = self._last_send

    def _send_announce_locked(self, sock: zmq.Socket[bytes]) -> None:
        start = self._start
        assert start is not None
        if start.done:
            msg = dict(start.msg)
            msg["seq"] = self._next_seq()
            start = Pending(msg["seq"], msg)  # internal: nobody waits on it
        if self._send(sock, start.payload):
            start.sent_at = time.monotonic()
            self._announce = start

    def _announced_locked(self) -> None:
        """The daemon knows our session again: re-send the outbox and every open leg's state."""
        self._announced = True
        self._outq = []
        self._updates = {}
        sent_legs: set[str] = set()
        pending_entries = {p.key for p in self._outbox.values() if p.kind == "entry"}

        def snapshot(key: str) -> None:
            state = self._legs.get(key)
            if state is not None and key not in sent_legs:
                sent_legs.add(key)
                msg = {
                    "v": PROTOCOL_VERSION,
                    "type": "update",
                    "session": self._session,
                    "token": self._token,
                    "key": key,
                }
                msg.update(state)
                self._outq.append(encode(msg))

        for pending in self._outbox.values():
            if pending is self._start:
                continue
            if pending.kind in ("crash", "end", "sync"):
                for key in self._legs:
                    if key not in pending_entries:
                        snapshot(key)
            self._outq.append(pending)
            if pending.kind == "entry":
                pending_entries.discard(pending.key)
                if pending.key is not None:
                    snapshot(pending.key)
        for key in list(self._legs):
            if key not in pending_entries:
                snapshot(key)

    def _revived_locked(self, revived: dict[str, Any]) -> dict[str, str]:
        """We were declared crashed and came back: legs not handed back are someone else's now.

        Returns the legs fenced this way, with the reason.
        """
        log.error(
            "positiond had declared this session CRASHED (%s at %s); it is RUNNING again",
            revived.get("crash_reason"),
            revived.get("crash_timestamp"),
        )
        back = set(revived.get("legs") or ())
        pending_entries = {p.key for p in self._outbox.values() if p.kind == "entry"}
        fenced = {}
        for key in [k for k in self._legs if k not in back and k not in pending_entries]:
            reason = (
                f"leg {key!r} was adopted, closed or flagged by another session or an operator "
                "while this session was declared crashed: stop managing it"
            )
            log.error("%s", reason)
            self._fenced[key] = fenced[key] = reason
            del self._legs[key]
            self._updates.pop(key, None)
        return fenced

    def _resend_stale(self, sock: zmq.Socket[bytes], now: float) -> None:
        """Safety net: re-send durable messages unanswered for a long time (they are idempotent)."""
        with self._lock:
            announce = self._announce
            if (
                self._connected
                and not self._announced
                and announce is not None
                and announce.sent_at is not None
                and now - announce.sent_at > self.resend_interval
            ):
                self._announce = None  # its ack was lost: announce again
            if not (self._connected and self._announced):
                return
            stale = [
                p
                for p in self._outbox.values()
                if p.sent_at is not None and now - p.sent_at > self.resend_interval
            ]
            for pending in stale:
                pending.sent_at = now
                self._outq.append(pending)
        self._pump(sock)

    def _on_replies(self, sock: zmq.Socket[bytes]) -> None:
        while True:
            try:
                raw = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = orjson.loads(raw)
                kind = msg["type"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                log.error("unreadable reply from positiond: %r", raw[:200])
                continue
            if kind == "ack":
                self._on_ack(msg)
            elif kind == "error":
                self._on_error(msg)
            elif kind == "notice":
                self._notice(msg.get("code", ""), msg)

    def _notice(self, code: str, info: dict[str, Any]) -> None:
        if self.on_notice is not None:
            try:
                self.on_notice(code, info)
            except Exception:
                log.exception("on_notice callback failed")

    def _on_ack(self, msg: dict[str, Any]) -> None:
        seq = msg.get("seq")
        fenced: dict[str, str] = {}
        with self._lock:
            announce = self._announce
            if announce is not None and seq == announce.seq:
                if "revived" in msg:
                    fenced = self._revived_locked(msg["revived"])
                self._announced_locked()
            pending = self._outbox.pop(seq, None) if type(seq) is int else None
            if pending is not None and pending.kind in ("crash", "end"):
                self._session = None
                self._start = None
        if pending is not None:
            pending.sent_at = pending.sent_at or time.monotonic()
            pending._finish(msg, None)
        if announce is not None and seq == announce.seq and "revived" in msg:
            self._notice("REVIVED", msg["revived"])
            for key, reason in fenced.items():
                self._notice("FENCED", {"key": key, "reason": reason})

    def _on_error(self, msg: dict[str, Any]) -> None:
        code = str(msg.get("code", "INTERNAL"))
        reason = str(msg.get("reason", ""))
        seq = msg.get("seq")
        error = error_for(code, reason)
        with self._lock:
            announce = self._announce
            is_announce = announce is not None and seq == announce.seq
            if is_announce and code not in FINAL_SESSION_ERRORS:
                # A passing fault (storage, internal): announce again on the next round.
                self._announce = None
                return
            if code == "UNKNOWN_SESSION" and self._session is not None and not is_announce:
                # The daemon does not know our session (it restarted, or declared us dead):
                # announce again; whatever was refused stays in the outbox and follows.
                if self._announced:
                    self._announced = False
                    self._announce = None
                    self._wake_pending = True
                    self._wake()
                return
            if is_announce:
                # Our own session is refused (it ended, or crashed by our own report).
                self._closed_reason = SessionError(reason, code)
                self._session = None
                self._start = None
                failed = list(self._outbox.values())
                self._outbox.clear()
            else:
                pending = self._outbox.pop(seq, None) if type(seq) is int else None
                failed = [pending] if pending is not None else []
                if pending is not None and pending.kind == "entry" and pending.key is not None:
                    self._legs.pop(pending.key, None)  # refused: the leg was never opened
                    self._updates.pop(pending.key, None)
        if is_announce:
            log.error("positiond refused this session: %s", error)
        key = msg.get("key")
        if code == "FENCED" and isinstance(key, str) and key not in self._fenced:
            # Another session owns this leg now: every later call for it raises, loudly.
            log.error("leg %s is fenced: %s", key, reason)
            with self._lock:
                self._fenced[key] = reason
                self._legs.pop(key, None)
                self._updates.pop(key, None)
            self._notice("FENCED", {"key": key, "reason": reason})
        for pending in failed:
            pending._finish(None, error)
        if seq is None:
            self._error_log(error)

    def _error_log(self, error: PositiondError) -> None:
        now = time.monotonic()
        if now - self._error_window > 10.0:
            if self._errors_suppressed:
                log.error("%d more errors from positiond suppressed", self._errors_suppressed)
            self._error_window, self._error_count, self._errors_suppressed = now, 0, 0
        self._error_count += 1
        if self._error_count <= 10:
            log.error("positiond refused a message: %s", error)
        else:
            self._errors_suppressed += 1
