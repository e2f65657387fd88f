"""Copy a SQLite database into an empty PostgreSQL one (``posctl migrate``, issue 14).

The steps, and why:

1. **A snapshot of the source.** SQLite's online backup of the file (read-only connection, one
   read transaction) into a temporary file: consistent even while a daemon writes the source,
   and the source is never written. The copy, not the source, is then migrated to this
   positiond's schema version (an old file is copied as the daemon would read it).
2. **The target.** Connected (the migrations' advisory lock taken), migrated to the same
   version. Both must end at the same version (a newer database on either side is refused:
   :class:`SchemaMismatch`). A daemon running on it (a live lease) is refused in step 3.
3. **One transaction**: every table locked, refused unless every data table is empty
   (:class:`TargetNotEmpty`); then each table the two schemas share, in foreign-key order,
   with every column they share *by name* (a later schema step's columns are copied without
   this module knowing them; a source column the target lacks is refused), by ``COPY``. Ids
   are kept; each identity sequence is set past the highest id (and past SQLite's
   ``sqlite_sequence``, so a pruned id is never reused). User triggers of the copied tables
   (alerts, notifications) are disabled inside the transaction: copied alerts are not raised
   again. A failure anywhere rolls the whole copy back: the target stays empty.

The lookup tables (statuses, event types) are made by the migrations on both sides, so they
are not copied.
"""

from __future__ import annotations

import logging
import sqlite3
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from positiond.store import schema
from positiond.store.dbfile import DatabaseLock, DatabaseLocked, lock_database
from positiond.store.dsn import PgDsn
from positiond.store.pgschema import LOCK_ID
from positiond.store.postgres import connect
from positiond.store.postgres import migrate as migrate_pg
from positiond.store.schema import iso
from positiond.store.sqlite import connect_readonly

__all__ = [
    "LOOKUPS",
    "Copied",
    "MigrateError",
    "SchemaMismatch",
    "TargetNotEmpty",
    "copy_database",
    "snapshot",
]

log = logging.getLogger(__name__)

# Made by the migrations on both backends: never copied, never "data" in the target.
LOOKUPS = frozenset({"session_statuses", "position_statuses", "event_types"})
# Not the book: the schema's version, SQLite's id counters, the daemons' leases (PostgreSQL's
# own: a host registers again when its daemon starts on the target).
_BOOKKEEPING = frozenset({"schema_version", "sqlite_sequence", "daemons"})


class MigrateError(RuntimeError):
    """The copy was refused or failed; nothing was written to the target."""


class TargetNotEmpty(MigrateError):
    """The target already holds rows."""


class SchemaMismatch(MigrateError):
    """Source and target do not have the same schema after migrating both."""


@dataclass
class Copied:
    """What :func:`copy_database` did: rows per table in copy order, the schema version, and
    whether a daemon held the source (its later writes are not in the copy)."""

    version: int
    tables: dict[str, int] = field(default_factory=dict)
    live_source: bool = False
    snapshot_at: str = ""
    sequences: dict[str, int] = field(default_factory=dict)


def snapshot(source: Path, into: Path) -> tuple[int, bool]:
    """Back ``source`` up into the new file ``into``, migrate the copy; (its version, whether a
    running daemon held the source). Raises FileNotFoundError, MigrateError, sqlite3.Error."""
    if not source.is_file():
        raise FileNotFoundError(f"no SQLite database at {source}")
    held: DatabaseLock | None = None
    live = False
    try:
        held = lock_database(source)  # no daemon starts on it while the snapshot is taken
    except DatabaseLocked:
        live = True  # a daemon runs: the backup below is one consistent read all the same
    except PermissionError:
        log.debug("cannot lock %s (not ours to write): reading it without the lock", source)
    try:
        src = connect_readonly(source, busy_timeout=10.0)
        dst = sqlite3.connect(into, isolation_level=None)
        try:
            version = int(src.execute("PRAGMA user_version").fetchone()[0])
            if version == 0:
                raise MigrateError(f"{source} is not a positiond database (no schema)")
            src.backup(dst)  # one step: one read transaction, the WAL's pages included
            return schema.migrate(dst), live
        except schema.SchemaError as exc:
            raise SchemaMismatch(str(exc)) from None
        finally:
            src.close()
            dst.close()
    finally:
        if held is not None:
            held.close()


def _source_tables(conn: sqlite3.Connection) -> dict[str, list[str]]:
    names = [
        r[0]
        for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )
    ]
    return {
        n: [c[1] for c in conn.execute(f'PRAGMA table_info("{n}")')]
        for n in names
        if n not in LOOKUPS | _BOOKKEEPING
    }


def _target_tables(conn: psycopg.Connection[Any]) -> dict[str, dict[str, str]]:
    """Data tables of the target: name -> {column: data_type}."""
    found: dict[str, dict[str, str]] = {}
    for table, column, kind in conn.execute(
        "SELECT c.table_name, c.column_name, c.data_type FROM information_schema.columns c "
        "JOIN information_schema.tables t USING (table_schema, table_name) "
        "WHERE c.table_schema = current_schema() AND t.table_type = 'BASE TABLE' "
        "ORDER BY c.table_name, c.ordinal_position"
    ):
        if table not in LOOKUPS | _BOOKKEEPING:
            found.setdefault(table, {})[column] = kind
    return found


def _fk_order(conn: psycopg.Connection[Any], tables: Iterable[str]) -> list[str]:
    """``tables`` with every referenced table before the tables that reference it."""
    wanted = sorted(tables)
    refs: dict[str, set[str]] = {t: set() for t in wanted}
    for child, parent in conn.execute(
        "SELECT conrelid::regclass::text, confrelid::regclass::text FROM pg_constraint "
        "WHERE contype = 'f' AND connamespace = current_schema()::regnamespace"
    ):
        if child in refs and parent in refs and parent != child:
            refs[child].add(parent)
    ordered: list[str] = []
    while refs:
        ready = [t for t in wanted if t in refs and not refs[t] - set(ordered)]
        if not ready:  # a cycle: no order works with the checks on; copy as they are
            ready = [t for t in wanted if t in refs]
        for t in ready:
            ordered.append(t)
            del refs[t]
    return ordered


def _user_triggers(conn: psycopg.Connection[Any], tables: list[str]) -> list[str]:
    return [
        r[0]
        for r in conn.execute(
            "SELECT DISTINCT tgrelid::regclass::text FROM pg_trigger "
            "WHERE NOT tgisinternal AND tgrelid::regclass::text = ANY(%s)",
            (tables,),
        )
    ]


def _convert(kinds: list[str]) -> list[Any]:
    """Per column: how a SQLite value becomes the target's (booleans are 0/1 in SQLite)."""
    return [(lambda v: v if v is None else bool(v)) if k == "boolean" else None for k in kinds]


def copy_database(source: Path, target: PgDsn, *, workdir: Path | None = None) -> Copied:
    """Copy the SQLite database ``source`` into the empty PostgreSQL database ``target``.

    All or nothing (one transaction); raises :class:`TargetNotEmpty`, :class:`SchemaMismatch`,
    :class:`DatabaseLocked` (a daemon runs on the target), FileNotFoundError, ``sqlite3.Error``
    and ``psycopg.Error``; the target holds none of the rows then.
    """
    with tempfile.TemporaryDirectory(prefix="positiond-migrate-", dir=workdir) as tmp:
        copy = Path(tmp) / "snapshot.db"
        at = iso(time.time())
        version, live = snapshot(source, copy)
        src = connect_readonly(copy)
        try:
            result = _copy(src, target, version)
        finally:
            src.close()
    result.live_source, result.snapshot_at = live, at
    return result


def _copy(src: sqlite3.Connection, target: PgDsn, version: int) -> Copied:
    conn = connect(target)
    try:
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_ID,)).fetchone()
        if not (row and row[0]):
            raise DatabaseLocked(f"a positiond is running on the target {target}: stop it first")
        try:
            theirs = migrate_pg(conn)
        except schema.SchemaError as exc:
            raise SchemaMismatch(f"target {target}: {exc}") from None
        if theirs != version:
            raise SchemaMismatch(
                f"schema version {version} in the source, {theirs} in the target {target}"
            )
        mine, theirs_cols = _source_tables(src), _target_tables(conn)
        missing = sorted(set(mine) - set(theirs_cols))
        if missing:
            raise SchemaMismatch(f"tables missing in the target: {', '.join(missing)}")
        for table, columns in mine.items():
            lost = [c for c in columns if c not in theirs_cols[table]]
            if lost:
                raise SchemaMismatch(f"{table}: columns missing in the target: {', '.join(lost)}")
        order = _fk_order(conn, mine)
        with conn.transaction():
            return _copy_tables(src, conn, mine, theirs_cols, order, version)
    finally:
        try:
            conn.execute("SELECT pg_advisory_unlock_all()")
        except psycopg.Error as exc:  # closing anyway: the server releases it with the session
            log.debug("could not release the lock: %s", exc)
        conn.close()


def _copy_tables(
    src: sqlite3.Connection,
    conn: psycopg.Connection[Any],
    mine: dict[str, list[str]],
    theirs: dict[str, dict[str, str]],
    order: list[str],
    version: int,
) -> Copied:
    everything = sorted(theirs)
    conn.execute(
        sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(
            sql.SQL(", ").join(sql.Identifier(t) for t in everything)
        )
    )
    # A daemon on the target holds a live lease (several hosts: no advisory lock): refused,
    # and none may register until this transaction ends.
    conn.execute("LOCK TABLE daemons IN SHARE MODE")
    live = conn.execute(
        "SELECT host_id FROM daemons WHERE lease_expires > now() AND lost_at IS NULL LIMIT 1"
    ).fetchone()
    if live is not None:
        raise DatabaseLocked(
            f"a positiond is running on the target (host id {live[0]!r}): stop it first"
        )
    full = [
        t
        for t in everything
        if conn.execute(
            sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(sql.Identifier(t))
        ).fetchone()[0]  # type: ignore[index]
    ]
    if full:
        raise TargetNotEmpty(f"the target already holds rows in: {', '.join(full)}")
    triggered = _user_triggers(conn, order)
    for t in triggered:
        conn.execute(sql.SQL("ALTER TABLE {} DISABLE TRIGGER USER").format(sql.Identifier(t)))
    done = Copied(version=version)
    for table in order:
        columns = mine[table]
        fix = _convert([theirs[table][c] for c in columns])
        statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
            sql.Identifier(table), sql.SQL(", ").join(sql.Identifier(c) for c in columns)
        )
        listed = ", ".join(f'"{c}"' for c in columns)
        count = 0
        with conn.cursor().copy(statement) as copy:
            for values in src.execute(f'SELECT {listed} FROM "{table}"'):
                copy.write_row([v if f is None else f(v) for f, v in zip(fix, values, strict=True)])
                count += 1
        done.tables[table] = count
    for t in triggered:
        conn.execute(sql.SQL("ALTER TABLE {} ENABLE TRIGGER USER").format(sql.Identifier(t)))
    done.sequences = _set_sequences(src, conn, order)
    return done


def _set_sequences(
    src: sqlite3.Connection, conn: psycopg.Connection[Any], tables: list[str]
) -> dict[str, int]:
    """Each identity key's next value past the highest id copied and past SQLite's own
    counter (AUTOINCREMENT never reuses a pruned id; neither will PostgreSQL)."""
    used: dict[str, int] = {}
    if src.execute("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_sequence'").fetchone():
        used = {str(n): int(s) for n, s in src.execute("SELECT name, seq FROM sqlite_sequence")}
    last: dict[str, int] = {}
    for table, column in conn.execute(
        "SELECT table_name, column_name FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND is_identity = 'YES' AND table_name = ANY(%s)",
        (tables,),
    ).fetchall():
        top = conn.execute(
            sql.SQL("SELECT coalesce(max({}), 0) FROM {}").format(
                sql.Identifier(column), sql.Identifier(table)
            )
        ).fetchone()
        value = max(int(top[0]) if top else 0, used.get(table, 0))
        if value > 0:
            conn.execute(
                "SELECT setval(pg_get_serial_sequence(%s, %s), %s)", (table, column, value)
            )
            last[table] = value
    return last
