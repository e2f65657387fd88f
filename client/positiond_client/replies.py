"""The client channel's state, and how the daemon's answers change it.

:class:`~positiond_client.channel.Channel` adds the callers' side and the I/O thread that
owns the socket; everything here runs under ``_lock`` or on the I/O thread. Acks finish
pending calls; errors fail them, fence legs, or (``UNKNOWN_SESSION``) trigger a re-announce,
after which :meth:`ChannelState._announced_locked` re-queues the outbox and every open leg's
newest state; a ``revived`` ack fences the legs the daemon did not hand back.
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

from positiond_client.errors import PositiondError, SessionError, error_for
from positiond_client.link import Link
from positiond_client.pending import Pending
from positiond_client.protocol import PROTOCOL_VERSION, encode

__all__ = ["FINAL_SESSION_ERRORS", "ChannelState"]

log = logging.getLogger(__name__)

# Refusals of a session's start that end it for good; anything else is retried.
FINAL_SESSION_ERRORS = frozenset(
    {"SESSION_CLOSED", "BAD_FIELD", "BAD_VERSION", "BAD_TYPE", "BAD_TOKEN"}
)


class ChannelState:
    """Outbox, leg states and session of one channel; the daemon's answers applied to them."""

    def __init__(
        self,
        endpoint: str,
        *,
        heartbeat_interval: float,
        resend_interval: float,
        ack_timeout: float,
        warn_every: float,
        on_notice: Callable[[str, dict[str, Any]], None] | None,
        curve: tuple[bytes, bytes, bytes] | None,
    ) -> None:
        self.endpoint = endpoint
        self.curve = curve  # (server public, client public, client secret) for tcp://
        self.heartbeat_interval = heartbeat_interval
        self.resend_interval = resend_interval
        self.ack_timeout = ack_timeout
        self.on_notice = on_notice
        self._pid = os.getpid()
        self._forked = False
        self._conn_fd: int | None = None  # the connection's file descriptor, while connected
        self._link = Link(
            time.monotonic(), grace=ack_timeout, answer_timeout=ack_timeout, warn_every=warn_every
        )
        self._link_waiters: set[Callable[[], None]] = set()
        self._blocked = False  # the socket would block: send nothing until it is writable
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

    def _wake(self) -> None:
        # A full pipe means the thread is already due to wake.
        with contextlib.suppress(BlockingIOError):
            os.write(self._wfd, b"\0")

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

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
        # A warning, as the daemon's verdict and its revival are: nothing is lost, the session
        # runs on (the fenced legs below, if any, are errors of their own).
        log.warning(
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
            answers = 1 if seq in self._outbox else 0
            self._link.answered(time.monotonic(), outstanding=len(self._outbox) > answers)
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
            answers = 1 if seq in self._outbox else 0
            self._link.answered(time.monotonic(), outstanding=len(self._outbox) > answers)
            announce = self._announce
            is_announce = announce is not None and seq == announce.seq
            if is_announce and code not in FINAL_SESSION_ERRORS:
                # A passing fault (storage, internal): announce again on the next round.
                self._announce = None
                return
            if code == "UNKNOWN_SESSION" and self._session is not None and not is_announce:
                # The daemon does not know our session (it restarted, or declared us dead):
                # announce again; whatever was refused stays in the outbox and follows.
                if seq is None:
                    self._rekey_syncs_locked()
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

    def _rekey_syncs_locked(self) -> None:
        """An update was refused (the daemon no longer knew our session): a sync sent before
        it may still be acked, but that ack would not cover the refused update. Such syncs
        get a new seq (the old ack is then ignored) and go again after the re-announce, behind
        every open leg's state."""
        for pending in [p for p in self._outbox.values() if p.kind == "sync" and p.sent_at]:
            del self._outbox[pending.seq]
            pending.seq = pending.msg["seq"] = self._next_seq()
            pending.payload = encode(pending.msg)
            pending.sent_at = None
            self._outbox[pending.seq] = pending

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
