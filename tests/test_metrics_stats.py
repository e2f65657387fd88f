"""What the writer counts for /metrics (positiond.metrics.stats): plain logic, no daemon."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from positiond.metrics.stats import DETECTION_BUCKETS, Buckets, WriterStats
from positiond.ops import CLIENT, DISCONNECT, HEARTBEAT, RESTART, Batch, CrashOp, Result, SyncOp


def crash(source: str, last_seen: float | None = 100.0) -> CrashOp:
    return CrashOp(None, None, "s", source, "why", 0.0, last_seen=last_seen)


def test_each_committed_crash_counts_once_by_cause_with_its_detection_delay() -> None:
    stats = WriterStats()
    batch = Batch(ops=[crash(DISCONNECT, 100.0), crash(HEARTBEAT, 97.0), crash(RESTART, 95.0),
                       crash(CLIENT, None), SyncOp(b"r", 1, "s")])  # fmt: skip
    results = [Result(True), Result(True), Result(True), Result(True), Result(True)]
    stats.committed(batch, results, seconds=0.002, wall=100.25)
    assert stats.crashes == {"disconnect": 1, "heartbeat": 1, "not_returned": 1, "reported": 1}
    # The strategy's own report is no detection: three delays, 0.25 + 3.25 + 5.25.
    assert stats.detection_seconds.count == 3
    assert abs(stats.detection_seconds.sum - 8.75) < 1e-9
    assert stats.commit_seconds.count == 1 and stats.batch_ops.sum == 5


def test_a_refused_or_repeated_crash_is_not_counted() -> None:
    stats = WriterStats()
    batch = Batch(ops=[crash(DISCONNECT), crash(HEARTBEAT)])
    results = [Result.error("UNKNOWN_SESSION", "gone"), Result(True, {"duplicate": True})]
    stats.committed(batch, results, seconds=0.001, wall=101.0)
    assert set(stats.crashes.values()) == {0}
    assert stats.detection_seconds.count == 0


def test_a_clock_step_back_is_no_negative_delay() -> None:
    stats = WriterStats()
    stats.committed(Batch(ops=[crash(DISCONNECT, 200.0)]), [Result(True)], 0.001, wall=199.0)
    assert stats.detection_seconds.sum == 0.0
    assert stats.detection_seconds.snapshot()[0][0] == ("0.005", 1)


@given(st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), max_size=200))
def test_buckets_are_cumulative_inclusive_and_count_everything(values: list[float]) -> None:
    buckets = Buckets(DETECTION_BUCKETS)
    for v in values:
        buckets.observe(v)
    cumulative, total = buckets.snapshot()
    assert [le for le, _ in cumulative] == [repr(b) for b in DETECTION_BUCKETS] + ["+Inf"]
    for (le, n), bound in zip(cumulative, [*DETECTION_BUCKETS, float("inf")], strict=True):
        assert n == sum(1 for v in values if v <= bound), le  # Prometheus' le is inclusive
    assert cumulative[-1][1] == len(values) == buckets.count
    assert abs(total - sum(values)) <= 1e-6 * max(1.0, sum(values))
