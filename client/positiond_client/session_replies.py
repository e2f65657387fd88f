"""How the daemon's answers change a :class:`~positiond_client.session.ClientSession` (pure).

Acks finish pending calls; errors fail them, fence legs, or (``UNKNOWN_SESSION``) send the
session back to ANNOUNCE; the start's ack replays the outbox and every open leg's newest state
(:meth:`Replies._replay`); a ``revived`` ack fences the legs the daemon did not hand back.
Nothing here runs a caller's code: what must happen outside the driver's lock (finishing a
pending call, an ``on_notice`` call) is returned as effects.
"""

from __future__ import annotations

import enum
import logging
from typing import TYPE_CHECKING, Any

from positiond_client.errors import PositiondError, error_for
from positiond_client.link import Link
from positiond_client.pending import Pending
from positiond_client.protocol import encode

if TYPE_CHECKING:
    from positiond_client.session import Effect

__all__ = ["FINAL_SESSION_ERRORS", "Phase", "Replies"]

log = logging.getLogger(__name__)

# Refusals of a session's start that end it for good; anything else is retried.
FINAL_SESSION_ERRORS = frozenset(
    {"SESSION_CLOSED", "BAD_FIELD", "BAD_VERSION", "BAD_TYPE", "BAD_TOKEN"}
)


class Phase(enum.Enum):
    """The connection's state (transitions: :mod:`positiond_client.session`)."""

    OFFLINE = "offline"  # no connection
    IDLE = "idle"  # connected, no session to announce
    ANNOUNCE = "announce"  # connected, the session's start is due
    ANNOUNCING = "announcing"  # start sent on this connection, its ack awaited
    READY = "ready"  # the daemon knows the session: traffic flows


class Replies:
    """The reply half of ClientSession (its state is declared there)."""

    link: Link
    phase: Phase
    _seq: int
    _outbox: dict[int, Pending]
    _outq: list[bytes | Pending]
    _updates: dict[str, dict[str, Any]]
    _legs: dict[str, dict[str, Any]]
    _fenced: dict[str, str]
    _closed: dict[str, str]
    _session: str | None
    _start: Pending | None
    _announce: Pending | None

    def _update_msg(self, key: str, fields: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def _ready(self) -> None:
        raise NotImplementedError

    def _reannounce(self) -> None:
        raise NotImplementedError

    def _on_session_acked(self) -> None:
        raise NotImplementedError

    def _refused_for_good(self, code: str, reason: str) -> list[Pending]:
        raise NotImplementedError

    def error_budget(self, error: PositiondError, now: float) -> None:
        raise NotImplementedError

    def _replay(self) -> None:
        """The daemon knows our session again: re-send the outbox and every open leg's state
        (each leg's right after its entry, before a crash/end/sync)."""
        self._outq = []
        self._updates = {}
        sent_legs: set[str] = set()
        pending_entries = {p.key for p in self._outbox.values() if p.kind == "entry"}

        def snapshot(key: str) -> None:
            state = self._legs.get(key)
            if state is not None and key not in sent_legs:
                sent_legs.add(key)
                self._outq.append(encode(self._update_msg(key, state)))

        for pending in self._outbox.values():
            if pending is self._start:
                continue
            if pending.kind in ("crash", "end", "sync"):
                for key in self._legs:
                    if key not in pending_entries:
                        snapshot(key)
            self._outq.append(pending)
            if pending.kind == "entry":
                pending_entries.discard(pending.key)
                if pending.key is not None:
                    snapshot(pending.key)
        for key in list(self._legs):
            if key not in pending_entries:
                snapshot(key)

    def _close_leg(self, key: str, reason: str) -> bool:
        """The daemon closed this leg (its protective stop filled): every later call for it
        raises. True the first time."""
        if key in self._closed:
            return False
        log.warning("%s", reason)
        self._closed[key] = reason
        self._legs.pop(key, None)
        self._updates.pop(key, None)
        return True

    def _revived(self, revived: dict[str, Any]) -> dict[str, str]:
        """We were declared crashed and came back: legs not handed back are someone else's
        now. Returns the legs fenced this way, with the reason."""
        # A warning, as the daemon's verdict and its revival are: nothing is lost, the session
        # runs on (the fenced legs below, if any, are errors of their own).
        log.warning(
            "positiond had declared this session CRASHED (%s at %s); it is RUNNING again",
            revived.get("crash_reason"),
            revived.get("crash_timestamp"),
        )
        back = set(revived.get("legs") or ())
        pending_entries = {p.key for p in self._outbox.values() if p.kind == "entry"}
        fenced = {}
        for key in [k for k in self._legs if k not in back and k not in pending_entries]:
            reason = (
                f"leg {key!r} was adopted, closed or flagged by another session or an operator "
                "while this session was declared crashed: stop managing it"
            )
            log.error("%s", reason)
            self._fenced[key] = fenced[key] = reason
            del self._legs[key]
            self._updates.pop(key, None)
        return fenced

    def _on_ack(self, msg: dict[str, Any], now: float) -> list[Effect]:
        seq = msg["seq"]
        effects: list[Effect] = []
        self.link.answered(now, outstanding=len(self._outbox) > (seq in self._outbox))
        announce = self._announce
        if announce is not None and seq == announce.seq:
            revived = msg.get("revived")
            fenced = self._revived(revived) if isinstance(revived, dict) else {}
            self._ready()
            if isinstance(revived, dict):
                effects.append(("notice", "REVIVED", revived))
                effects += [
                    ("notice", "FENCED", {"key": k, "reason": r}) for k, r in fenced.items()
                ]
            effects += self._protection_shown(msg, revived)
        pending = self._outbox.pop(seq, None)
        if pending is not None:
            if pending.kind in ("crash", "end"):
                self._on_session_acked()
            pending.sent_at = pending.sent_at or now
            effects.insert(0, ("finish", pending, msg, None))
        return effects

    def _protection_shown(self, msg: dict[str, Any], revived: Any) -> list[Effect]:
        """A start ack shows the protective orders handed to this session (``protection``:
        resumed; ``revived.protection``: revived). One that filled closes its leg here too; a
        resumed session's map is handed on as the client's own ``PROTECTION`` notice (what was
        settled while it was away)."""
        shown = revived.get("protection") if isinstance(revived, dict) else msg.get("protection")
        if not isinstance(shown, dict):
            return []
        effects: list[Effect] = []
        for key, order in shown.items():
            if isinstance(order, dict) and order.get("state") == "TRIGGERED" and key in self._legs:
                reason = (
                    f"leg {key!r} was closed at the broker by its protective stop order "
                    f"{order.get('order_id') or '?'}: it is no longer open"
                )
                if self._close_leg(key, reason):
                    effects.append(("notice", "LEG_CLOSED", {"key": key, "reason": reason}))
        if not isinstance(revived, dict):
            effects.append(("notice", "PROTECTION", {"protection": shown}))
        return effects

    def _on_error(self, msg: dict[str, Any], now: float) -> list[Effect]:
        code, reason = msg["code"], msg["reason"]
        seq = msg.get("seq")
        error = error_for(code, reason)
        self.link.answered(now, outstanding=len(self._outbox) > (seq in self._outbox))
        announce = self._announce
        is_announce = announce is not None and seq == announce.seq
        if is_announce and code not in FINAL_SESSION_ERRORS:
            self._reannounce()  # a passing fault (storage, internal): announce again
            return []
        if code == "UNKNOWN_SESSION" and self._session is not None and not is_announce:
            # The daemon does not know our session (it restarted, or declared us dead):
            # announce again; whatever was refused stays in the outbox and follows.
            if seq is None:
                self._rekey_syncs()
            if self.phase is Phase.READY:
                self._reannounce()
            return []
        if is_announce:
            log.error("positiond refused this session: %s", error)
            failed = self._refused_for_good(code, reason)
        else:
            pending = self._outbox.pop(seq, None) if seq is not None else None
            failed = [pending] if pending is not None else []
            if pending is not None and pending.kind == "entry" and pending.key is not None:
                self._legs.pop(pending.key, None)  # refused: the leg was never opened
                self._updates.pop(pending.key, None)
        effects: list[Effect] = []
        key = msg.get("key")
        if code == "FENCED" and key is not None and key not in self._fenced:
            # Another session owns this leg now: every later call for it raises, loudly.
            log.error("leg %s is fenced: %s", key, reason)
            self._fenced[key] = reason
            self._legs.pop(key, None)
            self._updates.pop(key, None)
            effects.append(("notice", "FENCED", {"key": key, "reason": reason}))
        if code == "LEG_CLOSED" and key is not None and self._close_leg(key, reason):
            # (the daemon's notice was missed, e.g. while disconnected: the refusal tells)
            effects.append(("notice", "LEG_CLOSED", {"key": key, "reason": reason}))
        effects += [("finish", p, None, error) for p in failed]
        if seq is None:
            self.error_budget(error, now)
        return effects

    def _rekey_syncs(self) -> None:
        """An update was refused (the daemon no longer knew our session): a sync sent before
        it may still be acked, but that ack would not cover the refused update. Such syncs
        get a new seq (the old ack is then ignored) and go again after the re-announce, behind
        every open leg's state."""
        for pending in [p for p in self._outbox.values() if p.kind == "sync" and p.sent_at]:
            del self._outbox[pending.seq]
            self._seq += 1
            pending.seq = pending.msg["seq"] = self._seq
            pending.payload = encode(pending.msg)
            pending.sent_at = None
            self._outbox[pending.seq] = pending
