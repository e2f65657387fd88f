"""Prometheus metrics (``metrics_listen``; docs/MONITORING.md).

- :mod:`~positiond.metrics.listen`: the address setting, checked (no prometheus_client needed);
- :mod:`~positiond.metrics.stats`: what the writer counts per committed batch (plain numbers);
- :mod:`~positiond.metrics.database`: the database's counts, on a read-only connection;
- :mod:`~positiond.metrics.collector`: every ``positiond_*`` family, read at scrape time;
- :mod:`~positiond.metrics.endpoint`: the HTTP server thread (needs the ``metrics`` extra).

Only the first two are imported by the daemon unless an endpoint is configured.
"""

__all__: list[str] = []
