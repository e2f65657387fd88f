"""The daemon's asyncio adapter: one ROUTER socket in, one SQLite writer out.

Five tasks share the event loop:

- receive: ``await poll()`` then drain the socket without blocking through a shadow socket
  (pyzmq's one-await-per-message path is four times slower, and a cancelled ``recv`` can lose a
  message), decode, hand each message to the :class:`~positiond.engine.Engine`;
- write: takes a batch from the engine, commits it in one call, then sends the acks;
- tick: drives liveness verdicts (on the engine's observed clock, after reading what is
  queued) and the flush interval, and once a second lets the
  :class:`~positiond.listener.Listener` recount fds and check the socket file;
- monitor (a selector callback of the Listener, not a task): turns a dropped ipc connection
  into "process exited" within milliseconds, and counts connections against the fd limit;
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
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import zmq
import zmq.asyncio

from positiond.config import RELOADABLE, Config, changed
from positiond.connections import shutdown_connection
from positiond.curve import ServerCurve, secure_server
from positiond.engine import Engine
from positiond.listener import Listener
from positiond.notify import Notifier
from positiond.status import Progress, Reporter, status_file_for, status_line, version
from positiond.store import Store, open_store
from positiond.store.dbfile import (
    DatabaseLock,
    DatabaseLocked,
    DatabaseLost,
    FileWatch,
    Lost,
    StoreError,
    is_corruption,
    lock_database,
    open_error,
    restore_advice,
)
from positiond_client.errors import ProtocolError
from positiond_client.paths import ipc_path
from positiond_client.protocol import PROTOCOL_VERSION, decode, encode, error_reply

__all__ = ["AlreadyRunning", "Daemon"]

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
# Without a systemd watchdog, health() calls a writer stalled for this long unhealthy.
STALL_LIMIT = 30.0
# How often an idle daemon checks that its database files are still in place (every commit
# checks too, before its acks).
WATCH_INTERVAL = 1.0


class AlreadyRunning(RuntimeError):
    """Another positiond holds this database or endpoint."""


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


def _same_file(handle: IO[bytes], path: Path) -> bool:
    """Is the lock ``handle`` still the file at ``path`` (not deleted and made anew)?"""
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
        self._db_lock: DatabaseLock | None = None
        # Set for good when the database can no longer be written safely (its file deleted or
        # replaced, damage found): nothing is written or acknowledged any more.
        self.storage_fault: str | None = None
        self._bad_log = _RateLimitedLog()
        self.is_ipc = config.endpoint.startswith("ipc://")
        self.endpoint = config.endpoint
        self.healthy = True  # the last write succeeded
        self.last_flush: float | None = None
        self.started = monotonic()
        self.progress = Progress(self.started)
        self.reporter = Reporter(self.notifier, None, self.health)
        self.counters = self.engine.counters
        self.counters.update({"bad_messages": 0, "dropped_replies": 0, "batches": 0})
        self.listener = Listener(
            config,
            listen_fd=listen_fd,
            counters=self.counters,
            ensure_lock=self._ensure_lock,
            warn_limited=_RateLimitedLog().warning,
        )

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Lock, open and migrate the database, load live sessions, bind, start the tasks."""
        cfg = self.config
        db = Path(cfg.db)
        try:
            # Locked by what the path leads to (symlinks, hard links): see positiond.store.dbfile.
            self._db_lock = lock_database(db, create=True)
        except DatabaseLocked:
            raise AlreadyRunning(f"another positiond is already running on database {db}") from None
        except OSError as exc:  # a directory we may not create, a full or read-only disk
            raise StoreError(f"cannot create or lock the database {db}: {exc}") from None
        self.listener.prepare()
        watch = FileWatch(db, self._db_lock.fd)
        self.store = await open_store(
            db, cfg.synchronous, busy_timeout=cfg.busy_timeout, watch=watch
        )
        try:
            sessions, legs = await self.store.load_live()
        except sqlite3.Error as exc:  # damage the bounded quick_check did not reach
            await self.store.close()
            self.store = None
            raise open_error(db, exc) from None
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
        if cfg.curve_secret_key is not None and cfg.curve_clients is not None and not self.is_ipc:
            # Config refuses tcp:// without these: a network port is never served in clear.
            self._curve = secure_server(self.ctx, sock, cfg.curve_secret_key, cfg.curve_clients)
        self.endpoint = self.listener.bind(self.ctx, sock)
        self.sock = sock
        loop = self._loop = asyncio.get_running_loop()
        self._writer = loop.create_task(self._write_loop(), name="positiond-writer")
        self._reader_fd = sock.fileno()
        loop.add_reader(self._reader_fd, self._on_readable)
        self._drain_soon()  # anything that queued before the fd was watched
        self._tasks = [loop.create_task(self._tick_loop(), name="positiond-tick")]
        self.listener.attach(loop, self._disconnected)
        self._tasks.append(loop.create_task(self._watch_loop(), name="positiond-watch"))
        self.reporter.path = status_file_for(ipc_path(cfg.endpoint))
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

    def _ensure_lock(self, path: Path) -> None:
        """Hold the lock at ``path`` (again, if the file we held was deleted)."""
        if not any(_same_file(handle, path) for handle in self._locks):
            self._locks.append(_lock(path, f"endpoint {self.config.endpoint}"))

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
        self.listener.close_monitor()
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
        self.listener.close()
        if self._curve is not None:
            self._curve.stop()
            self._curve = None
        if self.ctx is not None:
            self.ctx.term()
            self.ctx = None
        try:
            if self.store is not None:
                await self.store.close()
                self.store = None
        finally:
            self.reporter.remove()
            if self._db_lock is not None:
                self._db_lock.close()  # only now: SQLite's connection is closed (store.dbfile)
                self._db_lock = None
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
        if self.storage_fault is not None:
            # Stopped on purpose, not stuck, and a restart would not bring the data back nor repair
            # the file: no watchdog kill; the health says UNHEALTHY and what to do.
            return True
        if not engine.pending_ops and not engine.batch_due(now):
            self.progress.idle(now)
        return self.progress.stalled_for(now) < self.stall_limit

    def health(self) -> dict[str, Any]:
        """A snapshot for operators and monitoring (documented in :mod:`positiond.status`)."""
        now, wall = self.monotonic(), time.time()
        progressing = self.writer_progressing()
        listening = self.listener.health()
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
            "storage_fault": self.storage_fault,
            **listening,
            "healthy": self.healthy
            and progressing
            and self.storage_fault is None
            and listening["listening"],
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
        listener = self.listener
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
                if stopping and self.storage_fault is not None:
                    log.error(
                        "stopping with %d durable message(s) and %d leg update(s) not written "
                        "(none was acknowledged): %s",
                        self.engine.pending_ops,
                        self.engine.pending_updates,
                        self.storage_fault,
                    )
                    return
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
        if self.storage_fault is not None:
            return False  # nothing more goes into a file that may not be the database
        batch = engine.take_batch(self.monotonic(), flush_updates=flush_updates)
        if not batch:
            self.progress.idle(self.monotonic())
            return True
        self.progress.begin(self.monotonic())
        committed = False
        try:
            results = await self.store.apply(batch)
            committed = True
        except DatabaseLost as exc:
            engine.requeue(batch)  # committed into a lost file: not one ack for it
            self.storage_lost(exc.lost)
            return False
        except (sqlite3.Error, OSError) as exc:
            engine.requeue(batch)
            if isinstance(exc, sqlite3.Error) and is_corruption(exc):
                self.storage_failed(
                    f"the database {self.store.path} is damaged ({exc}); "
                    f"{restore_advice(self.store.path)}"
                )
                return False
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

    # ---- storage faults ------------------------------------------------------------------

    def storage_failed(self, message: str) -> None:
        """Stop writing and acknowledging for good; say so loudly, in the log and the health."""
        if self.storage_fault is not None:
            return
        self.storage_fault = message
        self.healthy = False
        log.critical(
            "STORAGE FAILED, nothing is written or acknowledged any more (clients keep their "
            "messages and re-send them to the next daemon): %s",
            message,
        )
        self.reporter.publish()

    def storage_lost(self, lost: Lost) -> None:
        """A database file was deleted or replaced: stop, then save what the connection holds."""
        if self.storage_fault is not None:
            return
        if lost.file == "db":
            todo = "positiond saves a copy: stop positiond, put the copy in its place, start it"
        else:
            todo = "positiond checkpoints the WAL into the database: then restart it"
        self.storage_failed(f"{lost.message}; {todo}")
        if self._loop is not None and self.store is not None:
            self._loop.create_task(self._save(self.store, lost), name="positiond-save")

    async def _save(self, store: Store, lost: Lost) -> None:
        try:
            where = await store.save(lost)
        except (sqlite3.Error, OSError) as exc:
            log.critical(
                "could not save what the open database holds (%s); while this process runs its "
                "files are still readable under /proc/%d/fd",
                exc,
                os.getpid(),
            )
            return
        log.critical("nothing acknowledged is lost: %s", where)
        self.storage_fault = f"{self.storage_fault}; {where}"
        self.reporter.publish()

    async def _watch_loop(self) -> None:
        """Between commits, too: an idle daemon must not report healthy on a deleted database."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            store = self.store
            if store is None or store.watch is None or self.storage_fault is not None:
                continue
            try:
                lost = store.watch.check()
            except OSError as exc:
                lost = Lost("db", f"cannot check the database file: {exc}")
            if lost is not None:
                self.storage_lost(lost)

    # ---- time ----------------------------------------------------------------------------

    async def _tick_loop(self) -> None:
        while True:
            cfg = self.config  # SIGHUP may have changed it
            interval = max(0.005, min(0.05, cfg.flush_interval / 4, cfg.heartbeat_timeout / 10))
            await asyncio.sleep(interval)
            # Judge only after reading what is queued: after a gap in the daemon's own progress
            # (stopped, suspended, starved) the strategies' heartbeats wait in the socket.
            self._read_queued()
            if self.engine.tick(self.monotonic()):
                self._wake.set()
            self._recheck()  # cheap insurance against a missed edge of the fd
            self.listener.drain_monitor()  # the same for the monitor's
            self.listener.tick(self.monotonic())  # fd recount, socket file check: each second

    def _read_queued(self) -> None:
        if self.sock is not None and int(self.sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            self._on_readable()

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
