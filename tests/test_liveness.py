"""Liveness with an injected clock: time is a number the test sets, nothing sleeps."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from positiond.engine import Engine
from positiond.liveness import MAX_STEP, MIN_HEARTBEATS, DaemonClock, Liveness, Verdict
from positiond.ops import CrashOp, Result, StallOp
from tests import conftest


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


def test_a_session_with_a_slow_heartbeat_gets_two_of_its_intervals() -> None:
    live = Liveness(1.0)
    live.seen("slow", 0.0)
    live.seen("fast", 0.0)
    live.announce("slow", 2.0)
    live.announce("fast", 0.25)  # the timeout already spans four of its heartbeats
    assert (live.timeout_for("slow"), live.timeout_for("fast")) == (4.0, 1.0)
    assert live.next_deadline() == 1.0
    assert [d.session_key for d in live.expired(1.5)] == ["fast"]
    assert live.expired(3.9) == []
    (dead,) = live.expired(4.1)
    assert (dead.session_key, dead.timeout) == ("slow", 4.0)
    live.seen("again", 0.0)
    live.announce("again", 2.0)
    live.announce("again", None)  # re-announced without an interval: the timeout rules
    assert live.timeout_for("again") == 1.0


def test_forget_stops_watching_and_bad_timeout_is_refused() -> None:
    live = Liveness(1.0)
    live.seen("a", 0.0)
    live.forget("a")
    assert live.expired(100.0) == []
    assert live.next_deadline() is None
    with pytest.raises(ValueError):
        Liveness(0)


# ---- the daemon's observed clock ------------------------------------------------------------


def test_observed_time_is_monotonic_time_without_the_gaps() -> None:
    clock = DaemonClock(100.0, max_step=0.1)
    assert clock.observe(100.05) == 100.05  # an ordinary step counts in full
    assert clock.observe(130.05) == pytest.approx(100.15)  # a gap counts max_step
    assert clock.gaps == 1 and clock.excluded == pytest.approx(29.9)
    assert clock.observe(130.1) == pytest.approx(100.2)
    assert clock.observe(120.0) == pytest.approx(100.2)  # a stale timestamp: never backwards
    # Observed instants map back to the monotonic ones, on either side of the gap.
    assert clock.raw(100.05) == pytest.approx(100.05)
    assert clock.raw(100.2) == pytest.approx(130.1)


@settings(derandomize=True, database=None, deadline=None, max_examples=conftest.SOAK.count(300))
@given(st.lists(st.floats(-1.0, 100.0), max_size=50))
def test_observed_time_never_runs_backwards_nor_faster_than_max_step(steps: list[float]) -> None:
    clock = DaemonClock(0.0, max_step=0.1)
    raw = observed = 0.0
    for step in steps:
        raw += step
        now = clock.observe(raw)
        assert observed <= now <= observed + max(0.0, min(step, 0.1)) + 1e-9
        observed = now
    if all(step <= 0.1 for step in steps):
        assert observed == pytest.approx(max([0.0, *_prefix_sums(steps)]))


def _prefix_sums(steps: list[float]) -> list[float]:
    total, sums = 0.0, []
    for step in steps:
        total += step
        sums.append(total)
    return sums


# ---- the rule as the engine applies it: a daemon pause is never a verdict -------------------
#
# A simulated daemon (its loop: read what is readable, then tick, every `step` while it runs)
# and simulated clients, on one injected monotonic clock. The daemon's schedule mixes running
# stretches (steps up to MAX_STEP: a loaded machine), stops (SIGSTOP of the daemon alone: the
# clients go on and their messages queue) and jumps (the whole VM suspended, or the clock
# stepped: the clients are frozen too). A healthy client sends something at least every
# `interval` of its own running time; a hung one stops at some moment; a killed one stops and
# its connection drops (the monitor reports it at the daemon's next iteration).

TOKEN = "5" * 32


@dataclass
class _Client:
    rid: bytes
    key: str
    interval: float
    deadline: float | None  # progress deadline
    fate: str  # healthy, hung, killed
    fate_at: float  # client running time at which it hangs or dies
    next_send: float = 0.0
    last_read: float | None = None  # the daemon's running time at its latest read message
    gone: bool = False


@dataclass
class _Sim:
    raw: float = 1000.0
    active: float = 0.0  # the clients' running time (frozen during jumps)
    running: float = 0.0  # the daemon's running time
    queue: list[tuple[float, _Client, dict[str, Any]]] = field(default_factory=list)
    verdicts: list[tuple[float, str, str]] = field(default_factory=list)  # (running, key, kind)


def _commit(engine: Engine, sim: _Sim) -> None:
    batch = engine.take_batch(sim.raw)
    results = []
    for n, op in enumerate(batch.ops):
        if isinstance(op, CrashOp):
            sim.verdicts.append((sim.running, op.session_key, op.source))
        elif isinstance(op, StallOp) and op.stalled:
            sim.verdicts.append((sim.running, op.session_key, "STALLED"))
        results.append(Result(True, {"session_id": n + 1, "position_id": n + 1}))
    engine.committed(batch, results)


def _client_sends(sim: _Sim, clients: list[_Client], rng: random.Random) -> None:
    for c in clients:
        while not c.gone and c.next_send <= sim.active:
            if c.fate != "healthy" and c.next_send >= c.fate_at:
                c.gone = True
                break
            msg = {"v": 1, "session": c.key, "token": TOKEN, "type": "update", "key": c.key,
                   "stop_price": 90.0 + rng.random()}  # fmt: skip
            sent_raw = sim.raw - (sim.active - c.next_send)
            sim.queue.append((sent_raw, c, msg))
            c.next_send += c.interval * rng.uniform(0.05, 1.0)


def _iterate(
    engine: Engine, sim: _Sim, clients: list[_Client], latency: float, blind: bool
) -> None:
    """One turn of the daemon's loop: read what is readable, hear of dropped peers, tick."""
    if not blind:
        readable = [q for q in sim.queue if q[0] <= sim.raw - latency]
        sim.queue = [q for q in sim.queue if q[0] > sim.raw - latency]
        for _, c, msg in sorted(readable, key=lambda q: q[0]):
            engine.receive(c.rid, msg, sim.raw, sim.raw)
            c.last_read = sim.running
    for c in clients:
        if c.fate == "killed" and c.gone and c.rid in engine.peers:
            engine.peer_gone(c.rid)
    engine.tick(sim.raw)
    _commit(engine, sim)


@st.composite
def _plans(draw: st.DrawFn) -> dict[str, Any]:
    timeout = draw(st.floats(MIN_HEARTBEATS * 0.5, 5.0))
    clients = []
    for n in range(draw(st.integers(1, 4))):
        interval = draw(st.floats(0.05, 1.5 * timeout))
        deadline = draw(st.none() | st.floats(max(1.0, 2 * interval), 3 * timeout + 2))
        fate = draw(st.sampled_from(["healthy", "healthy", "hung", "killed"]))
        clients.append((interval, deadline, fate, draw(st.floats(0.0, 20.0)), n))
    segments = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["run", "run", "stop", "jump"]),
                st.floats(0.0, 5.0) | st.floats(5.0, 600.0),
                st.floats(0.02, MAX_STEP),
            ),
            min_size=1,
            max_size=6,
        )
    )
    return {
        "timeout": timeout,
        "clients": clients,
        "segments": segments,
        "latency": draw(st.floats(0.0, 0.05)),
        "blind_after_gap": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**32)),
    }


@settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=conftest.SOAK.count(100),
    suppress_health_check=[HealthCheck.too_slow],
)
@given(_plans())
def test_a_daemon_pause_never_produces_a_verdict_and_real_deaths_are_still_found(
    plan: dict[str, Any],
) -> None:
    sim = _Sim()
    rng = random.Random(plan["seed"])
    engine = Engine(plan["timeout"], 1.0, monotonic=lambda: sim.raw, wall=lambda: sim.raw)
    clients = []
    for interval, deadline, fate, fate_at, n in plan["clients"]:
        c = _Client(f"peer-{n}".encode(), f"s{n}", interval, deadline, fate, fate_at)
        engine.add_peer(c.rid, fd=n, uid=1000, pid=100 + n)
        start = {"v": 1, "session": c.key, "token": TOKEN, "type": "start", "seq": 1,
                 "strategy": "s", "heartbeat_interval": interval}  # fmt: skip
        if deadline is not None:
            start["progress_deadline"] = deadline
        engine.receive(c.rid, start, sim.raw, sim.raw)
        _commit(engine, sim)
        entry = {"v": 1, "session": c.key, "token": TOKEN, "type": "entry", "seq": 2,
                 "key": c.key, "symbol": "X", "side": "BUY", "quantity": 1,
                 "entry_price": 100.0, "stop_price": 90.0}  # fmt: skip
        engine.receive(c.rid, entry, sim.raw, sim.raw)
        _commit(engine, sim)
        c.last_read = 0.0
        clients.append(c)
    engine_timeouts = {c.key: engine.liveness.timeout_for(c.key) for c in clients}
    # Long enough at the end for every real death to be found.
    segments = [*plan["segments"], ("run", max(engine_timeouts.values()) + 1.0, 0.05)]
    blind = False
    for kind, duration, step in segments:
        if kind == "run":
            end = sim.running + duration
            while sim.running < end:
                sim.raw += step
                sim.active += step
                sim.running += step
                _client_sends(sim, clients, rng)
                _iterate(engine, sim, clients, plan["latency"], blind)
                blind = False
        else:
            sim.raw += duration
            if kind == "stop":  # the daemon alone: the clients go on, their messages queue
                sim.active += duration
                _client_sends(sim, clients, rng)
            blind = plan["blind_after_gap"]  # its first turn may not see them yet

    by_key = {c.key: c for c in clients}
    dead: dict[str, tuple[float, str]] = {}
    for running, key, kind in sim.verdicts:
        c = by_key[key]
        # Never about a healthy client, whatever the pauses.
        assert c.fate != "healthy", f"healthy {c} got a verdict: {sim.verdicts}"
        assert key not in dead, f"{key} declared dead twice: {sim.verdicts}"
        assert kind in ("STALLED", "HEARTBEAT", "DISCONNECT")
        assert kind != "DISCONNECT" or c.fate == "killed"
        if kind != "STALLED":
            dead[key] = (running, kind)
    for c in clients:
        if c.fate == "healthy" or not c.gone:
            continue
        # A real death is found, and within its timeout of the daemon's running time after the
        # last message of it that the daemon read (+ one step: the ticks are discrete).
        assert c.last_read is not None
        limit = c.last_read + engine_timeouts[c.key] + MAX_STEP + 1e-6
        if c.key not in dead:
            assert c.fate == "hung" and sim.running <= limit, f"{c} not found: {sim.verdicts}"
            continue
        running, kind = dead[c.key]
        assert kind == "DISCONNECT" or running <= limit
