"""The progress watch: which sessions hold open legs without an update for too long.

A session may announce a ``progress_deadline`` in its start: a strategy that keeps sending
heartbeats but stopped monitoring its legs (a hung loop, a dead feed) is then marked STALLED.
Pure bookkeeping: every call takes the (observed, monotonic) ``now``; the
:class:`~positiond.engine.Engine` turns what it returns into log lines and stall ops.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Overdue", "ProgressWatch"]


@dataclass(slots=True)
class _Watched:
    deadline: float | None
    last: float  # when it last made progress (entry, update, exit)
    stalled: bool = False


@dataclass(frozen=True, slots=True)
class Overdue:
    """A session that just became STALLED."""

    key: str
    last: float  # its last progress, on the clock the watch was given
    deadline: float
    idle: float  # how long it has gone without progress


class ProgressWatch:
    """Per session: its deadline (if any), its last progress, whether it is stalled."""

    def __init__(self) -> None:
        self._sessions: dict[str, _Watched] = {}
        self._deadlined: set[str] = set()  # only these are looked at each tick

    def watch(self, key: str, deadline: float | None, now: float) -> None:
        """A session (re)started or was loaded: its deadline, progress counted from ``now``."""
        watched = self._sessions.get(key)
        if watched is None:
            self._sessions[key] = _Watched(deadline, now)
        else:
            watched.deadline, watched.last = deadline, now
        if deadline is None:
            self._deadlined.discard(key)
        else:
            self._deadlined.add(key)

    def mark_stalled(self, key: str) -> None:
        """Loaded as STALLED: it stays so until its next progress."""
        watched = self._sessions.get(key)
        if watched is not None:
            watched.stalled = True

    def progress(self, key: str, now: float) -> bool:
        """The session made progress at ``now``; True when that ends a stall."""
        watched = self._sessions.get(key)
        if watched is None:
            return False
        watched.last = now
        if watched.stalled:
            watched.stalled = False
            return True
        return False

    def stalled(self, key: str) -> bool:
        watched = self._sessions.get(key)
        return watched is not None and watched.stalled

    def forget(self, key: str) -> None:
        self._sessions.pop(key, None)
        self._deadlined.discard(key)

    def overdue(self, now: float, has_legs: Callable[[str], bool]) -> list[Overdue]:
        """Mark and return the sessions with open legs whose deadline passed (once each)."""
        found = []
        for key in self._deadlined:
            watched = self._sessions[key]
            deadline = watched.deadline
            if (
                deadline is not None
                and not watched.stalled
                and now - watched.last > deadline
                and has_legs(key)
            ):
                watched.stalled = True
                found.append(Overdue(key, watched.last, deadline, now - watched.last))
        return found
