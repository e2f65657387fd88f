"""The Prometheus collector: the daemon's own numbers, read when /metrics is scraped.

It runs in the HTTP server's thread and only reads: counters the engine, router, listener,
writer and alert delivery keep anyway (plain ints in dicts whose keys are all there from the
start), the writer's :class:`~positiond.metrics.stats.WriterStats`, a few attributes, a
``stat()`` of the database files, and the database's counts on a read-only connection of its
own (:class:`~positiond.metrics.database.DatabaseCounts`). Nothing here runs on the event loop
or takes a lock the loop takes; the receive and write paths only add to their counters.

Every name and its meaning: docs/MONITORING.md (a test keeps the two in step).
"""

from __future__ import annotations

import contextlib
import platform
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from positiond.metrics.database import DatabaseCounts
from positiond.metrics.stats import Buckets
from positiond.status import version
from positiond.store.schema import SCHEMA_VERSION
from positiond_client.protocol import PROTOCOL_VERSION

if TYPE_CHECKING:
    from positiond.server import Daemon

__all__ = ["DaemonCollector", "healthy", "writer_stalled"]


# positiond_protective_orders_total{result}: the protect worker's counters.
PROTECT_RESULTS = ("planned", "placed", "skipped", "failed", "triggered", "cancelled")


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _histogram(name: str, doc: str, buckets: Buckets) -> HistogramMetricFamily:
    cumulative, total = buckets.snapshot()
    family = HistogramMetricFamily(name, doc)
    family.add_metric([], cumulative, total)
    return family


def _labelled(
    family: CounterMetricFamily | GaugeMetricFamily, values: dict[str, int]
) -> CounterMetricFamily | GaugeMetricFamily:
    for label, value in sorted(values.items()):
        family.add_metric([label], value)
    return family


def writer_stalled(daemon: Daemon, now: float) -> float:
    """Seconds the writer has had work it could not commit; 0 while it has nothing to do.

    Read-only (``Daemon.writer_progressing`` also marks an idle writer; this only looks).
    """
    progress, engine = daemon.progress, daemon.engine
    idle = progress.write_started is None and not progress.failing
    if idle and not engine.pending_ops and not engine.batch_due(now):
        return 0.0
    return progress.stalled_for(now)


def healthy(daemon: Daemon, stalled: float) -> bool:
    """What ``Daemon.health()`` calls healthy, from the same values, without side effects."""
    listening = daemon.listener.watch is None or daemon.listener.watch.ok
    return (
        daemon.healthy
        and daemon.storage_fault is None
        and listening
        and (stalled < daemon.stall_limit)
    )


def _size(db: Path) -> int:
    size = 0
    for path in (db, db.with_name(db.name + "-wal")):
        with contextlib.suppress(OSError):
            size += path.stat().st_size
    return size


class DaemonCollector(Collector):
    """Everything under ``positiond_``, from one running :class:`~positiond.server.Daemon`."""

    def __init__(self, daemon: Daemon, counts: DatabaseCounts) -> None:
        self.daemon = daemon
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        yield from self._identity()
        yield from self._database()
        yield from self._traffic()
        yield from self._writer()
        yield from self._alerts()
        yield from self._protective_orders()

    def _protective_orders(self) -> Iterator[Metric]:
        """``[protect]`` on: what the protect worker did, each result from 0 (its counters)."""
        protector = self.daemon.protector
        if protector is None:
            return
        state = dict(protector.state)
        family = CounterMetricFamily(
            "positiond_protective_orders",
            "protective stop orders for crashed legs by result: planned (dry-run: recorded "
            "only), placed at the broker, skipped (flat, ambiguous, no stop, outside the "
            "window), failed (the leg stays unprotected), triggered (filled), cancelled",
            labels=["result"],
        )
        yield _labelled(family, {r: int(state.get(r) or 0) for r in PROTECT_RESULTS})

    def _identity(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "positiond_build_info",
            "positiond's version, protocol and schema; always 1",
            labels=["version", "protocol", "schema", "python", "sqlite"],
        )
        info.add_metric(
            [version(), str(PROTOCOL_VERSION), str(SCHEMA_VERSION), platform.python_version(),
             sqlite3.sqlite_version],
            1,
        )  # fmt: skip
        yield info
        daemon = self.daemon
        now = daemon.monotonic()
        yield _gauge("positiond_healthy", "1 while the daemon calls itself healthy "
                     "(posctl status): writes succeed, writer not stalled, listening",
                     float(healthy(daemon, writer_stalled(daemon, now))))  # fmt: skip
        listening = daemon.listener.health()
        yield _gauge("positiond_connections", "client connections open", listening["connections"])
        yield _gauge("positiond_connection_limit", "client connections served at most",
                     listening["connection_limit"])  # fmt: skip

    def _database(self) -> Iterator[Metric]:
        daemon = self.daemon
        if isinstance(self.counts.db, Path):  # PostgreSQL: the server keeps its own files
            yield _gauge("positiond_database_size_bytes", "database file plus its WAL",
                         _size(self.counts.db))  # fmt: skip
        yield _gauge(
            "positiond_database_writable",
            "1 while commits succeed; 0 while they fail or after a storage fault (the database "
            "was deleted, replaced or damaged: nothing is acknowledged any more)",
            float(daemon.healthy and daemon.storage_fault is None),
        )
        counts = self.counts.get()
        yield _gauge("positiond_database_readable",
                     "1 when the counts below could be read from the database",
                     float(counts is not None))  # fmt: skip
        if counts is None:
            return
        yield _labelled(
            GaugeMetricFamily("positiond_sessions", "sessions in the database by status",
                              labels=["status"]), counts.sessions,
        )  # fmt: skip
        yield _labelled(
            GaugeMetricFamily("positiond_legs", "legs in the database by status",
                              labels=["status"]), counts.legs,
        )  # fmt: skip
        yield _gauge(
            "positiond_attention_legs",
            "what needs a human (posctl crashed): crashed legs, legs flagged NEEDS_REVIEW, legs "
            "left ACTIVE in a finished session, unresolved broker orphans",
            counts.attention,
        )

    def _traffic(self) -> Iterator[Metric]:
        daemon = self.daemon
        engine, router = daemon.engine, daemon.router
        yield _labelled(
            CounterMetricFamily("positiond_messages", "valid messages received, by type",
                                labels=["type"]), dict(engine.by_type),
        )  # fmt: skip
        yield _counter("positiond_bad_messages", "messages refused before the engine "
                       "(undecodable, too large, several frames)",
                       router.counters["bad_messages"])  # fmt: skip
        yield _counter("positiond_acks", "durable messages acknowledged after their commit",
                       engine.counters["acks"])  # fmt: skip
        yield _counter("positiond_error_replies", "messages answered with an error",
                       engine.counters["errors"])  # fmt: skip
        yield _counter("positiond_dropped_replies",
                       "replies not sent: the client was gone or its queue full",
                       router.counters["dropped_replies"])  # fmt: skip
        yield _counter("positiond_refused_connections", "connections refused at the limit",
                       daemon.listener.counters["refused_connections"])  # fmt: skip

    def _writer(self) -> Iterator[Metric]:
        daemon = self.daemon
        stats, engine = daemon.stats, daemon.engine
        yield _labelled(
            CounterMetricFamily("positiond_crashes", "crash verdicts committed, by cause "
                                "(disconnect, heartbeat, not_returned, reported)",
                                labels=["cause"]), dict(stats.crashes),
        )  # fmt: skip
        yield _histogram(
            "positiond_crash_detection_seconds",
            "from a crashed session's last sign of life to its verdict committed (the "
            "daemon's own verdicts)",
            stats.detection_seconds,
        )
        yield _histogram("positiond_commit_duration_seconds", "one batch's SQLite transaction",
                         stats.commit_seconds)  # fmt: skip
        yield _histogram("positiond_batch_ops", "durable messages per committed batch",
                         stats.batch_ops)  # fmt: skip
        yield _histogram("positiond_batch_updates", "coalesced leg updates per committed batch",
                         stats.batch_updates)  # fmt: skip
        yield _counter("positiond_failed_commits", "batches whose commit failed (retried)",
                       stats.failed_commits)  # fmt: skip
        yield _gauge("positiond_pending_ops", "durable messages waiting for their commit",
                     engine.pending_ops)  # fmt: skip
        yield _gauge("positiond_pending_updates", "coalesced leg updates not written yet",
                     engine.pending_updates)  # fmt: skip
        yield _gauge("positiond_writer_stalled_seconds",
                     "how long the writer has had work it could not commit (0 when idle)",
                     writer_stalled(daemon, daemon.monotonic()))  # fmt: skip

    def _alerts(self) -> Iterator[Metric]:
        daemon = self.daemon
        if daemon.delivery is not None:
            family = CounterMetricFamily(
                "positiond_alert_deliveries", "alert delivery attempts by sink and result "
                "(delivered, retried, failed: given up)", labels=["sink", "result"],
            )  # fmt: skip
            for (sink, result), n in sorted(dict(daemon.delivery.by_sink).items()):
                family.add_metric([sink, result], n)
            yield family
        if daemon.reconciler is not None:
            state = dict(daemon.reconciler.state)
            yield _gauge("positiond_reconcile_drift",
                         "legs that differ from the broker's positionbook at the last check",
                         state.get("drift") or 0)  # fmt: skip
            yield _counter("positiond_reconcile_checks", "reconciliations run",
                           state.get("checks") or 0)  # fmt: skip
            yield _counter("positiond_reconcile_failures",
                           "reconciliations that could not read the positionbook",
                           state.get("refused") or 0)  # fmt: skip
