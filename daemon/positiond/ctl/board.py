"""``posctl watch``'s picture of the world and how it is drawn.

:class:`Board` starts from a snapshot (the daemon's ``watch`` ack, or the database read
directly while the daemon is down: :func:`positiond.store.snapshot.read_snapshot`) and applies
the daemon's ``changes`` and ``health`` frames (docs/PROTOCOL.md §5.5). :func:`render` draws it
for rich, readable at 80 columns: the daemon's health, what needs attention, the sessions, the
open and crashed legs, the latest events. No I/O here: the clock comes in as a parameter.
"""

from __future__ import annotations

import time
from collections import deque
from datetime import datetime
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

__all__ = ["Board", "render"]

EVENT_LINES = 8  # the events shown, newest last
ATTENTION_STATUSES = ("CRASHED", "NEEDS_REVIEW")
_SHORT = {"NEEDS_REVIEW": "REVIEW", "CRASHED": "CRASH"}  # the status column is 6 wide
_GONE = frozenset({"CLOSED", "RECOVERED", "MANUAL_EXIT", "EXPIRED", "ORPHANED"})


def _epoch(stamp: Any) -> float | None:
    """The stored ISO 8601 UTC text -> epoch seconds (None if absent or unreadable)."""
    if not isinstance(stamp, str):
        return None
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):  # prices: 8 columns hold 99999.95
        return f"{value:.2f}" if abs(value) < 100_000 else f"{value:.0f}"
    return str(value)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


def _clock(stamp: Any) -> str:
    when = _epoch(stamp)
    return time.strftime("%H:%M:%S", time.localtime(when)) if when is not None else "--:--:--"


class Board:
    """Sessions, legs, orphans and events as the watcher knows them."""

    def __init__(self) -> None:
        self.sessions: dict[str, dict[str, Any]] = {}
        self.legs: dict[str, dict[str, Any]] = {}
        self.orphans: list[dict[str, Any]] = []
        self.events: deque[str] = deque(maxlen=EVENT_LINES)
        self.health: dict[str, Any] | None = None
        self.live = False  # fed by a running daemon (else: the database, read-only)
        self.down = False  # the daemon is known to be away (the board shows the database)
        self.note = ""
        self.stale_orphans = False  # an ``orphans`` event came: read them again

    # ---- in ------------------------------------------------------------------------------

    def load(self, snapshot: dict[str, Any]) -> None:
        """Start over from a snapshot (PROTOCOL.md §4.14)."""
        self.sessions = {row["session"]: dict(row) for row in snapshot.get("sessions", ())}
        self.legs = {row["key"]: dict(row) for row in snapshot.get("legs", ())}
        self.orphans = list(snapshot.get("orphans", ()))
        self.stale_orphans = False
        self.events.clear()
        for row in snapshot.get("events", ()):
            where = row.get("symbol") or row.get("strategy") or ""
            self.events.append(f"{_clock(row.get('time'))} {row.get('event')} {where}")

    def apply(self, frame: dict[str, Any]) -> None:
        """A ``changes`` or ``health`` frame from the daemon."""
        if frame.get("type") == "health":
            self.health = frame.get("health")
            for key, when in (frame.get("seen") or {}).items():
                if key in self.sessions:
                    self.sessions[key]["last_heartbeat"] = when
            return
        for event in frame.get("events", ()):
            self._event(event)

    def _event(self, ev: dict[str, Any]) -> None:
        kind, key, session = ev.get("event"), ev.get("key"), ev.get("session")
        who = ev.get("strategy") or "?"
        leg = self.legs.get(key) if isinstance(key, str) else None
        symbol = (leg or ev).get("symbol") or key
        line: str | None = None
        if kind == "session" and isinstance(session, str):
            row = self.sessions.setdefault(session, {"session": session})
            row.update(
                id=ev.get("id"), strategy=who, status="RUNNING", host=ev.get("host"),
                pid=ev.get("pid"), last_heartbeat=ev.get("time"),
            )  # fmt: skip
            for revived in ev.get("legs") or ():
                if revived in self.legs:
                    self.legs[revived]["status"] = "ACTIVE"
            line = f"{who} session {ev.get('id')} {'REVIVED' if ev.get('revived') else 'started'}"
        elif kind == "entry" and isinstance(key, str):
            fields = {k: v for k, v in ev.items() if k not in ("event", "time")}
            self.legs[key] = {**fields, "updated_at": ev.get("time")}
            side, qty, price = ev.get("side"), ev.get("quantity"), _num(ev.get("entry_price"))
            line = f"{who} ENTRY {symbol} {side} {qty} @ {price}"
        elif kind == "update" and leg is not None:
            leg.update({k: v for k, v in ev.items() if k not in ("event", "time", "key")})
            leg["updated_at"] = ev.get("time")
        elif kind == "trail":
            before, after = (ev.get("stop_price") or [None, None])[:2]
            if leg is not None:
                leg["stop_price"] = after
                leg["last_trail_level"] = (ev.get("last_trail_level") or [None, None])[1]
            line = f"{who} STOP {symbol} {_num(before)} -> {_num(after)}"
        elif kind == "exit" and isinstance(key, str):
            self.legs.pop(key, None)
            line = f"{who} EXIT {symbol} @ {_num(ev.get('exit_price'))} {ev.get('exit_reason')}"
        elif kind == "crash" and isinstance(session, str):
            if session in self.sessions:
                self.sessions[session]["status"] = "CRASHED"
                self.sessions[session]["crash_reason"] = ev.get("reason")
            for row in self.legs.values():
                if row.get("session") == session and row.get("status") == "ACTIVE":
                    row["status"] = "CRASHED"
            line = f"{who} CRASHED ({ev.get('source')}): {ev.get('reason')}"
        elif kind == "end" and isinstance(session, str):
            self.sessions.pop(session, None)
            line = f"{who} session ended"
        elif kind == "status" and isinstance(session, str):
            if session in self.sessions:
                self.sessions[session]["status"] = ev.get("status")
            line = f"{who} {ev.get('status')}"
        elif kind == "resolve" and isinstance(key, str):
            status = ev.get("status")
            if status in _GONE:
                self.legs.pop(key, None)
            elif leg is not None and isinstance(status, str):
                leg["status"] = status
            line = f"{ev.get('by') or who} {ev.get('action')} {symbol} -> {status}"
        elif kind == "orphans":
            self.stale_orphans = True
            line = f"orphans changed ({ev.get('by')})"
        if line is not None:
            self.events.append(f"{_clock(ev.get('time'))} {line}")

    # ---- out -----------------------------------------------------------------------------

    def attention(self) -> list[str]:
        """What needs a human, most urgent first (empty: nothing)."""
        out = []
        crashed = [r for r in self.legs.values() if r.get("status") == "CRASHED"]
        review = [r for r in self.legs.values() if r.get("status") == "NEEDS_REVIEW"]
        down = [s for s in self.sessions.values() if s.get("status") in ("CRASHED", "STALLED")]
        for row in down:
            out.append(
                f"{row.get('status')}: {row.get('strategy')} session {row.get('id')} "
                f"{row.get('crash_reason') or ''}".rstrip()
            )
        if crashed:
            out.append(f"{len(crashed)} CRASHED leg(s): posctl crashed / posctl verify")
        if review:
            out.append(f"{len(review)} leg(s) NEEDS_REVIEW: posctl crashed")
        if self.orphans:
            out.append(f"{len(self.orphans)} orphan(s) at the broker: posctl orphans")
        return out


def _header(board: Board, now: float) -> Text:
    health = board.health
    text = Text()
    if board.live and health is not None:
        ok = bool(health.get("healthy"))
        text.append("positiond ", style="bold")
        text.append("● healthy" if ok else "● UNHEALTHY", style="green" if ok else "bold red")
        text.append(
            f"  pid {health.get('pid')} up {_age(health.get('uptime'))}"
            f"  {health.get('sessions')} sessions/{health.get('legs')} legs live"
            f"  db {int(health.get('db_size') or 0) // 1024}K"
        )
        if health.get("storage_fault"):
            text.append(f"\nSTORAGE: {health['storage_fault']}", style="bold red")
    elif board.live:
        text.append("positiond ", style="bold")
        text.append("● connected", style="green")
    elif board.down:
        text.append("positiond ", style="bold")
        text.append("● DOWN", style="bold red")
        text.append(f"  {board.note}")
    else:
        text.append("positiond ", style="bold")
        text.append("● connecting…", style="yellow")
    stamp = Text(time.strftime("%H:%M:%S ", time.localtime(now)), style="dim")
    return stamp + text


def _sessions(board: Board, now: float) -> Table:
    table = Table(box=None, padding=(0, 1), expand=True, header_style="bold", title_justify="left")
    table.title = "Sessions"
    for name, kw in (
        ("id", {"justify": "right", "width": 5}),
        ("strategy", {"ratio": 2}),
        ("host/pid", {"ratio": 2}),
        ("status", {"width": 8}),
        ("seen", {"justify": "right", "width": 5}),
    ):
        table.add_column(name, no_wrap=True, overflow="ellipsis", **kw)
    rows = sorted(
        board.sessions.values(), key=lambda r: (r.get("status") == "RUNNING", -(r.get("id") or 0))
    )
    for row in rows:
        status = str(row.get("status"))
        style = "bold red" if status == "CRASHED" else "yellow" if status == "STALLED" else ""
        seen = _epoch(row.get("last_heartbeat"))
        table.add_row(
            str(row.get("id") or "-"), str(row.get("strategy")),
            f"{row.get('host') or '?'}/{row.get('pid') or '?'}", Text(status, style=style),
            _age(None if seen is None else now - seen),
        )  # fmt: skip
    return table


def _legs(board: Board, now: float) -> Table:
    table = Table(
        box=None, padding=(0, 1, 0, 0), pad_edge=False, expand=True, header_style="bold",
        title_justify="left",
    )  # fmt: skip
    table.title = "Legs"
    columns = (
        ("symbol", {"ratio": 1, "min_width": 8}),
        ("B/S qty", {"justify": "right", "width": 7}), ("entry", {"justify": "right", "width": 8}),
        ("stop", {"justify": "right", "width": 8}), ("high", {"justify": "right", "width": 8}),
        ("trl", {"justify": "right", "width": 3}), ("last", {"justify": "right", "width": 8}),
        ("age", {"justify": "right", "width": 3}), ("status", {"width": 6}),
    )  # fmt: skip
    for name, kw in columns:
        table.add_column(name, no_wrap=True, overflow="ellipsis", **kw)
    order = {"CRASHED": 0, "NEEDS_REVIEW": 1, "ACTIVE": 2}
    legs = sorted(
        board.legs.values(),
        key=lambda r: (order.get(str(r.get("status")), 3), str(r.get("symbol"))),
    )
    for row in legs:
        status = str(row.get("status"))
        updated = _epoch(row.get("updated_at"))
        style = "bold red" if status in ATTENTION_STATUSES else ""
        side = str(row.get("side") or "-")[:1]
        table.add_row(
            str(row.get("symbol")), f"{side} {_num(row.get('quantity'))}",
            _num(row.get("entry_price")), _num(row.get("stop_price")),
            _num(row.get("highest_price")), _num(row.get("last_trail_level")),
            _num(row.get("current_price")), _age(None if updated is None else now - updated),
            Text(_SHORT.get(status, status), style=style),
        )  # fmt: skip
    return table


def render(board: Board, now: float | None = None) -> RenderableType:
    """The whole board, top to bottom (``now``: epoch seconds, for ages)."""
    now = time.time() if now is None else now
    parts: list[RenderableType] = [_header(board, now)]
    attention = board.attention()
    if attention:
        parts.append(Text("ATTENTION", style="bold white on red"))
        parts.extend(Text(f" ! {line}", style="bold red") for line in attention[:6])
    else:
        parts.append(Text("nothing needs attention", style="green"))
    parts.append(_sessions(board, now))
    parts.append(_legs(board, now))
    parts.append(Text("Events", style="bold"))
    parts.extend(Text(line, no_wrap=True, overflow="ellipsis") for line in board.events)
    parts.append(Text("q: quit", style="dim"))
    return Group(*parts)
