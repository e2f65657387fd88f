"""The client's I/O thread: it alone owns the ZeroMQ socket; callers never touch zmq.

Callers hand messages over under a lock and wake the thread through a pipe that it polls
together with the socket, so a hand-off costs no poll interval. Durable messages stay in the
outbox until acked and are re-sent after every reconnect; updates are coalesced per leg, and
the newest full state of every open leg is re-sent after a reconnect, so nothing the daemon
had only in memory is lost when it restarts.

After each (re)connection the thread first re-announces the session (a ``start`` with the same
session key) and sends nothing else until that is acked; then the outbox in order, each open
leg's state right after its entry, then normal traffic.

Memory stays flat whatever the daemon does (absent, paused, slow): updates are encoded only
when the socket takes them. Once a send would block, the thread stops sending, waits for the
socket to become writable again, and meanwhile updates keep coalescing per leg; what waits is
one pending state per open leg plus the durable messages themselves.

What the thread knows about the daemon (up, connecting, down, unresponsive) is a
:class:`~positiond_client.link.Link`; a durable call returns at once when it says "known
unreachable".

A channel belongs to the process that created it: :mod:`positiond_client.fork`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from positiond_client import fork
from positiond_client.errors import SessionError, error_for
from positiond_client.link import DOWN, UP
from positiond_client.pending import Delivery, Pending
from positiond_client.protocol import PROTOCOL_VERSION, encode
from positiond_client.replies import ChannelState

__all__ = ["Channel", "Pending"]

log = logging.getLogger(__name__)

# Outbox size past which every new durable message logs a warning (nothing is dropped).
OUTBOX_WARN = 10_000
# Monitor events that mean "no connection now": a failed attempt, a lost connection.
LOST_EVENTS = (
    zmq.EVENT_CONNECT_RETRIED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


class Channel(ChannelState):
    """One DEALER connection to the daemon, driven by a background thread."""

    def __init__(
        self,
        endpoint: str,
        *,
        heartbeat_interval: float = 0.5,
        resend_interval: float = 5.0,
        ack_timeout: float = 2.0,
        warn_every: float = 30.0,
        on_notice: Callable[[str, dict[str, Any]], None] | None = None,
        curve: tuple[bytes, bytes, bytes] | None = None,
    ) -> None:
        super().__init__(
            endpoint,
            heartbeat_interval=heartbeat_interval,
            resend_interval=resend_interval,
            ack_timeout=ack_timeout,
            warn_every=warn_every,
            on_notice=on_notice,
            curve=curve,
        )
        fork.register(self)
        self._thread = threading.Thread(target=self._run, name="positiond-client-io", daemon=True)
        self._ready = threading.Event()
        self._thread.start()
        self._ready.wait(5.0)

    # ---- caller side (any thread) --------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Connected and answering: the link is up and not known unreachable."""
        return not self._forked and self._link.state(time.monotonic()) == UP

    def unreachable(self) -> bool:
        """The daemon is known unreachable (see :mod:`positiond_client.link`)."""
        return self._link.unreachable(time.monotonic())

    def link_state(self) -> tuple[str, float | None]:
        """The link's state and, if the daemon is known unreachable, for how many seconds."""
        now = time.monotonic()
        return self._link.state(now), self._link.away_for(now)

    @property
    def outbox_size(self) -> int:
        return len(self._outbox)

    def queued(self) -> dict[str, int]:
        """What waits in this process (the regression test of flat memory reads it)."""
        self.check_process()  # (a forked child may have inherited the lock taken)
        with self._lock:
            items = list(self._outq)
            updates = len(self._updates)
        return {
            "send_queue": len(items),
            "send_queue_bytes": sum(
                len(i.payload) if isinstance(i, Pending) else len(i) for i in items
            ),
            "pending_updates": updates,
            "unacknowledged": len(self._outbox),
        }

    def abandon(self) -> None:
        """In a forked child (called by :mod:`positiond_client.fork`): unusable from now on,
        and the parent's connection is not kept open by this process."""
        self._forked = True
        if self._conn_fd is not None:
            fork.close_inherited(self._conn_fd, self.endpoint)

    def check_process(self) -> None:
        """Raise in a child forked from the process that created this channel."""
        if self._forked:
            raise SessionError(
                f"this client belongs to process {self._pid}, not to this forked child "
                f"(pid {os.getpid()}): its session, I/O thread and ZeroMQ socket stay with "
                "the parent; create a new PositionPersistenceManager in the child",
                "NO_SESSION",
            )

    def await_answer(self, pending: Pending, timeout: float) -> Delivery:
        """Wait until ``pending`` is answered (``STORED``: acked or refused), ``timeout``
        passes (``UNANSWERED``) or the daemon is known unreachable (``QUEUED``, at once if it
        already is)."""
        if pending.answered:
            return Delivery.STORED
        if self.unreachable():
            return Delivery.QUEUED
        event = threading.Event()
        pending.add_callback(lambda _: event.set())
        self.add_link_waiter(event.set)
        try:
            # (It may have become unreachable before the waiter was there.)
            woke = self.unreachable() or event.wait(timeout)
        finally:
            self.remove_link_waiter(event.set)
        if pending.answered:
            return Delivery.STORED
        if woke:
            return Delivery.QUEUED
        self.note_unanswered()
        return Delivery.UNANSWERED

    def note_unanswered(self) -> None:
        """A durable call waited its whole timeout in vain: the daemon is unresponsive."""
        with self._lock:
            self._link.overdue(time.monotonic())

    def add_link_waiter(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` on the I/O thread when the connection is lost (a call waiting for
        its ack then returns at once; the time-based states are seen by the next call)."""
        with self._lock:
            self._link_waiters.add(fn)

    def remove_link_waiter(self, fn: Callable[[], None]) -> None:
        with self._lock:
            self._link_waiters.discard(fn)

    def session_key(self) -> str | None:
        return self._session

    def fenced_reason(self, key: str) -> str | None:
        return self._fenced.get(key)

    def open_session(self, msg: dict[str, Any]) -> Pending:
        """Queue the session's start; it is (re-)announced on every connection."""
        self.check_process()
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
        self.check_process()
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
        if self._forked:
            self.check_process()
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
            if self._wake_pending or not self._connected or self._blocked:
                # No daemon, or one not taking more: the state waits in _legs/_updates; a
                # reconnect or the socket becoming writable sends it.
                return
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
        """Give unacked messages up to ``timeout`` to be acked, then stop the thread (no
        waiting while the daemon is known unreachable: nothing could ack them).

        In a forked child it does nothing: the thread, the socket and the messages are the
        parent's.
        """
        if self._forked:
            return
        deadline = time.monotonic() + timeout
        for pending in self.unacked():
            if not self.await_answer(pending, max(0.0, deadline - time.monotonic())):
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
        if self.endpoint.startswith("tcp://"):
            # ZeroMQ's own PING/PONG (answered by the daemon's libzmq thread, whatever its
            # Python code does): a daemon host gone or frozen drops the connection after
            # ack_timeout, so the client knows it is unreachable before a call waits on it.
            # Not on ipc://, where a dropped connection is the daemon's crash verdict.
            sock.setsockopt(zmq.HEARTBEAT_IVL, max(1, int(self.heartbeat_interval * 1000)))
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(1, int(self.ack_timeout * 1000)))
            sock.setsockopt(zmq.CONNECT_TIMEOUT, max(1, int(self.ack_timeout * 1000)))
        if self.curve is not None:
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = self.curve
        monitor = sock.get_monitor_socket(
            zmq.EVENT_CONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | LOST_EVENTS
        )
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
        if self._session is not None and self._connected and not self._blocked:
            wait = min(wait, self._last_send + self.heartbeat_interval - now)
        # Watch for writability only while blocked (a writable socket would spin the loop).
        poller.modify(sock, zmq.POLLIN | zmq.POLLOUT if self._blocked else zmq.POLLIN)
        events = dict(poller.poll(max(1, int(min(max(wait, 0.0), 1.0) * 1000) + 1)))
        if self._rfd in events:
            os.read(self._rfd, 65536)
        if monitor in events:
            self._on_monitor(monitor)
        if sock in events:
            if events[sock] & zmq.POLLOUT:
                self._blocked = False
            if events[sock] & zmq.POLLIN:
                self._on_replies(sock)
        self._pump(sock)
        now = time.monotonic()
        if now >= next_resend:
            next_resend = now + self.resend_interval
            self._resend_stale(sock, now)
        self._report_link(now)
        if (
            self._session is not None
            and self._connected
            and not self._blocked
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

    def _report_link(self, now: float) -> None:
        """Log the daemon becoming unreachable (then every warn_every s) and coming back."""
        report = self._link.report(now)
        if report is None:
            return
        what, seconds = report
        if what == "away":
            state = self._link.state(now)
            why = {
                DOWN: "no connection",
                UP: "",
            }.get(state, f"{state}: no answer within {self.ack_timeout:g}s")
            log.warning(
                "positiond at %s unreachable for %.0fs (%s); durable calls return at once, "
                "%d message(s) kept for it and sent when it is back",
                self.endpoint,
                seconds,
                why or state,
                len(self._outbox),
            )
        else:
            log.info("positiond at %s answers again after %.1fs", self.endpoint, seconds)

    def _wake_link_waiters(self) -> None:
        with self._lock:
            waiters = list(self._link_waiters)
        for fn in waiters:
            fn()

    def _send(self, sock: zmq.Socket[bytes], payload: bytes) -> bool:
        try:
            sock.send(payload, zmq.NOBLOCK)
        except zmq.Again:
            self._blocked = True
            return False
        self._last_send = time.monotonic()
        return True

    def _on_monitor(self, monitor: zmq.Socket[bytes]) -> None:
        while True:
            try:
                event = parse_monitor_message(monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            kind, now = event["event"], time.monotonic()
            if kind == zmq.EVENT_CONNECTED:
                self._conn_fd = int(event["value"])  # closed by a forked child (fork.py)
            elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                log.debug("connected to positiond at %s", self.endpoint)
                with self._lock:
                    self._link.handshake(now)
                    self._connected = True
                    self._blocked = False
                    self._announced = False
                    self._announce = None
            elif kind & LOST_EVENTS:
                log.debug("no connection to positiond at %s (event %#x)", self.endpoint, kind)
                with self._lock:
                    self._link.lost(now, definite=self._definitely_absent(kind))
                    self._connected = False
                    self._announced = False
                    self._announce = None
                    if kind == zmq.EVENT_DISCONNECTED:
                        self._conn_fd = None
                if self._link.unreachable(now):
                    self._wake_link_waiters()  # callers waiting for an ack return at once
                self._report_link(now)

    def _definitely_absent(self, kind: int) -> bool:
        """Does this failed attempt prove the daemon absent? A retried connect on ipc:// whose
        socket file exists (a busy or starting daemon), or any retried connect on tcp://, may
        still succeed: a fresh client keeps trying within its grace."""
        if kind != zmq.EVENT_CONNECT_RETRIED:
            return True
        if self.endpoint.startswith("ipc://"):
            return not os.path.exists(self.endpoint[len("ipc://") :])
        return False

    def _pump(self, sock: zmq.Socket[bytes]) -> None:
        """Send what is due: the announce, or (once announced) the queue and the updates.

        Updates are encoded only here, one at a time, as the socket takes them: when it would
        block, the rest stay coalesced per leg (one pending state each) until it is writable.
        """
        with self._lock:
            self._wake_pending = False
            if not self._connected or self._blocked:
                return
            if self._session is not None and not self._announced:
                if self._announce is None:
                    self._send_announce_locked(sock)
                return
            queue, self._outq = self._outq, []
        for i, item in enumerate(queue):
            if not self._send(sock, item.payload if isinstance(item, Pending) else item):
                with self._lock:  # full, or the connection went away: keep the rest, in order
                    self._outq[:0] = queue[i:]
                return
            if isinstance(item, Pending):
                item.sent_at = self._last_send
                with self._lock:
                    self._link.asked(self._last_send)
        with self._lock:
            updates, self._updates = self._updates, {}
            session, token = self._session, self._token
        items = list(updates.items())
        for i, (key, fields) in enumerate(items):
            msg = {"v": PROTOCOL_VERSION, "type": "update", "session": session, "token": token}
            msg["key"] = key
            msg.update(fields)
            if not self._send(sock, encode(msg)):
                with self._lock:  # back into the coalescing map, under newer values
                    for key_left, older in items[i:]:
                        if key_left in self._legs:
                            older.update(self._updates.get(key_left, {}))
                            self._updates[key_left] = older
                return

    def _send_announce_locked(self, sock: zmq.Socket[bytes]) -> None:
        start = self._start
        assert start is not None
        if start.done:
            msg = dict(start.msg)
            msg["seq"] = self._next_seq()
            start = Pending(msg["seq"], msg)  # internal: nobody waits on it
        if self._send(sock, start.payload):
            start.sent_at = self._last_send
            self._announce = start
            self._link.asked(self._last_send)

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
            if not (self._connected and self._announced) or self._blocked:
                return  # (not lost: they are re-sent after the next resend interval)
            queued = {id(p) for p in self._outq if isinstance(p, Pending)}
            stale = [
                p
                for p in self._outbox.values()
                if p.sent_at is not None
                and now - p.sent_at > self.resend_interval
                and id(p) not in queued
            ]
            for pending in stale:
                pending.sent_at = now
                self._outq.append(pending)
        self._pump(sock)
