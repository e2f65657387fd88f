"""A stand-in for OpenAlgo's REST API: the broker is the one edge where tests use a fake.

In ``bench`` because the benchmarks use it too and never import the tests (tests/fake_openalgo.py
re-exports it). Standard library only: ``http.server`` in a thread, bound to 127.0.0.1 port 0
(the port is read back, never guessed). Deterministic: every answer can be configured
(:meth:`FakeOpenAlgo.reply`), an answer can be delayed (timeouts), and every request is recorded
with its parsed JSON body (:attr:`FakeOpenAlgo.requests`) — the Telegram notify endpoint only
records and answers 200.

An order book (:class:`bench.fake_orders.Orders`, :attr:`FakeOpenAlgo.orders`) answers
``placeorder``, ``cancelorder``, ``orderstatus`` and ``orderbook`` in OpenAlgo's shapes, with a
positionbook that reflects fills, a trigger the test fires, rejections, hangs and OpenAlgo's
order rate limit. Account-wide calls (``closeposition``, ``placesmartorder``,
``cancelallorder``) are answered with an error and recorded: :meth:`FakeOpenAlgo.forbidden`.

Also runnable, to try crash -> verify on one machine without a broker (examples/README.md)::

    python examples/fake_openalgo.py --port 5000 --api-key KEY --positionbook book.json
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

__all__ = [
    "ACCOUNT_WIDE",
    "FakeOpenAlgo",
    "Received",
    "Reply",
    "book",
    "main",
]

INVALID_KEY = {"status": "error", "message": "Invalid openalgo apikey"}
# Calls that act on the whole account: positiond must never send them.
ACCOUNT_WIDE = ("closeposition", "placesmartorder", "cancelallorder")


@dataclass(frozen=True)
class Reply:
    """What the fake answers: an HTTP status, a body (JSON value, or raw bytes), after a delay."""

    body: Any = None
    status: int = 200
    delay: float = 0.0


@dataclass(frozen=True)
class Received:
    """One request as the fake saw it."""

    path: str
    body: Any  # parsed JSON, or the raw text when it was not JSON
    headers: dict[str, str] = field(default_factory=dict)


class _Server(ThreadingHTTPServer):
    # A backlog of 5 (socketserver's default) resets connections when many orders arrive at
    # once (24 legs of one strategy): the client reads that as a failure of its call.
    request_queue_size = 128


def book(*rows: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A positionbook reply: ``{"status": "success", "data": rows, **extra}``."""
    return {"status": "success", "data": list(rows), **extra}


class FakeOpenAlgo:
    """``with FakeOpenAlgo(api_key="k") as fake: fake.url ...``; stop() joins the thread."""

    def __init__(self, api_key: str | None = None, port: int = 0) -> None:
        from bench.fake_orders import Orders

        self.api_key = api_key  # None: any key is accepted
        self.requests: list[Received] = []
        self.orders = Orders()
        self._replies: dict[str, Reply | Callable[[Any], Reply]] = {
            "/api/v1/positionbook": lambda _body: Reply(book(*self.orders.positionbook())),
            "/api/v1/telegram/notify": Reply({"status": "success", "message": "sent"}),
            **{f"/api/v1/{name}": self._order_call(name) for name in self.orders.CALLS},
            **{
                f"/api/v1/{name}": Reply(
                    {"status": "error", "message": f"{name}: refused by the fake"}, 400
                )
                for name in ACCOUNT_WIDE
            },
        }
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = _Server(("127.0.0.1", port), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def reply(self, name: str, answer: Reply | Callable[[Any], Reply]) -> None:
        """Answer ``POST /api/v1/<name>`` with this (a callable gets each request's body)."""
        with self._lock:
            self._replies[f"/api/v1/{name}"] = answer

    def received(self, name: str) -> list[Any]:
        """The JSON bodies received on ``/api/v1/<name>``, in order."""
        with self._lock:
            return [r.body for r in self.requests if r.path == f"/api/v1/{name}"]

    def forbidden(self) -> list[Received]:
        """Every account-wide call received (must stay empty: positiond never sends one)."""
        paths = {f"/api/v1/{name}" for name in ACCOUNT_WIDE}
        with self._lock:
            return [r for r in self.requests if r.path in paths]

    def _order_call(self, name: str) -> Callable[[Any], Reply]:
        def answer(body: Any) -> Reply:
            status, data, delay = self.orders.call(name, body if isinstance(body, dict) else {})
            return Reply(data, status, delay)

        return answer

    def stop(self) -> None:
        self._stopping.set()  # delayed answers end now
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> FakeOpenAlgo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _answer(self, path: str, body: Any) -> Reply:
        with self._lock:
            answer = self._replies.get(path)
        if answer is None:
            return Reply({"status": "error", "message": f"no such endpoint {path}"}, 404)
        if self.api_key is not None and (
            not isinstance(body, dict) or body.get("apikey") != self.api_key
        ):
            return Reply(INVALID_KEY, 403)
        return answer(body) if callable(answer) else answer

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body: Any = json.loads(raw)
                except ValueError:
                    body = raw.decode("utf-8", "replace")
                with fake._lock:
                    fake.requests.append(Received(self.path, body, dict(self.headers.items())))
                answer = fake._answer(self.path, body)
                if answer.delay:
                    fake._stopping.wait(answer.delay)  # the client's timeout is under test
                data = (
                    answer.body
                    if isinstance(answer.body, bytes)
                    else json.dumps(answer.body).encode()
                )
                try:
                    self.send_response(answer.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test): nothing to answer

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet: requests are in fake.requests

        return Handler


def main(argv: Sequence[str] | None = None) -> int:
    """Serve a fake OpenAlgo until interrupted; the positionbook file is re-read per request."""
    parser = argparse.ArgumentParser(
        prog="fake_openalgo",
        description="A fake OpenAlgo REST API for trying posctl verify --openalgo without a "
        "broker: POST /api/v1/positionbook answers the positionbook file (re-read at each "
        "request; an OpenAlgo reply or a list of rows), /api/v1/telegram/notify prints what "
        "it received.",
    )
    parser.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (0: any)")
    parser.add_argument("--api-key", help="the only API key accepted (default: any)")
    parser.add_argument(
        "--positionbook", type=Path, metavar="FILE", help="JSON positionbook (default: empty)"
    )
    args = parser.parse_args(argv)
    fake = FakeOpenAlgo(api_key=args.api_key, port=args.port)

    def positionbook(_body: Any) -> Reply:
        if args.positionbook is None:
            return Reply(book())
        try:
            data = json.loads(args.positionbook.read_text())
        except (OSError, ValueError) as exc:
            return Reply({"status": "error", "message": f"positionbook file: {exc}"}, 500)
        return Reply(data if isinstance(data, dict) else book(*data))

    def notify(body: Any) -> Reply:
        if isinstance(body, dict):
            print(f"telegram to {body.get('username')}: {body.get('message')}", flush=True)
        return Reply({"status": "success", "message": "sent"})

    fake.reply("positionbook", positionbook)
    fake.reply("telegram/notify", notify)
    print(f"fake OpenAlgo listening on {fake.url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
