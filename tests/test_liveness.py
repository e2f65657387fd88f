"""Liveness with an injected clock: time is a number the test sets, nothing sleeps."""

from __future__ import annotations

import pytest

from positiond.liveness import Liveness, Verdict


def test_silent_session_expires_after_the_timeout_and_only_once() -> None:
    live = Liveness(3.0)
    live.seen("a", 100.0)
    live.seen("b", 101.0)
    assert live.expired(102.9) == []
    assert live.expired(103.0) == []  # exactly the timeout: not yet
    dead = live.expired(103.01)
    assert [(d.session_key, d.verdict, d.last_seen) for d in dead] == [
        ("a", Verdict.MISSED_HEARTBEATS, 100.0)
    ]
    assert live.expired(103.5) == []  # reported once, then forgotten
    assert [d.session_key for d in live.expired(104.5)] == ["b"]
    assert len(live) == 0


def test_any_message_pushes_the_deadline() -> None:
    live = Liveness(1.0)
    live.seen("a", 0.0)
    for t in (0.9, 1.8, 2.7):
        live.seen("a", t)
        assert live.expired(t + 0.5) == []
    assert live.next_deadline() == pytest.approx(3.7)


def test_session_loaded_after_restart_expires_with_its_own_verdict() -> None:
    live = Liveness(2.0)
    live.expect_return("back", 10.0)
    live.expect_return("gone", 10.0)
    live.seen("back", 11.0)
    dead = live.expired(12.5)
    assert [(d.session_key, d.verdict) for d in dead] == [("gone", Verdict.NOT_RETURNED)]
    # The one that came back is an ordinary live session from then on.
    assert [(d.session_key, d.verdict) for d in live.expired(13.5)] == [
        ("back", Verdict.MISSED_HEARTBEATS)
    ]


def test_forget_stops_watching_and_bad_timeout_is_refused() -> None:
    live = Liveness(1.0)
    live.seen("a", 0.0)
    live.forget("a")
    assert live.expired(100.0) == []
    assert live.next_deadline() is None
    with pytest.raises(ValueError):
        Liveness(0)
