"""Alerts: what positiond tells people and programs when a strategy needs attention.

The verdicts that cause an alert (a session CRASHED, STALLED, REVIVED, a leg NEEDS_REVIEW, a
FENCED write, an orphan at the broker, a session that did not return after a restart) write it
to the ``alert_outbox`` table in their own transaction (triggers of schema version 6), so an
alert is never lost between a verdict and its delivery. :class:`~.delivery.Delivery` sends each
to every configured sink that wants it, apart from the hot path, at least once, with retries
and backoff for a bounded time. The body is documented in docs/PROTOCOL.md ("Alerts").

Modules: :mod:`.settings` (the ``[alerts]`` config section), :mod:`.outbox` (the SQL the worker
and posctl use), :mod:`.sinks` (webhook, command), :mod:`.human` (telegram, openalgo: one message
per burst), :mod:`.delivery` (the asyncio worker).
"""

from __future__ import annotations

from positiond.alerts.settings import AlertsConfig, SinkConfig, parse_alerts

__all__ = ["AlertsConfig", "SinkConfig", "parse_alerts"]
