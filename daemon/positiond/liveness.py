"""Who is alive: heartbeat bookkeeping with an injected clock (no I/O, no sleeping).

Any message from a session counts as a heartbeat. A session whose last message is older than the
timeout is expired; so is a session loaded at daemon start that never came back.

Silence is only evidence while the daemon itself is listening. Ages are therefore measured on
the :class:`DaemonClock`, the daemon's *observed* time: monotonic time minus the gaps in the
daemon's own progress (SIGSTOP, a suspended VM, a starved or blocked event loop, a stepped
clock). During such a gap the strategies go on heartbeating into the socket; their messages are
read once the daemon runs again, so a gap must not age anyone. Of each gap only
:data:`MAX_STEP` counts: a session silent before the gap (hung, or dead without a dropped
connection) is still declared dead within its timeout plus that step of the daemon's running
time after the gap.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from enum import Enum

__all__ = ["MAX_STEP", "MIN_HEARTBEATS", "DaemonClock", "Expired", "Liveness", "Verdict"]

log = logging.getLogger(__name__)

# The daemon observes its clock at least every tick (50 ms at most) while it runs. A step
# between two observations longer than this means it did not run: a gap, of which only this
# much counts. A timeout of at least MIN_HEARTBEATS intervals leaves a healthy client one
# interval (0.5 s by default) of slack; a gap takes at most this much of it, the rest is the
# daemon's time to read the queued heartbeat. A starved loop (steps longer than this) makes
# observed time run slower: verdicts come later, never earlier.
MAX_STEP = 0.1
# A timeout must span at least this many heartbeat intervals of the client: one late or lost
# heartbeat must not be a verdict.
MIN_HEARTBEATS = 2.0
# How many gaps are remembered to convert observed instants back to monotonic ones.
_GAP_MEMORY = 256


class DaemonClock:
    """The daemon's observed time: monotonic seconds during which the daemon was running.

    ``observe(raw)`` takes the monotonic time and returns the observed time, which never moves
    backwards and advances by at most ``max_step`` between two observations. Without gaps it
    equals the monotonic time exactly.
    """

    def __init__(self, raw_start: float, max_step: float = MAX_STEP) -> None:
        if max_step <= 0:
            raise ValueError("max_step must be positive")
        self.max_step = max_step
        self._raw = raw_start  # the latest monotonic time observed
        self._excluded = 0.0  # seconds of gaps not counted
        self.gaps = 0
        # (observed instant the gap ended, excluded before it, excluded after it)
        self._marks: deque[tuple[float, float, float]] = deque(maxlen=_GAP_MEMORY)

    @property
    def excluded(self) -> float:
        """Seconds of monotonic time that were gaps in the daemon's progress."""
        return self._excluded

    def now(self) -> float:
        """The observed time of the latest observation."""
        return self._raw - self._excluded

    def observe(self, raw: float) -> float:
        """Advance to monotonic ``raw``; return the observed time.

        An earlier ``raw`` than the latest (a timestamp taken before a gap was seen) reads as
        the latest: observed time never moves backwards.
        """
        step = raw - self._raw
        if step > self.max_step:
            before = self._excluded
            self._excluded = before + step - self.max_step
            self._marks.append((raw - self._excluded, before, self._excluded))
            self.gaps += 1
            level = logging.WARNING if step >= 1.0 else logging.DEBUG
            log.log(
                level,
                "the daemon did not run for %.2fs (stopped, suspended, starved or blocked): "
                "that time does not count towards any heartbeat or progress deadline",
                step,
            )
            self._raw = raw
        elif step > 0:
            self._raw = raw
        return self._raw - self._excluded

    def raw(self, observed: float) -> float:
        """The monotonic time of an observed instant (for reporting wall-clock times)."""
        excluded = self._excluded
        for mark, before, after in reversed(self._marks):
            if observed >= mark:
                return observed + after
            excluded = before
        return observed + excluded


class Verdict(Enum):
    """Why a session is declared dead; each maps to a crash_reason and crash_source."""

    MISSED_HEARTBEATS = "HEARTBEAT"
    NOT_RETURNED = "RESTART"


@dataclass(frozen=True, slots=True)
class Expired:
    session_key: str
    verdict: Verdict
    last_seen: float  # on the clock given to seen()/expect_return()
    timeout: float  # the one applied to this session


class Liveness:
    """Tracks the last time each session was heard from; ``expired(now)`` names the dead.

    ``now`` is always passed in (the daemon's observed time, any number in tests), so the caller
    decides what time it is and tests step it explicitly. A session that announced its
    heartbeat interval is given at least :data:`MIN_HEARTBEATS` intervals whatever the timeout.
    """

    def __init__(self, timeout: float) -> None:
        if timeout <= 0:
            raise ValueError("heartbeat timeout must be positive")
        self.timeout = timeout
        self._last: dict[str, float] = {}
        self._returning: set[str] = set()
        self._floor: dict[str, float] = {}  # session -> the least timeout its interval needs

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

    def announce(self, session_key: str, interval: float | None) -> None:
        """The session heartbeats every ``interval`` seconds (None: unknown: the timeout rules)."""
        if interval is None:
            self._floor.pop(session_key, None)
        else:
            self._floor[session_key] = MIN_HEARTBEATS * interval

    def timeout_for(self, session_key: str) -> float:
        """The timeout applied to the session: the daemon's, or more if its interval needs it."""
        return max(self.timeout, self._floor.get(session_key, 0.0))

    def forget(self, session_key: str) -> None:
        """Stop watching the session (it ended, crashed, or was declared dead)."""
        self._last.pop(session_key, None)
        self._returning.discard(session_key)
        self._floor.pop(session_key, None)

    def last_seen(self, session_key: str) -> float | None:
        return self._last.get(session_key)

    def expired(self, now: float) -> list[Expired]:
        """Remove and return every session not heard from within its timeout, oldest first."""
        limit = now - self.timeout
        dead = [(seen, key) for key, seen in self._last.items() if seen < limit]
        if self._floor:
            floor = self._floor
            dead = [(seen, key) for seen, key in dead if seen < now - floor.get(key, 0.0)]
        dead.sort()
        result = []
        for seen, key in dead:
            verdict = Verdict.NOT_RETURNED if key in self._returning else Verdict.MISSED_HEARTBEATS
            result.append(Expired(key, verdict, seen, self.timeout_for(key)))
            self.forget(key)
        return result

    def next_deadline(self) -> float | None:
        """The earliest moment at which some session could expire (None if none watched)."""
        if not self._last:
            return None
        return min(seen + self.timeout_for(key) for key, seen in self._last.items())
