"""``posctl alerts``: the recent alerts and their delivery state per sink.

Read from the database (the ``alert_outbox`` and ``alert_deliveries`` tables, schema version
6); an older database has no alerts.

``posctl alerts test [--sink NAME]`` sends a ``test`` alert through each configured sink (the
``[alerts]`` of the daemon's config file, as posctl finds it) directly from posctl: it needs
no running daemon and touches no database, and it checks the sinks as this user sees them
(the token and key files must be readable, as they are for the daemon's user).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sqlite3
import time
import uuid
from typing import Any

import orjson
from rich.table import Table

from positiond.alerts.human import HumanSink
from positiond.alerts.outbox import BODY_SCHEMA, recent
from positiond.alerts.settings import AlertsConfig, SinkConfig
from positiond.alerts.sinks import build_sink
from positiond.ctl import render
from positiond.ctl.access import EXIT_ATTENTION, EXIT_OK, EXIT_USAGE, Ctl, CtlError, open_readonly
from positiond.openalgo import Settings
from positiond.store.schema import iso

ALERTS_VERSION = 6  # the schema step that made the alert tables

__all__ = ["ALERTS_VERSION", "alert_records", "cmd_alerts", "send_tests", "test_body"]


def alert_records(conn: sqlite3.Connection, limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` alerts, newest first, with their deliveries ([] before version 6)."""
    # PRAGMA user_version: the schema's version on either backend (positiond.store.pgconn).
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    return recent(conn, limit) if version >= ALERTS_VERSION else []


def _delivery(d: dict[str, Any]) -> str:
    text = f"{d['sink']}: {d['state']}"
    if d["state"] != "DELIVERED" and d["attempts"]:
        text += f" ({d['attempts']} tries, {d['last_error']})"
    return text


def cmd_alerts(ctl: Ctl, args: argparse.Namespace) -> int:
    """Recent alerts (crashed, stalled, needs_review, ...), newest first, with each sink's
    delivery state: PENDING (to send, or retrying), DELIVERED or FAILED (given up after
    [alerts] retry_for). Exit 1 if a shown alert FAILED for a sink.

    ``alerts test [--sink NAME]``: send a test alert through the configured sinks; exit 1 if
    one failed."""
    if args.action == "test":
        return _cmd_test(ctl, args)
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


def test_body(by: str, now: float) -> bytes:
    """A ``test`` alert: the usual envelope, no strategy and no legs."""
    return orjson.dumps(
        {
            "schema": BODY_SCHEMA,
            "id": uuid.uuid4().hex,
            "event": "test",
            "severity": "info",
            "time": iso(now),
            "strategy": None,
            "session_id": None,
            "reason": f"a test from posctl alerts test ({by} on {socket.gethostname()})",
            "legs": [],
            "detail": {},
        }
    )


async def _one(config: SinkConfig, openalgo: Settings | None, body: bytes) -> str | None:
    try:
        sink = build_sink(config, openalgo)
    except Exception as exc:  # a sink that cannot even be built: that is its answer
        return f"{type(exc).__name__}: {exc}"
    try:
        async with asyncio.timeout(config.timeout + 1.0):
            if isinstance(sink, HumanSink):
                return await sink.send_many([body])
            return await sink.send(body)
    except TimeoutError:
        return f"no answer within {config.timeout:g}s"
    finally:
        await sink.aclose()


async def send_tests(
    sinks: tuple[SinkConfig, ...], openalgo: Settings | None, body: bytes
) -> list[str | None]:
    """Send ``body`` through every sink at once; per sink None (OK) or the error."""
    return list(await asyncio.gather(*(_one(s, openalgo, body) for s in sinks)))


def _cmd_test(ctl: Ctl, args: argparse.Namespace) -> int:
    alerts: AlertsConfig = args.alerts_config
    sinks = alerts.sinks
    if args.sink is not None:
        sinks = tuple(s for s in sinks if s.name == args.sink)
        if not sinks:
            known = ", ".join(s.name for s in alerts.sinks) or "none"
            raise CtlError(EXIT_USAGE, f"no sink named {args.sink!r} (configured: {known})")
    if not sinks:
        raise CtlError(
            EXIT_USAGE,
            "no [[alerts.sink]] in the daemon's config file (posctl reads it from --config, "
            "POSITIOND_CONFIG or /etc/positiond/positiond.toml)",
        )
    errors = asyncio.run(send_tests(sinks, args.openalgo_settings, test_body(ctl.by, time.time())))
    results = [
        {"sink": s.name, "type": s.type, "ok": e is None, "error": e}
        for s, e in zip(sinks, errors, strict=True)
    ]
    failed = any(e is not None for e in errors)
    if ctl.json:
        ctl.emit({"sinks": results, "failed": failed})
    else:
        for r in results:
            line = f"{r['sink']} ({r['type']}): " + ("OK" if r["ok"] else f"FAILED: {r['error']}")
            ctl.out.print(line, markup=False, highlight=False)
    return EXIT_ATTENTION if failed else EXIT_OK
