"""``posctl migrate``: copy a SQLite database into an empty PostgreSQL one (issue 14).

The copy itself is :func:`positiond.store.pgcopy.copy_database`; this module maps its outcome
onto posctl's output and exit codes.
"""

from __future__ import annotations

import argparse
import sqlite3
from pathlib import Path

from positiond.ctl.access import (
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    Ctl,
    CtlError,
)
from positiond.store.dbfile import DatabaseLocked
from positiond.store.dsn import PgDsn, parse_db

__all__ = ["cmd_migrate"]


def cmd_migrate(ctl: Ctl, args: argparse.Namespace) -> int:
    """Copy a SQLite database into an empty PostgreSQL database.

    Copies every session, leg, event, orphan, alert (outbox and deliveries) and protective
    order, ids included, in one transaction: all of it or nothing. The source (--from, else the
    database posctl locates, see --db) is read through an online backup, so a daemon running on
    it is no obstacle, but what it writes after the snapshot is not copied: stop it first for a
    final migration. The copy of the source and the target are both brought to this positiond's
    schema version first. Refused (exit 5, nothing written): a target that holds any row, a
    schema that differs, a daemon running on the target. Then start positiond with
    --db postgresql://... (the crashed legs are found as before). Prints rows per table.
    """
    source = args.source if args.source is not None else ctl.db
    if isinstance(source, PgDsn):
        raise CtlError(EXIT_USAGE, "the source must be a SQLite file: use --from PATH")
    target = parse_db(args.to)
    if not isinstance(target, PgDsn):
        raise CtlError(EXIT_USAGE, f"--to must be a postgresql:// URL, not {args.to!r}")
    try:
        import psycopg

        from positiond.store.pgcopy import MigrateError, copy_database
    except ImportError as exc:
        need = "pip install 'positiond[postgres]'"
        raise CtlError(EXIT_USAGE, f"migrating needs psycopg ({exc}): {need}") from None
    try:
        done = copy_database(Path(source), target)
    except FileNotFoundError as exc:
        raise CtlError(EXIT_UNREACHABLE, str(exc)) from None
    except (MigrateError, DatabaseLocked) as exc:
        raise CtlError(EXIT_REFUSED, f"{exc}; nothing was copied") from None
    except psycopg.OperationalError as exc:
        message = str(exc).strip().splitlines()[0]
        raise CtlError(EXIT_UNREACHABLE, f"{target}: {message}; nothing was copied") from None
    except (psycopg.Error, sqlite3.Error) as exc:
        message = str(exc).strip().splitlines()[0]
        raise CtlError(EXIT_REFUSED, f"copy failed: {message}; nothing was copied") from None
    if ctl.json:
        ctl.emit(
            {
                "migrated": {
                    "from": str(source),
                    "to": str(target),
                    "schema_version": done.version,
                    "tables": done.tables,
                    "sequences": done.sequences,
                    "live_source": done.live_source,
                    "snapshot_at": done.snapshot_at,
                }
            }
        )
        return EXIT_OK
    out = ctl.out
    out.print(f"copied {source} into {target} (schema version {done.version}):", markup=False)
    for table, count in done.tables.items():
        out.print(f"  {table:<20} {count:>9} rows", markup=False, highlight=False)
    if done.live_source:
        out.print(
            f"a positiond was running on {source}: what it wrote after {done.snapshot_at} is "
            "not in the copy (stop it, then migrate into a fresh database for the final copy)",
            markup=False,
        )
    out.print(f"next: positiond --db '{target}' (and the same db for posctl)", markup=False)
    return EXIT_OK
