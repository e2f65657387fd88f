"""The PostgreSQL store (issue 14): the same :class:`positiond.store.Store` on a server.

``--db postgresql://user@host:port/dbname`` (or ``postgres://``) selects it; it needs
``pip install 'positiond[postgres]'`` (psycopg 3).

How it works: one psycopg connection, used by one thread of its own, as aiosqlite does for
SQLite. A batch is one call on that thread: :func:`positiond.store.writes.apply_batch` itself,
through :class:`~positiond.store.pgconn.PgConnection`, so the rules are the same code on both
backends and the acks are sent after PostgreSQL's COMMIT returned (the writer sends them only
once ``apply`` returns). Whether that commit survives the loss of the primary is the server's
``synchronous_commit`` and replication settings (docs/DATABASE.md).

Several daemons on one database, one per ``host_id`` (:mod:`positiond.store.lease`): at open
the daemon registers with a new epoch (refused while another daemon of the same host id holds a
live lease), a thread renews its lease, and every batch first checks that the lease is still
this daemon's (else :class:`~positiond.store.dbfile.Fenced`: nothing acknowledged). A lost
connection is a retried write (nothing acknowledged): the next batch reconnects, ending this
daemon's previous server session if that one lives on.

Alerts: the outbox triggers are PL/pgSQL (:mod:`positiond.store.pgalerts`), replaced by
:func:`migrate` at every open; the delivery worker reads through
:func:`positiond.store.side.connect_side`, as do the periodic reconciliation and the protect
worker (their write transactions and the writer's take one advisory lock, as SQLite's write
lock: :data:`positiond.store.pgconn.WRITE_LOCK`), and the metrics endpoint's counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, cast

import psycopg

from positiond.ops import Batch, LegRow, LiveSession, Result
from positiond.store import lease, pgalerts, recovery
from positiond.store.dbfile import DatabaseLocked, Fenced, Lost, StoreError
from positiond.store.dsn import PgDsn
from positiond.store.pgconn import PgConnection, translated_error
from positiond.store.pgschema import LOCK_ID, MIGRATIONS, SCHEMA_VERSION
from positiond.store.schema import SchemaError
from positiond.store.writes import apply_batch, load_live

__all__ = ["PostgresStore", "apply_direct", "connect", "migrate"]

log = logging.getLogger(__name__)
T = TypeVar("T")

CONNECT_TIMEOUT = 5  # seconds; libpq's connect_timeout
# TCP keepalives: a server gone without a FIN (host lost, partition) is noticed in ~20 s.
_KEEPALIVES: dict[str, Any] = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 5,
               "keepalives_count": 3}  # fmt: skip


def connect(
    dsn: PgDsn, busy_timeout: float = 5.0, name: str = "positiond"
) -> psycopg.Connection[Any]:
    """An autocommit connection (the store says BEGIN and COMMIT itself); ``busy_timeout``
    bounds how long a statement waits for a lock, as SQLite's busy timeout does."""
    options = f"-c lock_timeout={int(busy_timeout * 1000)}"
    return psycopg.connect(
        dsn.url,
        autocommit=True,
        connect_timeout=CONNECT_TIMEOUT,
        application_name=name,
        options=options,
        **_KEEPALIVES,
    )


def migrate(conn: psycopg.Connection[Any]) -> int:
    """Bring the database to SCHEMA_VERSION, each step in its own transaction; return it.

    Concurrent migrators wait for each other (a transaction advisory lock); a database newer
    than this positiond raises :class:`SchemaError`. The alert triggers
    (:mod:`positiond.store.pgalerts`) are (re)installed in the last transaction.
    """
    version = 0
    while True:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_ID + 1,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
                "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()
            version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                raise SchemaError(
                    f"database schema version {version} is newer than this positiond knows "
                    f"({SCHEMA_VERSION}); upgrade positiond"
                )
            if version == SCHEMA_VERSION:
                pgalerts.install(conn)  # not a step: replaced at every open (pgalerts.py)
                return version
            conn.execute(MIGRATIONS[version].encode())
            conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version + 1,))


def _no_live_daemon(conn: PgConnection) -> None:
    """posctl's direct write, first in its transaction: refused while a daemon's lease is live
    (the ``daemons`` table is locked against a registration until it commits)."""
    conn.raw.execute("LOCK TABLE daemons IN SHARE MODE")
    row = conn.raw.execute(
        "SELECT host_id FROM daemons WHERE lease_expires > now() AND lost_at IS NULL LIMIT 1"
    ).fetchone()
    if row is not None:
        raise DatabaseLocked(f"a positiond (host id {row[0]!r}) is running on this database")


def _release(conn: PgConnection, host: str | None = None, epoch: int = 0) -> None:
    """End the lease (a restart need not wait for it), then close."""
    try:
        if host is not None and not conn.broken:
            lease.release(conn.raw, host, epoch)
    except psycopg.Error as exc:  # closing anyway: the lease runs out by itself
        log.debug("could not end the lease before closing: %s", exc)
    finally:
        conn.close()


def apply_direct(dsn: PgDsn, batch: Batch) -> list[Result]:
    """Apply one batch with a connection of its own when no daemon holds a live lease on the
    database (posctl's write when no daemon runs); raises :class:`DatabaseLocked` when one does, and
    ``sqlite3.Error`` or :class:`SchemaError` as :func:`positiond.store.sqlite.apply_direct`."""
    try:
        raw = connect(dsn)
    except psycopg.Error as exc:
        raise sqlite3.OperationalError(f"cannot connect to {dsn}: {exc}") from None
    conn = PgConnection(raw)
    try:
        migrate(raw)
        conn.on_begin = _no_live_daemon
        return apply_batch(cast(sqlite3.Connection, conn), batch)  # its surface: .pgconn
    except psycopg.Error as exc:
        raise translated_error(exc) from exc
    finally:
        _release(conn)


class PostgresStore:
    """The daemon's writer connection: a :class:`positiond.store.Store` on PostgreSQL.

    Open with :meth:`open` (or :func:`positiond.store.open_store`), close with :meth:`close`.
    """

    watch = None  # no file to watch: the server keeps its own files

    def __init__(
        self, dsn: PgDsn, busy_timeout: float, host_id: str = "", lease_ttl: float = 10.0
    ) -> None:
        self.path = dsn
        self.host_id = host_id or socket.gethostname()
        self.lease_ttl = lease_ttl
        self.epoch = 0  # this daemon's, once registered
        self.lease: lease.Lease | None = None
        self._busy_timeout = busy_timeout
        self._conn: PgConnection | None = None
        # The server process of the writer's connection (pid, start): after the connection was
        # cut it may live on, holding locks, until the server notices (tcp_keepalives_*).
        self._backend: tuple[int, Any] | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="positiond-pg")
        self._beat: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls, dsn: PgDsn, busy_timeout: float = 5.0, host_id: str = "", lease_ttl: float = 10.0
    ) -> PostgresStore:
        """Connect, migrate, register (a new epoch) and start the lease. Raises
        :class:`DatabaseLocked` while another daemon of the same host id holds a live lease,
        :class:`StoreError` with a one-line reason otherwise."""
        store = cls(dsn, busy_timeout, host_id, lease_ttl)
        try:
            await store._run(store._connection)
        except BaseException:
            await store.close()
            raise
        name = lease.application_name(store.host_id)
        store.lease = lease.Lease(
            lambda: connect(dsn, busy_timeout, name + ":lease"), store.host_id, store.epoch,
            lease_ttl,
        )  # fmt: skip
        store.lease.start()
        store._beat = asyncio.get_running_loop().create_task(store._beating(store.lease))
        return store

    async def _beating(self, held: lease.Lease) -> None:
        while True:  # the loop runs: the lease may be renewed (Lease.alive)
            held.beat()
            await asyncio.sleep(self.lease_ttl / 6)

    @property
    def fenced(self) -> str | None:
        """Why this daemon's lease is no longer its own (None while it is)."""
        return self.lease.fenced if self.lease is not None else None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def _connection(self) -> PgConnection:
        """The writer's connection, made again if it was lost (registered at the first)."""
        if self._conn is not None and not self._conn.broken:
            return self._conn
        if self._conn is not None:
            log.warning("the connection to PostgreSQL %s was lost; connecting again", self.path)
            self._conn.close()
            self._conn = None
        try:
            raw = connect(self.path, self._busy_timeout, lease.application_name(self.host_id))
        except psycopg.Error as exc:
            raise StoreError(f"cannot connect to the database {self.path}: {exc}") from None
        try:
            migrate(raw)
            if self._backend is not None:
                self._end_stale_backend(raw, *self._backend)
            if self.epoch == 0:
                self._register(raw)
            else:  # the same daemon: its epoch, checked by every batch (fence_check)
                raw.execute(
                    "SELECT set_config('positiond.host_id', %s, false), "
                    "set_config('positiond.epoch', %s, false)",
                    (self.host_id, str(self.epoch)),
                )
            row = raw.execute(
                "SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()"
            ).fetchone()
            self._backend = (row[0], row[1]) if row else None
        except psycopg.Error as exc:
            raw.close()
            raise StoreError(f"cannot prepare the database {self.path}: {exc}") from None
        except BaseException:
            raw.close()
            raise
        self._conn = PgConnection(raw, lease.fence_check(self.host_id, self.epoch))
        return self._conn

    def _register(self, raw: psycopg.Connection[Any]) -> None:
        """Register with a new epoch, waiting up to ``busy_timeout`` for a live lease of the
        same host id to end (a daemon stopping, or killed a moment ago)."""
        deadline = time.monotonic() + self._busy_timeout
        while True:
            try:
                self.epoch = lease.register(raw, self.host_id, self.lease_ttl)
            except DatabaseLocked as exc:
                if time.monotonic() >= deadline:
                    raise DatabaseLocked(f"{exc} ({self.path})") from None
                time.sleep(0.1)
                continue
            log.info(
                "registered on %s as host id %r, epoch %d (lease %gs)",
                self.path, self.host_id, self.epoch, self.lease_ttl,
            )  # fmt: skip
            return

    def _end_stale_backend(self, raw: psycopg.Connection[Any], pid: int, started: Any) -> None:
        """Our lost connection's server process, perhaps still alive (the connection was cut,
        not closed: a partition, a proxy or a NAT dropped it) with a transaction open: end it,
        so that writing resumes now instead of when the server notices. Whatever it was doing
        was never acknowledged; matched by pid and start time, so never another process."""
        ended = raw.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE pid = %s AND backend_start = %s",
            (pid, started),
        ).fetchone()
        if ended and ended[0]:
            log.warning(
                "ended this daemon's previous PostgreSQL session (pid %d): its connection was "
                "lost but it lived on",
                pid,
            )

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """On the writer thread: ``fn(connection, *args)``; a lost connection (or one that
        cannot be made) is ``sqlite3.OperationalError``, as a busy SQLite database is."""
        try:
            conn = self._connection()
        except (StoreError, DatabaseLocked) as exc:
            raise sqlite3.OperationalError(str(exc)) from None
        try:
            return fn(conn, *args)
        except psycopg.Error as exc:
            raise translated_error(exc) from exc

    async def migrate(self) -> int:
        """Bring the schema to this version's (done by :meth:`open` already); return it."""
        return await self._run(self._call, lambda conn: migrate(conn.raw))

    async def apply(self, batch: Batch) -> list[Result]:
        """Commit a batch; one :class:`Result` per durable op (after PostgreSQL's COMMIT).
        Raises :class:`Fenced` (nothing committed) once the lease is no longer this daemon's."""
        if (why := self.fenced) is not None:
            raise Fenced(why)
        return await self._run(self._call, apply_batch, batch)

    async def query(self, what: str, strategy: str | None = None) -> dict[str, Any]:
        """``crashed`` legs (the seed's recovery query) or every ``open`` one (every host's)."""
        return await self._run(self._call, recovery.read_legs, what, strategy)

    async def load_live(self) -> tuple[list[LiveSession], list[LegRow]]:
        """This host's RUNNING sessions and their ACTIVE legs."""
        return await self._run(self._call, load_live, self.host_id)

    async def save(self, lost: Lost) -> str:
        """Nothing to save: no file of PostgreSQL's is watched (``watch`` is None)."""
        return f"nothing to save: {self.path} is a PostgreSQL server"

    async def close(self) -> None:
        """Stop the lease, end it, close the connection; every commit is already durable."""
        if self._beat is not None:
            self._beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beat
            self._beat = None
        held, self.lease = self.lease, None
        if held is not None:
            await asyncio.get_running_loop().run_in_executor(None, held.stop)
        conn, self._conn = self._conn, None
        if conn is not None:
            fenced = held is not None and held.fenced is not None
            host = None if fenced or self.epoch == 0 else self.host_id
            await self._run(_release, conn, host, self.epoch)
        self._thread.shutdown(wait=True)
