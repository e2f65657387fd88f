"""The client's link state (positiond_client.link): pure logic driven by an injected clock."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from positiond_client.link import CONNECTING, DOWN, UNRESPONSIVE, UP, Link
from tests.conftest import SOAK

GRACE = 2.0


def fresh(now: float = 0.0) -> Link:
    return Link(now, grace=GRACE, answer_timeout=GRACE, warn_every=30.0)


def test_a_fresh_client_gets_its_grace_before_it_is_known_unreachable() -> None:
    link = fresh()
    assert link.state(0.0) == CONNECTING
    assert not link.unreachable(GRACE)  # a durable call made now still waits for its ack
    assert link.unreachable(GRACE + 0.001)
    assert link.away_for(GRACE + 1.0) == 1.0


def test_a_fresh_client_retries_attempts_that_may_still_succeed_within_its_grace() -> None:
    link = fresh()
    link.lost(0.01, definite=False)  # refused, but the socket file is there: a busy daemon
    assert link.state(0.01) == CONNECTING and not link.unreachable(1.0)
    link.handshake(0.2)
    assert link.state(0.3) == UP
    link.lost(0.5, definite=False)  # once it was up, any failure is an outage
    assert link.unreachable(0.5)


def test_a_failed_attempt_or_a_lost_connection_is_unreachable_at_once() -> None:
    link = fresh()
    link.lost(0.01)  # e.g. no socket file: the first attempt failed
    assert link.state(0.01) == DOWN and link.unreachable(0.01)
    link.handshake(5.0)
    assert link.state(5.0) == UP and not link.unreachable(5.0)
    link.lost(6.0)
    assert link.unreachable(6.0) and link.away_for(7.5) == 1.5


def test_an_unanswered_durable_message_makes_it_unresponsive_after_the_timeout() -> None:
    link = fresh()
    link.handshake(0.0)
    link.asked(1.0)
    link.asked(1.5)  # the oldest unanswered one counts
    assert not link.unreachable(1.0 + GRACE)
    assert link.state(1.0 + GRACE + 0.1) == UNRESPONSIVE and link.unreachable(3.1)
    # Any reply shows the daemon alive: the clock restarts for what is still outstanding ...
    link.answered(3.2, outstanding=True)
    assert link.state(3.2) == UP and not link.unreachable(3.2 + GRACE)
    assert link.unreachable(3.2 + GRACE + 0.1)
    # ... and stops when nothing is.
    link.answered(6.0, outstanding=False)
    assert not link.unreachable(100.0)
    # A call that waited its whole timeout in vain: unresponsive at once, until a reply.
    link.asked(100.0)
    link.overdue(100.2)
    assert link.state(100.2) == UNRESPONSIVE and link.away_for(100.3) == pytest.approx(0.1)
    link.answered(100.4, outstanding=False)
    assert link.state(100.4) == UP


def test_the_outage_is_reported_when_it_starts_every_warn_every_and_once_back() -> None:
    link = Link(0.0, grace=GRACE, answer_timeout=GRACE, warn_every=10.0)
    link.lost(1.0)
    reports = [(t, link.report(t)) for t in (1.0, 1.5, 5.0, 11.0, 11.5, 21.0)]
    assert [(t, r) for t, r in reports if r is not None] == [
        (1.0, ("away", 0.0)),
        (11.0, ("away", 10.0)),
        (21.0, ("away", 20.0)),
    ]
    link.handshake(25.0)
    assert link.report(25.0) == ("back", 24.0)
    assert link.report(26.0) is None


EVENTS = st.lists(
    st.tuples(
        st.floats(min_value=0.0, max_value=5.0),
        st.sampled_from(
            ["handshake", "lost", "asked", "answered", "answered_more", "overdue", "report"]
        ),
    ),
    max_size=60,
)


@settings(max_examples=SOAK.count(300), deadline=None)
@given(EVENTS)
def test_properties_of_any_event_sequence(events: list[tuple[float, str]]) -> None:
    link = Link(0.0, grace=GRACE, answer_timeout=GRACE, warn_every=7.0)
    now, last_away, away_reported = 0.0, None, False
    for step, event in events:
        now += step
        if event == "handshake":
            link.handshake(now)
            assert not link.unreachable(now)  # a handshake always makes it reachable
        elif event == "lost":
            link.lost(now)
            assert link.unreachable(now) and link.state(now) == DOWN
        elif event == "asked":
            link.asked(now)
        elif event == "overdue":
            link.overdue(now)
            assert link.state(now) != UP
        elif event in ("answered", "answered_more"):
            link.answered(now, outstanding=event == "answered_more")
            if link.state(now) != DOWN and link.state(now) != CONNECTING:
                assert not link.unreachable(now)  # a reply proves the daemon alive
        else:
            report = link.report(now)
            if report is not None and report[0] == "away":
                # Never more often than warn_every while it stays away.
                assert last_away is None or now - last_away >= 7.0 or not away_reported
                last_away, away_reported = now, True
            elif report is not None:
                assert away_reported  # "back" only after "away"
                assert not link.unreachable(now)
                last_away, away_reported = None, False
        away = link.away_for(now)
        assert (away is None) == (not link.unreachable(now))
        assert away is None or away >= 0.0
