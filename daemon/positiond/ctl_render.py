"""posctl's human output: rich tables, times in local time with their zone.

Only presentation lives here; what is shown comes from the commands. Every data value is wrapped
in :class:`rich.text.Text`, so a symbol or a crash reason holding ``[...]`` is printed as it is,
never read as markup. Each table is described by its columns; on a narrow terminal the optional
ones are left out (least useful first) rather than folding symbols and prices over several
lines — ``--json`` always has everything.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import orjson
from rich.console import Console, Group
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

__all__ = [
    "actions_table",
    "console",
    "crashed_tables",
    "events_table",
    "local_time",
    "orphans_table",
    "positions_table",
    "price",
    "prune_table",
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
}
# Piped into a file or a pager, 80 columns would leave out half of every table.
PIPE_WIDTH = 160
# Free-text columns (reasons, details) need at least this much room to be worth showing.
WRAP_WIDTH = 24

Row = Mapping[str, Any]


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


@dataclass(frozen=True)
class Col:
    """One column: header, how a row shows in it, and when it may be left out."""

    name: str
    cell: Callable[[Row], Text]
    right: bool = False
    drop: int = 0  # 0: always shown; otherwise left out on a narrow terminal, highest first
    wrap: bool = False  # free text that may fold over lines (reasons, details)


def _table(
    out: Console, cols: Sequence[Col], rows: Sequence[Row], title: str | None = None,
    caption: str | None = None,
) -> Table:  # fmt: skip
    """Build the table with as many optional columns as the console's width allows."""
    shown = list(cols)
    while True:
        droppable = [c for c in shown if c.drop]
        # Free text counts at WRAP_WIDTH when deciding: it folds into whatever room is left.
        if not droppable or _natural_width(out, _build(shown, rows, WRAP_WIDTH)) <= out.width:
            return _build(shown, rows, None, title, caption)
        shown.remove(max(droppable, key=lambda c: c.drop))


def _build(
    cols: Sequence[Col], rows: Sequence[Row], wrap_width: int | None, title: str | None = None,
    caption: str | None = None,
) -> Table:  # fmt: skip
    table = Table(
        title=Text(title, style="bold") if title else None,
        caption=Text(caption) if caption else None,
        title_justify="left",
        caption_justify="left",
        header_style="bold",
    )
    justify: Literal["left", "right"]
    for col in cols:
        justify = "right" if col.right else "left"
        table.add_column(
            col.name, justify=justify, no_wrap=not col.wrap, overflow="fold",
            max_width=wrap_width if col.wrap else None,
        )  # fmt: skip
    for row in rows:
        table.add_row(*(col.cell(row) for col in cols))
    return table


def _natural_width(out: Console, table: Table) -> int:
    """How wide the table would be with room to spare (console.measure caps it at the width)."""
    return Measurement.get(out, out.options.update_width(100_000), table).maximum


def _leg_name(leg: Row) -> Text:
    return Text(f"{leg['position_key']} (#{leg['position_id']})")


def _levels(entry: int, highest: int, last: int) -> list[Col]:
    """Entry, stop, highest, trail, last price; stop and trail are never left out."""
    return [
        Col("entry", lambda r: _text(price(r["entry_price"])), right=True, drop=entry),
        Col("stop", lambda r: _text(price(r["stop_price"]), "bold"), right=True),
        Col("highest", lambda r: _text(price(r["highest_price"])), right=True, drop=highest),
        Col("trail", lambda r: _text(level(r["last_trail_level"])), right=True),
        Col("last", lambda r: _text(price(r["current_price"])), right=True, drop=last),
    ]


_CRASHED = [
    Col("leg", _leg_name),
    Col("symbol", lambda r: _text(r["symbol"], "bold")),
    Col("exch/prod", lambda r: _text(f"{r['exchange']}/{r['product']}"), drop=4),
    Col("type", lambda r: _text(r["leg_type"]), drop=3),
    Col("side", lambda r: _text(r["side"])),
    Col("qty", lambda r: _text(r["quantity"]), right=True),
    Col("entered", lambda r: _text(local_time(r["entry_time"])), drop=6),
    *_levels(entry=0, highest=2, last=5),
]


def _ran_on(host: str, pid: int | None, reason: str) -> str:
    """Where the strategy ran; its pid only when the crash reason does not already say it
    (``process exited (pid 4321)``: the same process, seen by the kernel)."""
    if pid is None or f"(pid {pid})" in reason:
        return f"ran on {host}"
    return f"ran on {host} as pid {pid}"


def crashed_tables(out: Console, crashes: Sequence[Row]) -> list[Table]:
    """One table per crash: when, why, and every leg with its levels for a manual exit."""
    tables = []
    for crash in crashes:
        title = (
            f"{crash['strategy_name']} — session {crash['session_id']} crashed "
            f"{local_time(crash['crash_timestamp'])}"
        )
        reason = crash["crash_reason"] or "unknown"
        caption = f"why: {reason}"
        if crash.get("client_host"):
            caption += f"   ({_ran_on(crash['client_host'], crash.get('client_pid'), reason)})"
        tables.append(_table(out, _CRASHED, crash["legs"], title, caption))
    return tables


_SESSIONS = [
    Col("id", lambda s: _text(s["id"]), right=True),
    Col("strategy", lambda s: _text(s["strategy_name"], "bold")),
    Col("status", lambda s: _status(s["status"])),
    Col("started", lambda s: _text(local_time(s["start_time"])), drop=3),
    Col("ended / crashed", lambda s: _text(local_time(s["crash_timestamp"] or s["end_time"]))),
    Col("legs open/crashed/all",
        lambda s: _text(f"{s['open_legs']}/{s['crashed_legs']}/{s['all_legs']}")),
    Col("host, pid", lambda s: _text(", ".join(
        str(p) for p in (s["client_host"], s["client_pid"]) if p is not None)), drop=2),
    Col("crash reason", lambda s: _text(s["crash_reason"]), wrap=True, drop=1),
]  # fmt: skip


def sessions_table(out: Console, sessions: Sequence[Row]) -> Table:
    return _table(out, _SESSIONS, sessions)


def _note(leg: Row) -> Text:
    if leg["exit_reason"]:
        return _text(f"{leg['exit_reason']} at {price(leg['exit_price'])}")
    return _text(leg["review_reason"])


_POSITIONS = [
    Col("leg", _leg_name),
    Col("strategy (session)", lambda r: _text(f"{r['strategy_name']} ({r['session_id']})"),
        drop=6),
    Col("symbol", lambda r: _text(r["symbol"], "bold")),
    Col("side", lambda r: _text(r["side"])),
    Col("qty", lambda r: _text(r["quantity"]), right=True),
    Col("status", lambda r: _status(r["status"])),
    *_levels(entry=3, highest=2, last=4),
    Col("note", _note, wrap=True, drop=1),
]  # fmt: skip


def positions_table(out: Console, legs: Sequence[Row]) -> Table:
    return _table(out, _POSITIONS, legs)


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
    return ", ".join(parts)


_EVENTS = [
    Col("#", lambda e: _text(e["id"]), right=True),
    Col("time", lambda e: _text(local_time(e["event_time"]))),
    Col("event", lambda e: _text(e["event_type"], "bold")),
    Col("session", lambda e: _text(e["session_id"]), right=True, drop=1),
    Col("details", lambda e: _text(_details(e["event_type"], e["payload"])), wrap=True),
]


def events_table(out: Console, leg: Row, events: Sequence[Row]) -> Table:
    title = (
        f"{leg['position_key']} (#{leg['position_id']}): {leg['side']} {leg['quantity']} "
        f"{leg['symbol']} {leg['exchange']}/{leg['product']}, now {leg['status']}"
    )
    return _table(out, _EVENTS, events, title)


_VERDICTS = [
    Col("leg", lambda v: _leg_name(v["leg"])),
    Col("strategy", lambda v: _text(v["leg"]["strategy_name"]), drop=6),
    Col("symbol", lambda v: _text(v["leg"]["symbol"], "bold")),
    Col("exch/prod", lambda v: _text(f"{v['leg']['exchange']}/{v['leg']['product']}"), drop=5),
    Col("side", lambda v: _text(v["leg"]["side"]), drop=3),
    Col("qty", lambda v: _text(v["leg"]["quantity"]), right=True, drop=2),
    Col("broker", lambda v: _text(v["broker_quantity"]), right=True),
    Col("positiond", lambda v: _text(v["known_quantity"]), right=True),
    Col("verdict", lambda v: _text(v["verdict"], VERDICT_STYLE.get(v["verdict"], ""))),
    Col("why", lambda v: _text(v["reason"]), wrap=True, drop=4),
]


def verify_table(out: Console, verdicts: Sequence[Row]) -> Table:
    """One row per crashed leg: the broker's net and positiond's for its instrument, verdict."""
    return _table(out, _VERDICTS, verdicts, "crashed legs against the broker's positionbook")


def actions_table(out: Console, actions: Mapping[str, str]) -> Table:
    """What ``verify --apply`` did, per leg (and for the orphans)."""
    cols = [Col("leg", lambda r: _text(r["key"])), Col("done", lambda r: _text(r["done"]),
                                                       wrap=True)]  # fmt: skip
    rows = [{"key": k, "done": v} for k, v in actions.items()]
    return _table(out, cols, rows, "applied")


_ORPHANS = [
    Col("symbol", lambda o: _text(o["symbol"], "bold")),
    Col("exchange", lambda o: _text(o["exchange"])),
    Col("product", lambda o: _text(o["product"])),
    Col("broker", lambda o: _text(o["broker_quantity"]), right=True),
    Col("positiond", lambda o: _text(o["known_quantity"]), right=True),
]


def orphans_table(out: Console, orphans: Sequence[Row]) -> Table:
    title = "orphans: broker positions no leg positiond knows explains"
    return _table(out, _ORPHANS, orphans, title)


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
    cols = [Col("", lambda r: _text(r["k"])), Col("", lambda r: _text(r["v"]), wrap=True)]
    table = _table(out, cols, rows)
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
        ("database", f"{health.get('db')} ({_size(int(health.get('db_size') or 0))})"),
        ("live sessions", health.get("sessions")),
        ("open legs", health.get("legs")),
        ("pending", f"{health.get('pending_ops', 0)} message(s), "
                    f"{health.get('pending_updates', 0)} update(s)"),
        ("last flush", "never" if flushed is None else f"{float(flushed):.1f}s ago"),
        ("writer stalled", f"{float(health.get('writer_stalled') or 0):.1f}s"),
        ("snapshot written", datetime.fromtimestamp(float(written)).astimezone()
         .strftime("%Y-%m-%d %H:%M:%S %Z") if isinstance(written, int | float) else "—"),
    ]  # fmt: skip
    return _pairs(out, pairs, f"positiond: {verdict}")
