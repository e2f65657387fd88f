"""Who is alive: heartbeat bookkeeping with an injected clock (no I/O, no sleeping).

Any message from a session counts as a heartbeat. A session whose last message is older than the
timeout is expired; so is a session loaded at daemon start that never came back.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

__all__ = ["Expired", "Liveness", "Verdict"]


class Verdict(Enum):
    """Why a session is declared dead; each maps to a crash_reason and crash_source."""

    MISSED_HEARTBEATS = "HEARTBEAT"
    NOT_RETURNED = "RESTART"


@dataclass(frozen=True, slots=True)
class Expired:
    session_key: str
    verdict: Verdict
    last_seen: float  # on the clock given to seen()/expect_return()


class Liveness:
    """Tracks the last time each session was heard from; ``expired(now)`` names the dead.

    ``now`` is always passed in (monotonic seconds in the daemon, any number in tests), so the
    caller decides what time it is and tests step it explicitly.
    """

    def __init__(self, timeout: float) -> None:
        if timeout <= 0:
            raise ValueError("heartbeat timeout must be positive")
        self.timeout = timeout
        self._last: dict[str, float] = {}
        self._returning: set[str] = set()

    def __len__(self) -> int:
        return len(self._last)

    def __contains__(self, session_key: object) -> bool:
        return session_key in self._last

    def seen(self, session_key: str, now: float) -> None:
        """Record a message from the session at ``now``."""
        self._last[session_key] = now
        if self._returning:
            self._returning.discard(session_key)

    def expect_return(self, session_key: str, now: float) -> None:
        """A session that was RUNNING when the daemon stopped: it has one timeout to come back."""
        self._last[session_key] = now
        self._returning.add(session_key)

    def forget(self, session_key: str) -> None:
        """Stop watching the session (it ended, crashed, or was declared dead)."""
        self._last.pop(session_key, None)
        self._returning.discard(session_key)

    def last_seen(self, session_key: str) -> float | None:
        return self._last.get(session_key)

    def expired(self, now: float) -> list[Expired]:
        """Remove and return every session not heard from within the timeout, oldest first."""
        limit = now - self.timeout
        dead = [(seen, key) for key, seen in self._last.items() if seen < limit]
        dead.sort()
        result = []
        for seen, key in dead:
            verdict = Verdict.NOT_RETURNED if key in self._returning else Verdict.MISSED_HEARTBEATS
            result.append(Expired(key, verdict, seen))
            self.forget(key)
        return result

    def next_deadline(self) -> float | None:
        """The earliest moment at which some session could expire (None if none watched)."""
        if not self._last:
            return None
        return min(self._last.values()) + self.timeout
