"""Alerts about the daemon itself: its health turning bad (database writes failing, the writer
stalled, the database lost, the socket gone) and good again.

These cannot go through the outbox — the database may be the fault — so they are sent from
memory: kept only while the daemon runs, retried like the others (docs/PROTOCOL.md, "Alerts").
:class:`HealthWatch` turns the daemon's health snapshots (:meth:`positiond.server.Daemon.health`)
into at most one alert per change.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson

from positiond.alerts.outbox import BODY_SCHEMA
from positiond.alerts.settings import SEVERITY
from positiond.store.schema import iso

__all__ = ["HealthWatch", "health_body"]


def _reason(health: dict[str, Any]) -> str:
    if health.get("healthy"):
        return "healthy again: writes succeed and the writer makes progress"
    parts = []
    if health.get("storage_fault"):
        parts.append(str(health["storage_fault"]))
    if health.get("writes_ok") is False:
        parts.append("database writes are failing")
    if not parts:
        parts.append(f"the writer made no progress for {health.get('writer_stalled', 0):g}s")
    if health.get("listening") is False:
        parts.append("not listening")
    return "; ".join(parts)


def health_body(kind: str, health: dict[str, Any], now: float) -> bytes:
    """The JSON of an ``unhealthy`` or ``healthy`` alert (same envelope as every alert)."""
    detail = {
        k: health.get(k)
        for k in ("pid", "db", "writes_ok", "writer_stalled", "storage_fault", "listening")
    }
    return orjson.dumps(
        {
            "schema": BODY_SCHEMA,
            "id": uuid.uuid4().hex,
            "event": kind,
            "severity": SEVERITY[kind],
            "time": iso(now),
            "strategy": None,
            "session_id": None,
            "reason": _reason(health),
            "legs": [],
            "detail": detail,
        }
    )


class HealthWatch:
    """Remembers the last health seen; :meth:`change` says which alert a new one calls for."""

    def __init__(self) -> None:
        self.healthy = True  # the daemon starts healthy: a bad first look is a change

    def change(self, health: dict[str, Any]) -> str | None:
        """``unhealthy``, ``healthy`` or None (no change)."""
        healthy = bool(health.get("healthy"))
        if healthy == self.healthy:
            return None
        self.healthy = healthy
        return "healthy" if healthy else "unhealthy"
