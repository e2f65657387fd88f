"""Where positiond keeps its state: one interface, :class:`Store`, and its SQLite implementation.

The engine decides and the store executes (:mod:`positiond.ops` holds the records between
them). A store is what the daemon's writer needs, no more:

================  ===========================================================================
``open_store()``  open (creating if missing) the database, run the migrations, check it is sound;
                  raises :class:`~positiond.store.dbfile.StoreError` (or its
                  :class:`~positiond.store.dbfile.CorruptDatabase`) with a one-line reason
``migrate()``     bring the schema to this version's (``open_store`` already did); return it
``load_live()``   the sessions live when the daemon last stopped and their open legs
``apply(batch)``  commit a whole :class:`~positiond.ops.Batch` in one transaction, one
                  :class:`~positiond.ops.Result` per durable op, in order; a storage fault
                  raises and nothing in the batch counts as written (the caller retries it)
``query(what)``   the recovery reads: ``crashed`` legs (the seed's crash query) or every
                  ``open`` one, as posctl and a recovering strategy see them
``save(lost)``    keep what is still reachable after a file was lost under the store
``close()``       make everything durable and release the connection
================  ===========================================================================

Recovery and operator changes (adopt, resolve, orphans, prune) are ops inside a batch, so they
are ordered with everything else and acknowledged only after the commit. ``path`` names the
database in messages; ``watch`` is the file watch of a file-backed store (None for a server).

Modules: :mod:`.sqlite` (the aiosqlite implementation, and :func:`.sqlite.apply_direct` for
posctl's write when no daemon runs), :mod:`.writes` (a batch as SQL), :mod:`.recovery` (the
recovery and operator ops), :mod:`.schema` (tables and migrations), :mod:`.dbfile` (the file:
lock, watch, integrity). :mod:`.postgres` is the PostgreSQL store (``db`` a
``postgresql://`` URL, :mod:`.dsn`), running the same :mod:`.writes` and :mod:`.recovery`
through :mod:`.pgconn`, with its migrations in :mod:`.pgschema`; tests/test_store.py checks
both against :class:`Store`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from positiond.ops import Batch, LegRow, LiveSession, Result
from positiond.store.dbfile import FileWatch, Lost, StoreError
from positiond.store.dsn import PgDsn
from positiond.store.sqlite import INTEGRITY_CHECK_SECONDS, SQLiteStore, Synchronous

__all__ = ["Store", "Synchronous", "open_store"]


@runtime_checkable
class Store(Protocol):
    """The daemon's storage: the writer's one connection (see the module docstring)."""

    @property
    def path(self) -> Path | PgDsn:
        """The database, for messages: a SQLite file or a PostgreSQL URL."""
        ...

    @property
    def watch(self) -> FileWatch | None:
        """The file watch of a file-backed store (None for a server)."""
        ...

    async def migrate(self) -> int:
        """Bring the schema to this version's; return the version."""
        ...

    async def load_live(self) -> tuple[list[LiveSession], list[LegRow]]:
        """Sessions that were RUNNING or STALLED, and their ACTIVE legs."""
        ...

    async def apply(self, batch: Batch) -> list[Result]:
        """Commit ``batch`` in one transaction; one result per durable op."""
        ...

    async def query(self, what: str, strategy: str | None = None) -> dict[str, Any]:
        """``crashed`` or ``open`` legs: ``{"legs": [...], "truncated": bool}``."""
        ...

    async def save(self, lost: Lost) -> str:
        """Keep what is still reachable after ``lost``; say where it went."""
        ...

    async def close(self) -> None:
        """Make everything durable and release the connection."""
        ...


async def open_store(
    path: Path | PgDsn,
    synchronous: Synchronous = "NORMAL",
    busy_timeout: float = 5.0,
    *,
    watch: FileWatch | None = None,
    check_seconds: float = INTEGRITY_CHECK_SECONDS,
    host_id: str = "",
    lease_ttl: float = 10.0,
) -> Store:
    """Open the store at ``path``: a :class:`PgDsn` is PostgreSQL
    (:meth:`~positiond.store.postgres.PostgresStore.open`, where ``synchronous``, ``watch`` and
    ``check_seconds`` do not apply; ``host_id`` and ``lease_ttl`` name this daemon among those
    sharing the database, :mod:`.lease`), anything else SQLite (:meth:`SQLiteStore.open`,
    where they do not apply)."""
    if isinstance(path, PgDsn):
        try:
            from positiond.store.postgres import PostgresStore
        except ImportError as exc:
            raise StoreError(
                f"the PostgreSQL store needs psycopg ({exc}): pip install 'positiond[postgres]'"
            ) from None
        return await PostgresStore.open(path, busy_timeout, host_id, lease_ttl)
    return await SQLiteStore.open(
        path, synchronous, busy_timeout, watch=watch, check_seconds=check_seconds
    )
