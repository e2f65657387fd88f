"""The HTTP endpoint: ``GET /metrics`` on a thread of its own, served by prometheus_client.

Started by the daemon only when ``metrics_listen`` is set. Each scrape runs
:class:`~positiond.metrics.collector.DaemonCollector` in the server's thread; the event loop
never waits for it. A failing scrape is answered 500 and logged; it cannot stop the daemon.
"""

from __future__ import annotations

import errno
import logging
import socket
import sys
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.process_collector import ProcessCollector

from positiond.metrics.collector import DaemonCollector
from positiond.metrics.database import DatabaseCounts
from positiond.metrics.listen import Listen, MetricsError

if TYPE_CHECKING:
    from positiond.server import Daemon

__all__ = ["MetricsEndpoint", "registry_for"]

log = logging.getLogger(__name__)

PATH = "/metrics"
# socket() refused: RestrictAddressFamilies= (EAFNOSUPPORT) or a seccomp/LSM rule (EPERM, EACCES).
SANDBOXED = (errno.EAFNOSUPPORT, errno.EPERM, errno.EACCES)
IDLE_TIMEOUT = 5.0  # seconds; a scrape takes milliseconds
StartResponse = Callable[..., Any]


class _Quiet(WSGIRequestHandler):
    # A scraper that connects and says nothing (or stops reading) holds one thread: it is
    # dropped after this many seconds of silence, so such connections cannot pile up.
    timeout = IDLE_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per scrape would drown the daemon's log


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a hung scraper never holds up the daemon's exit

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Not socketserver's traceback on stderr: a scraper gone silent or away is routine."""
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            log.debug("metrics: dropped the connection from %s: %s", client_address, exc)
        else:
            log.error("metrics: error serving %s", client_address, exc_info=exc)


def registry_for(daemon: Daemon, counts: DatabaseCounts) -> CollectorRegistry:
    """positiond's metrics plus the process' own (CPU seconds, memory, fds, start time)."""
    registry = CollectorRegistry()
    registry.register(DaemonCollector(daemon, counts))
    ProcessCollector(registry=registry)
    return registry


class MetricsEndpoint:
    """``start()`` binds and serves (returns the URL), ``stop()`` closes."""

    def __init__(self, daemon: Daemon, listen: Listen) -> None:
        self.listen = listen
        self.counts = DatabaseCounts(daemon.config.db, busy_timeout=1.0)
        self.registry = registry_for(daemon, self.counts)
        self._httpd: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.url: str | None = None

    def _app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != PATH:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"positiond serves its metrics at /metrics\n"]
        try:
            return self._metrics(environ, start_response)  # type: ignore[no-any-return]
        except Exception:  # a bug in a collector must cost one scrape, nothing more
            log.exception("metrics: a scrape failed")
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
            return [b"scrape failed; see the daemon's log\n"]

    def start(self) -> str:
        host, port = self.listen
        self._metrics = make_wsgi_app(self.registry)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_class = type("_Bound", (_Server,), {"address_family": family})
        try:
            httpd: WSGIServer = make_server(
                host, port, self._app, server_class, handler_class=_Quiet
            )
        except OSError as exc:
            text = f"cannot serve metrics on {host}:{port}: {exc.strerror}"
            if exc.errno in SANDBOXED:
                text += (
                    " (under systemd the unit allows unix sockets only: see "
                    "docs/MONITORING.md, 'Under systemd')"
                )
            raise MetricsError(text, permanent=exc.errno != errno.EADDRINUSE) from None
        bound = httpd.socket.getsockname()[1]
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.2},
            name="positiond-metrics", daemon=True,
        )  # fmt: skip
        self._thread.start()
        self.url = Listen(host, bound).url()
        log.info("metrics: %s", self.url)
        return self.url

    def stop(self) -> None:
        """Stop serving (waits for the server's loop, at most its poll interval)."""
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.counts.close()
