"""What the client knows about its link to the daemon: pure logic, the clock is passed in.

A durable call waits for its ack only while the daemon may answer. It returns at once when the
daemon is **known unreachable**, which is exactly one of:

- ``down``: the connection the client had was lost (the daemon exited or restarted; on tcp://
  also when the daemon left ZeroMQ heartbeats unanswered for ``ack_timeout``), or a connect
  attempt failed after that, or a fresh client's first attempt found no daemon at all (on
  ipc://, no socket file), and no new connection has completed its handshake since;
- ``connecting`` for longer than ``grace``: a fresh client whose first connection has not
  completed its handshake within ``grace`` seconds (``ack_timeout``). Until then a fresh
  client is *not* known unreachable — its failed attempts that may still succeed (on ipc://
  the socket file exists: a daemon starting or busy; on tcp://, any) are retried within the
  grace — so the connect attempt gets a fair chance, and a durable call made at once after
  creating the manager waits for its ack as usual;
- ``unresponsive``: connected, but a durable message sent on this link has been waiting longer
  than ``answer_timeout`` (``ack_timeout``) with no reply of any kind since, or a durable call
  has just waited its whole ``ack_timeout`` in vain (a frozen or stuck daemon keeps its
  connection: the one call that found out paid ``ack_timeout``, the next ones do not). Any
  reply from the daemon makes it ``up`` again.

Everything else (``up``, ``connecting`` within its grace) may answer: a durable call waits for
its ack for up to ``ack_timeout``.

While the daemon stays unreachable the I/O thread logs a warning when that starts and every
``warn_every`` seconds after (never once per call), and once at INFO when it answers again.
"""

from __future__ import annotations

__all__ = ["CONNECTING", "DOWN", "UNRESPONSIVE", "UP", "Link"]

CONNECTING = "connecting"
UP = "up"
DOWN = "down"
UNRESPONSIVE = "unresponsive"


class Link:
    """The link's state machine; every method takes ``now`` (a monotonic clock reading)."""

    def __init__(
        self, now: float, *, grace: float, answer_timeout: float, warn_every: float = 30.0
    ) -> None:
        self.grace = grace
        self.answer_timeout = answer_timeout
        self.warn_every = warn_every
        self._state = CONNECTING
        self._since = now  # when _state began
        self._asked: float | None = None  # oldest durable message unanswered since a reply
        self._overdue: float | None = None  # when a durable call waited ack_timeout in vain
        self._away_since: float | None = None  # when it became known unreachable (logged)
        self._next_warning = 0.0

    # ---- events ----------------------------------------------------------------------------

    def handshake(self, now: float) -> None:
        """A connection completed its ZeroMQ handshake."""
        self._state, self._since, self._asked, self._overdue = UP, now, None, None

    def lost(self, now: float, *, definite: bool = True) -> None:
        """A connection attempt failed, or the connection was lost. A fresh client ignores a
        failed attempt that is not ``definite`` (it may still succeed) during its grace."""
        if self._state == CONNECTING and not definite:
            return
        if self._state != DOWN:
            self._state, self._since, self._asked, self._overdue = DOWN, now, None, None

    def asked(self, now: float) -> None:
        """A durable message (one that will be answered) was sent."""
        if self._state == UP and self._asked is None:
            self._asked = now

    def answered(self, now: float, *, outstanding: bool) -> None:
        """A reply came; ``outstanding``: sent durable messages are still unanswered."""
        self._asked = now if outstanding and self._asked is not None else None
        self._overdue = None

    def overdue(self, now: float) -> None:
        """A durable call waited its whole ``answer_timeout`` and got no answer."""
        if self._state == UP and self._overdue is None:
            self._overdue = now

    # ---- questions -------------------------------------------------------------------------

    def state(self, now: float) -> str:
        """``up``, ``connecting``, ``down`` or ``unresponsive`` (see the module docstring)."""
        if self._state == UP and self._unresponsive_since(now) is not None:
            return UNRESPONSIVE
        return self._state

    def _unresponsive_since(self, now: float) -> float | None:
        since = [] if self._overdue is None else [self._overdue]
        asked = self._asked
        if asked is not None and now - asked > self.answer_timeout:
            since.append(asked + self.answer_timeout)
        return min(since) if since else None

    def unreachable(self, now: float) -> bool:
        """Known unreachable: a durable call returns at once instead of waiting for its ack."""
        state = self.state(now)
        if state == CONNECTING:
            return now - self._since > self.grace
        return state in (DOWN, UNRESPONSIVE)

    def away_for(self, now: float) -> float | None:
        """Seconds since the daemon became known unreachable; None while it is not."""
        if not self.unreachable(now):
            return None
        return now - self._started_away(now)

    def _started_away(self, now: float) -> float:
        state = self.state(now)
        if state == CONNECTING:
            return self._since + self.grace
        if state == UNRESPONSIVE:
            since = self._unresponsive_since(now)
            assert since is not None
            return since
        return self._since

    def report(self, now: float) -> tuple[str, float] | None:
        """What to log now, if anything: ``("away", seconds)`` when the daemon became known
        unreachable and every ``warn_every`` seconds while it stays so, ``("back", seconds)``
        once when it answers again after that."""
        if self.unreachable(now):
            if self._away_since is None:
                self._away_since = self._started_away(now)
                self._next_warning = now + self.warn_every
                return ("away", now - self._away_since)
            if now >= self._next_warning:
                self._next_warning = now + self.warn_every
                return ("away", now - self._away_since)
            return None
        if self._away_since is not None and self.state(now) == UP:
            away, self._away_since = now - self._away_since, None
            return ("back", away)
        return None
