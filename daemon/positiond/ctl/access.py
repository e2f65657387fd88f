"""How posctl reaches the data: SQLite read-only for reads; for changes, the daemon when it runs
and a locked direct write when it does not.

Reads open ``file:<db>?mode=ro`` in one read transaction (one consistent snapshot, WAL readers
never block the daemon's writer), so they work whether or not the daemon runs.

Changes are protocol messages (``resolve``, ``orphans``, ``resolve_orphan``, ``prune``: the
sessionless ones), checked with :func:`positiond_client.protocol.validate` either way. The daemon
holds the database's lock (:func:`positiond.store.dbfile.lock_database`, on the file whatever path
names it) while it runs:

- lock held: the daemon runs and is the only writer, so the messages go to it over ZeroMQ and
  each waits for its ack (no answer in time: :data:`EXIT_NO_ANSWER`);
- lock free: posctl takes the lock itself (a daemon starting meanwhile refuses to run instead of
  writing alongside), and applies the ops the daemon builds (:func:`positiond.ops.operator_op`)
  with the daemon's own batch code (:func:`positiond.store.sqlite.apply_direct`), in one
  transaction. One code path for the ops and the SQL;
- no database we can see (or a lock we may not open: the daemon's user owns them): only the
  daemon can write it, so the messages go to its socket too.

A socket file nobody listens on (a daemon stopped or killed leaves it) is "not running" at once,
not a wait for the timeout.

A PostgreSQL store (``db`` a ``postgresql://`` URL, :mod:`positiond.store.postgres`) is read in
one read-only REPEATABLE READ transaction (one snapshot) through the store's
:class:`~positiond.store.pgconn.PgConnection`, with the same SQL; changes go to the daemon
when it runs, else directly, refused while any daemon's lease on the database is live
(:func:`positiond.store.postgres.apply_direct`).
"""

from __future__ import annotations

import contextlib
import getpass
import os
import socket
import sqlite3
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import orjson
import zmq
from rich.console import Console

from positiond.commands import HealthQuery, Refusal, command_op
from positiond.ops import Batch, Result
from positiond.store.dbfile import DatabaseLocked, lock_database, lock_file_for
from positiond.store.dsn import PgDsn
from positiond.store.schema import SCHEMA_VERSION, SchemaError
from positiond.store.sqlite import apply_direct, connect_readonly
from positiond_client.errors import ProtocolError
from positiond_client.paths import ipc_path
from positiond_client.protocol import PROTOCOL_VERSION, encode, validate

__all__ = [
    "EXIT_ATTENTION",
    "EXIT_NO_ANSWER",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "Ctl",
    "CtlError",
    "Outcome",
    "Written",
    "ask_health",
    "listening",
    "open_readonly",
    "who",
    "write",
]

EXIT_OK = 0  # done; nothing crashed, nothing to look at
EXIT_ATTENTION = 1  # crashed legs, mismatches, orphans, an unhealthy daemon
EXIT_USAGE = 2  # bad command line or input file (argparse uses 2 too)
EXIT_UNREACHABLE = 3  # database unreadable / missing, daemon not running or unreachable
EXIT_NO_ANSWER = 4  # the daemon runs but did not answer in time
EXIT_REFUSED = 5  # the daemon (or the store) refused: unknown leg, wrong state, fenced

# The columns every read uses appeared in schema version 2 (review_reason, broker_orphans).
MIN_READ_VERSION = 2


class CtlError(Exception):
    """A failure that ends the command: a one-line message and the exit code it means."""

    def __init__(self, exit_code: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message
        self.code = code  # the wire error code, for a refusal


def open_readonly(db: Path | PgDsn) -> sqlite3.Connection:
    """A read-only connection inside one read transaction; CtlError(3) when it cannot be read."""
    if isinstance(db, PgDsn):
        return _open_postgres(db)
    if not db.is_file():
        parent = db.parent
        if parent.is_dir() and not os.access(parent, os.R_OK | os.X_OK):
            raise CtlError(
                EXIT_UNREACHABLE,
                f"cannot read {db}: {parent} is not readable by this user "
                "(run posctl as root or as the daemon's user, or use --db)",
            )
        raise CtlError(EXIT_UNREACHABLE, f"no database at {db} (use --db or POSITIOND_DB)")
    try:
        conn = connect_readonly(db)
    except sqlite3.Error as exc:
        raise CtlError(EXIT_UNREACHABLE, f"cannot open {db}: {exc}") from None
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("BEGIN")
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version and version >= MIN_READ_VERSION:
            conn.execute("SELECT 1 FROM strategy_positions LIMIT 1").fetchall()
    except sqlite3.Error as exc:
        conn.close()
        raise CtlError(EXIT_UNREACHABLE, f"cannot read {db}: {exc}") from None
    _readable(conn, db, version)
    return conn


def _readable(conn: Any, db: Path | PgDsn, version: int) -> None:
    """Close ``conn`` and raise CtlError unless posctl can read a schema of ``version``."""
    problem = None
    if version == 0:
        problem = f"{db} is not a positiond database (no schema)"
    elif version > SCHEMA_VERSION:
        problem = f"{db} has schema version {version}, newer than this posctl; upgrade positiond"
    elif version < MIN_READ_VERSION:
        problem = f"{db} has the old schema version {version}; start positiond once to migrate it"
    if problem is not None:
        conn.close()
        raise CtlError(EXIT_UNREACHABLE, problem)


def _open_postgres(db: PgDsn) -> sqlite3.Connection:
    """:func:`open_readonly` for PostgreSQL: a :class:`~positiond.store.pgconn.PgConnection`,
    which offers the part of ``sqlite3.Connection`` posctl's reads use (hence the cast)."""
    try:
        import psycopg

        from positiond.store.pgconn import PgConnection
    except ImportError as exc:
        need = "pip install 'positiond[postgres]'"
        raise CtlError(EXIT_UNREACHABLE, f"reading {db} needs psycopg ({exc}): {need}") from None
    try:
        raw = psycopg.connect(db.url, autocommit=True, connect_timeout=5, application_name="posctl")
    except psycopg.Error as exc:
        raise CtlError(EXIT_UNREACHABLE, f"cannot open {db}: {str(exc).strip()}") from None
    conn = PgConnection(raw)
    try:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        known = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()[0]
        version = int(conn.execute("PRAGMA user_version").fetchone()[0]) if known else 0
    except sqlite3.Error as exc:
        conn.close()
        raise CtlError(EXIT_UNREACHABLE, f"cannot read {db}: {exc}") from None
    _readable(conn, db, version)
    return cast(sqlite3.Connection, conn)


@contextlib.contextmanager
def _daemon_lock(db: Path) -> Iterator[bool]:
    """Try the daemon's lock: yields True while we hold it (no daemon), False if it is taken.

    The same lock the daemon takes, by the same rule (:func:`positiond.store.dbfile.lock_database`:
    what the path leads to, whatever symlink or hard link spells it). An operator who may not
    even open it (the daemon's user owns it, mode 0600) could not write the database either:
    False, so the change goes to the daemon's socket.
    """
    try:
        held = lock_database(db)
    except (DatabaseLocked, PermissionError):
        yield False
        return
    except OSError as exc:
        raise CtlError(EXIT_UNREACHABLE, f"cannot lock {db}: {exc}") from None
    try:
        yield True
    finally:
        held.close()  # after _direct closed its connection: see positiond.store.dbfile


@dataclass(frozen=True)
class Outcome:
    """The answer to one message: the ack's data, or a refusal's code and reason."""

    ok: bool
    data: dict[str, Any] = field(default_factory=dict)
    code: str = ""
    reason: str = ""


@dataclass(frozen=True)
class Written:
    """How the messages were applied (``via`` "daemon" or "direct") and one outcome each."""

    via: str
    by: str
    outcomes: list[Outcome]


class _Locked(Exception):
    """A daemon holds the PostgreSQL database: the change goes to it."""


def _apply_direct(db: Path | PgDsn, batch: Batch) -> list[Result]:
    if not isinstance(db, PgDsn):
        return apply_direct(db, batch)
    try:
        from positiond.store import postgres
    except ImportError as exc:
        need = "pip install 'positiond[postgres]'"
        raise CtlError(EXIT_UNREACHABLE, f"writing {db} needs psycopg ({exc}): {need}") from None
    try:
        return postgres.apply_direct(db, batch)
    except DatabaseLocked:
        raise _Locked from None


def _direct(db: Path | PgDsn, messages: list[dict[str, Any]], by: str) -> list[Outcome]:
    """Apply the messages as the daemon would (its ops, its SQL), in one transaction."""
    now = time.time()
    ops = []
    for msg in messages:
        # The engine's own rule: refused as the daemon refuses it, or the op it builds.
        out = command_op(None, None, {**msg, "by": by}, now, {})
        if isinstance(out, Refusal):
            raise CtlError(EXIT_USAGE, f"{msg['type']}: {out.reason}", out.code)
        if isinstance(out, HealthQuery):
            raise CtlError(EXIT_USAGE, "a health query goes to the daemon")
        ops.append(out)
    try:
        results = _apply_direct(db, Batch(ops=ops, time=now))
    except SchemaError as exc:
        raise CtlError(EXIT_UNREACHABLE, f"{db}: {exc}") from None
    except sqlite3.Error as exc:
        raise CtlError(EXIT_UNREACHABLE, f"cannot write {db}: {exc}") from None
    return [Outcome(r.ok, r.data, r.code, r.reason) for r in results]


def listening(path: Path) -> bool:
    """Does anything accept connections on this unix socket? (A stopped daemon's file may stay.)"""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return False
        except OSError:
            return True  # no permission to tell, a full backlog...: let ZeroMQ try
    return True


def _ask_daemon(
    endpoint: str, messages: list[dict[str, Any]], timeout: float, why: str
) -> list[Outcome]:
    sock_file = ipc_path(endpoint)
    if sock_file is not None and not listening(sock_file):
        raise CtlError(EXIT_UNREACHABLE, f"{why}, and no daemon listens on {endpoint}")
    outcomes = []
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        for msg in messages:
            sock.send(encode(msg))
            outcomes.append(_reply(sock, msg, endpoint, timeout))
    finally:
        sock.close(linger=0)
        ctx.term()
    return outcomes


def _reply(sock: zmq.Socket[bytes], msg: dict[str, Any], endpoint: str, timeout: float) -> Outcome:
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not sock.poll(int(left * 1000) + 1):
            raise CtlError(
                EXIT_NO_ANSWER,
                f"daemon did not answer on {endpoint} within {timeout:g}s "
                f"({msg['type']} {msg.get('key', '')}); it may still apply it".rstrip(),
            )
        reply = orjson.loads(sock.recv())
        if type(reply) is not dict or reply.get("seq") != msg["seq"]:
            continue  # a ping, or a late answer to something else
        if reply.get("type") == "ack":
            data = {k: v for k, v in reply.items() if k not in ("v", "type", "seq")}
            return Outcome(True, data)
        return Outcome(False, code=str(reply.get("code")), reason=str(reply.get("reason")))


def ask_health(endpoint: str, timeout: float) -> dict[str, Any] | None:
    """The daemon's live health snapshot over its socket; None if nobody answers in time."""
    msg = {"v": PROTOCOL_VERSION, "type": "query", "seq": 1, "what": "health", "by": who()}
    try:
        (outcome,) = _ask_daemon(endpoint, [msg], timeout, "asking for health")
    except CtlError:
        return None
    health = outcome.data.get("health") if outcome.ok else None
    return health if isinstance(health, dict) else None


def write(
    db: Path | PgDsn, endpoint: str, messages: list[dict[str, Any]], *, by: str, timeout: float
) -> Written:
    """Apply sessionless messages through the running daemon, or directly when none runs."""
    checked = []
    for seq, fields in enumerate(messages, start=1):
        msg = {"v": PROTOCOL_VERSION, "seq": seq, "by": by, **fields}
        try:
            validate(msg)
        except ProtocolError as exc:
            raise CtlError(EXIT_USAGE, exc.reason, exc.code) from None
        checked.append(msg)
    if isinstance(db, PgDsn):
        direct_by = f"{by} (direct write: daemon not running)"
        try:
            return Written("direct", direct_by, _direct(db, checked, direct_by))
        except _Locked:
            why = f"the database's lock on {db} is held (by a running positiond?)"
    elif db.is_file():
        with _daemon_lock(db) as ours:
            if ours:
                direct_by = f"{by} (direct write: daemon not running)"
                return Written("direct", direct_by, _direct(db, checked, direct_by))
        why = f"the database lock {lock_file_for(db)} is held (by a running positiond?)"
    else:  # not here, or not ours to see: only the daemon can write it
        why = f"no database at {db} (use --db or POSITIOND_DB)"
    return Written("daemon", by, _ask_daemon(endpoint, checked, timeout, why))


def who() -> str:
    """``posctl user@host``: the ``by`` of every change, kept in the audit trail."""
    try:
        user = getpass.getuser()
    except Exception:  # no login name in the environment or passwd: the uid says it
        user = str(os.getuid())
    return f"posctl {user}@{socket.gethostname()}"[:120]


@dataclass
class Ctl:
    """What every command gets: where the data is, how to print, who is asking."""

    db: Path | PgDsn
    endpoint: str
    json: bool
    timeout: float
    out: Console
    by: str
    db_source: str = ""  # why this database (positiond.ctl.locate), for messages

    def emit(self, data: Any) -> None:
        """Print ``data`` as indented JSON on stdout (``--json``)."""
        sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")

    def write(self, messages: list[dict[str, Any]]) -> Written:
        """Apply sessionless messages: through the daemon, or directly when it is down."""
        return write(self.db, self.endpoint, messages, by=self.by, timeout=self.timeout)

    def via(self, written: Written) -> str:
        """How a change was applied, for the human output."""
        if written.via == "daemon":
            return f"through the daemon at {self.endpoint}, as {written.by!r}"
        return f"directly in {self.db} (daemon not running), as {written.by!r}"
