"""posctl's read commands: crashed (everything that needs attention), sessions, positions,
events, status.

Each opens the database read-only in one snapshot (:func:`positiond.ctl.access.open_readonly`);
crashed legs and open legs come from the daemon's own query
(:func:`positiond.store.recovery.read_legs`, the seed's crash identification), so posctl and a
recovering strategy see the same legs. Each command's docstring is its ``--help``.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console, RenderableType

from positiond.ctl import render
from positiond.ctl.access import (
    EXIT_ATTENTION,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    Ctl,
    CtlError,
    ask_health,
    open_readonly,
)
from positiond.ctl.orphans import orphan_records
from positiond.ctl.protection import attach
from positiond.status import STATUS_FILENAME
from positiond.store.recovery import leg_dict, read_legs
from positiond.store.schema import trail_level_sql
from positiond_client.paths import ipc_path, runtime_dir
from positiond_client.recovery import CrashedLeg

__all__ = [
    "cmd_crashed",
    "cmd_events",
    "cmd_positions",
    "cmd_sessions",
    "cmd_status",
    "find_leg",
    "position_columns",
    "status_file",
]

def _statuses(conn: sqlite3.Connection, table: str, given: list[str] | None) -> list[str] | None:
    """Upper-cased statuses from repeatable/comma-separated options, checked against the db."""
    if not given:
        return None
    wanted = [s.strip().upper() for item in given for s in item.split(",") if s.strip()]
    if "ALL" in wanted:
        return None
    known = {r[0] for r in conn.execute(f"SELECT name FROM {table}")}
    unknown = sorted(set(wanted) - known)
    if unknown:
        raise CtlError(
            EXIT_USAGE, f"unknown status {', '.join(unknown)} (known: {', '.join(sorted(known))})"
        )
    return wanted


def _in(column: str, values: Sequence[str]) -> str:
    return f"{column} IN ({', '.join('?' * len(values))})"


# ---- reads ---------------------------------------------------------------------------------


FINISHED_SESSION_STATUSES = ("COMPLETED", "CRASHED")


def _legs_where(
    conn: sqlite3.Connection, where: str, strategy: str | None, params: Sequence[Any] = ()
) -> list[dict[str, Any]]:
    sql = (
        f"SELECT {position_columns(conn)} FROM strategy_positions p "
        f"JOIN strategy_sessions s ON s.id = p.session_id WHERE {where}"
    )
    values = list(params)
    if strategy is not None:
        sql += " AND s.strategy_name = ?"
        values.append(strategy)
    return [leg_dict(r) for r in conn.execute(sql + " ORDER BY p.position_id", values)]


def cmd_crashed(ctl: Ctl, args: argparse.Namespace) -> int:
    """Everything that needs a human, grouped, with why: crashed legs by crash (when, why, each
    leg's symbol, side, quantity, entry, stop, highest, trail: what a manual exit needs), legs
    flagged NEEDS_REVIEW (with the reason), legs still ACTIVE in a session that is over
    (COMPLETED or CRASHED: its owner can never exit them), and unresolved orphans (broker
    positions no leg explains; not shown with --strategy: they belong to no strategy).

    Crashed legs are the seed's crash identification (status CRASHED and was_crashed), newest
    crash first; --since filters crashes only (the other groups wait for a human whatever their
    age). Exit 0 when nothing needs attention, 1 while anything does: a cron check can alert on
    it. --json: {"crashes", "count" (crashed legs), "needs_review", "open_in_finished",
    "orphans", "attention" (the total)}.
    """
    conn = open_readonly(ctl.db)
    try:
        review = _legs_where(conn, "p.status = 'NEEDS_REVIEW'", args.strategy)
        stranded = _legs_where(
            conn, f"p.status = 'ACTIVE' AND {_in('s.status', FINISHED_SESSION_STATUSES)}",
            args.strategy, FINISHED_SESSION_STATUSES,
        )  # fmt: skip
        orphans = [] if args.strategy else orphan_records(conn, unresolved=True)
        found = read_legs(conn, "crashed", args.strategy)
        legs = [
            leg for leg in found["legs"]
            if args.since is None or (leg["crash_timestamp"] or "") >= args.since
        ]  # fmt: skip
        crashes: dict[int, dict[str, Any]] = {}
        for leg in legs:
            sid = leg["session_id"]
            if sid not in crashes:
                crashes[sid] = {
                    "session_id": sid,
                    "strategy_name": leg["strategy_name"],
                    "crash_timestamp": leg["crash_timestamp"],
                    "crash_reason": leg["crash_reason"],
                    "legs": [],
                }
            crashes[sid]["legs"].append(CrashedLeg.from_row(leg).to_dict())
        attach(conn, [g for c in crashes.values() for g in c["legs"]] + review)
        if crashes:
            for row in conn.execute(
                "SELECT id, crash_source, client_host, client_pid, start_time "
                f"FROM strategy_sessions WHERE {_in('id', [''] * len(crashes))}",
                list(crashes),
            ):
                crashes[row["id"]].update(
                    {k: row[k] for k in ("crash_source", "client_host", "client_pid", "start_time")}
                )
    finally:
        conn.close()
    data = {
        "crashes": list(crashes.values()),
        "count": len(legs),
        "truncated": found["truncated"],
        "needs_review": review,
        "open_in_finished": stranded,
        "orphans": orphans,
        "attention": len(legs) + len(review) + len(stranded) + len(orphans),
    }
    if ctl.json:
        ctl.emit(data)
    else:
        _print_attention(ctl, data, args.strategy)
    return EXIT_ATTENTION if data["attention"] else EXIT_OK


def _print_attention(ctl: Ctl, data: dict[str, Any], strategy: str | None) -> None:
    scope = f" for strategy {strategy!r}" if strategy else ""
    if not data["attention"]:
        ctl.out.print(
            f"Nothing needs attention{scope}: no crashed legs, none flagged for review, no open "
            "leg in a finished session" + ("." if strategy else ", no unresolved orphan."),
            markup=False,
        )
        return
    for table in render.attention_tables(ctl.out, data):
        ctl.out.print(table)
        ctl.out.print()
    counts = [
        (data["count"], f"{data['count']} crashed leg(s) in {len(data['crashes'])} crash(es)"),
        (len(data["needs_review"]), f"{len(data['needs_review'])} leg(s) flagged NEEDS_REVIEW"),
        (len(data["open_in_finished"]),
         f"{len(data['open_in_finished'])} leg(s) open in a finished session"),
        (len(data["orphans"]), f"{len(data['orphans'])} unresolved orphan(s)"),
    ]  # fmt: skip
    hints = [f"Needs attention{scope}: " + ", ".join(text for n, text in counts if n) + "."]
    if data["count"]:
        hints.append("Check crashed legs against the broker: posctl verify --positionbook FILE")
    if data["count"] or data["needs_review"]:
        hints.append("Decide by hand: posctl resolve LEG --closed | --review WHY | --resume")
        hints.append("  (a whole strategy: posctl resolve --strategy S --all --closed ...)")
    if data["orphans"]:
        hints.append("Orphans: posctl resolve-orphan ID --acknowledge|--adopt S|--closed "
                     "--note WHY")  # fmt: skip
    ctl.out.print("\n".join(hints), markup=False)


def cmd_sessions(ctl: Ctl, args: argparse.Namespace) -> int:
    """Strategy sessions, newest first: status, start, end or crash with its reason, and how
    many of their legs are open, crashed, or in all."""
    conn = open_readonly(ctl.db)
    try:
        where, params = ["TRUE"], []
        statuses = _statuses(conn, "session_statuses", args.status)
        if statuses:
            where.append(_in("s.status", statuses))
            params += statuses
        if args.strategy:
            where.append("s.strategy_name = ?")
            params.append(args.strategy)
        found = conn.execute(
            "SELECT s.id, s.session_key, s.strategy_name, s.status, s.start_time, s.end_time, "
            "s.last_heartbeat, s.crash_timestamp, s.crash_reason, s.crash_source, s.client_host, "
            "s.client_pid, "
            "(SELECT count(*) FROM strategy_positions p WHERE p.session_id = s.id "
            " AND p.status = 'ACTIVE') AS open_legs, "
            "(SELECT count(*) FROM strategy_positions p WHERE p.session_id = s.id "
            " AND p.status = 'CRASHED') AS crashed_legs, "
            "(SELECT count(*) FROM strategy_positions p WHERE p.session_id = s.id) AS all_legs "
            f"FROM strategy_sessions s WHERE {' AND '.join(where)} ORDER BY s.id DESC LIMIT ?",
            [*params, args.limit + 1],
        ).fetchall()
    finally:
        conn.close()
    sessions = [dict(r) for r in found[: args.limit]]
    _show_newest(ctl, "sessions", sessions, len(found) > args.limit, args.limit,
                 render.sessions_table, "No sessions match.")  # fmt: skip
    return EXIT_OK


def _show_newest(
    ctl: Ctl, name: str, rows: list[dict[str, Any]], truncated: bool, limit: int,
    table: Callable[[Console, Sequence[dict[str, Any]]], RenderableType], empty: str,
) -> None:  # fmt: skip
    """Print ``rows`` (the newest ``limit``) as ``--json`` or as a table."""
    if ctl.json:
        ctl.emit({name: rows, "truncated": truncated})
    elif not rows:
        ctl.out.print(empty, markup=False)
    else:
        ctl.out.print(table(ctl.out, rows))
        if truncated:
            ctl.out.print(f"(the newest {limit}; --limit shows more)", markup=False)


_POSITION_COLUMNS = """
    p.position_id, p.position_key, p.session_id, s.strategy_name, p.symbol, p.exchange,
    p.product, p.leg_type, p.side, p.quantity, p.entry_price, p.entry_time, p.current_price,
    p.stop_price, p.highest_price, {trail_level}, p.state, p.status, p.was_crashed,
    p.exit_price, p.exit_time, p.exit_reason, p.review_reason, p.updated_at,
    s.status AS session_status, s.crash_timestamp, s.crash_reason
"""


def position_columns(conn: sqlite3.Connection) -> str:
    """The columns for this database's schema: the trail level as the strategy sent it."""
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    return _POSITION_COLUMNS.format(trail_level=trail_level_sql("p", version))


def cmd_positions(ctl: Ctl, args: argparse.Namespace) -> int:
    """Legs with their levels, newest first: by default those that may still hold a position
    at the broker (ACTIVE, CRASHED, NEEDS_REVIEW); --status picks others (or ALL)."""
    conn = open_readonly(ctl.db)
    try:
        statuses = _statuses(
            conn, "position_statuses", args.status or ["ACTIVE,CRASHED,NEEDS_REVIEW"]
        )
        where, params = ["TRUE"], []
        if statuses:
            where.append(_in("p.status", statuses))
            params += statuses
        if args.strategy:
            where.append("s.strategy_name = ?")
            params.append(args.strategy)
        found = conn.execute(
            f"SELECT {position_columns(conn)} FROM strategy_positions p "
            f"JOIN strategy_sessions s ON s.id = p.session_id WHERE {' AND '.join(where)} "
            "ORDER BY p.position_id DESC LIMIT ?",
            [*params, args.limit + 1],
        ).fetchall()
    finally:
        conn.close()
    legs = [leg_dict(r) for r in found[: args.limit]]
    conn = open_readonly(ctl.db)
    try:
        attach(conn, legs)  # each leg's protective order (docs/PROTECT.md), if any
    finally:
        conn.close()
    _show_newest(ctl, "positions", legs, len(found) > args.limit, args.limit,
                 render.positions_table, "No legs match.")  # fmt: skip
    return EXIT_OK


def find_leg(conn: sqlite3.Connection, leg: str) -> sqlite3.Row | None:
    """A leg by its position key, or else by its position id (``12`` or ``#12``)."""
    sql = (
        f"SELECT {position_columns(conn)} FROM strategy_positions p "
        "JOIN strategy_sessions s ON s.id = p.session_id WHERE "
    )
    row: sqlite3.Row | None = conn.execute(sql + "p.position_key = ?", (leg,)).fetchone()
    number = leg[1:] if leg.startswith("#") else leg
    if row is None and number.isdigit():
        row = conn.execute(sql + "p.position_id = ?", (int(number),)).fetchone()
    return row


def cmd_events(ctl: Ctl, args: argparse.Namespace) -> int:
    """The audit trail of one leg (LEG: its position key or position id): entry, trail moves,
    crash, recovery, review, exit, refused writes — each with time, session and details."""
    conn = open_readonly(ctl.db)
    try:
        row = find_leg(conn, args.leg)
        if row is None:
            raise CtlError(EXIT_REFUSED, f"no leg {args.leg!r}", "UNKNOWN_LEG")
        events = [
            {**dict(e), "payload": orjson.loads(e["payload"] or "{}")}
            for e in conn.execute(
                "SELECT id, position_id, session_id, event_type, event_time, payload "
                "FROM position_events WHERE position_id = ? ORDER BY id",
                (row["position_id"],),
            )
        ]
    finally:
        conn.close()
    leg = leg_dict(row)
    if ctl.json:
        ctl.emit({"leg": leg, "events": events})
    else:
        ctl.out.print(render.events_table(ctl.out, leg, events))
    return EXIT_OK


# ---- status --------------------------------------------------------------------------------


def status_file(endpoint: str) -> Path:
    """Where the daemon on ``endpoint`` keeps status.json: beside its ipc socket."""
    sock = ipc_path(endpoint)
    return (sock.parent if sock is not None else runtime_dir()) / STATUS_FILENAME


def _pid_alive(pid: Any) -> bool:
    if type(pid) is not int or pid <= 0:
        return True  # cannot tell: let the file's age speak
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


def cmd_status(ctl: Ctl, args: argparse.Namespace) -> int:
    """The running daemon's health, asked over its socket (answered even while its database
    writes are stuck): live sessions, open legs, pending writes, last flush, writer stalls.
    If the socket does not answer, its status.json (beside the socket) says whether the process
    is alive. Exit 0 healthy, 1 unhealthy (or alive but not answering: hung), 3 not running or
    unreachable."""
    path = status_file(ctl.endpoint)
    live = ask_health(ctl.endpoint, ctl.timeout)
    if live is not None:
        healthy = bool(live.get("healthy"))
        if ctl.json:
            ctl.emit({"running": True, "healthy": healthy, "stale": False, "source": "daemon",
                      "status_file": str(path), "status": live})  # fmt: skip
        else:
            verdict = "healthy" if healthy else "UNHEALTHY" + (
                f": {live['storage_fault']}" if live.get("storage_fault") else
                "" if live.get("writes_ok", True) else ": database writes failing"
            )  # fmt: skip
            ctl.out.print(render.status_table(ctl.out, live, verdict))
        return EXIT_OK if healthy else EXIT_ATTENTION
    try:
        health = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        raise CtlError(EXIT_UNREACHABLE, f"daemon not running or unreachable: no {path}") from None
    except (OSError, orjson.JSONDecodeError) as exc:
        raise CtlError(EXIT_UNREACHABLE, f"cannot read {path}: {exc}") from None
    if type(health) is not dict:
        raise CtlError(EXIT_UNREACHABLE, f"{path} does not hold a status object")
    if not _pid_alive(health.get("pid")):
        raise CtlError(
            EXIT_UNREACHABLE, f"daemon not running: {path} was left by pid {health['pid']}"
        )
    written = health.get("time")
    interval = health.get("status_interval")
    limit = 3 * float(interval) + 2 if isinstance(interval, int | float) else 30.0
    age = time.time() - float(written) if isinstance(written, int | float) else None
    stale = age is None or age > limit
    # The process lives (its pid) but did not answer on its socket: not healthy, whatever the
    # last snapshot said.
    healthy = False
    if ctl.json:
        ctl.emit({"running": True, "healthy": healthy, "stale": stale,
                  "status_file": str(path), "status": health})  # fmt: skip
    else:
        if not stale:
            verdict = f"UNHEALTHY: no answer on {ctl.endpoint} (hung daemon?)"
        elif stale:
            verdict = "UNHEALTHY: " + (
                "status.json has no time" if age is None else
                f"status.json is {age:.0f}s old (hung daemon?)"
            )  # fmt: skip
        else:
            verdict = "UNHEALTHY" + ("" if health.get("writes_ok", True) else
                                     ": database writes failing")  # fmt: skip
        ctl.out.print(render.status_table(ctl.out, health, verdict))
    return EXIT_OK if healthy else EXIT_ATTENTION
