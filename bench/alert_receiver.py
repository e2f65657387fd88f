"""A real webhook receiver for the alert tests and the ``alerts`` benchmark: http.server on
127.0.0.1, port 0, in a thread (in ``bench`` because the benchmarks never import the tests).

It records every POST (path, headers, JSON body, arrival time); it also stands in for the
Telegram Bot API (tests/test_alert_human.py: path ``/bot<token>/sendMessage``). ``statuses``
lists the status codes of the first answers (then 200); ``hang`` set makes it hold every
request unanswered until :meth:`close`.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["Receiver"]


class Receiver:
    def __init__(self, statuses: list[int] | None = None, hang: bool = False) -> None:
        self.posts: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.statuses = list(statuses or [])
        self.hang = hang
        self.released = threading.Event()
        self.lock = threading.Lock()
        self.arrived: list[float] = []  # time.perf_counter() of each POST, in order
        self.times: list[float] = []  # time.monotonic() of each POST, in order
        self.paths: list[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length))
                with receiver.lock:
                    receiver.arrived.append(time.perf_counter())
                    receiver.times.append(time.monotonic())
                    receiver.paths.append(self.path)
                    receiver.posts.append(body)
                    receiver.headers.append(dict(self.headers))
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                if receiver.hang:
                    receiver.released.wait(120)
                    return
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/positiond"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def ids(self) -> set[str]:
        """The distinct alert ids received (a receiver that dedupes by id)."""
        with self.lock:
            return {p["id"] for p in self.posts}

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
