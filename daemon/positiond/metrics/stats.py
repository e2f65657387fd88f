"""What the writer measures for the metrics endpoint: plain numbers, no I/O, no locks.

The event loop calls :meth:`WriterStats.committed` once per committed batch (never per message);
the scrape thread only copies the numbers (:meth:`Buckets.snapshot`). A copy taken while the
loop adds one observation may show it in the buckets and not yet in the sum: a histogram's
count is read from its buckets, so count and buckets always agree.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field

from positiond.ops import CLIENT, DISCONNECT, HEARTBEAT, RESTART, Batch, CrashOp, Result

__all__ = [
    "BATCH_BUCKETS",
    "CAUSES",
    "COMMIT_BUCKETS",
    "DETECTION_BUCKETS",
    "Buckets",
    "WriterStats",
    "cause_of",
]

# strategy_sessions.crash_source -> the ``cause`` label of positiond_crashes_total.
CAUSES = {DISCONNECT: "disconnect", HEARTBEAT: "heartbeat", RESTART: "not_returned",
          CLIENT: "reported"}  # fmt: skip

COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                  5.0, 10.0)  # fmt: skip
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)
# A kill -9 on ipc is seen in milliseconds; missed heartbeats take the heartbeat timeout.
DETECTION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0,
                     60.0, 300.0)  # fmt: skip


def cause_of(source: str) -> str:
    return CAUSES.get(source, source.lower())


class Buckets:
    """A histogram as plain counts: ``counts[i]`` observations <= ``bounds[i]``, the last one
    for +Inf (not cumulative: one increment per observation)."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self) -> tuple[list[tuple[str, float]], float]:
        """Cumulative ``[(le, count), ..., ("+Inf", total)]`` and the sum."""
        counts, total = list(self.counts), self.sum  # list() of ints: one step under the GIL
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip((*(repr(b) for b in self.bounds), "+Inf"), counts, strict=True):
            running += n
            out.append((bound, running))
        return out, total

    @property
    def count(self) -> int:
        return sum(self.counts)


@dataclass
class WriterStats:
    """Commits, their sizes and durations, and the crash verdicts they made durable."""

    commit_seconds: Buckets = field(default_factory=lambda: Buckets(COMMIT_BUCKETS))
    batch_ops: Buckets = field(default_factory=lambda: Buckets(BATCH_BUCKETS))
    batch_updates: Buckets = field(default_factory=lambda: Buckets(BATCH_BUCKETS))
    detection_seconds: Buckets = field(default_factory=lambda: Buckets(DETECTION_BUCKETS))
    crashes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CAUSES.values(), 0))
    failed_commits: int = 0

    def committed(self, batch: Batch, results: list[Result], seconds: float, wall: float) -> None:
        """A batch committed after ``seconds``, at ``wall``: count it and its crash verdicts.

        A crash counts once it is durable and took (not a repeat of one already recorded).
        Its detection delay is from the session's last sign of life (its latest message; for
        a session that did not return after a restart, the daemon's start) to ``wall``; a
        strategy's own report is counted but has no detection delay.
        """
        self.commit_seconds.observe(seconds)
        self.batch_ops.observe(len(batch.ops))
        self.batch_updates.observe(len(batch.updates))
        for op, res in zip(batch.ops, results, strict=False):
            if not isinstance(op, CrashOp) or not res.ok or res.data.get("duplicate"):
                continue
            cause = cause_of(op.source)
            self.crashes[cause] = self.crashes.get(cause, 0) + 1
            if op.source != CLIENT and op.last_seen is not None:
                self.detection_seconds.observe(max(0.0, wall - op.last_seen))
