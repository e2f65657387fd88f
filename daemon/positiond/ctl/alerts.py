"""``posctl alerts``: the recent alerts and their delivery state per sink.

Read from the database (the ``alert_outbox`` and ``alert_deliveries`` tables, schema version
6); an older database has no alerts.
"""

from __future__ import annotations

import argparse
import sqlite3
from typing import Any

from rich.table import Table

from positiond.alerts.outbox import recent
from positiond.ctl import render
from positiond.ctl.access import EXIT_ATTENTION, EXIT_OK, Ctl, open_readonly

__all__ = ["alert_records", "cmd_alerts"]


def alert_records(conn: sqlite3.Connection, limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` alerts, newest first, with their deliveries ([] before version 6)."""
    known = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alert_outbox'"
    ).fetchone()
    return recent(conn, limit) if known else []


def _delivery(d: dict[str, Any]) -> str:
    text = f"{d['sink']}: {d['state']}"
    if d["state"] != "DELIVERED" and d["attempts"]:
        text += f" ({d['attempts']} tries, {d['last_error']})"
    return text


def cmd_alerts(ctl: Ctl, args: argparse.Namespace) -> int:
    """Recent alerts (crashed, stalled, needs_review, ...), newest first, with each sink's
    delivery state: PENDING (to send, or retrying), DELIVERED or FAILED (given up after
    [alerts] retry_for). Exit 1 if a shown alert FAILED for a sink."""
    conn = open_readonly(ctl.db)
    try:
        shown = alert_records(conn, args.limit)
    finally:
        conn.close()
    failed = any(d["state"] == "FAILED" for a in shown for d in a["deliveries"])
    if ctl.json:
        ctl.emit({"alerts": shown, "failed": failed})
    elif not shown:
        ctl.out.print("No alerts.", markup=False)
    else:
        table = Table(title="alerts (newest first)")
        for name in ("time", "event", "strategy", "session", "legs", "reason", "delivery"):
            table.add_column(name)
        for a in shown:
            table.add_row(
                render.local_time(a["time"]),
                a["event"],
                a.get("strategy") or "",
                "" if a.get("session_id") is None else str(a["session_id"]),
                str(len(a.get("legs") or [])),
                a.get("reason") or "",
                "\n".join(_delivery(d) for d in a["deliveries"]) or "(no sink)",
            )
        ctl.out.print(table)
    return EXIT_ATTENTION if failed else EXIT_OK
