"""The client's connection logic (positiond_client.session) with no socket and an injected clock:
announce, lost ack, reconnect and replay, revival, fencing, refusals, outbox bounds."""

from __future__ import annotations

import logging
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from positiond_client.errors import LegError, SessionError
from positiond_client.pending import Pending
from positiond_client.protocol import ack_reply, error_reply
from positiond_client.session import ClientSession, Effect, Phase
from tests.conftest import SOAK

RESEND = 5.0
HB = 0.5


def new(now: float = 0.0, **kw: Any) -> ClientSession:
    return ClientSession(now, heartbeat_interval=HB, resend_interval=RESEND, ack_timeout=2.0, **kw)


def start_msg(session: str = "s1") -> dict[str, Any]:
    return {"v": 1, "type": "start", "session": session, "token": "t" * 32, "strategy": "x"}


def entry_msg(key: str, price: float = 100.0) -> dict[str, Any]:
    return {"v": 1, "type": "entry", "session": "s1", "token": "t" * 32, "key": key,
            "entry_price": price, "stop_price": 90.0}  # fmt: skip


def drain(s: ClientSession, now: float) -> list[dict[str, Any]]:
    """Everything the socket would take now, decoded."""
    out = []
    while (data := s.next_send(now)) is not None:
        s.sent(now)
        out.append(orjson.loads(data))
    return out


def finish(effects: list[Effect]) -> None:
    for effect in effects:
        if effect[0] == "finish":
            effect[1]._finish(effect[2], effect[3])


def announced(now: float = 0.0) -> ClientSession:
    """A session connected and announced (the daemon acked its start)."""
    s = new(now)
    s.open_session(start_msg())
    s.connected(now)
    [start] = drain(s, now)
    finish(s.receive(ack_reply(start["seq"], {"session_id": 7}), now))
    assert s.phase is Phase.READY
    return s


def kinds(msgs: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    return [(m["type"], m.get("key")) for m in msgs]


def test_nothing_but_the_announce_goes_until_it_is_acked() -> None:
    s = new()
    pending = s.open_session(start_msg())
    entry = s.submit(entry_msg("a"))
    assert s.phase is Phase.OFFLINE and s.next_send(0.0) is None
    s.connected(0.1)
    assert s.phase is Phase.ANNOUNCE
    assert kinds(drain(s, 0.1)) == [("start", None)]
    assert s.phase is Phase.ANNOUNCING
    assert drain(s, 0.2) == []  # the entry waits for the ack (heartbeat not due yet)
    assert kinds(drain(s, 0.1 + HB)) == [("hb", None)]
    effects = s.receive(ack_reply(pending.seq, {"session_id": 7}), 0.7)
    finish(effects)
    assert pending.done and pending.result is not None and pending.result["session_id"] == 7
    assert s.phase is Phase.READY
    # The entry, then its leg's state right after it.
    assert kinds(drain(s, 0.7)) == [("entry", "a"), ("update", "a")]
    assert not entry.done


def test_a_lost_announce_ack_announces_again_after_the_resend_interval() -> None:
    s = new()
    start = s.open_session(start_msg())
    s.connected(0.0)
    assert kinds(drain(s, 0.0)) == [("start", None)]
    s.tick(RESEND - 0.1)
    assert s.phase is Phase.ANNOUNCING
    s.tick(RESEND + 0.1)
    assert s.phase is Phase.ANNOUNCE
    again = drain(s, RESEND + 0.1)
    assert kinds(again) == [("start", None)] and again[0]["seq"] == start.seq  # same message
    finish(s.receive(ack_reply(start.seq), RESEND + 0.2))
    assert s.phase is Phase.READY and start.done


def test_a_durable_message_whose_ack_is_lost_is_sent_again() -> None:
    s = announced()
    exit_ = s.submit({"v": 1, "type": "sync", "session": "s1", "token": "t"})
    assert kinds(drain(s, 1.0)) == [("sync", None)]
    s.tick(1.0 + RESEND + 0.1)  # (one resend interval since the last check)
    s.tick(2 * RESEND + 1.1)
    assert [m["seq"] for m in drain(s, 2 * RESEND + 1.1) if m["type"] == "sync"] == [exit_.seq]


def test_reconnect_reannounces_with_the_token_and_replays_the_outbox_in_order() -> None:
    s = announced()
    s.submit(entry_msg("a"))
    drain(s, 0.1)
    s.lost(0.2)
    assert s.phase is Phase.OFFLINE
    b = s.submit(entry_msg("b"))
    s.update("a", {"current_price": 101.0})
    s.update("a", {"current_price": 102.0})
    sync = s.submit({"v": 1, "type": "sync", "session": "s1", "token": "t" * 32})
    assert s.next_send(0.3) is None
    s.connected(1.0)
    [start] = drain(s, 1.0)
    # The start was acked once: the re-announce is a copy with a new seq, same key and token.
    assert start["type"] == "start" and start["session"] == "s1" and start["token"] == "t" * 32
    assert start["seq"] > sync.seq
    finish(s.receive(ack_reply(start["seq"]), 1.1))
    replay = drain(s, 1.1)
    assert kinds(replay) == [
        ("entry", "a"),  # unacked: sent again (idempotent), its newest state right after
        ("update", "a"),
        ("entry", "b"),
        ("update", "b"),
        ("sync", None),
    ]
    assert replay[1]["current_price"] == 102.0  # coalesced, the newest value only
    seqs = [m["seq"] for m in replay if "seq" in m]
    assert seqs == sorted(seqs)
    assert replay[2]["seq"] == b.seq


def test_a_daemon_that_forgot_the_session_gets_it_announced_again() -> None:
    s = announced()
    s.submit(entry_msg("a"))
    sync = s.submit({"v": 1, "type": "sync", "session": "s1", "token": "t"})
    drain(s, 0.1)
    old_seq = sync.seq
    # An update refused with no seq (the daemon restarted): the sync in flight is re-keyed,
    # its old ack would not cover the refused update.
    assert s.receive(error_reply("UNKNOWN_SESSION", "who?"), 0.2) == []
    assert s.phase is Phase.ANNOUNCE
    assert sync.seq > old_seq and sync.seq in {p.seq for p in s.unacked()}
    finish(s.receive(ack_reply(old_seq), 0.3))
    assert not sync.done  # the stale ack is ignored
    [start] = drain(s, 0.4)
    finish(s.receive(ack_reply(start["seq"]), 0.5))
    assert kinds(drain(s, 0.5)) == [("entry", "a"), ("update", "a"), ("sync", None)]


def test_revival_fences_the_legs_the_daemon_did_not_hand_back() -> None:
    s = announced()
    for key in ("a", "b"):
        finish(s.receive(ack_reply(s.submit(entry_msg(key)).seq), 0.1))
    s.lost(0.2)
    s.connected(0.3)
    [start] = drain(s, 0.3)
    revived = {"crash_reason": "HEARTBEAT_TIMEOUT", "legs": ["a"]}
    effects = s.receive(ack_reply(start["seq"], {"revived": revived}), 0.4)
    notices = [(e[1], e[2].get("key")) for e in effects if e[0] == "notice"]
    assert notices == [("REVIVED", None), ("FENCED", "b")]
    assert s.is_open("a") and not s.is_open("b")
    assert s.fenced_reason("b") is not None
    with pytest.raises(LegError):
        s.update("b", {"current_price": 1.0})
    assert kinds(drain(s, 0.4)) == [("update", "a")]  # only our leg's state is replayed


def test_a_fenced_refusal_fences_the_leg_and_fails_the_call() -> None:
    s = announced()
    finish(s.receive(ack_reply(s.submit(entry_msg("a")).seq), 0.1))
    exit_ = s.submit({"v": 1, "type": "exit", "session": "s1", "token": "t", "key": "a"})
    drain(s, 0.2)
    effects = s.receive(error_reply("FENCED", "adopted by s2", exit_.seq, "a"), 0.3)
    assert [e[1] for e in effects if e[0] == "notice"] == ["FENCED"]
    finish(effects)
    assert isinstance(exit_.error, LegError) and exit_.error.code == "FENCED"
    assert s.fenced_reason("a") == "adopted by s2" and s.unacked() == []


def test_a_final_refusal_of_the_session_fails_everything_and_refuses_new_calls() -> None:
    s = new()
    start = s.open_session(start_msg())
    entry = s.submit(entry_msg("a"))
    s.connected(0.0)
    drain(s, 0.0)
    finish(s.receive(error_reply("SESSION_CLOSED", "it ended", start.seq), 0.1))
    assert s.phase is Phase.IDLE and s.unacked() == []
    assert isinstance(start.error, SessionError) and isinstance(entry.error, SessionError)
    with pytest.raises(SessionError):
        s.submit(entry_msg("b"))
    assert drain(s, 10.0) == []  # no heartbeats for a refused session


def test_a_passing_refusal_of_the_announce_is_retried() -> None:
    s = new()
    start = s.open_session(start_msg())
    s.connected(0.0)
    drain(s, 0.0)
    assert s.receive(error_reply("INTERNAL", "disk", start.seq), 0.1) == []
    assert s.phase is Phase.ANNOUNCE and not start.done
    assert kinds(drain(s, 0.2)) == [("start", None)]


def test_a_refused_entry_never_opens_its_leg() -> None:
    s = announced()
    entry = s.submit(entry_msg("a"))
    drain(s, 0.1)
    finish(s.receive(error_reply("KEY_CONFLICT", "taken", entry.seq, "a"), 0.2))
    assert entry.error is not None and not s.is_open("a")


def test_updates_wait_coalesced_while_offline_or_blocked_one_state_per_leg() -> None:
    s = announced()
    for key in ("a", "b"):
        finish(s.receive(ack_reply(s.submit(entry_msg(key)).seq), 0.1))
    drain(s, 0.1)
    s.blocked()
    for i in range(10_000):
        assert not s.update("ab"[i % 2], {"current_price": float(i)})  # not sendable now
    q = s.queued()
    assert q["pending_updates"] == 2 and q["send_queue"] == 0 and q["unacknowledged"] == 0
    assert s.next_send(0.2) is None
    s.writable()
    sent = drain(s, 0.3)
    assert [(m["key"], m["current_price"]) for m in sent] == [("a", 9998.0), ("b", 9999.0)]


def test_an_update_the_socket_refused_is_encoded_again_with_newer_values() -> None:
    s = announced()
    finish(s.receive(ack_reply(s.submit(entry_msg("a")).seq), 0.1))
    drain(s, 0.1)
    s.update("a", {"current_price": 1.0})
    assert s.next_send(0.2) is not None
    s.blocked()  # the socket would not take it
    s.update("a", {"stop_price": 2.0})
    s.writable()
    [update] = drain(s, 0.3)
    assert update["current_price"] == 1.0 and update["stop_price"] == 2.0


def test_a_large_outbox_is_kept_and_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    s = new(outbox_warn=3)
    s.open_session(start_msg())
    with caplog.at_level(logging.WARNING, "positiond_client.session"):
        for i in range(5):
            s.submit(entry_msg(f"k{i}"))
    assert s.unacknowledged == 6  # nothing dropped
    assert sum("durable messages are waiting" in r.message for r in caplog.records) == 3


def test_heartbeats_only_for_a_session_and_not_when_blocked() -> None:
    s = new()
    s.connected(0.0)
    assert drain(s, 5.0) == []  # no session: no heartbeat
    s = announced()
    assert kinds(drain(s, HB)) == [("hb", None)]
    assert drain(s, HB + 0.1) == []
    s.blocked()
    assert s.next_send(10.0) is None


def test_the_link_goes_unresponsive_when_a_durable_message_waits_too_long() -> None:
    s = announced()
    entry = s.submit(entry_msg("a"))
    drain(s, 1.0)
    assert not s.unreachable(2.9)
    assert s.unreachable(3.1)
    s.receive(b'{"v":1,"type":"ping"}', 3.2)  # a liveness probe is not an answer
    assert s.unreachable(3.2)
    s.receive(ack_reply(entry.seq), 3.3)
    assert not s.unreachable(3.3)


def test_end_acked_closes_the_session() -> None:
    s = announced()
    end = s.submit({"v": 1, "type": "end", "session": "s1", "token": "t"}, flush_updates=True)
    drain(s, 0.1)
    finish(s.receive(ack_reply(end.seq), 0.2))
    assert s.phase is Phase.IDLE and s.session_key() is None
    assert drain(s, 10.0) == []


def test_an_unreadable_reply_is_logged_and_ignored(caplog: pytest.LogCaptureFixture) -> None:
    s = announced()
    with caplog.at_level(logging.ERROR, "positiond_client.session"):
        assert s.receive(b"not json", 0.1) == []
        assert s.receive(b'{"v":1,"type":"ack","seq":"x"}', 0.1) == []
    assert len(caplog.records) == 2 and s.phase is Phase.READY


# ---- property: whatever happens, every unacked durable message is replayed, in order --------

EVENT = st.one_of(
    st.tuples(st.just("entry"), st.integers(0, 3)),
    st.tuples(st.just("update"), st.integers(0, 3)),
    st.tuples(st.just("exit"), st.integers(0, 3)),
    st.tuples(st.just("ack"), st.integers(0, 20)),
    st.tuples(st.just("send"), st.integers(0, 5)),
    st.tuples(st.just("lost"), st.just(0)),
    st.tuples(st.just("connected"), st.just(0)),
    st.tuples(st.just("blocked"), st.just(0)),
    st.tuples(st.just("tick"), st.just(0)),
)


@settings(max_examples=1000 if SOAK else 150, deadline=None)
@given(st.lists(EVENT, max_size=60))
def test_every_unacked_message_is_replayed_in_order_after_a_reconnect(
    events: list[tuple[str, int]],
) -> None:
    s = new()
    s.open_session(start_msg())
    now = 0.0
    sent_seqs: list[int] = []
    for what, n in events:
        now += 0.7
        key = f"k{n}"
        if what == "entry" and not s.is_open(key):
            s.submit(entry_msg(key))
        elif what == "update" and s.is_open(key):
            s.update(key, {"current_price": now})
        elif what == "exit" and s.is_open(key):
            s.submit({"v": 1, "type": "exit", "session": "s1", "token": "t", "key": key})
        elif what == "ack" and sent_seqs:
            finish(s.receive(ack_reply(sent_seqs[n % len(sent_seqs)]), now))
        elif what == "send":
            for _ in range(n):
                data = s.next_send(now)
                if data is None:
                    break
                s.sent(now)
                seq = orjson.loads(data).get("seq")
                if seq is not None:
                    sent_seqs.append(seq)
        elif what == "lost":
            s.lost(now)
        elif what == "connected":
            s.connected(now)
        elif what == "blocked":
            s.blocked()
        elif what == "tick":
            s.tick(now)
        assert len(s.queued()) == 4 and s.queued()["pending_updates"] <= 4
    # Whatever happened: reconnect, the announce is acked, and everything unacked goes again.
    now += 1.0
    s.lost(now)
    s.connected(now)
    [start] = drain(s, now)
    assert start["type"] == "start"
    unacked = [p.seq for p in s.unacked() if p.kind != "start"]
    finish(s.receive(ack_reply(start["seq"]), now))
    replayed = [m["seq"] for m in drain(s, now) if m["type"] != "update"]
    assert replayed == unacked == sorted(unacked)
    # And every open leg's newest state was sent.
    assert s.queued()["pending_updates"] == 0


def test_pending_is_what_the_session_hands_out() -> None:
    s = new()
    assert isinstance(s.open_session(start_msg()), Pending)
