"""The client's I/O driver: one ZeroMQ DEALER, one lock, one thread; the logic is elsewhere.

Everything the client knows and decides — session, announce and re-announce, outbox and its
replay, coalesced updates, revival, fencing, the link — is the pure
:class:`~positiond_client.session.ClientSession`. This module only moves bytes and events
between it and the socket, under one lock: every use of the socket and of the session happens
while holding ``_lock``, so the socket may be used by whichever thread holds it.

A caller's durable message is sent by the caller itself, right away, when the socket takes it
(no hand-off to the I/O thread on the way out). The I/O thread waits on the socket's file
descriptor (never on the socket itself, so it holds nothing while it waits), reads replies,
follows the connection through the socket monitor, sends what the session has due (updates,
heartbeats, the re-announce and replay after a reconnect) and runs the session's timers. What
the session hands back to run outside the lock (finishing a caller's call, ``on_notice``) runs
on the thread that got it.

A channel belongs to the process that created it: :mod:`positiond_client.fork`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from positiond_client import fork
from positiond_client.errors import SessionError
from positiond_client.link import DOWN, UP
from positiond_client.pending import Delivery, Pending
from positiond_client.session import FINAL_SESSION_ERRORS, ClientSession, Effect

__all__ = ["FINAL_SESSION_ERRORS", "Channel", "Pending"]

log = logging.getLogger(__name__)

# Monitor events that mean "no connection now": a failed attempt, a lost connection.
LOST_EVENTS = (
    zmq.EVENT_CONNECT_RETRIED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


class Channel:
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
        self.endpoint = endpoint
        self.curve = curve  # (server public, client public, client secret) for tcp://
        self.heartbeat_interval = heartbeat_interval
        self.ack_timeout = ack_timeout
        self.on_notice = on_notice
        self._s = ClientSession(
            time.monotonic(),
            endpoint=endpoint,
            heartbeat_interval=heartbeat_interval,
            resend_interval=resend_interval,
            ack_timeout=ack_timeout,
            warn_every=warn_every,
        )
        self._lock = threading.Lock()
        self._link_waiters: set[Callable[[], None]] = set()
        self._pid = os.getpid()
        self._forked = False
        self._stop = False
        self._wake_due = False  # a wake-up is on its way to the I/O thread
        self._conn_fd: int | None = None  # the connection's file descriptor, while connected
        self._sock: zmq.Socket[bytes] | None = None
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._wfd, False)
        fork.register(self)
        self._thread = threading.Thread(target=self._run, name="positiond-client-io", daemon=True)
        self._ready = threading.Event()
        self._thread.start()
        self._ready.wait(5.0)

    # ---- caller side (any thread) --------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Connected and answering: the link is up and not known unreachable."""
        return not self._forked and self._s.link.state(time.monotonic()) == UP

    def unreachable(self) -> bool:
        """The daemon is known unreachable (see :mod:`positiond_client.link`)."""
        return self._s.unreachable(time.monotonic())

    def link_state(self) -> tuple[str, float | None]:
        """The link's state and, if the daemon is known unreachable, for how many seconds."""
        now = time.monotonic()
        return self._s.link.state(now), self._s.link.away_for(now)

    @property
    def outbox_size(self) -> int:
        return self._s.unacknowledged

    def queued(self) -> dict[str, int]:
        """What waits in this process (the regression test of flat memory reads it)."""
        self.check_process()  # (a forked child may have inherited the lock taken)
        with self._lock:
            return self._s.queued()

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
            self._s.overdue(time.monotonic())

    def add_link_waiter(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` on the I/O thread when the connection is lost (a call waiting for
        its ack then returns at once; the time-based states are seen by the next call)."""
        with self._lock:
            self._link_waiters.add(fn)

    def remove_link_waiter(self, fn: Callable[[], None]) -> None:
        with self._lock:
            self._link_waiters.discard(fn)

    def session_key(self) -> str | None:
        return self._s.session_key()

    def fenced_reason(self, key: str) -> str | None:
        return self._s.fenced_reason(key)

    def closed_reason(self, key: str) -> str | None:
        return self._s.closed_reason(key)

    def open_session(self, msg: dict[str, Any]) -> Pending:
        """Queue the session's start; it is (re-)announced on every connection."""
        self.check_process()
        with self._lock:
            pending = self._s.open_session(msg)
            self._pump_locked()
        return pending

    def submit(self, msg: dict[str, Any], *, flush_updates: bool = False) -> Pending:
        """Queue a durable message (entry, exit, crash, end, sync) after what came before it,
        and send it now if the socket takes it (``flush_updates``: pending updates first)."""
        self.check_process()
        with self._lock:
            pending = self._s.submit(msg, flush_updates=flush_updates)
            self._pump_locked()
        return pending

    def update(self, key: str, fields: dict[str, Any]) -> None:
        """Coalesce an update for an open leg (never blocks; at most a wake-up of the I/O
        thread, which encodes and sends it when the socket takes it)."""
        if self._forked:
            self.check_process()
        with self._lock:
            if not self._s.update(key, fields) or self._wake_due:
                return
            self._wake_due = True
        self._wake()

    def open_leg(self, key: str, state: dict[str, Any]) -> None:
        """Open a leg adopted from a crashed session: updates for it are accepted from now on."""
        with self._lock:
            self._s.open_leg(key, state)

    def forget(self, pending: Pending) -> None:
        """Drop an unanswered read from the outbox (a stale answer would help nobody)."""
        with self._lock:
            self._s.forget(pending)

    def is_open(self, key: str) -> bool:
        return self._s.is_open(key)

    def leg_state(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            return self._s.leg_state(key)

    def session_closed(self) -> None:
        """The session ended or crashed by its own report: stop heartbeats and re-announces."""
        with self._lock:
            self._s.session_closed()

    def unacked(self) -> list[Pending]:
        with self._lock:
            return self._s.unacked()

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
        left = self.outbox_size
        if left:
            log.warning("closing with %d durable message(s) not acknowledged by positiond", left)
        self._stop = True
        self._wake()
        self._thread.join(5.0)
        os.close(self._rfd)
        os.close(self._wfd)

    # ---- the socket, under _lock -----------------------------------------------------------

    def _wake(self) -> None:
        # A full pipe means the thread is already due to wake.
        with contextlib.suppress(BlockingIOError):
            os.write(self._wfd, b"\0")

    def _pump_locked(self) -> None:
        """Send what the session has due, as long as the socket takes it; then make sure a
        reply this may have left unsignalled on the socket's descriptor is read."""
        sock = self._sock
        if sock is None:
            return
        s = self._s
        now = time.monotonic()
        while (data := s.next_send(now)) is not None:
            try:
                sock.send(data, zmq.NOBLOCK)
            except zmq.Again:
                s.blocked()
                break
            s.sent(now)
        # The descriptor is edge-triggered: a send may have consumed the signal of a reply
        # that is waiting; then the I/O thread must look (it rechecks EVENTS itself).
        if threading.current_thread() is not self._thread:
            flags = int(sock.get(zmq.EVENTS))
            if flags & zmq.POLLIN or (s.is_blocked and flags & zmq.POLLOUT):
                self._wake()

    # ---- I/O thread ----------------------------------------------------------------------

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
        poller.register(int(sock.get(zmq.FD)), zmq.POLLIN)  # the descriptor: holds no socket
        poller.register(monitor, zmq.POLLIN)
        poller.register(self._rfd, zmq.POLLIN)
        with self._lock:
            self._sock = sock
        self._ready.set()
        busy = False
        try:
            while not self._stop:
                try:
                    busy = self._step(sock, monitor, poller, busy)
                except Exception:  # one bad iteration must not end the strategy's persistence
                    log.exception("positiond client I/O thread: unexpected error, going on")
                    time.sleep(0.01)  # not a hot loop if it repeats
        finally:
            with self._lock:
                self._sock = None
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)
            ctx.term()

    def _step(
        self, sock: zmq.Socket[bytes], monitor: zmq.Socket[bytes], poller: zmq.Poller, busy: bool
    ) -> bool:
        """One round: wait (not if ``busy``), then read and send under the lock. Returns
        whether the socket still has something for the next round at once."""
        wait = 0.0 if busy else min(self._s.next_deadline(time.monotonic()), 1.0)
        events = dict(poller.poll(int(wait * 1000) + (0 if busy else 1)))
        if self._rfd in events:
            os.read(self._rfd, 65536)
        effects: list[Effect] = []
        lost = False
        with self._lock:
            self._wake_due = False
            if monitor in events:
                lost = self._on_monitor(monitor)
            s = self._s
            flags = int(sock.get(zmq.EVENTS))
            now = time.monotonic()
            if flags & zmq.POLLOUT and s.is_blocked:
                s.writable()
            for _ in range(1000) if flags & zmq.POLLIN else ():  # (then let callers in)
                try:
                    raw = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                effects += s.receive(raw, now)
            s.tick(now)
            self._pump_locked()
            flags = int(sock.get(zmq.EVENTS))
            # Blocked: the descriptor signals when it is writable again, but only as an edge.
            busy = bool(flags & zmq.POLLIN) or (s.is_blocked and bool(flags & zmq.POLLOUT))
            report = s.link.report(now)
            unreachable = s.unreachable(now)
            waiters = list(self._link_waiters) if lost and unreachable else []
        for fn in waiters:
            fn()  # callers waiting for an ack return at once
        self._run_effects(effects)
        if report is not None:
            self._log_link(report, now)
        return busy

    def _run_effects(self, effects: list[Effect]) -> None:
        for effect in effects:
            if effect[0] == "finish":
                _, pending, result, error = effect
                pending._finish(result, error)
            elif self.on_notice is not None:
                try:
                    self.on_notice(effect[1], effect[2])
                except Exception:
                    log.exception("on_notice callback failed")

    def _log_link(self, report: tuple[str, float], now: float) -> None:
        """Log the daemon becoming unreachable (then every warn_every s) and coming back."""
        what, seconds = report
        if what == "away":
            state = self._s.link.state(now)
            why = {DOWN: "no connection", UP: state}.get(
                state, f"{state}: no answer within {self.ack_timeout:g}s"
            )
            log.warning(
                "positiond at %s unreachable for %.0fs (%s); durable calls return at once, "
                "%d message(s) kept for it and sent when it is back",
                self.endpoint,
                seconds,
                why,
                self.outbox_size,
            )
        else:
            log.info("positiond at %s answers again after %.1fs", self.endpoint, seconds)

    def _on_monitor(self, monitor: zmq.Socket[bytes]) -> bool:
        """Feed the connection's events to the session; True if a connection was lost."""
        lost = False
        while True:
            try:
                event = parse_monitor_message(monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return lost
            kind, now = event["event"], time.monotonic()
            if kind == zmq.EVENT_CONNECTED:
                self._conn_fd = int(event["value"])  # closed by a forked child (fork.py)
            elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                log.debug("connected to positiond at %s", self.endpoint)
                self._s.connected(now)
            elif kind & LOST_EVENTS:
                log.debug("no connection to positiond at %s (event %#x)", self.endpoint, kind)
                self._s.lost(now, definite=self._definitely_absent(kind))
                lost = True
                if kind == zmq.EVENT_DISCONNECTED:
                    self._conn_fd = None

    def _definitely_absent(self, kind: int) -> bool:
        """Does this failed attempt prove the daemon absent? A retried connect on ipc:// whose
        socket file exists (a busy or starting daemon), or any retried connect on tcp://, may
        still succeed: a fresh client keeps trying within its grace."""
        if kind != zmq.EVENT_CONNECT_RETRIED:
            return True
        if self.endpoint.startswith("ipc://"):
            return not os.path.exists(self.endpoint[len("ipc://") :])
        return False
