"""A raw watcher for the tests: one DEALER speaking ``watch`` / ``watching`` (PROTOCOL.md §4.14)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson
import zmq

from tests.helpers import UNIT

__all__ = ["RawWatcher", "kinds"]


class RawWatcher:
    """Subscribes on ``endpoint``; :meth:`until` reads frames (reporting progress, as a
    well-behaved watcher does) until a condition on the events seen holds."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> None:
        self.sock: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.events: list[dict[str, Any]] = []
        self.frames: list[dict[str, Any]] = []
        self.seq = 0

    def subscribe(self, strategy: str | None = None, timeout: float = 5.0) -> dict[str, Any]:
        """Send ``watch``; the ack (or error) that answers it."""
        self.seq += 1
        msg: dict[str, Any] = {"v": 1, "type": "watch", "seq": self.seq}
        if strategy is not None:
            msg["strategy"] = strategy
        self.sock.send(orjson.dumps(msg))
        while True:
            reply = self.recv(timeout)
            assert reply is not None, "no answer to watch"
            if reply.get("seq") == self.seq:
                return reply

    def recv(self, timeout: float = 5.0) -> dict[str, Any] | None:
        if not self.sock.poll(int(timeout * UNIT * 1000)):
            return None
        msg: dict[str, Any] = orjson.loads(self.sock.recv())
        return msg

    def report(self, n: int) -> None:
        self.sock.send(orjson.dumps({"v": 1, "type": "watching", "n": n}))

    def until(
        self, condition: Callable[[list[dict[str, Any]]], bool], timeout: float = 10.0
    ) -> list[dict[str, Any]]:
        """Read and report until ``condition(events)``; fail after ``timeout`` units."""
        deadline = time.monotonic() + timeout * UNIT
        while not condition(self.events):
            left = deadline - time.monotonic()
            assert left > 0, f"not seen in time; events: {self.events[-10:]}"
            msg = self.recv(left / UNIT)
            if msg is None:
                continue
            self.frames.append(msg)
            if msg["type"] in ("changes", "health"):
                self.report(msg["n"])
            if msg["type"] == "changes":
                self.events.extend(msg["events"])
        return self.events

    def close(self) -> None:
        self.sock.close(linger=0)


def kinds(events: list[dict[str, Any]], kind: str, **match: Any) -> list[dict[str, Any]]:
    """The events of ``kind`` whose fields include ``match``."""
    return [
        e for e in events if e["event"] == kind and all(e.get(k) == v for k, v in match.items())
    ]
