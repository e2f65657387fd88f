"""The daemon's asyncio adapter: one ROUTER socket in, one SQLite writer out.

Five tasks share the event loop:

- receive: ``await poll()`` then drain the socket without blocking through a shadow socket
  (pyzmq's one-await-per-message path is four times slower, and a cancelled ``recv`` can lose a
  message), decode, hand each message to the :class:`~positiond.engine.Engine`;
- write: takes a batch from the engine, commits it in one call, then sends the acks;
- tick: drives liveness verdicts and the flush interval;
- monitor (a selector callback, not a task): turns a dropped ipc connection into "process
  exited" within milliseconds, and counts connections against the fd limit
  (:class:`~positiond.listener.ConnectionGate`);
- status: tells systemd how the daemon is doing (``STATUS=``, ``WATCHDOG=1`` while the writer
  makes progress, see :mod:`positiond.status`) and refreshes ``status.json``.

Under systemd the daemon may be handed its listening socket (:mod:`positiond.activation`) and
reports READY=1 only once the database is migrated and the socket accepts connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import sqlite3
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from positiond.config import RELOADABLE, Config, changed
from positiond.curve import ServerCurve, secure_server
from positiond.engine import Engine
from positiond.listener import (
    ConnectionGate,
    Limits,
    SocketWatch,
    open_fds,
    peer_of,
    raise_fd_limit,
    shutdown_connection,
)
from positiond.notify import Notifier
from positiond.status import Progress, Reporter, status_file_for, status_line, version
from positiond.store import Store
from positiond_client.errors import ProtocolError
from positiond_client.paths import (
    ensure_private_dir,
    ipc_path,
    runtime_dir,
    unsafe_socket_directory,
)
from positiond_client.protocol import PROTOCOL_VERSION, decode, encode, error_reply

__all__ = ["AlreadyRunning", "Daemon", "UnsafeEndpoint"]

log = logging.getLogger(__name__)

PING = encode({"v": PROTOCOL_VERSION, "type": "ping"})
# Plain ints: flags as enums cost a conversion per call on the hot path.
NOBLOCK = int(zmq.NOBLOCK)
MORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)
# Messages handled per wake-up before yielding to the writer and the ticker.
DRAIN_MAX = 2000
# After a disconnect event the ROUTER may still list the peer for a moment: probe again.
PROBE_RETRIES = (0.002, 0.01, 0.05, 0.2)
# How long a stopping daemon keeps retrying a failing final write.
SHUTDOWN_WRITE_TIMEOUT = 10.0
# While the final flush runs, ask systemd for this much more stop time every EXTEND_STEP seconds.
EXTEND_STEP = 1.0
EXTEND_BY = 3 * EXTEND_STEP
# A connection refused for the limit is dropped this long after it came in.
REFUSE_GRACE = 0.5
# How often the open fds are recounted (a listdir of /proc/self/fd).
FD_COUNT_INTERVAL = 1.0
FD_CEILING_UNSET = 1 << 20
# Without a systemd watchdog, health() calls a writer stalled for this long unhealthy.
STALL_LIMIT = 30.0


class AlreadyRunning(RuntimeError):
    """Another positiond holds this database or endpoint."""


class UnsafeEndpoint(RuntimeError):
    """The ipc socket's directory would let another user take the endpoint over."""


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


def _lock(path: Path, what: str) -> IO[bytes]:
    handle = open(path, "ab")  # noqa: SIM115 -- held open for the daemon's lifetime
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise AlreadyRunning(f"another positiond is already running on {what}") from None
    return handle


def _paused_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.paused")


def _same_file(handle: IO[bytes], path: Path) -> bool:
    try:
        mine, there = os.fstat(handle.fileno()), os.stat(path)
    except (OSError, ValueError):
        return False
    return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)


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


class Daemon:
    """positiond itself: ``await start()``, then ``await stop()`` (or ``run()`` for both)."""

    def __init__(
        self,
        config: Config,
        *,
        listen_fd: int | None = None,
        notifier: Notifier | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.listen_fd = listen_fd  # a listening socket from systemd (positiond.activation)
        self._curve: ServerCurve | None = None
        # CURVE peers: routing id -> (fd, z85 public key), to drop a key's connections on revoke.
        self._curve_peers: dict[bytes, tuple[int, str]] = {}
        self._own_socket_file: Path | None = None
        self._socket_watch: SocketWatch | None = None
        self._monitor: zmq.Socket[bytes] | None = None
        self._gate = ConnectionGate(Limits.compute(FD_CEILING_UNSET, 0))
        self._next_fd_count = 0.0
        self._refuse_log = _RateLimitedLog()
        self._endpoint_lock: Path | None = None
        self.notifier = Notifier() if notifier is None else notifier
        self.monotonic = monotonic
        self.engine = Engine(
            config.heartbeat_timeout, config.flush_interval, monotonic=monotonic, wall=wall
        )
        self.engine.health = self.health  # answers `query what=health` from memory
        self.store: Store | None = None
        self.ctx: zmq.asyncio.Context | None = None
        # A plain (not asyncio) socket: the event loop watches its fd (see _on_readable).
        self.sock: zmq.Socket[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader_fd: int | None = None
        self._drain_queued = False
        self._tasks: list[asyncio.Task[None]] = []
        self._writer: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stop_requested = asyncio.Event()
        self._stopped = asyncio.Event()
        self._stopping = False
        self._locks: list[IO[bytes]] = []
        self._bad_log = _RateLimitedLog()
        self.is_ipc = config.endpoint.startswith("ipc://")
        self.endpoint = config.endpoint
        self.healthy = True  # the last write succeeded
        self.last_flush: float | None = None
        self.started = monotonic()
        self.progress = Progress(self.started)
        self.reporter = Reporter(self.notifier, None, self.health)
        self.counters = self.engine.counters
        self.counters.update(
            {
                "bad_messages": 0,
                "dropped_replies": 0,
                "batches": 0,
                "refused_connections": 0,
                "accept_pauses": 0,
            }
        )

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Lock, open and migrate the database, load live sessions, bind, start the tasks."""
        cfg = self.config
        db = Path(cfg.db)
        db.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._locks.append(_lock(db.with_name(db.name + ".lock"), f"database {db}"))
        sock_path = ipc_path(cfg.endpoint)
        if sock_path is not None:
            self._prepare_socket_dir(sock_path)
            # libzmq unlinks an existing socket file on bind: without this lock a second daemon
            # would silently steal the endpoint from the first.
            lock = self._endpoint_lock = sock_path.with_name(sock_path.name + ".lock")
            self._locks.append(_lock(lock, f"endpoint {cfg.endpoint}"))
            self._restore_paused(sock_path)
        self.store = await Store.open(db, cfg.synchronous, busy_timeout=cfg.busy_timeout)
        sessions, legs = await self.store.load_live()
        self.engine.load(sessions, legs)
        if sessions:
            log.info(
                "%d session(s) were RUNNING when the daemon last stopped; waiting %.1fs for them",
                len(sessions),
                cfg.heartbeat_timeout,
            )
        self.ctx = zmq.asyncio.Context()
        sock: zmq.Socket[bytes] = zmq.Socket(self.ctx, zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, cfg.max_message_bytes + 1024)
        sock.setsockopt(zmq.LINGER, 1000)
        fd_limit = raise_fd_limit()
        # What still comes in after the daemon stops accepting: keep it within the spare fds.
        sock.setsockopt(zmq.BACKLOG, Limits.compute(fd_limit, 0).backlog)
        if self.listen_fd is not None:
            # Socket activation: libzmq adopts systemd's listening socket (and will close it)
            # instead of unlinking the file and binding a new one; bind only names it.
            sock.setsockopt(zmq.USE_FD, self.listen_fd)
        # Watched from before the first connection: the gate counts every one.
        monitor_address = f"inproc://positiond-monitor-{id(self):x}"
        sock.monitor(monitor_address, zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        # A plain socket drained from a selector callback, like the ROUTER (see _drain_monitor).
        monitor: zmq.Socket[bytes] = zmq.Socket(self.ctx, zmq.PAIR)
        # libzmq drops events beyond the pipe's HWM (1000 + 1000): a flood of connections
        # would lose ACCEPTED events and the gate would count too few. 0 on our side makes
        # the inproc pipe unbounded (libzmq adds both sides' HWMs unless one is 0).
        monitor.setsockopt(zmq.RCVHWM, 0)
        monitor.connect(monitor_address)
        self._monitor = monitor
        if cfg.curve_secret_key is not None and cfg.curve_clients is not None and not self.is_ipc:
            # Config refuses tcp:// without these: a network port is never served in clear.
            self._curve = secure_server(self.ctx, sock, cfg.curve_secret_key, cfg.curve_clients)
        sock.bind(cfg.endpoint)
        # tcp://host:* binds a free port: report the real one.
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        if sock_path is not None and self.listen_fd is not None:
            log.info("listening on the socket from systemd (mode: the unit's SocketMode=)")
        elif sock_path is not None:
            os.chmod(sock_path, cfg.socket_mode)
            self._check_group_access(sock_path)
            self._own_socket_file = sock_path
        else:
            log.info("listening on %s with CURVE authentication", self.endpoint)
        if sock_path is not None and not str(sock_path).startswith("@"):
            self._socket_watch = SocketWatch(sock_path)
        limits = Limits.compute(fd_limit, open_fds(), cfg.max_connections)
        self._gate = ConnectionGate(limits)
        log.info(
            "connections: up to %d served (accepting again below %d; file descriptor limit %d)",
            limits.cap,
            limits.resume_below,
            limits.fd_limit,
        )
        self.sock = sock
        loop = self._loop = asyncio.get_running_loop()
        self._writer = loop.create_task(self._write_loop(), name="positiond-writer")
        self._reader_fd = sock.fileno()
        loop.add_reader(self._reader_fd, self._on_readable)
        self._drain_soon()  # anything that queued before the fd was watched
        self._tasks = [loop.create_task(self._tick_loop(), name="positiond-tick")]
        loop.add_reader(monitor.fileno(), self._drain_monitor)
        self._drain_monitor()
        self.reporter.path = status_file_for(sock_path)
        self.started = self.monotonic()
        self.progress = Progress(self.started)
        health = self.reporter.publish(notify=False)
        # The database is migrated and the socket accepts connections: now, not earlier.
        self.notifier.ready(status_line(health))
        status = self.reporter.status_loop(lambda: self.config.status_interval)
        self._tasks.append(loop.create_task(status, name="positiond-status"))
        if self.notifier.watchdog_interval is not None:
            watchdog = self.reporter.watchdog_loop(self.writer_progressing)
            self._tasks.append(loop.create_task(watchdog, name="positiond-watchdog"))
        log.info("positiond ready: database %s, endpoint %s", db, self.endpoint)

    @staticmethod
    def _prepare_socket_dir(sock_path: Path) -> None:
        """Create the socket's directory, or refuse one another user could write.

        Someone who can write the directory can bind the socket's name while the daemon is
        stopped (or delete it and bind while it runs) and receive strategies' sessions and
        tokens: refuse it before anything is bound (exit 2; docs/SECURITY.md).
        """
        try:
            if sock_path.parent == runtime_dir():
                ensure_private_dir(sock_path.parent)
            else:
                sock_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except PermissionError as exc:
            raise UnsafeEndpoint(f"refusing the socket directory: {exc}") from None
        unsafe = unsafe_socket_directory(sock_path)
        if unsafe is not None:
            raise UnsafeEndpoint(
                f"refusing to listen on {sock_path}: {unsafe}; another user could take the "
                "endpoint over (docs/SECURITY.md). Put the socket in a directory only this "
                "user (and root) can write, e.g. the default one"
            )

    def _restore_paused(self, sock_path: Path) -> None:
        """A daemon that died at its connection limit left the socket file moved aside."""
        paused = _paused_name(sock_path)
        if not paused.exists():
            return
        if self.listen_fd is not None and not sock_path.exists():
            os.rename(paused, sock_path)  # systemd's socket, where its unit expects it
            log.warning("moved the socket file back from %s", paused)
        else:
            paused.unlink(missing_ok=True)  # ours: bind() makes a new one

    def _check_group_access(self, sock_path: Path) -> None:
        if not self.config.socket_mode & 0o070:
            return
        mode = sock_path.parent.stat().st_mode
        if not mode & stat.S_IXGRP:
            log.warning(
                "socket_mode %04o lets the group in, but its directory %s (mode %04o) does not",
                self.config.socket_mode,
                sock_path.parent,
                mode & 0o7777,
            )

    def request_stop(self) -> None:
        """Ask for a graceful stop (signal handlers call this)."""
        if not self._stopping:
            log.info("stopping: no new messages; flushing what is pending")
            self.notifier.stopping("stopping: writing what is pending")
            self._stopping = True
            self._stop_requested.set()
            self._wake.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def run(self) -> None:
        """Start, serve until :meth:`request_stop`, then stop gracefully."""
        await self.start()
        try:
            await self._stop_requested.wait()
        finally:
            await self.stop()

    async def stop(self) -> None:
        """Stop receiving, write everything pending, answer it, close socket and database."""
        if not self._stopping:
            self.notifier.stopping("stopping: writing what is pending")
        self._stopping = True
        if self._reader_fd is not None and self._loop is not None:
            self._loop.remove_reader(self._reader_fd)
            self._reader_fd = None
        self._close_monitor()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._writer is not None:
            self._wake.set()
            await self._final_flush(self._writer)
            self._writer = None
        if self.sock is not None:
            self.sock.close(linger=1000)
            self.sock = None
        if self._gate.paused and self._socket_watch is not None:
            self._gate.paused = False
            self._resume_accepting()  # systemd's socket goes back where the unit expects it
        if self._own_socket_file is not None:
            # libzmq leaves the file behind; nobody listens on it any more (the endpoint lock
            # says it is ours). A socket from systemd belongs to the .socket unit: kept.
            self._own_socket_file.unlink(missing_ok=True)
            self._own_socket_file = None
        if self._curve is not None:
            self._curve.stop()
            self._curve = None
        if self.ctx is not None:
            self.ctx.term()
            self.ctx = None

        if self.store is not None:
            await self.store.close()
            self.store = None
        self.reporter.remove()
        for handle in self._locks:
            handle.close()
        self._locks = []
        log.info("positiond stopped")
        self.notifier.close()
        self._stopped.set()

    async def _final_flush(self, writer: asyncio.Task[None]) -> None:
        """Wait for the writer to drain; if that runs long, tell systemd not to kill us yet.

        The writer gives up by itself after SHUTDOWN_WRITE_TIMEOUT of failures, and one SQLite
        call waits at most busy_timeout: extensions stop after both, so a hung disk cannot keep
        the unit in "deactivating" forever.
        """
        deadline = self.monotonic() + SHUTDOWN_WRITE_TIMEOUT + self.config.busy_timeout + 5
        while True:
            done, _ = await asyncio.wait({writer}, timeout=EXTEND_STEP)
            if done:
                writer.result()
                return
            if self.monotonic() < deadline:
                pending = self.engine.pending_ops + self.engine.pending_updates
                log.info(
                    "final flush still running (%d pending); extending the stop timeout", pending
                )
                self.notifier.extend_timeout(EXTEND_BY)

    # ---- health --------------------------------------------------------------------------

    @property
    def stall_limit(self) -> float:
        """A writer without progress for this long is stuck (half the watchdog timeout)."""
        interval = self.notifier.watchdog_interval
        return interval if interval is not None else max(STALL_LIMIT, 2 * self.config.busy_timeout)

    def writer_progressing(self) -> bool:
        """Did the writer commit or have nothing to do within :attr:`stall_limit`?"""
        now = self.monotonic()
        engine = self.engine
        if not engine.pending_ops and not engine.batch_due(now):
            self.progress.idle(now)
        return self.progress.stalled_for(now) < self.stall_limit

    def health(self) -> dict[str, Any]:
        """A snapshot for operators and monitoring (documented in :mod:`positiond.status`)."""
        now, wall = self.monotonic(), time.time()
        progressing = self.writer_progressing()
        listening = self._socket_watch is None or self._socket_watch.ok
        db = Path(self.config.db)
        size = 0
        for path in (db, db.with_name(db.name + "-wal")):
            with contextlib.suppress(OSError):
                size += path.stat().st_size
        return {
            "pid": os.getpid(),
            "version": version(),
            "time": round(wall, 3),
            "status_interval": self.config.status_interval,
            "uptime": round(now - self.started, 3),
            "endpoint": self.endpoint,
            "db": str(db),
            "db_size": size,
            "sessions": len(self.engine.sessions),
            "legs": len(self.engine.legs),
            "pending_ops": self.engine.pending_ops,
            "pending_updates": self.engine.pending_updates,
            "last_flush_age": None if self.last_flush is None else round(wall - self.last_flush, 3),
            "writer_stalled": round(self.progress.stalled_for(now), 3),
            "writes_ok": self.healthy,
            "listening": listening,
            "connections": len(self._gate.open),
            "connections_peak": self._gate.peak,
            "connection_limit": self._gate.limits.cap,
            "accepting": not self._gate.paused,
            "fd_limit": self._gate.limits.fd_limit,
            "healthy": self.healthy and progressing and listening,
            "counters": dict(self.counters),
        }

    # ---- reload --------------------------------------------------------------------------

    def reconfigure(self, new: Config) -> tuple[list[str], list[str]]:
        """Adopt the settings that are safe to change at runtime; (applied, not applied)."""
        diff = changed(self.config, new)
        applied = [name for name in diff if name in RELOADABLE]
        refused = [name for name in diff if name not in RELOADABLE]
        self.config = dataclasses.replace(
            self.config, **{name: getattr(new, name) for name in applied}
        )
        self.engine.liveness.timeout = self.config.heartbeat_timeout
        self.engine.flush_interval = self.config.flush_interval
        return applied, refused

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
        if len(self._curve_peers) > 2 * len(self.engine.peers) + 64:
            for gone in [r for r in self._curve_peers if r not in self.engine.peers]:
                del self._curve_peers[gone]
        self._curve_peers[rid] = (fd, key)

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
            self._wake.set()

    def _drain_soon(self) -> None:
        if not self._drain_queued and self._loop is not None:
            self._drain_queued = True
            self._loop.call_soon(self._on_readable)

    def _recheck(self) -> None:
        """After sending outside a drain: libzmq may have queued input without the fd firing
        again (it only signals a change of state), so ask ZMQ_EVENTS."""
        if self.sock is not None and int(self.sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            self._drain_soon()

    def _drain(self) -> bool:
        """Receive, decode and apply up to DRAIN_MAX messages; True if it stopped at the cap."""
        assert self.sock is not None
        sock, engine = self.sock, self.engine
        recv, peers, receive, send = sock.recv, engine.peers, engine.receive, self.send
        now, wall = self.monotonic(), engine.wall()
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
                self._drain_monitor()
                if fd in self._gate.refused:
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
            except Exception:  # a bug must not take the daemon down with it
                log.exception("internal error handling a %s message", msg.get("type"))
                reply = error_reply(
                    "INTERNAL", "internal error; see the daemon log", msg.get("seq")
                )
            if reply is not None:
                send(rid, reply)
        return True

    def _busy(self, rid: bytes) -> None:
        """Answer a message of a connection refused for the limit (no seq: nothing fails)."""
        assert self.sock is not None
        while self.sock.rcvmore:
            self.sock.recv()
        limits = self._gate.limits
        reason = (
            f"positiond is at its connection limit ({limits.cap} served; file descriptor limit "
            f"{limits.fd_limit}): this connection is refused and will be closed; the client "
            "reconnects and re-sends by itself"
        )
        self.send(rid, error_reply("BUSY", reason))

    def _reject_frames(self, rid: bytes) -> None:
        assert self.sock is not None
        while self.sock.rcvmore:
            self.sock.recv()
        self._bad(rid, ProtocolError("a message must be exactly one frame", "BAD_FRAMES"))

    def _bad(self, rid: bytes, exc: ProtocolError) -> None:
        self.counters["bad_messages"] += 1
        self._bad_log.warning("refused a message: %s", exc)
        self.send(rid, error_reply(exc.code, exc.reason, exc.seq))

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

    # ---- write ---------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        backoff = 0.0
        give_up: float | None = None
        while True:
            await self._wake.wait()
            self._wake.clear()
            if backoff:
                await asyncio.sleep(backoff)
            stopping = self._stopping
            try:
                ok = await self.write_once(flush_updates=stopping)
            except Exception:  # a bug must not end every later write with this task
                log.exception("internal error in the writer; retrying")
                ok = False
            backoff = 0.0 if ok else min(max(backoff * 2, 0.05), 2.0)
            if not ok:
                if stopping:
                    give_up = give_up or time.monotonic() + SHUTDOWN_WRITE_TIMEOUT
                    if time.monotonic() > give_up:
                        log.error(
                            "giving up: %d durable message(s) and %d leg update(s) not written "
                            "(none was acknowledged; clients re-send them to the next daemon)",
                            self.engine.pending_ops,
                            self.engine.pending_updates,
                        )
                        return
                self._wake.set()
            elif stopping:
                if not (self.engine.pending_ops or self.engine.pending_updates):
                    return
                self._wake.set()
            elif self.engine.pending_ops:
                self._wake.set()

    async def write_once(self, *, flush_updates: bool = False) -> bool:
        """Commit what is due and send its replies; False (batch kept) on a storage fault."""
        assert self.store is not None
        engine = self.engine
        batch = engine.take_batch(self.monotonic(), flush_updates=flush_updates)
        if not batch:
            self.progress.idle(self.monotonic())
            return True
        self.progress.begin(self.monotonic())
        committed = False
        try:
            results = await self.store.apply(batch)
            committed = True
        except (sqlite3.Error, OSError) as exc:
            engine.requeue(batch)
            if self.healthy:
                log.error("database write failed, will retry (nothing acked): %s", exc)
            self.healthy = False
            return False
        except Exception:
            # A bug (a value SQLite or orjson cannot take past validation): keep the batch,
            # report unhealthy, retry with backoff — the writer task itself must never die.
            engine.requeue(batch)
            log.exception("writing a batch failed unexpectedly, will retry (nothing acked)")
            self.healthy = False
            return False
        finally:
            self.progress.end(self.monotonic(), committed=committed)
        if not self.healthy:
            log.warning("database writes work again")
            self.healthy = True
        self.counters["batches"] += 1
        self.last_flush = time.time()
        send = self.send
        for rid, payload in engine.committed(batch, results):
            send(rid, payload)
        self._recheck()
        return True

    # ---- time ----------------------------------------------------------------------------

    async def _tick_loop(self) -> None:
        while True:
            cfg = self.config  # SIGHUP may have changed it
            interval = max(0.005, min(0.05, cfg.flush_interval / 4, cfg.heartbeat_timeout / 10))
            await asyncio.sleep(interval)
            if self.engine.tick(self.monotonic()):
                self._wake.set()
            self._recheck()  # cheap insurance against a missed edge of the fd
            self._drain_monitor()  # the same for the monitor's
            now = self.monotonic()
            if now >= self._next_fd_count:
                self._next_fd_count = now + FD_COUNT_INTERVAL
                self._count_fds()
            watch = self._socket_watch
            if watch is not None and not self._gate.paused and watch.due(now):
                self._check_socket_file(watch)

    # ---- the socket file -------------------------------------------------------------------

    def _check_socket_file(self, watch: SocketWatch) -> None:
        """Bind the socket file again if it was deleted or replaced (or report unhealthy)."""
        problem = watch.problem()
        if problem is None:
            if not watch.ok:
                log.warning("the socket file %s is back", watch.path)
                watch.ok = True
            return
        if self._own_socket_file is None:
            # systemd's socket unit owns the file (socket activation): only it can make one.
            if watch.ok:
                log.error(
                    "the socket file %s was %s; new strategies cannot connect: restart "
                    "positiond.socket and positiond (systemctl restart positiond.socket)",
                    watch.path,
                    problem,
                )
            watch.ok = False
            return
        try:
            self._rebind(watch.path)
        except (OSError, zmq.ZMQError, UnsafeEndpoint, AlreadyRunning) as exc:
            if watch.ok:
                log.error(
                    "the socket file %s was %s and cannot be bound again: %s",
                    watch.path,
                    problem,
                    exc,
                )
            watch.ok = False
            return
        watch.record()
        self.counters["socket_rebinds"] = self.counters.get("socket_rebinds", 0) + 1
        log.warning(
            "the socket file %s was %s while running; bound it again (connections in place "
            "were kept)",
            watch.path,
            problem,
        )

    def _rebind(self, path: Path) -> None:
        assert self.sock is not None
        self._prepare_socket_dir(path)
        lock = self._endpoint_lock
        if lock is not None and not any(_same_file(h, lock) for h in self._locks):
            # The directory went with the file: take the endpoint lock again before binding.
            self._locks.append(_lock(lock, f"endpoint {self.config.endpoint}"))
        # A second listener on the same endpoint. Not unbind() first: libzmq would close every
        # connection the old listener accepted with it. The old one (a listening socket no
        # path leads to any more) stays open until the daemon stops: one fd per incident.
        self.sock.bind(self.endpoint)
        os.chmod(path, self.config.socket_mode)

    # ---- connection limit -----------------------------------------------------------------

    def _accepted(self, fd: int) -> None:
        gate = self._gate
        action = gate.accepted(fd)
        if fd in gate.refused:
            self.counters["refused_connections"] += 1
            self._refuse_log.warning(
                "refusing a new connection (%s): %d open, %d served at most (file descriptor "
                "limit %d; raise LimitNOFILE= or see max_connections)",
                peer_of(fd),
                len(gate.open),
                gate.limits.cap,
                gate.limits.fd_limit,
            )
            # Long enough for its first message to be answered BUSY (see _drain).
            assert self._loop is not None
            self._loop.call_later(REFUSE_GRACE, self._drop_refused, fd)
        if action == "pause":
            self._pause_accepting()

    def _drop_refused(self, fd: int) -> None:
        if fd in self._gate.refused:
            shutdown_connection(fd)

    def _pause_accepting(self) -> None:
        """Stop new connections: move the socket file aside (connect() then fails ENOENT).

        Not unbind(): libzmq would close every connection that listener accepted. At most the
        listen backlog (ZMQ_BACKLOG) of connections already queued is still accepted.
        """
        path = self._socket_watch.path if self._socket_watch is not None else None
        if path is None:
            # tcp://: libzmq's tcp listener survives EMFILE (it retries the accept).
            log.error("at the connection limit: %d open", len(self._gate.open))
            return
        try:
            os.rename(path, _paused_name(path))
        except OSError as exc:
            log.error("cannot stop accepting connections (%s): %s", path, exc)
            return
        self.counters["accept_pauses"] += 1
        log.error(
            "stopped accepting connections: %d open, %d fds in use of %d; accepting again "
            "below %d (new strategies cannot connect meanwhile)",
            len(self._gate.open),
            open_fds(),
            self._gate.limits.fd_limit,
            self._gate.limits.resume_below,
        )

    def _resume_accepting(self) -> None:
        path = self._socket_watch.path if self._socket_watch is not None else None
        if path is None:
            return
        try:
            os.rename(_paused_name(path), path)
        except FileNotFoundError:
            pass  # never moved (the rename failed) or deleted meanwhile: the watch binds again
        except OSError as exc:
            log.error("cannot listen again on %s: %s; retrying", self.endpoint, exc)
            self._gate.paused = True  # the next tick tries again
            return
        if self._socket_watch is not None:
            self._socket_watch.record()
        log.warning("accepting connections again: %d open", len(self._gate.open))

    def _count_fds(self) -> None:
        """Recount the fds now and then: monitor events can be lost under a flood."""
        gate = self._gate
        if gate.fds_now(open_fds()) == "pause":
            self._pause_accepting()
        elif gate.resume_due():
            self._resume_accepting()

    # ---- process death -------------------------------------------------------------------

    def _drain_monitor(self) -> None:
        """Handle every queued socket event (accepted, disconnected) without blocking.

        Also called for each new peer in _drain: libzmq queues a connection's ACCEPTED event
        before it reads a byte from it, so the gate knows every fd a message arrives on.
        """
        monitor = self._monitor
        if monitor is None:
            return
        while True:
            try:
                event = parse_monitor_message(monitor.recv_multipart(NOBLOCK))
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self._disconnected(int(event["value"]))
            elif event["event"] == zmq.EVENT_ACCEPTED:
                self._accepted(int(event["value"]))

    def _close_monitor(self) -> None:
        monitor, self._monitor = self._monitor, None
        if monitor is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(monitor.fileno())
        if self.sock is not None:
            self.sock.disable_monitor()
        monitor.close(linger=0)

    def _disconnected(self, fd: int) -> None:
        if self._gate.closed(fd) == "resume":
            self._resume_accepting()
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
                    self.engine.peer_gone(rid)
                    self._wake.set()
                else:
                    # On tcp:// it may be the network: heartbeats decide, we only forget it.
                    self.engine.peers.pop(rid, None)
                return
            if exc.errno != errno.EAGAIN:
                raise
        self._recheck()
        if attempt < len(PROBE_RETRIES):
            asyncio.get_running_loop().call_later(
                PROBE_RETRIES[attempt], self._probe, rid, attempt + 1
            )
