"""A durable message waiting for its ack, and how its sender learns the outcome."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, ClassVar

from positiond_client.errors import PositiondError
from positiond_client.protocol import encode

__all__ = ["Delivery", "Pending"]

log = logging.getLogger(__name__)


class Delivery(int):
    """What a durable call's message became by the time the call returned.

    Only ``STORED`` is true (``if pm.save_position_exit(...):`` reads as "stored"); it is an
    ``int`` (1 or 0) so that code written for the former ``bool`` results, ``json.dumps``
    included, keeps working. Neither false value loses anything: the message stays in the
    client's outbox and is re-sent until the daemon acknowledges it.

    - ``Delivery.STORED``: acknowledged, i.e. committed to the daemon's database;
    - ``Delivery.QUEUED``: the daemon is known unreachable (``pm.connected`` is false): the
      call returned at once;
    - ``Delivery.UNANSWERED``: sent, but not acknowledged within ``ack_timeout``.

    Compare with ``is``: ``leg.delivery is Delivery.QUEUED``.
    """

    STORED: ClassVar[Delivery]
    QUEUED: ClassVar[Delivery]
    UNANSWERED: ClassVar[Delivery]
    name: str

    def __new__(cls, stored: bool, name: str) -> Delivery:
        self = super().__new__(cls, 1 if stored else 0)
        self.name = name
        return self

    def __repr__(self) -> str:
        return f"Delivery.{self.name}"

    __str__ = __repr__


Delivery.STORED = Delivery(True, "STORED")
Delivery.QUEUED = Delivery(False, "QUEUED")
Delivery.UNANSWERED = Delivery(False, "UNANSWERED")


class Pending:
    """A durable message waiting for its ack (or error)."""

    __slots__ = (
        "_answered",
        "_done",
        "_lock",
        "callbacks",
        "error",
        "key",
        "kind",
        "msg",
        "payload",
        "result",
        "sent_at",
        "seq",
    )

    def __init__(self, seq: int, msg: dict[str, Any]) -> None:
        self.seq = seq
        self.msg = msg
        self.kind: str = msg["type"]
        self.key: str | None = msg.get("key")
        self.payload = encode(msg)
        self.result: dict[str, Any] | None = None
        self.error: PositiondError | None = None
        self.sent_at: float | None = None
        self.callbacks: list[Callable[[Pending], None]] = []
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._answered = False

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def answered(self) -> bool:
        """Answered (ack or error); true already while the answer's callbacks run."""
        return self._answered

    def wait(self, timeout: float | None) -> bool:
        """True once answered (ack or error) within ``timeout`` seconds."""
        return self._done.wait(timeout)

    def add_callback(self, fn: Callable[[Pending], None]) -> None:
        """Call ``fn(self)`` on the I/O thread when answered (at once if already answered)."""
        with self._lock:
            answered = self._answered
            if not answered:
                self.callbacks.append(fn)
        if answered:
            fn(self)

    def _finish(self, result: dict[str, Any] | None, error: PositiondError | None) -> None:
        with self._lock:
            self.result, self.error = result, error
            self._answered = True
            callbacks, self.callbacks = self.callbacks, []
        for fn in callbacks:
            try:
                fn(self)
            except Exception:
                log.exception("callback for %s failed", self.kind)
        # Waiters wake only now, so what the callbacks fill in (position_id...) is there.
        self._done.set()
