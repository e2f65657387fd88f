"""posctl's human output: tables that fit the terminal, times in local time with their zone.

Only presentation lives here; what is shown comes from the commands. Every data value is wrapped
in :class:`rich.text.Text`, so a symbol or a crash reason holding ``[...]`` is printed as it is,
never read as markup.

Each table is a list of columns (:class:`positiond.ctl.layout.Col`: a number, a short text, free
text or an identifier); :func:`positiond.ctl.layout.layout` fits them to the terminal without
ever cutting a value, or folds the rows into blocks. Legs are named ``#id key``: the short id
first (posctl takes it wherever it asks for a LEG). ``--json`` has everything, always.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import orjson
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from positiond.ctl.layout import Col, Row, layout
from positiond.ctl.protection import protection_text

__all__ = [
    "actions_table",
    "attention_tables",
    "console",
    "crashed_tables",
    "events_table",
    "local_time",
    "orphan_records_table",
    "orphans_table",
    "positions_table",
    "price",
    "prune_table",
    "resolve_table",
    "sessions_table",
    "status_table",
    "verify_table",
]

VERDICT_STYLE = {"RESUME": "green", "CLOSED_AT_BROKER": "yellow", "MISMATCH": "bold red"}
STATUS_STYLE = {
    "CRASHED": "bold red",
    "NEEDS_REVIEW": "yellow",
    "ACTIVE": "green",
    "RUNNING": "green",
    "STALLED": "yellow",
    "ORPHANED": "bold red",
}
# Piped into a file or a pager, 80 columns would fold every table into blocks.
PIPE_WIDTH = 160


def console(stderr: bool = False) -> Console:
    """A console for stdout (or stderr); wide when not a terminal unless COLUMNS says otherwise."""
    stream = sys.stderr if stderr else sys.stdout
    width = None
    if not stream.isatty() and not os.environ.get("COLUMNS"):
        width = PIPE_WIDTH
    return Console(file=stream, width=width, highlight=False, soft_wrap=False)


def local_time(stamp: str | None) -> str:
    """Stored ISO UTC text -> local time with the zone (``2025-11-28 15:30:22 IST``)."""
    if not stamp:
        return "—"
    try:
        when = datetime.fromisoformat(stamp).astimezone()
    except ValueError:
        return stamp
    return when.strftime("%Y-%m-%d %H:%M:%S %Z")


def price(value: float | None) -> str:
    """A price as a trader reads it: two decimals unless it has more."""
    if value is None:
        return "—"
    if abs(value - round(value, 2)) < 1e-9:
        return f"{value:,.2f}"
    return f"{value:,}"


def level(value: float | None) -> str:
    """A trail level (or any plain number): no forced decimals."""
    return "—" if value is None else f"{value:g}"


def _text(value: Any, style: str = "") -> Text:
    return Text("—" if value is None or value == "" else str(value), style=style)


def _status(value: str) -> Text:
    return Text(value, style=STATUS_STYLE.get(value, ""))


def _leg_name(leg: Row) -> Text:
    """``#12 key``: the short id first (posctl takes it wherever a LEG is asked), then the key."""
    return Text(f"#{leg['position_id']} {leg['position_key']}")


def _levels() -> list[Col]:
    """Entry, stop, highest, trail, last price."""
    return [
        Col("entry", lambda r: _text(price(r["entry_price"])), "num"),
        Col("stop", lambda r: _text(price(r["stop_price"]), "bold"), "num"),
        Col("highest", lambda r: _text(price(r["highest_price"])), "num"),
        Col("trail", lambda r: _text(level(r["last_trail_level"])), "num"),
        Col("last", lambda r: _text(price(r["current_price"])), "num"),
    ]


def _instrument(r: Row) -> Text:
    """``SYMBOL NFO MIS CE``: wraps under the symbol on a narrow terminal."""
    text = Text(str(r["symbol"]), style="bold")
    text.append("".join(f" {p}" for p in (r["exchange"], r["product"], r["leg_type"]) if p))
    return text


def _protection(leg: Row) -> Text:
    """The leg's protective order at the broker (docs/PROTECT.md), ``—`` when none."""
    return _text(protection_text(leg.get("protection")))


_CRASHED = [
    Col("leg", _leg_name, "fold"),
    Col("instrument", _instrument, "wrap"),
    Col("side", lambda r: _text(r["side"])),
    Col("qty", lambda r: _text(r["quantity"]), "num"),
    *_levels(),
    Col("entered", lambda r: _text(local_time(r["entry_time"])), "wrap"),
    Col("protection", _protection, "wrap"),
]


def _ran_on(host: str, pid: int | None, reason: str) -> str:
    """Where the strategy ran; its pid only when the crash reason does not already say it
    (``process exited (pid 4321)``: the same process, seen by the kernel)."""
    if pid is None or f"(pid {pid})" in reason:
        return f"ran on {host}"
    return f"ran on {host} as pid {pid}"


def _crash_title(crash: Row) -> tuple[str, str]:
    title = (
        f"{crash['strategy_name']} — session {crash['session_id']} crashed "
        f"{local_time(crash['crash_timestamp'])}"
    )
    reason = crash["crash_reason"] or "unknown"
    caption = f"why: {reason}"
    if crash.get("client_host"):
        caption += f"   ({_ran_on(crash['client_host'], crash.get('client_pid'), reason)})"
    return title, caption


def crashed_tables(out: Console, crashes: Sequence[Row]) -> list[RenderableType]:
    """One table per crash: when, why, and every leg with its levels for a manual exit."""
    return [layout(out, _CRASHED, c["legs"], *_crash_title(c)) for c in crashes]


_REVIEW = [
    Col("leg", _leg_name, "fold"),
    Col("strategy (session)", lambda r: _text(f"{r['strategy_name']} ({r['session_id']})"),
        "wrap"),
    Col("symbol", lambda r: _text(r["symbol"], "bold")),
    Col("side", lambda r: _text(r["side"])),
    Col("qty", lambda r: _text(r["quantity"]), "num"),
    Col("stop", lambda r: _text(price(r["stop_price"]), "bold"), "num"),
    Col("trail", lambda r: _text(level(r["last_trail_level"])), "num"),
    Col("why", lambda r: _text(r["review_reason"]), "wrap"),
    Col("protection", _protection, "wrap"),
]  # fmt: skip

_STRANDED = [
    Col("leg", _leg_name, "fold"),
    Col("strategy (session)",
        lambda r: _text(f"{r['strategy_name']} ({r['session_id']}, {r['session_status']})"),
        "wrap"),
    Col("symbol", lambda r: _text(r["symbol"], "bold")),
    Col("side", lambda r: _text(r["side"])),
    Col("qty", lambda r: _text(r["quantity"]), "num"),
    Col("entry", lambda r: _text(price(r["entry_price"])), "num"),
    Col("stop", lambda r: _text(price(r["stop_price"]), "bold"), "num"),
    Col("trail", lambda r: _text(level(r["last_trail_level"])), "num"),
    Col("last", lambda r: _text(price(r["current_price"])), "num"),
]  # fmt: skip


REVIEW_TITLE = "needs review — flagged for a human (posctl resolve LEG --closed | --resume)"
STRANDED_TITLE = (
    "open in a finished session — its owner can never exit it "
    "(posctl resolve LEG --closed | --review WHY | --resume)"
)
ORPHANS_TITLE = "unresolved orphans — broker positions no leg explains (posctl resolve-orphan)"


def attention_tables(out: Console, data: Row) -> list[RenderableType]:
    """Everything that needs a human, in groups: crashes, reviews, stranded legs, orphans."""
    shown = crashed_tables(out, data["crashes"])
    if data["needs_review"]:
        shown.append(layout(out, _REVIEW, data["needs_review"], REVIEW_TITLE))
    if data["open_in_finished"]:
        shown.append(layout(out, _STRANDED, data["open_in_finished"], STRANDED_TITLE))
    if data["orphans"]:
        shown.append(orphan_records_table(out, data["orphans"], ORPHANS_TITLE))
    return shown


_SESSIONS = [
    Col("id", lambda s: _text(s["id"]), "num"),
    Col("strategy", lambda s: _text(s["strategy_name"], "bold"), "wrap"),
    Col("status", lambda s: _status(s["status"])),
    Col("started", lambda s: _text(local_time(s["start_time"])), "wrap"),
    Col("ended / crashed", lambda s: _text(local_time(s["crash_timestamp"] or s["end_time"])),
        "wrap"),
    Col("legs open/crashed/all",
        lambda s: _text(f"{s['open_legs']}/{s['crashed_legs']}/{s['all_legs']}"), "num"),
    Col("host, pid", lambda s: _text(", ".join(
        str(p) for p in (s["client_host"], s["client_pid"]) if p is not None)), "wrap"),
    Col("crash reason", lambda s: _text(s["crash_reason"]), "wrap"),
]  # fmt: skip


def sessions_table(out: Console, sessions: Sequence[Row]) -> RenderableType:
    return layout(out, _SESSIONS, sessions)


def exit_note(leg: Row) -> str:
    """How a closed leg ended: ``STOP_HIT at 104.00``, or plainly that the price is unknown."""
    if leg.get("exit_price") is None:
        return f"{leg['exit_reason']}, exit price unknown"
    return f"{leg['exit_reason']} at {price(leg['exit_price'])}"


def _note(leg: Row) -> Text:
    if leg["exit_reason"]:
        return _text(exit_note(leg))
    return _text(leg["review_reason"])


_POSITIONS = [
    Col("leg", _leg_name, "fold"),
    Col("strategy (session)", lambda r: _text(f"{r['strategy_name']} ({r['session_id']})"),
        "wrap"),
    Col("symbol", lambda r: _text(r["symbol"], "bold")),
    Col("side", lambda r: _text(r["side"])),
    Col("qty", lambda r: _text(r["quantity"]), "num"),
    Col("status", lambda r: _status(r["status"])),
    *_levels(),
    Col("note", _note, "wrap"),
    Col("protection", _protection, "wrap"),
]  # fmt: skip


def positions_table(out: Console, legs: Sequence[Row]) -> RenderableType:
    return layout(out, _POSITIONS, legs)


def _details(kind: str, payload: Any) -> str:
    """An event's payload as one readable line (``stop_price 100 → 104`` for trail moves)."""
    if not isinstance(payload, dict):
        return orjson.dumps(payload).decode()
    parts = []
    for key, value in payload.items():
        if value is None:
            continue
        if kind == "TRAIL_UPDATE" and isinstance(value, list) and len(value) == 2:
            parts.append(f"{key} {level(value[0])} → {level(value[1])}")
        elif key == "traceback" and isinstance(value, str):
            last = value.strip().splitlines()[-1:] or [""]
            parts.append(f"traceback …{last[0]}")
        elif isinstance(value, str | int | float):
            parts.append(f"{key}={value}")
        else:
            parts.append(f"{key}={orjson.dumps(value).decode()}")
    if kind == "EXIT" and "exit_price" not in payload:
        parts.append("exit price unknown")
    return ", ".join(parts)


_EVENTS = [
    Col("#", lambda e: _text(e["id"]), "num"),
    Col("time", lambda e: _text(local_time(e["event_time"])), "wrap"),
    Col("event", lambda e: _text(e["event_type"], "bold")),
    Col("session", lambda e: _text(e["session_id"]), "num"),
    Col("details", lambda e: _text(_details(e["event_type"], e["payload"])), "wrap"),
]


def events_table(out: Console, leg: Row, events: Sequence[Row]) -> RenderableType:
    title = (
        f"#{leg['position_id']} {leg['position_key']}: {leg['side']} {leg['quantity']} "
        f"{leg['symbol']} {leg['exchange']}/{leg['product']}, now {leg['status']}"
    )
    if leg.get("exit_reason"):
        title += f" ({exit_note(leg)})"
    return layout(out, _EVENTS, events, title)


_VERDICTS = [
    Col("leg", lambda v: _leg_name(v["leg"]), "fold"),
    Col("strategy", lambda v: _text(v["leg"]["strategy_name"]), "wrap"),
    Col("symbol", lambda v: _text(v["leg"]["symbol"], "bold")),
    Col("exch prod", lambda v: _text(f"{v['leg']['exchange']} {v['leg']['product']}"), "wrap"),
    Col("side", lambda v: _text(v["leg"]["side"])),
    Col("qty", lambda v: _text(v["leg"]["quantity"]), "num"),
    Col("broker", lambda v: _text(v["broker_quantity"]), "num"),
    Col("positiond", lambda v: _text(v["known_quantity"]), "num"),
    Col("verdict", lambda v: _text(v["verdict"], VERDICT_STYLE.get(v["verdict"], ""))),
    Col("why", lambda v: _text(v["reason"]), "wrap"),
]


def verify_table(out: Console, verdicts: Sequence[Row]) -> RenderableType:
    """One row per crashed leg: the broker's net and positiond's for its instrument, verdict."""
    return layout(out, _VERDICTS, verdicts, "crashed legs against the broker's positionbook")


def actions_table(out: Console, actions: Mapping[str, str]) -> RenderableType:
    """What ``verify --apply`` did, per leg (and for the orphans)."""
    cols = [Col("leg", lambda r: _text(r["key"]), "fold"),
            Col("done", lambda r: _text(r["done"]), "wrap")]  # fmt: skip
    rows = [{"key": k, "done": v} for k, v in actions.items()]
    return layout(out, cols, rows, "applied")


_ORPHANS = [
    Col("symbol", lambda o: _text(o["symbol"], "bold")),
    Col("exchange", lambda o: _text(o["exchange"])),
    Col("product", lambda o: _text(o["product"])),
    Col("broker", lambda o: _text(o["broker_quantity"]), "num"),
    Col("positiond", lambda o: _text(o["known_quantity"]), "num"),
    Col("decided", lambda o: _text(o.get("resolution") or "—")),
]


def orphans_table(out: Console, orphans: Sequence[Row]) -> RenderableType:
    """The orphans a verification found (not yet recorded: no id)."""
    title = "orphans: broker positions no leg positiond knows explains"
    return layout(out, _ORPHANS, orphans, title)


def _resolution(o: Row) -> Text:
    if o["status"] == "ORPHANED":
        return _status("ORPHANED")
    who = f" to {o['adopted_by']}" if o.get("adopted_by") else ""
    return _text(f"{o['status']}{who} {local_time(o.get('resolved_at'))} by {o.get('resolved_by')}"
                 f": {o.get('resolution_reason')}")  # fmt: skip


_ORPHAN_RECORDS = [
    Col("orphan", lambda o: Text(f"#{o['id']} {o['symbol']}"), "wrap"),
    Col("exch prod", lambda o: _text(f"{o['exchange']} {o['product']}"), "wrap"),
    Col("broker", lambda o: _text(o["broker_quantity"]), "num"),
    Col("positiond", lambda o: _text(o["known_quantity"]), "num"),
    Col("detected", lambda o: _text(f"{local_time(o['detected_at'])} by {o['detected_by']}"),
        "wrap"),
    Col("status", _resolution, "wrap"),
]  # fmt: skip


def orphan_records_table(
    out: Console, orphans: Sequence[Row], title: str = "orphans"
) -> RenderableType:
    """Recorded orphans (broker_orphans rows) with their id, resolution and who decided."""
    return layout(out, _ORPHAN_RECORDS, orphans, title)


def resolve_table(out: Console, legs: Sequence[Row], title: str) -> RenderableType:
    """The legs a bulk resolve is about to change (or changed)."""
    cols = [c for c in _POSITIONS if c.name not in ("highest", "last", "entry")]
    return layout(out, cols, legs, title)


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    value = n / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _pairs(out: Console, pairs: Iterable[tuple[str, Any]], title: str) -> Group:
    """A heading over a two-column table of names and values."""
    rows = [{"k": k, "v": v} for k, v in pairs]
    cols = [Col("", lambda r: _text(r["k"])), Col("", lambda r: _text(r["v"]), "wrap")]
    table = layout(out, cols, rows)
    if isinstance(table, Table):
        table.show_header = False
    return Group(Text(title, style="bold"), table)


def prune_table(out: Console, data: Row, cutoff: str) -> Group:
    return _pairs(
        out,
        [
            ("sessions removed", data.get("sessions", 0)),
            ("legs removed", data.get("positions", 0)),
            ("events removed", data.get("events", 0)),
            ("orphan records removed", data.get("orphans", 0)),
            ("space freed in the file", _size(int(data.get("freed_bytes", 0)))),
        ],
        f"pruned what finished before {local_time(cutoff)}",
    )


def status_table(out: Console, health: Row, verdict: str) -> Group:
    written = health.get("time")
    flushed = health.get("last_flush_age")
    pairs = [
        ("pid", health.get("pid")),
        ("version", health.get("version")),
        ("uptime", f"{float(health.get('uptime') or 0):.0f}s"),
        ("endpoint", health.get("endpoint")),
        ("database", f"{health.get('db')}" + ("" if health.get("db_size") is None else
                     f" ({_size(int(health.get('db_size') or 0))})")),  # None: PostgreSQL
        ("live sessions", health.get("sessions")),
        ("open legs", health.get("legs")),
        ("pending", f"{health.get('pending_ops', 0)} message(s), "
                    f"{health.get('pending_updates', 0)} update(s)"),
        ("last flush", "never" if flushed is None else f"{float(flushed):.1f}s ago"),
        ("writer stalled", f"{float(health.get('writer_stalled') or 0):.1f}s"),
        ("snapshot written", datetime.fromtimestamp(float(written)).astimezone()
         .strftime("%Y-%m-%d %H:%M:%S %Z") if isinstance(written, int | float) else "—"),
    ]  # fmt: skip
    recon = health.get("reconcile")  # [openalgo] reconcile_interval set
    if isinstance(recon, dict):
        error = recon.get("last_error")
        pairs.append(
            (
                "reconcile",
                f"{recon.get('drift')} drift(s) at the last check, "
                f"{recon.get('alerts')} alert(s), {recon.get('checks')} check(s), "
                f"{recon.get('refused')} refused" + (f"; last: {error}" if error else ""),
            )
        )
    guard = health.get("protect")  # [protect] mode on or dry-run
    if isinstance(guard, dict):
        pairs.append(("protect", f"{guard.get('mode')}: {guard.get('placed')} placed, "
                      f"{guard.get('triggered')} triggered, {guard.get('failed')} failed, "
                      f"{guard.get('skipped')} skipped"))  # fmt: skip
    return _pairs(out, pairs, f"positiond: {verdict}")
