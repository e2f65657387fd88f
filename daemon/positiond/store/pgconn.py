"""A psycopg 3 connection that runs the SQLite store's statements: one batch code, two backends.

:mod:`positiond.store.writes` and :mod:`positiond.store.recovery` are written against the
``sqlite3`` DB-API (``conn.execute``, ``cursor.lastrowid``, rows by index and by name,
``sqlite3.Error`` subclasses). :class:`PgConnection` gives them the same surface on a
PostgreSQL connection, so every rule is written once:

- placeholders: ``?`` and ``?N`` become ``$N``, ``:name`` becomes ``$N`` (a named mapping is
  turned into the positional list), sent with server-side binding (psycopg's ``RawCursor``);
- ``BEGIN IMMEDIATE`` is ``BEGIN`` and then the transaction advisory lock :data:`WRITE_LOCK`:
  like SQLite's write lock, one such transaction at a time (the writer's batches, the protect
  worker's changes, the alert worker's records), so a check made in it (``WHERE EXISTS ...``)
  still holds at its COMMIT; ``PRAGMA user_version`` reads ``schema_version``; the page
  counters ``PRAGMA page_size``/``freelist_count`` read 0 (PostgreSQL reuses space itself);
- ``ORDER BY … DESC`` puts NULLs last, as SQLite does;
- ``INSERT OR IGNORE`` is ``INSERT … ON CONFLICT DO NOTHING``;
- an ``INSERT`` into a table with an identity key gets ``RETURNING`` its key: ``lastrowid``;
- the trail level as the strategy sent it (:func:`positiond.store.schema.trail_level_sql`):
  PostgreSQL's CASE has one type, so the whole level comes back as JSON (an integer) and any
  other as text, turned back into a float here;
- errors: psycopg's integrity and data errors are ``sqlite3.IntegrityError`` and
  ``sqlite3.InterfaceError`` (this op alone is refused, the batch commits), every other one is
  ``sqlite3.OperationalError`` (the batch is retried, nothing was acknowledged): the writer's
  fault handling is the same code on both backends.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import lru_cache
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus
from psycopg.rows import RowMaker

__all__ = ["WRITE_LOCK", "PgConnection", "PgCursor", "PgRow", "translate", "translated_error"]

# pg_advisory_xact_lock key of BEGIN IMMEDIATE (positiond.store.pgschema.LOCK_ID + 3).
WRITE_LOCK = 0x706F7364 + 3

# Tables whose key an INSERT returns as lastrowid.
_KEYS = {
    "strategy_sessions": "id",
    "strategy_positions": "position_id",
    "position_events": "id",
    "broker_orphans": "id",
    "alert_outbox": "id",
    "protective_orders": "id",
}
_INSERT = re.compile(r"^\s*INSERT\s+INTO\s+(\w+)", re.IGNORECASE)
_TRAIL = re.compile(
    r"CASE WHEN (\w+)\.last_trail_level_is_int AND \1\.last_trail_level = "
    r"CAST\(\1\.last_trail_level AS INTEGER\) THEN CAST\(\1\.last_trail_level AS INTEGER\) "
    r"ELSE \1\.last_trail_level END"
)
_TRAIL_PG = (
    r"CASE WHEN \1.last_trail_level_is_int AND \1.last_trail_level = trunc(\1.last_trail_level) "
    r"AND abs(\1.last_trail_level) < 9.2e18 THEN to_jsonb(\1.last_trail_level::bigint) "
    r"ELSE to_jsonb(\1.last_trail_level::text) END"
)
_IGNORE = re.compile(r"^\s*INSERT\s+OR\s+IGNORE\s+INTO\b", re.IGNORECASE)
_DESC = re.compile(r"\bDESC\b(?!\s+NULLS)", re.IGNORECASE)
_PRAGMAS = {
    "PRAGMA user_version": "SELECT coalesce(max(version), 0) FROM schema_version",
    "PRAGMA page_size": "SELECT 0",
    "PRAGMA freelist_count": "SELECT 0",
    "BEGIN IMMEDIATE": "BEGIN",  # and WRITE_LOCK (PgCursor.execute)
}
# A string literal, or a placeholder: ?N, ?, :name (not a :: cast).
_TOKEN = re.compile(r"'(?:[^']|'')*'|\?(\d+)|\?|(?<!:):([A-Za-z_]\w*)")


@lru_cache(maxsize=512)
def translate(sql: str) -> tuple[str, tuple[str, ...] | None]:
    """SQLite's statement as PostgreSQL's; the names of ``:name`` placeholders in $ order
    (None when the statement is positional)."""
    stripped = sql.strip()
    if stripped in _PRAGMAS:
        return _PRAGMAS[stripped], None
    names: list[str] = []
    count = 0

    def placeholder(match: re.Match[str]) -> str:
        nonlocal count
        text = match.group(0)
        if text.startswith("'"):
            return text
        if match.group(1) is not None:
            return "$" + match.group(1)
        if match.group(2) is not None:
            name = match.group(2)
            if name not in names:
                names.append(name)
            return f"${names.index(name) + 1}"
        count += 1
        return f"${count}"

    out = _TOKEN.sub(placeholder, sql)
    out = _TRAIL.sub(_TRAIL_PG, out)
    out = _DESC.sub("DESC NULLS LAST", out)
    if _IGNORE.match(out):
        out = _IGNORE.sub("INSERT INTO", out).rstrip().rstrip(";") + " ON CONFLICT DO NOTHING"
    return out, (tuple(names) if names else None)


def translated_error(exc: psycopg.Error) -> sqlite3.Error:
    """The ``sqlite3`` exception the store's callers handle for a psycopg one."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, psycopg.IntegrityError):
        return sqlite3.IntegrityError(message)
    if isinstance(exc, psycopg.DataError):
        return sqlite3.InterfaceError(message)
    if isinstance(exc, psycopg.ProgrammingError | psycopg.NotSupportedError):
        return sqlite3.ProgrammingError(message)
    return sqlite3.OperationalError(message)


class PgRow(tuple[Any, ...]):
    """A row readable by index and by column name, like ``sqlite3.Row`` (``dict(row)`` too)."""

    _index: dict[str, int]

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return tuple.__getitem__(self, self._index[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._index)


def _row_factory(cursor: Any) -> RowMaker[PgRow]:
    description = cursor.description or []
    index = {column.name: i for i, column in enumerate(description)}
    trail = index.get("last_trail_level")

    def make(values: Sequence[Any]) -> PgRow:
        if trail is not None and isinstance(values[trail], str):
            values = list(values)
            values[trail] = float(values[trail])
        row = PgRow(values)
        row._index = index
        return row

    return make


class PgCursor:
    """The part of ``sqlite3.Cursor`` the store uses, on a psycopg ``RawCursor``."""

    def __init__(
        self, conn: psycopg.Connection[Any], owner: PgConnection | None = None
    ) -> None:
        self._cur: psycopg.RawCursor[PgRow] = psycopg.RawCursor(conn, row_factory=_row_factory)
        self.lastrowid: int | None = None
        self._owner = owner

    @property
    def rowcount(self) -> int:
        return self._cur.rowcount

    @property
    def description(self) -> Any:
        """The columns of the last query (name first in each entry), as sqlite3's."""
        return self._cur.description

    def execute(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> PgCursor:
        query, names = translate(sql)
        args = _args(params, names)
        table = _INSERT.match(query)
        key = _KEYS.get(table.group(1).lower()) if table else None
        if key is not None and "RETURNING" not in query.upper():
            query += f" RETURNING {key}"
        try:
            self._cur.execute(query, args)
            if query == "BEGIN" and sql.strip() == "BEGIN IMMEDIATE":
                self._cur.execute(f"SELECT pg_advisory_xact_lock({WRITE_LOCK})")
            if query == "BEGIN" and self._owner is not None:
                self._owner.began()
            if key is not None:
                row = self._cur.fetchone()
                self.lastrowid = None if row is None else int(row[0])
        except psycopg.Error as exc:
            raise translated_error(exc) from exc
        return self

    def executemany(self, sql: str, seq: Sequence[Sequence[Any]]) -> PgCursor:
        query, names = translate(sql)
        try:
            self._cur.executemany(query, [_args(p, names) for p in seq])
        except psycopg.Error as exc:
            raise translated_error(exc) from exc
        return self

    def fetchone(self) -> Any:
        try:
            return self._cur.fetchone() if self._cur.description else None
        except psycopg.Error as exc:
            raise translated_error(exc) from exc

    def fetchall(self) -> list[Any]:
        try:
            return self._cur.fetchall() if self._cur.description else []
        except psycopg.Error as exc:
            raise translated_error(exc) from exc

    def __iter__(self) -> Iterator[Any]:
        return iter(self.fetchall())


def _args(params: Sequence[Any] | Mapping[str, Any], names: tuple[str, ...] | None) -> list[Any]:
    if isinstance(params, Mapping):
        return [params[name] for name in names or ()]
    return list(params)


class PgConnection:
    """The part of ``sqlite3.Connection`` the store uses (autocommit: the store says BEGIN).

    ``on_begin(self)`` runs right after each ``BEGIN``, inside the transaction (the lease's
    fencing check, :mod:`positiond.store.lease`); if it raises, the transaction is rolled
    back and the exception goes to the caller.
    """

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        on_begin: Callable[[PgConnection], None] | None = None,
    ) -> None:
        self.raw = conn
        self.on_begin = on_begin

    def began(self) -> None:
        if self.on_begin is None:
            return
        try:
            self.on_begin(self)
        except BaseException:
            if not self.broken:
                self.raw.execute("ROLLBACK")
            raise

    @property
    def in_transaction(self) -> bool:
        status = self.raw.info.transaction_status
        return status in (TransactionStatus.INTRANS, TransactionStatus.INERROR)

    @property
    def broken(self) -> bool:
        return self.raw.closed or self.raw.broken

    def cursor(self) -> PgCursor:
        return PgCursor(self.raw, self)

    def execute(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> PgCursor:
        return self.cursor().execute(sql, params)

    def executemany(self, sql: str, seq: Sequence[Sequence[Any]]) -> PgCursor:
        return self.cursor().executemany(sql, seq)

    def close(self) -> None:
        self.raw.close()
