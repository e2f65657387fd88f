"""The progress watch alone, on a clock the test drives."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from positiond.progress import Overdue, ProgressWatch


def with_legs(key: str) -> bool:
    return True


def test_a_session_without_progress_past_its_deadline_is_overdue_once() -> None:
    watch = ProgressWatch()
    watch.watch("s1", 5.0, now=100.0)
    assert watch.overdue(105.0, with_legs) == []  # exactly the deadline: not yet
    assert watch.overdue(105.5, with_legs) == [Overdue("s1", 100.0, 5.0, 5.5)]
    assert watch.stalled("s1")
    assert watch.overdue(200.0, with_legs) == []  # reported once
    assert watch.progress("s1", 201.0)  # that ends the stall...
    assert not watch.progress("s1", 202.0)  # ... once
    assert watch.overdue(206.5, with_legs) == []  # counted from its last progress
    assert [o.key for o in watch.overdue(207.5, with_legs)] == ["s1"]


def test_no_deadline_or_no_open_leg_is_never_overdue() -> None:
    watch = ProgressWatch()
    watch.watch("free", None, now=0.0)
    watch.watch("flat", 1.0, now=0.0)
    assert watch.overdue(1000.0, lambda key: key != "flat") == []
    assert [o.key for o in watch.overdue(1000.0, with_legs)] == ["flat"]  # a leg opened


def test_a_restart_of_the_session_resets_its_deadline() -> None:
    watch = ProgressWatch()
    watch.watch("s1", 5.0, now=0.0)
    watch.watch("s1", 20.0, now=4.0)
    assert watch.overdue(23.0, with_legs) == []
    watch.watch("s1", None, now=30.0)
    assert watch.overdue(1000.0, with_legs) == []


def test_loaded_stalled_stays_so_until_progress_and_forget_forgets() -> None:
    watch = ProgressWatch()
    watch.watch("s1", None, now=0.0)
    watch.mark_stalled("s1")
    assert watch.stalled("s1")
    assert watch.progress("s1", 1.0) and not watch.stalled("s1")
    watch.watch("s2", 1.0, now=0.0)
    watch.forget("s2")
    assert watch.overdue(10.0, with_legs) == [] and not watch.progress("s2", 11.0)


@settings(max_examples=200, deadline=None)
@given(
    st.floats(0.1, 10.0),
    st.lists(st.tuples(st.floats(0.0, 5.0), st.booleans()), max_size=40),
)
def test_overdue_exactly_when_the_deadline_passed_without_progress(
    deadline: float, steps: list[tuple[float, bool]]
) -> None:
    watch = ProgressWatch()
    now, last, stalled = 0.0, 0.0, False
    watch.watch("s1", deadline, now)
    for step, progressed in steps:
        now += step
        if progressed:
            assert watch.progress("s1", now) == stalled
            last, stalled = now, False
        found = watch.overdue(now, with_legs)
        should = not stalled and now - last > deadline
        assert [o.key for o in found] == (["s1"] if should else [])
        stalled = stalled or should
