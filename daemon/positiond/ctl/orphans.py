"""posctl's orphan commands: list the recorded orphans, and resolve one.

An orphan is a broker position no leg positiond knows explains (recorded by ``verify --apply``
or a strategy's recovery). It is not a leg: positiond has no entry, stop or session for it, so
nothing can be handed to a strategy to manage. What a human can decide, and what each means:

- ``--acknowledge``: known and intended (a manual trade, another system's position): it stops
  needing attention, and a later verification finding the very same position (instrument and
  quantities) does not record it again;
- ``--adopt STRATEGY [--session ID]``: that strategy (or that session of it) takes it over —
  typically its next run enters it as a leg (``save_position_entry``) and manages it from then
  on. Recorded as ADOPTED with who took it; it stops needing attention, and an identical
  finding is not recorded again. positiond does not invent a leg for it: its entry and stop
  are the strategy's to set;
- ``--closed``: squared off at the broker: CLOSED, final. The same position seen again later is
  a new orphan.

Each decision keeps when, who (``posctl user@host``) and why (``--note``, required). An
acknowledged or adopted orphan can still be closed (the earlier decision stays in the reason).
"""

from __future__ import annotations

import argparse
import contextlib
import sqlite3
from typing import Any

import orjson

from positiond.ctl import render
from positiond.ctl.access import EXIT_ATTENTION, EXIT_OK, EXIT_REFUSED, Ctl, CtlError, open_readonly

__all__ = ["cmd_orphans", "cmd_resolve_orphan", "orphan_records"]

# Added by schema version 5; absent (None) when reading an older database.
_RESOLUTION_COLUMNS = ("resolved_at", "resolved_by", "resolution_reason", "adopted_by")


def orphan_records(
    conn: sqlite3.Connection, unresolved: bool, limit: int | None = None
) -> list[dict[str, Any]]:
    """broker_orphans rows, oldest first (``unresolved``: status ORPHANED only; ``limit``: the
    newest that many)."""
    sql = "SELECT * FROM broker_orphans"
    if unresolved:
        sql += " WHERE status = 'ORPHANED'"
    sql += " ORDER BY id DESC" + ("" if limit is None else f" LIMIT {int(limit)}")
    records = []
    for row in reversed(conn.execute(sql).fetchall()):
        record = dict(row)
        for name in _RESOLUTION_COLUMNS:
            record.setdefault(name, None)
        with contextlib.suppress(orjson.JSONDecodeError):  # else shown as stored
            record["row"] = orjson.loads(record.get("row") or "{}")
        records.append(record)
    return records


def cmd_orphans(ctl: Ctl, args: argparse.Namespace) -> int:
    """Recorded orphans: broker positions no leg explains, with their id, instrument, the
    broker's and positiond's quantities, when and by whom they were found. By default the
    unresolved ones; --all also those acknowledged, adopted or closed (with who and why).

    Decide one with posctl resolve-orphan ID --acknowledge | --adopt STRATEGY | --closed
    --note WHY. Exit 1 while any orphan is unresolved.
    """
    conn = open_readonly(ctl.db)
    try:
        shown = orphan_records(conn, unresolved=not args.all, limit=args.limit)
        open_count = int(
            conn.execute("SELECT count(*) FROM broker_orphans WHERE status = 'ORPHANED'")
            .fetchone()[0]
        )  # fmt: skip
    finally:
        conn.close()
    if ctl.json:
        ctl.emit({"orphans": shown, "unresolved": open_count})
    elif not shown:
        ctl.out.print("No unresolved orphans." if not args.all else "No orphans.", markup=False)
    else:
        title = "orphans (all)" if args.all else "unresolved orphans"
        ctl.out.print(render.orphan_records_table(ctl.out, shown, title))
        if open_count:
            ctl.out.print(
                f"{open_count} unresolved: posctl resolve-orphan ID\n"
                "  --acknowledge | --adopt STRATEGY [--session N] | --closed, and --note WHY",
                markup=False,
            )
    return EXIT_ATTENTION if open_count else EXIT_OK


def cmd_resolve_orphan(ctl: Ctl, args: argparse.Namespace) -> int:
    """Decide one recorded orphan (ID from posctl orphans): --acknowledge (known and intended:
    stop reporting it), --adopt STRATEGY [--session ID] (that strategy takes it over: its next
    run enters it as a leg; positiond invents no entry or stop), --closed (squared off at the
    broker). --note WHY is required: it is kept with who decided and when.

    Goes through the daemon when it runs, directly (under its lock) when it does not. Exit 5 if
    refused (unknown id, an orphan already CLOSED, a session not of that strategy).
    """
    msg: dict[str, Any] = {"type": "resolve_orphan", "id": args.orphan_id, "reason": args.note}
    if args.acknowledge:
        msg["action"] = "acknowledge"
    elif args.adopt is not None:
        msg |= {"action": "adopt", "strategy": args.adopt}
        if args.session is not None:
            msg["adopt_session"] = args.session
    else:
        msg["action"] = "close"
    if args.session is not None and args.adopt is None:
        raise CtlError(2, "--session goes with --adopt")
    written = ctl.write([msg])
    outcome = written.outcomes[0]
    if not outcome.ok:
        raise CtlError(
            EXIT_REFUSED, f"orphan {args.orphan_id}: {outcome.code}: {outcome.reason}", outcome.code
        )
    if ctl.json:
        ctl.emit({"id": args.orphan_id, "action": msg["action"], "via": written.via,
                  "by": written.by, "result": outcome.data})  # fmt: skip
    else:
        status = outcome.data.get("status")
        done = f"already {status}: nothing changed" if outcome.data.get("duplicate") else status
        ctl.out.print(f"orphan {args.orphan_id}: {done} — {ctl.via(written)}", markup=False)
    return EXIT_OK
