"""The ROUTER socket's side of the daemon: bind it, receive, decode, hand to the engine, send.

- :meth:`Router.open` makes the ROUTER (``ROUTER_MANDATORY``, ``MAXMSGSIZE``), secures it with
  CURVE on tcp://, and binds it through the :class:`~positiond.listener.Listener` (socket
  directory, endpoint lock, systemd's socket, ``chmod``, the connection limit);
- receive: the ROUTER's fd is watched by the event loop; each wake-up drains the socket without
  blocking (pyzmq's one-await-per-message path is four times slower, and a cancelled ``recv``
  can lose a message), decodes, and hands each message to the :class:`~positiond.engine.Engine`;
- send: replies without blocking; a gone or full peer costs a ``dropped_replies`` count;
- process death: the Listener's monitor reports a dropped connection; a ``ROUTER_MANDATORY``
  probe tells whether the peer behind it is really gone (the engine then crashes its sessions).

The daemon wires it with callables: ``wake()`` when the writer has work, ``health()`` to answer
``query what=health`` (the engine returns a :class:`~positiond.engine.HealthQuery` for it),
``watching(rid, n)`` for a watcher's progress (:class:`~positiond.engine.WatchProgress`).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from positiond.config import Config
from positiond.connections import shutdown_connection
from positiond.curve import ServerCurve, secure_server
from positiond.engine import Engine, HealthQuery, WatchProgress, health_reply
from positiond.listener import Listener
from positiond_client.errors import ProtocolError
from positiond_client.protocol import decode, error_reply, ping_reply

__all__ = ["DRAIN_MAX", "PING", "Router"]

log = logging.getLogger(__name__)

PING = ping_reply()
# Plain ints: flags as enums cost a conversion per call on the hot path.
NOBLOCK = int(zmq.NOBLOCK)
MORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)
# Messages handled per wake-up before yielding to the writer and the ticker.
DRAIN_MAX = 2000
# After a disconnect event the ROUTER may still list the peer for a moment: probe again.
PROBE_RETRIES = (0.002, 0.01, 0.05, 0.2)


class _RateLimitedLog:
    """Log at most ``burst`` lines per ``window`` seconds; count the rest."""

    def __init__(self, burst: int = 10, window: float = 10.0) -> None:
        self.burst, self.window = burst, window
        self._start, self._count, self.suppressed = 0.0, 0, 0

    def warning(self, fmt: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._start > self.window:
            if self.suppressed:
                log.warning("%d similar messages suppressed", self.suppressed)
            self._start, self._count, self.suppressed = now, 0, 0
        self._count += 1
        if self._count <= self.burst:
            log.warning(fmt, *args)
        else:
            self.suppressed += 1


def _peer_credentials(frame: zmq.Frame) -> tuple[int, int | None, int | None]:
    """(fd, uid, pid) of the connection a frame came in on; uid/pid only on ipc://."""
    fd = int(frame.get(zmq.SRCFD))
    try:
        address = str(frame.get("Peer-Address"))
    except zmq.ZMQError:
        return fd, None, None
    # ipc:// peers read "localhost:uid:gid:pid" (from SO_PEERCRED), tcp:// peers an IP.
    parts = address.split(":")
    if len(parts) == 4 and parts[1].isdigit() and parts[3].isdigit():
        return fd, int(parts[1]), int(parts[3])
    return fd, None, None


class Router:
    """One ROUTER socket between the strategies and the engine."""

    def __init__(
        self,
        config: Config,
        engine: Engine,
        *,
        listen_fd: int | None,
        ensure_lock: Callable[[Path], None],
        wake: Callable[[], None],
        health: Callable[[], dict[str, Any]],
        watching: Callable[[bytes, int], bytes | None] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.engine = engine
        self.wake = wake
        self.health = health
        self.watching = watching
        self.monotonic = monotonic
        self.wall = wall
        self.is_ipc = config.endpoint.startswith("ipc://")
        self.listener = Listener(
            config,
            listen_fd=listen_fd,
            ensure_lock=ensure_lock,
            warn_limited=_RateLimitedLog().warning,
        )
        self.counters: dict[str, int] = {"bad_messages": 0, "dropped_replies": 0}
        self.ctx: zmq.asyncio.Context | None = None
        # A plain (not asyncio) socket: the event loop watches its fd (see _on_readable).
        self.sock: zmq.Socket[bytes] | None = None
        self._curve: ServerCurve | None = None
        # CURVE peers: routing id -> (fd, z85 public key), to drop a key's connections on revoke.
        self._curve_peers: dict[bytes, tuple[int, str]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader_fd: int | None = None
        self._drain_queued = False
        self._bad_log = _RateLimitedLog()

    # ---- open and close ------------------------------------------------------------------

    def open(self) -> str:
        """Make the ROUTER and bind it (CURVE on tcp://); the endpoint bound."""
        cfg = self.config
        self.ctx = zmq.asyncio.Context()
        sock: zmq.Socket[bytes] = zmq.Socket(self.ctx, zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, cfg.max_message_bytes + 1024)
        sock.setsockopt(zmq.LINGER, 1000)
        if cfg.curve_secret_key is not None and cfg.curve_clients is not None and not self.is_ipc:
            # Config refuses tcp:// without these: a network port is never served in clear.
            self._curve = secure_server(self.ctx, sock, cfg.curve_secret_key, cfg.curve_clients)
        endpoint = self.listener.bind(self.ctx, sock)
        self.sock = sock
        return endpoint

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start receiving: the loop watches the ROUTER's fd and the monitor's."""
        assert self.sock is not None
        self._loop = loop
        self._reader_fd = self.sock.fileno()
        loop.add_reader(self._reader_fd, self._on_readable)
        self._drain_soon()  # anything that queued before the fd was watched
        self.listener.attach(loop, self._disconnected)

    def detach(self) -> None:
        """Stop receiving (the socket stays open to send the last acks)."""
        if self._reader_fd is not None and self._loop is not None:
            self._loop.remove_reader(self._reader_fd)
            self._reader_fd = None
        self.listener.close_monitor()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=1000)
            self.sock = None
        self.listener.close()
        if self._curve is not None:
            self._curve.stop()
            self._curve = None
        if self.ctx is not None:
            self.ctx.term()
            self.ctx = None

    # ---- receive -------------------------------------------------------------------------

    def _on_readable(self) -> None:
        """The ROUTER's fd fired: drain the socket, then let the writer take what is due.

        A plain selector callback (``loop.add_reader``): no task, future or poller per wake-up.
        libzmq's fd is edge-triggered, so the drain reads until EAGAIN; a drain cut short at
        DRAIN_MAX goes on in the next loop iteration, after the writer and the ticker had a turn.
        """
        self._drain_queued = False
        if self._drain():
            self._drain_soon()
        if self.engine.pending_ops:
            self.wake()

    def _drain_soon(self) -> None:
        if not self._drain_queued and self._loop is not None:
            self._drain_queued = True
            self._loop.call_soon(self._on_readable)

    def recheck(self) -> None:
        """After sending outside a drain: libzmq may have queued input without the fd firing
        again (it only signals a change of state), so ask ZMQ_EVENTS."""
        if self.sock is not None and int(self.sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            self._drain_soon()

    def read_queued(self) -> None:
        """Handle what waits in the socket now (before liveness verdicts are made)."""
        if self.sock is not None and int(self.sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            self._on_readable()

    def _drain(self) -> bool:
        """Receive, decode and apply up to DRAIN_MAX messages; True if it stopped at the cap."""
        assert self.sock is not None
        sock, engine = self.sock, self.engine
        recv, peers, receive, send = sock.recv, engine.peers, engine.receive, self.send
        listener = self.listener
        now, wall = self.monotonic(), self.wall()
        limit = self.config.max_message_bytes
        for _ in range(DRAIN_MAX):
            try:
                rid = recv(NOBLOCK)
            except zmq.Again:
                return False
            # A Frame's ``more`` is a plain attribute; ``sock.rcvmore`` is a getsockopt through
            # pyzmq's attribute machinery and cost more than decoding the message.
            frame = recv(copy=False)
            if rid not in peers:
                fd, uid, pid = _peer_credentials(frame)
                listener.drain_monitor()
                if listener.refused(fd):
                    self._busy(rid)
                    continue
                engine.add_peer(rid, fd, uid, pid)
                if self._curve is not None:
                    self._note_curve_peer(rid, fd, frame)
            if frame.more:
                self._reject_frames(rid)
                continue
            payload = frame.bytes
            try:
                msg = decode(payload, limit)
            except ProtocolError as exc:
                self._bad(rid, exc)
                continue
            except Exception:  # the decoder's contract is ProtocolError; a bug must not kill us
                log.exception("internal error decoding a message")
                self._bad(rid, ProtocolError("message could not be decoded", "BAD_MESSAGE"))
                continue
            try:
                reply = receive(rid, msg, now, wall)
                if reply is None:
                    continue
                if isinstance(reply, HealthQuery):
                    reply = health_reply(reply.seq, self.health())
                elif isinstance(reply, WatchProgress) and (
                    self.watching is None or (reply := self.watching(rid, reply.n)) is None
                ):
                    continue
            except Exception:  # a bug must not take the daemon down with it
                log.exception("internal error handling a %s message", msg.get("type"))
                reply = error_reply(
                    "INTERNAL", "internal error; see the daemon log", msg.get("seq")
                )
            send(rid, reply)
        return True

    def _busy(self, rid: bytes) -> None:
        """Answer a message of a connection refused for the limit (no seq: nothing fails)."""
        assert self.sock is not None
        while self.sock.rcvmore:
            self.sock.recv()
        self.send(rid, self.listener.busy_reply())

    def _reject_frames(self, rid: bytes) -> None:
        assert self.sock is not None
        while self.sock.rcvmore:
            self.sock.recv()
        self._bad(rid, ProtocolError("a message must be exactly one frame", "BAD_FRAMES"))

    def _bad(self, rid: bytes, exc: ProtocolError) -> None:
        self.counters["bad_messages"] += 1
        self._bad_log.warning("refused a message: %s", exc)
        self.send(rid, error_reply(exc.code, exc.reason, exc.seq))

    # ---- send ----------------------------------------------------------------------------

    def send(self, rid: bytes, payload: bytes) -> bool:
        """Send one reply without blocking; False if the peer is gone or its queue is full."""
        if self.sock is None:
            return False
        try:
            # ROUTER_MANDATORY: a gone or full peer fails the routing id, before any payload.
            self.sock.send(rid, MORE_NOBLOCK)
            self.sock.send(payload, NOBLOCK)
        except zmq.ZMQError as exc:
            if exc.errno not in (errno.EHOSTUNREACH, errno.EAGAIN):
                raise
            self.counters["dropped_replies"] += 1
            return False
        return True

    # ---- once per tick -------------------------------------------------------------------

    def tick(self, now: float) -> None:
        self.recheck()  # cheap insurance against a missed edge of the fd
        self.listener.drain_monitor()  # the same for the monitor's
        self.listener.tick(now)  # fd recount, socket file check: each second

    # ---- process death -------------------------------------------------------------------

    def _disconnected(self, fd: int) -> None:
        for peer in self.engine.peers_on_fd(fd):
            self._probe(peer.rid, 0)

    def _probe(self, rid: bytes, attempt: int) -> None:
        """Is the peer still connected? A ROUTER_MANDATORY send fails for a gone one."""
        if rid not in self.engine.peers or self.sock is None:
            return
        try:
            self.sock.send_multipart([rid, PING], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            if exc.errno == errno.EHOSTUNREACH:
                if self.is_ipc:
                    # On ipc:// a dropped connection means the process is gone.
                    self.engine.peer_gone(rid, self.wall())
                    self.wake()
                else:
                    # On tcp:// it may be the network: heartbeats decide, we only forget it.
                    self.engine.forget_peer(rid)
                return
            if exc.errno != errno.EAGAIN:
                raise
        self.recheck()
        if attempt < len(PROBE_RETRIES):
            asyncio.get_running_loop().call_later(
                PROBE_RETRIES[attempt], self._probe, rid, attempt + 1
            )

    # ---- CURVE keys ----------------------------------------------------------------------

    def reload_keys(self) -> str | None:
        """SIGHUP: re-read the allowed CURVE keys and drop the revoked ones' connections.

        Returns a line for the log, or None when nothing changed (or no CURVE).
        """
        if self._curve is None:
            return None
        added, removed = self._curve.reload()
        if not added and not removed:
            return None
        dropped = 0
        for rid, (fd, key) in list(self._curve_peers.items()):
            if rid not in self.engine.peers:
                del self._curve_peers[rid]
            elif key in removed:
                # The monitor then sees the disconnect; on tcp:// the session's heartbeats stop
                # and it is declared CRASHED after heartbeat_timeout (its legs stay recoverable).
                del self._curve_peers[rid]
                dropped += shutdown_connection(fd)
        return (
            f"CURVE keys: {len(self._curve.keys)} allowed ({len(added)} added, "
            f"{len(removed)} removed); {dropped} connection(s) of removed keys dropped"
        )

    def _note_curve_peer(self, rid: bytes, fd: int, frame: zmq.Frame) -> None:
        try:
            key = str(frame.get("User-Id"))  # zmq.auth's user id: the z85 public key
        except zmq.ZMQError:
            return
        peers = self.engine.peers
        if len(self._curve_peers) > 2 * len(peers) + 64:
            for gone in [r for r in self._curve_peers if r not in peers]:
                del self._curve_peers[gone]
        self._curve_peers[rid] = (fd, key)
