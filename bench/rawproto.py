"""A bare protocol client (docs/PROTOCOL.md): one DEALER, no I/O thread, blocking round trips.

It measures the daemon without the client library's thread hops, and it is the load generator
that holds a thousand sessions from one process. Every session proposes its own token in its
``start`` and repeats it in every message.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import orjson
import zmq

__all__ = ["RawClient", "RawSession"]


class RawSession:
    """One session's identity and message builders (seq numbers are the client's)."""

    def __init__(self, strategy: str) -> None:
        self.key = secrets.token_hex(16)
        self.token = secrets.token_hex(16)
        self.strategy = strategy
        self._seq = 0

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _base(self, kind: str) -> dict[str, Any]:
        return {"v": 1, "type": kind, "session": self.key, "token": self.token}

    def start(self) -> dict[str, Any]:
        msg = self._base("start")
        msg.update(seq=self.next_seq(), strategy=self.strategy, heartbeat_interval=0.5)
        return msg

    def entry(self, key: str, price: float = 100.0) -> dict[str, Any]:
        msg = self._base("entry")
        msg.update(
            seq=self.next_seq(), key=key, symbol="NIFTY28NOV2524000CE", exchange="NFO",
            product="MIS", leg_type="CE", side="BUY", quantity=75, entry_price=price,
            stop_price=price * 0.9,
        )  # fmt: skip
        return msg

    def exit(self, key: str, price: float = 95.0) -> dict[str, Any]:
        msg = self._base("exit")
        msg.update(seq=self.next_seq(), key=key, exit_price=price, exit_reason="BENCH")
        return msg

    def sync(self) -> dict[str, Any]:
        msg = self._base("sync")
        msg["seq"] = self.next_seq()
        return msg

    def end(self) -> dict[str, Any]:
        msg = self._base("end")
        msg["seq"] = self.next_seq()
        return msg

    def update(self, key: str, current_price: float) -> bytes:
        msg = self._base("update")
        msg.update(key=key, current_price=current_price)
        return orjson.dumps(msg)

    def heartbeat(self) -> bytes:
        return orjson.dumps(self._base("hb"))


class RawClient:
    """A DEALER to ``endpoint``; ``call`` sends one message and waits for its answer."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, payload: bytes) -> None:
        self.sock.send(payload)

    def call(self, msg: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        """Send and wait for the ack/error with the same seq; raise on an error or timeout."""
        self.sock.send(orjson.dumps(msg))
        answers = self.collect({msg["seq"]}, timeout)
        return answers[msg["seq"]]

    def collect(self, seqs: set[int], timeout: float = 30.0) -> dict[int, dict[str, Any]]:
        """Wait for the answers to ``seqs`` (sent already, pipelined); raise on an error."""
        wanted = set(seqs)
        answers: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        while wanted:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.sock.poll(int(remaining * 1000) + 1):
                raise TimeoutError(f"{len(wanted)} answer(s) missing after {timeout:.1f}s")
            reply = orjson.loads(self.sock.recv())
            seq = reply.get("seq")
            if seq not in wanted:
                continue  # a ping, or an answer to something else
            if reply.get("type") != "ack":
                raise RuntimeError(f"positiond refused seq {seq}: {reply}")
            wanted.discard(seq)
            answers[seq] = reply
        return answers

    def drain(self) -> int:
        """Throw away whatever answers are waiting (pings); how many."""
        count = 0
        while self.sock.poll(0):
            self.sock.recv()
            count += 1
        return count

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()
