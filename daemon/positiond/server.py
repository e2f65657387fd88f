"""The daemon's lifecycle: locks, start and stop, its tasks, the writer, its health.

The parts it wires together, none of which knows the daemon:

- the :class:`~positiond.router.Router` (selector callbacks, not tasks): binds the ROUTER,
  drains it, decodes, hands each message to the engine and sends the replies; turns a dropped
  ipc connection into "process exited" within milliseconds;
- the :class:`~positiond.engine.Engine`: the rules, and what waits to be written;
- the :class:`~positiond.store.Store`: one SQLite (or PostgreSQL) connection on its own thread;
- the :class:`~positiond.watchers.WatchHub`: ``posctl watch`` and scripts, fed from committed
  batches by the writer, sent to by the tick.

Its tasks:

- write: takes a batch from the engine, commits it in one call, then sends the acks;
- tick: drives liveness verdicts (on the engine's observed clock, after reading what is
  queued) and the flush interval, and once a second lets the router's
  :class:`~positiond.listener.Listener` recount fds and check the socket file;
- watch: checks between commits that the database files are still in place;
- metrics (``metrics_listen`` only): a thread serving /metrics (:mod:`positiond.metrics`), which
  reads the counters kept here and never waits for the event loop;
- status: tells systemd how the daemon is doing (``STATUS=``, ``WATCHDOG=1`` while the writer
  makes progress, see :mod:`positiond.status`) and refreshes ``status.json``.

Under systemd the daemon may be handed its listening socket (:mod:`positiond.activation`) and
reports READY=1 only once the database is migrated and the socket accepts connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from positiond.alerts.delivery import Delivery
from positiond.config import RELOADABLE, Config, changed
from positiond.engine import Engine
from positiond.metrics.listen import parse_listen
from positiond.metrics.stats import WriterStats
from positiond.notify import Notifier
from positiond.openalgo import settings_of
from positiond.ops import Batch, Op, Result
from positiond.protect.handback import HandBack
from positiond.protect.worker import Protector
from positiond.reconcile import Reconciler, reconciler_of
from positiond.router import Router
from positiond.status import Progress, Reporter, status_file_for, status_line, version
from positiond.store import Store, open_store
from positiond.store.dbfile import (
    DatabaseLock,
    DatabaseLocked,
    DatabaseLost,
    Fenced,
    FileWatch,
    Lost,
    StoreError,
    is_corruption,
    lock_database,
    open_error,
    restore_advice,
)
from positiond.store.dsn import PgDsn
from positiond.watchers import WatchHub
from positiond_client.paths import ipc_path

if TYPE_CHECKING:
    from positiond.metrics.endpoint import MetricsEndpoint

__all__ = ["AlreadyRunning", "Daemon"]

log = logging.getLogger(__name__)

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
        self.notifier = Notifier() if notifier is None else notifier
        self.monotonic = monotonic
        self.wall = wall
        self.engine = Engine(
            config.heartbeat_timeout,
            config.flush_interval,
            monotonic=monotonic,
            wall=wall,
            protects=config.protect.protects,
        )
        # The protect worker's wake (set where the worker is started): a commit that handed
        # protective orders back (adoption, revival) calls it, so the cancels go out at once.
        self.protect_wake: Callable[[], None] | None = None
        self.store: Store | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
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
        self.fenced: str | None = None  # PostgreSQL: why the lease was lost (Daemon.fence)
        self.endpoint = config.endpoint
        self.healthy = True  # the last write succeeded
        self.last_flush: float | None = None
        self.started = monotonic()
        self.progress = Progress(self.started)
        self.reporter = Reporter(self.notifier, None, self.health)
        self.counters: dict[str, int] = {"batches": 0}  # the writer's; health() merges all
        self.stats = WriterStats()  # per committed batch, for /metrics
        self.metrics: MetricsEndpoint | None = None  # metrics_listen, if set
        self.router = Router(
            config,
            self.engine,
            listen_fd=listen_fd,
            ensure_lock=self._ensure_lock,
            wake=self._wake.set,
            health=self.health,  # answers `query what=health` from memory
            watching=self._watching,
            monotonic=monotonic,
            wall=wall,
        )
        self.listener = self.router.listener
        # posctl watch and scripts: fed from committed batches, sent from the tick
        self.watchers = WatchHub(self.router.send)
        self.delivery: Delivery | None = None  # alerts to the configured sinks, if any
        self.reconciler: Reconciler | None = None  # [openalgo] reconcile_interval, if set
        self.protector: Protector | None = None  # [protect] mode on or dry-run

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Lock, open and migrate the database, load live sessions, bind, start the tasks."""
        cfg = self.config
        db = cfg.db
        if isinstance(db, PgDsn):  # one daemon per host id: its lease (positiond.store.lease)
            self._open_metrics()  # first, as with SQLite: a taken port fails the start
            self.listener.prepare()
            try:
                self.store = await open_store(
                    db, busy_timeout=cfg.busy_timeout, host_id=cfg.host_id,
                    lease_ttl=cfg.lease_ttl,
                )  # fmt: skip
            except DatabaseLocked as exc:
                raise AlreadyRunning(str(exc)) from None
        else:
            self.store = await self._open_sqlite(db)
        try:
            sessions, legs = await self.store.load_live()
        except sqlite3.Error as exc:  # damage the bounded quick_check did not reach
            await self.store.close()
            self.store = None
            raise open_error(db, exc) from None
        self.engine.load(sessions, legs, self.monotonic(), self.wall())
        if sessions:
            log.info(
                "%d session(s) were RUNNING when the daemon last stopped; waiting %.1fs for them",
                len(sessions),
                cfg.heartbeat_timeout,
            )
        self.endpoint = self.router.open()
        loop = self._loop = asyncio.get_running_loop()
        self._writer = loop.create_task(self._write_loop(), name="positiond-writer")
        self.router.attach(loop)
        self._tasks = [loop.create_task(self._tick_loop(), name="positiond-tick")]
        self._tasks.append(loop.create_task(self._watch_loop(), name="positiond-watch"))
        # Apart from the writer: its own task and connection (either backend).
        if cfg.alerts.sinks:
            self.delivery = Delivery(
                db, cfg.alerts, busy_timeout=cfg.busy_timeout, openalgo=settings_of(cfg)
            )
            self._tasks.append(loop.create_task(self.delivery.run(), name="positiond-alerts"))
        self.reconciler = reconciler_of(cfg, self.delivery.wake if self.delivery else None)
        if self.reconciler is not None:  # its own task, connection and HTTP client
            self._tasks.append(loop.create_task(self.reconciler.run(), name="positiond-reconcile"))
        self.open_protector(db)
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

    def _open_metrics(self) -> None:
        cfg = self.config
        if cfg.metrics_listen is None:
            return
        # Here, not at the top: prometheus_client is the optional metrics extra.
        from positiond.metrics.endpoint import MetricsEndpoint

        listen = parse_listen(cfg.metrics_listen, allow_remote=cfg.metrics_allow_remote)
        endpoint = MetricsEndpoint(self, listen)
        endpoint.start()
        self.metrics = endpoint

    def open_protector(self, db: Path | PgDsn) -> None:
        """Start the protect worker when ``[protect]`` is on (its own task, connection and
        HTTP client, on either backend); it is woken after commits through ``protect_wake``."""
        cfg, openalgo = self.config, settings_of(self.config)
        if not cfg.protect.enabled or openalgo is None:
            return
        self.protector = Protector(
            db, cfg.protect, openalgo, submit=self.submit, handback=self.handback,
            busy_timeout=cfg.busy_timeout,
        )  # fmt: skip
        self.protect_wake = self.protector.wake
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self.protector.run(), name="positiond-protect"))

    def submit(self, op: Op) -> None:
        """Queue an op of the daemon's own (the protect worker's) for the writer."""
        self.engine.submit(op)
        self._wake.set()

    async def _open_sqlite(self, db: Path) -> Store:
        cfg = self.config
        try:
            # Locked by what the path leads to (symlinks, hard links): see positiond.store.dbfile.
            self._db_lock = lock_database(db, create=True)
        except DatabaseLocked:
            raise AlreadyRunning(f"another positiond is already running on database {db}") from None
        except OSError as exc:  # a directory we may not create, a full or read-only disk
            raise StoreError(f"cannot create or lock the database {db}: {exc}") from None
        try:
            self._open_metrics()  # first: a taken port fails the start before anything opens
        except BaseException:
            self._db_lock.close()
            self._db_lock = None
            raise
        self.listener.prepare()
        watch = FileWatch(db, self._db_lock.fd)
        return await open_store(db, cfg.synchronous, busy_timeout=cfg.busy_timeout, watch=watch)

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
        self.router.detach()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.stop)
            self.metrics = None
        if self._writer is not None:
            self._wake.set()
            await self._final_flush(self._writer)
            self._writer = None
        self.router.close()
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
        """A snapshot for operators and monitoring (documented in :mod:`positiond.status`);
        a change of ``healthy`` is an alert (positiond.alerts.health)."""
        snapshot = self._health()
        if self.delivery is not None:
            self.delivery.observe(snapshot)
        return snapshot

    def _health(self) -> dict[str, Any]:
        now, wall = self.monotonic(), time.time()
        progressing = self.writer_progressing()
        listening = self.listener.health()
        db = self.config.db
        size: int | None = None  # PostgreSQL: not known here (the server keeps its files)
        if isinstance(db, Path):
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
            "metrics": self.metrics.url if self.metrics is not None else None,
            "healthy": self.healthy
            and progressing
            and self.storage_fault is None
            and listening["listening"],
            "counters": {
                **self.engine.counters,
                **self.router.counters,
                **self.counters,
                **self.listener.counters,
                **(self.delivery.counters if self.delivery is not None else {}),
                **self.watchers.counters,
            },
            **({"reconcile": dict(self.reconciler.state)} if self.reconciler else {}),
            **({"protect": dict(self.protector.state)} if self.protector else {}),
        }

    # ---- watchers -------------------------------------------------------------------------

    def _publish(self, batch: Batch, results: list[Result]) -> None:
        try:
            self.watchers.publish(batch, results, self.monotonic())
        except Exception:  # a bug here must cost the watchers, never an ack or the writer
            log.exception("internal error publishing to watchers; every watcher is dropped")
            self.watchers.drop_all()

    def _tick_watchers(self) -> None:
        try:
            self.watchers.tick(self.monotonic(), self._peer_alive, self.health)
        except Exception:  # nor the tick loop (liveness verdicts run there)
            log.exception("internal error sending to watchers; every watcher is dropped")
            self.watchers.drop_all()

    def _watching(self, rid: bytes, n: int) -> bytes | None:
        return self.watchers.progress(rid, n)

    def _peer_alive(self, rid: bytes) -> bool:
        return rid in self.engine.peers

    # ---- reload --------------------------------------------------------------------------

    def reconfigure(self, new: Config) -> tuple[list[str], list[str]]:
        """Adopt the settings that are safe to change at runtime; (applied, not applied)."""
        diff = changed(self.config, new)
        applied = [name for name in diff if name in RELOADABLE]
        refused = [name for name in diff if name not in RELOADABLE]
        self.config = dataclasses.replace(
            self.config, **{name: getattr(new, name) for name in applied}
        )
        self.engine.set_heartbeat_timeout(self.config.heartbeat_timeout)
        self.engine.set_flush_interval(self.config.flush_interval)
        self.router.config = self.config
        return applied, refused

    def reload_keys(self) -> str | None:
        """SIGHUP: re-read the allowed CURVE keys (see :meth:`Router.reload_keys`)."""
        return self.router.reload_keys()

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
        batch = engine.take_batch(self.monotonic(), wall=self.wall(), flush_updates=flush_updates)
        if not batch:
            self.progress.idle(self.monotonic())
            return True
        began = self.monotonic()
        self.progress.begin(began)
        committed = False
        try:
            results = await self.store.apply(batch)
            committed = True
            if batch.ops and self.delivery is not None:
                self.delivery.wake()  # a verdict may have written an alert: look now
            if batch.ops and self.protector is not None:
                self.protector.wake()  # a verdict may have crashed legs, or released one
        except DatabaseLost as exc:
            engine.requeue(batch)  # committed into a lost file: not one ack for it
            self.storage_lost(exc.lost)
            return False
        except Fenced as exc:  # PostgreSQL: another daemon took our lease over; not one ack
            engine.requeue(batch)
            self.fence(str(exc))
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
            self.stats.failed_commits += not committed
        took, done = self.monotonic() - began, self.wall()
        if not self.healthy:
            log.warning("database writes work again")
            self.healthy = True
        self.counters["batches"] += 1
        self.last_flush = time.time()
        self._publish(batch, results)  # before the acks: a watcher beyond the limit is refused
        send = self.router.send
        for rid, payload in engine.committed(batch, results):
            send(rid, payload)
        if engine.take_released() and self.protect_wake is not None:
            self.protect_wake()
        self.router.recheck()
        try:  # after the acks: counting must never cost one
            self.stats.committed(batch, results, took, done)
        except Exception:
            log.exception("internal error counting a batch for the metrics")
        return True

    # ---- protective stop orders ----------------------------------------------------------

    def handback(self, hb: HandBack) -> None:
        """The protect worker's callback once it settled the order of a handed-back leg (on
        the daemon's loop): notices to the session's client now, or a protective close for
        the writer (``Engine.handback``). Never raises: a bad report is logged and dropped."""
        try:
            replies = self.engine.handback(hb, self.wall())
        except Exception:  # the daemon never dies from a report
            log.exception("hand-back of leg %s failed", hb.position_key)
            return
        for rid, payload in replies:
            self.router.send(rid, payload)
        if self.engine.pending_ops:
            self._wake.set()

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

    def fence(self, why: str) -> None:
        """This daemon's lease is no longer its own (PostgreSQL, several hosts): acknowledge
        nothing more and stop; :func:`positiond.cli.async_main` starts it again, which
        registers a new epoch, and its clients re-announce as after any restart."""
        if self.fenced is not None:
            return
        self.fenced = why
        self.storage_failed(f"{why}; registering again with a new epoch")
        self.request_stop()

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
            self.router.read_queued()
            if (fenced := getattr(self.store, "fenced", None)) is not None:
                self.fence(fenced)
            if self.engine.tick(self.monotonic(), self.wall()):
                self._wake.set()
            self.router.tick(self.monotonic())
            if self.watchers:
                self._tick_watchers()
