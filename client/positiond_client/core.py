"""Message building shared by the sync and asyncio managers: the leg handle, argument checks,
and each operation written once as a generator that yields the messages it waits for.

A generator yields a :class:`~positiond_client.channel.Pending` and is sent back the ack's data
(or ``None`` if the daemon did not answer in time); the sync manager drives it with blocking
waits, the asyncio manager with awaits. Nothing here blocks.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
import traceback
import uuid
import weakref
from collections.abc import Callable, Generator
from typing import Any, TypeVar

import zmq.auth

from positiond_client.channel import Channel
from positiond_client.errors import LegError, PositiondError, SessionError, UnavailableError
from positiond_client.handles import ClientStatus, Leg, Protection
from positiond_client.paths import default_endpoint, socket_owner_warning
from positiond_client.pending import Delivery, Pending
from positiond_client.protocol import PROTOCOL_VERSION, check_fields, validate
from positiond_client.recovery import (
    CLOSED_AT_BROKER,
    RESUME,
    CrashedLeg,
    Orphan,
    VerificationReport,
    stranded,
    verify_positions,
)
from positiond_client.stop import StopControl

__all__ = ["LIVE", "UNSET", "ClientStatus", "Core", "Leg", "Step"]

log = logging.getLogger(__name__)
T = TypeVar("T")
# An operation: yields what it waits for, receives the ack data (None: no answer in time).
Step = Generator[Pending, dict[str, Any] | None, T]

UNSET: Any = object()
LIVE: weakref.WeakSet[Core] = weakref.WeakSet()


def _key_of(leg: CrashedLeg | Leg | str) -> str:
    if isinstance(leg, str):
        return leg
    if isinstance(leg, CrashedLeg):
        return leg.position_key
    if isinstance(leg, Leg):
        return leg.key
    raise LegError(f"not a leg handle: {leg!r}", "UNKNOWN_LEG")


def _curve_keys(
    endpoint: str,
    server_key: str | os.PathLike[str] | None,
    client_cert: str | os.PathLike[str] | None,
) -> tuple[bytes, bytes, bytes] | None:
    """tcp:// needs CURVE: the daemon's public certificate and this client's secret one.

    Defaults: ``$POSITIOND_CURVE_SERVER_KEY`` and ``$POSITIOND_CURVE_CLIENT_CERT``.
    """
    if not endpoint.startswith("tcp://"):
        return None
    server_key = server_key or os.environ.get("POSITIOND_CURVE_SERVER_KEY")
    client_cert = client_cert or os.environ.get("POSITIOND_CURVE_CLIENT_CERT")
    if not server_key or not client_cert:
        raise ValueError(
            "a tcp:// endpoint needs CURVE keys: curve_server_key= (the daemon's .key file) and "
            "curve_client_cert= (this client's .key_secret file), or POSITIOND_CURVE_SERVER_KEY "
            "and POSITIOND_CURVE_CLIENT_CERT"
        )
    server_public, _ = zmq.auth.load_certificate(os.fspath(server_key))
    client_public, client_secret = zmq.auth.load_certificate(os.fspath(client_cert))
    if client_secret is None:
        raise ValueError(f"{client_cert} holds no secret key (use the .key_secret file)")
    return server_public, client_public, client_secret


def _host() -> str:
    try:
        return socket.gethostname()[:255] or "unknown"
    except OSError:
        return "unknown"


class Core:
    """Message building shared by the sync and asyncio managers; no waiting here."""

    def __init__(
        self,
        strategy_name: str,
        endpoint: str | None = None,
        *,
        heartbeat_interval: float = 0.5,
        ack_timeout: float = 2.0,
        progress_deadline: float | None = None,
        on_notice: Callable[[str, dict[str, Any]], None] | None = None,
        curve_server_key: str | os.PathLike[str] | None = None,
        curve_client_cert: str | os.PathLike[str] | None = None,
        warn_every: float = 30.0,
    ) -> None:
        check_fields("start", {"strategy": strategy_name, "heartbeat_interval": heartbeat_interval})
        if progress_deadline is not None:
            check_fields("start", {"progress_deadline": progress_deadline})
        if ack_timeout <= 0:
            raise ValueError("ack_timeout must be positive")
        self.strategy_name = strategy_name
        self.endpoint = endpoint or default_endpoint()
        if not self.endpoint.startswith(("ipc://", "tcp://")):
            raise ValueError(f"endpoint {self.endpoint!r} must start with ipc:// or tcp://")
        unsafe = socket_owner_warning(self.endpoint)
        if unsafe is not None:
            log.warning("positiond endpoint may not be safe: %s", unsafe)
        self.ack_timeout = ack_timeout
        self.heartbeat_interval = heartbeat_interval
        self.session_id: int | None = None
        self.session_key: str | None = None
        self._token: str | None = None
        self.progress_deadline = progress_deadline
        # The report of the last recover() / start_session(recover=True) / session(recover=True).
        self.recovery: VerificationReport | None = None
        # What the daemon said of this session's protective stop orders (``start``'s ``protect``
        # ack field; None: not asked).
        self.protected: bool | None = None
        self._protect: bool | None = None
        # Every leg handle handed out, by key: the daemon's notices update their protection.
        self._handles: weakref.WeakValueDictionary[str, Leg] = weakref.WeakValueDictionary()
        self._user_notice = on_notice
        self._stop = StopControl()
        self._channel = Channel(
            self.endpoint,
            heartbeat_interval=heartbeat_interval,
            ack_timeout=ack_timeout,
            warn_every=warn_every,
            on_notice=self._on_notice,
            curve=_curve_keys(self.endpoint, curve_server_key, curve_client_cert),
        )
        self._closed = False
        LIVE.add(self)

    @property
    def connected(self) -> bool:
        """Connected to the daemon and answered by it (durable calls wait for their acks).

        False while the daemon is known unreachable (durable calls then return at once,
        ``Delivery.QUEUED``) and while a fresh client's first connection is under way.
        """
        return self._channel.connected

    def status(self) -> ClientStatus:
        """The link to the daemon and what waits for it (see :class:`ClientStatus`)."""
        link, away = self._channel.link_state()
        queued = self._channel.queued()
        return ClientStatus(
            connected=link == "up",
            link=link,
            unreachable=self._channel.unreachable(),
            unreachable_for=away,
            unacknowledged=queued["unacknowledged"],
            pending_updates=queued["pending_updates"],
            send_queue=queued["send_queue"],
            send_queue_bytes=queued["send_queue_bytes"],
            session_key=self.session_key,
            session_id=self.session_id,
            stop_requested=self._stop.requested,
        )

    # ---- stopping on request (see positiond_client.stop) ---------------------------------

    @property
    def stop_requested(self) -> bool:
        """A stop was requested (a handled SIGTERM/SIGINT, or :meth:`request_stop`): the
        strategy's loop should finish its step and leave ``pm.session()``."""
        return self._stop.requested

    def request_stop(self, reason: str = "requested") -> None:
        """Ask the strategy to stop, from any thread (what the signal handlers do)."""
        self._stop.request(reason)

    def wait_stop_requested(self, timeout: float | None = None) -> bool:
        """Sleep until a stop is requested (True) or ``timeout`` passes (False): a loop's
        pause between ticks that ends early on a stop."""
        return self._stop.wait(timeout)

    @property
    def unacknowledged(self) -> int:
        """Durable messages sent but not yet acknowledged (kept and re-sent until they are)."""
        return self._channel.outbox_size

    def is_open(self, leg: Leg | str) -> bool:
        """Whether the leg is open in this session (entered and not exited)."""
        return self._channel.is_open(leg.key if isinstance(leg, Leg) else leg)

    def _base(self, kind: str) -> dict[str, Any]:
        if self.session_key is None:
            raise SessionError("no session: call start_session() first", "NO_SESSION")
        return {
            "v": PROTOCOL_VERSION,
            "type": kind,
            "session": self.session_key,
            "token": self._token,
        }

    def _leg_key(self, leg: Leg | str) -> str:
        key = leg.key if isinstance(leg, Leg) else leg
        if not isinstance(key, str):
            raise LegError(f"not a leg handle: {leg!r}", "UNKNOWN_LEG")
        fenced = self._channel.fenced_reason(key)
        if fenced is not None:
            raise LegError(fenced, "FENCED")
        closed = self._channel.closed_reason(key)
        if closed is not None:
            raise LegError(closed, "LEG_CLOSED")
        return key

    # ---- notices (on the I/O thread: nothing here may raise into it) ---------------------

    def _on_notice(self, code: str, details: dict[str, Any]) -> None:
        try:
            self._track_protection(code, details)
        except Exception:
            log.exception("handling the %s notice failed", code)
        if self._user_notice is not None:
            self._user_notice(code, details)

    def _track_protection(self, code: str, details: dict[str, Any]) -> None:
        """Keep each leg handle's ``protection`` as the daemon reports it."""
        if code in ("REVIVED", "PROTECTION"):  # a start ack's map: key -> the order now
            shown = details.get("protection")
            for key, value in (shown.items() if isinstance(shown, dict) else ()):
                handle = self._handles.get(key)
                if handle is not None:
                    handle.protection = Protection.from_wire(value)
            return
        key = details.get("key")
        handle = self._handles.get(key) if isinstance(key, str) else None
        if handle is None:
            return
        current = handle.protection
        if current is None and code in ("PROTECTION_RELEASED", "PROTECTION_CANCEL_FAILED"):
            current = Protection(
                int(details.get("protect_id") or 0), "PLACED", details.get("order_id"), None,
                "SL-M", "CANCEL",
            )  # fmt: skip
        if code == "PROTECTION_RELEASED" and current is not None:
            kept = details.get("outcome") == "kept"
            handle.protection = current.settled("KEPT" if kept else "CANCELLED")
        elif code == "PROTECTION_CANCEL_FAILED" and current is not None:
            handle.protection = current.settled("CANCEL_FAILED")
        elif code == "LEG_CLOSED" and current is not None:
            handle.protection = current.settled("TRIGGERED")

    def _start_pending(self, session_key: str | None, protect: bool | None = None) -> Pending:
        self.session_key = session_key or uuid.uuid4().hex
        self.session_id = None
        # The session's secret: every message carries it, the daemon keeps only its hash, so
        # no other client can write to this session (proposed here rather than issued by the
        # daemon, so that a lost first ack cannot lock the strategy out of its own session).
        self._token = secrets.token_hex(16)
        msg = {
            **self._base("start"),
            "strategy": self.strategy_name,
            "host": _host(),
            "pid": os.getpid(),
            "heartbeat_interval": self.heartbeat_interval,
            "time": time.time(),
        }
        if self.progress_deadline is not None:
            msg["progress_deadline"] = self.progress_deadline
        if protect is not None:
            msg["protect"] = protect
        self._protect, self.protected = protect, None
        validate(msg | {"seq": 1})
        pending = self._channel.open_session(msg)
        pending.add_callback(self._on_started)
        return pending

    def _on_started(self, pending: Pending) -> None:
        if pending.result is not None:
            self.session_id = pending.result.get("session_id")
            if "protect" in pending.result:
                self.protected = bool(pending.result["protect"])

    def _entry_pending(
        self,
        symbol: str,
        leg_type: str | None,
        entry_price: float,
        stop_price: float | None,
        quantity: int,
        exchange: str,
        product: str,
        side: str,
        position_key: str | None,
        highest_price: float | None,
        last_trail_level: float | None,
        state: dict[str, Any] | None,
    ) -> tuple[Leg, Pending]:
        msg = self._base("entry")
        msg.update(
            key=position_key or f"{symbol}-{uuid.uuid4().hex[:16]}",
            symbol=symbol,
            exchange=exchange,
            product=product,
            side=side.upper() if isinstance(side, str) else side,
            quantity=quantity,
            entry_price=entry_price,
            time=time.time(),
        )
        optional = {
            "leg_type": leg_type,
            "stop_price": stop_price,
            "highest_price": highest_price,
            "last_trail_level": last_trail_level,
            "state": state,
        }
        msg.update({k: v for k, v in optional.items() if v is not None})
        validate(msg | {"seq": 1})
        if self._channel.is_open(msg["key"]):
            raise LegError(f"leg {msg['key']!r} is already open in this session", "KEY_CONFLICT")
        leg = Leg(msg)
        pending = self._channel.submit(msg)
        self._handles[leg.key] = leg

        def filled(p: Pending) -> None:
            if p.result is not None:
                leg.position_id = p.result.get("position_id")
                leg.delivery = Delivery.STORED

        pending.add_callback(filled)
        return leg, pending

    def queue_position_update(
        self,
        leg: Leg | str,
        *,
        current_price: float | None = UNSET,
        stop_price: float | None = UNSET,
        highest_price: float | None = UNSET,
        last_trail_level: float | None = UNSET,
        state: dict[str, Any] | None = UNSET,
    ) -> None:
        """Queue the leg's newest values: never blocks, never waits (also in the asyncio twin).

        The I/O thread sends them; the daemon coalesces them per leg and writes the newest every
        flush interval. Bad values raise ``ProtocolError`` (a ``ValueError``) here.
        """
        self._update(
            leg,
            {
                "current_price": current_price,
                "stop_price": stop_price,
                "highest_price": highest_price,
                "last_trail_level": last_trail_level,
                "state": state,
            },
        )

    def _update(self, leg: Leg | str, fields: dict[str, Any]) -> None:
        key = self._leg_key(leg)
        fields = {k: v for k, v in fields.items() if v is not UNSET}
        if not fields:
            return
        check_fields("update", fields)
        self._channel.update(key, fields)

    def _exit_pending(self, leg: Leg | str, exit_price: float | None, exit_reason: str) -> Pending:
        key = self._leg_key(leg)
        msg = self._base("exit")
        msg.update(key=key, exit_reason=exit_reason, time=time.time())
        if exit_price is not None:
            msg["exit_price"] = exit_price
        validate(msg | {"seq": 1})
        return self._channel.submit(msg)

    def _crash_pending(self, error: BaseException | str) -> Pending:
        msg = self._base("crash")
        if isinstance(error, BaseException):
            tb = "".join(traceback.format_exception(error))
            msg.update(
                error_type=type(error).__name__[:200],
                message=str(error)[:4000],
                traceback=tb[-65536:],
            )
        else:
            msg.update(error_type="Error", message=str(error)[:4000])
        msg["time"] = time.time()
        return self._channel.submit(msg, flush_updates=True)

    def _end_pending(self) -> Pending:
        msg = self._base("end")
        msg["time"] = time.time()
        return self._channel.submit(msg, flush_updates=True)

    def _sync_pending(self) -> Pending:
        return self._channel.submit(self._base("sync"), flush_updates=True)

    def _earlier_unacked(self, sync: Pending) -> list[Pending]:
        """What a sync waits for once acked: every earlier message still unacknowledged (one
        refused while the daemon did not know the session is sent again after the sync)."""
        return [p for p in self._channel.unacked() if p.seq < sync.seq]

    def _ended(self, pending: Pending, delivery: Delivery) -> Delivery:
        if delivery and pending.result is not None and pending.result.get("open_legs"):
            log.warning(
                "session ended with %d leg(s) still open; they stay ACTIVE in positiond",
                pending.result["open_legs"],
            )
        return delivery

    def _unanswered(self, pending: Pending, what: str, delivery: Delivery) -> None:
        if delivery is Delivery.UNANSWERED:
            log.warning(
                "%s not acknowledged by positiond within %.1fs; kept and re-sent until it is",
                what,
                self.ack_timeout,
            )
        else:  # the I/O thread warns about the outage itself, not once per call
            log.debug("%s queued: positiond at %s is unreachable", what, self.endpoint)

        def late(p: Pending) -> None:
            if p.error is not None:
                log.error("positiond refused %s after the caller moved on: %s", what, p.error)

        pending.add_callback(late)

    def _log_stop(self, exc: BaseException | None) -> None:
        how = self._stop.reason or (type(exc).__name__ if exc is not None else "requested")
        log.warning(
            "strategy stopped on request (%s): ending the session COMPLETED; legs still open "
            "stay ACTIVE",
            how,
        )

    def _missed(self, pending: Pending) -> Delivery:
        """Why an operation's message went unanswered (told apart after the fact)."""
        return Delivery.QUEUED if self._channel.unreachable() else Delivery.UNANSWERED

    def _finished(self, pending: Pending) -> None:
        if pending.kind in ("crash", "end") and pending.error is None:
            self._channel.session_closed()

    # ---- recovery operations: generators driven by the sync and asyncio managers --------

    def _request(self, kind: str, **fields: Any) -> Pending:
        msg: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": kind}
        if self.session_key is not None:
            msg["session"] = self.session_key
            msg["token"] = self._token
        msg.update({k: v for k, v in fields.items() if v is not None})
        validate(msg | {"seq": 1})
        return self._channel.submit(msg)

    def _answered(
        self, pending: Pending, result: dict[str, Any] | None, what: str
    ) -> dict[str, Any]:
        if result is None:
            self._channel.forget(pending)
            if self._channel.unreachable():
                raise UnavailableError(
                    f"positiond at {self.endpoint} is unreachable "
                    f"({self._channel.link_state()[0]}): no answer to {what}; nothing was "
                    "read or decided"
                )
            raise UnavailableError(
                f"positiond at {self.endpoint} did not answer {what} within "
                f"{self.ack_timeout:g}s; nothing was read or decided"
            )
        return result

    def _crashed_op(
        self, strategy_name: str | None, all_strategies: bool
    ) -> Step[list[CrashedLeg]]:
        strategy = None if all_strategies else (strategy_name or self.strategy_name)
        pending = self._request("query", what="crashed", strategy=strategy)
        result = self._answered(pending, (yield pending), "the crashed-legs query")
        if result.get("truncated"):
            log.warning("more crashed legs than one answer holds: resolve some and ask again")
        return [CrashedLeg.from_row(row) for row in result["legs"]]

    def _open_op(self, strategy_name: str | None) -> Step[list[CrashedLeg]]:
        pending = self._request("query", what="open", strategy=strategy_name)
        result = self._answered(pending, (yield pending), "the open-legs query")
        if result.get("truncated"):
            # Verification nets every open leg on an instrument: a partial list could attribute
            # a position to the wrong leg. Refuse rather than guess.
            raise PositiondError(
                f"more open legs than one answer holds ({len(result['legs'])}): verification "
                "needs all of them; resolve or prune some and try again"
            )
        return [CrashedLeg.from_row(row) for row in result["legs"]]

    def _adopt_op(self, leg: CrashedLeg | Leg | str, keep_protection: bool = False) -> Step[Leg]:
        key = _key_of(leg)
        self._base("resolve")  # adopting needs our session
        keep = True if keep_protection else None  # (absent: the default, cancel)
        pending = self._request("resolve", key=key, action="adopt", keep_protection=keep)
        result = yield pending
        if result is None:
            # A write, unlike a read: the daemon may have it queued and still commit it. Keep
            # it (re-sent until answered; adoption is idempotent), take the leg when a late ack
            # says it is ours, and tell the caller the truth: the outcome is unknown.
            pending.add_callback(self._adopted_late)
            raise UnavailableError(
                f"positiond at {self.endpoint} did not answer the adoption of {key} within "
                f"{self.ack_timeout:g}s: outcome unknown, it may still be applied. Call "
                "mark_position_recovered() again: if the leg is already yours it returns it"
            )
        handle = Leg.from_saved(result["leg"])
        self._channel.open_leg(key, handle.snapshot())
        self._handles[key] = handle
        log.info("adopted leg %s (%s %s %d)", key, handle.symbol, handle.side, handle.quantity)
        if handle.protection is not None and handle.protection.pending:
            log.warning(
                "adopted leg %s has a protective stop order live at the broker (order %s, "
                "trigger %s): %s", key, handle.protection.order_id,
                handle.protection.trigger_price,
                "it is yours to manage now" if handle.protection.release == "KEEP"
                else "positiond is cancelling it; do not exit the leg until it is released",
            )  # fmt: skip
        return handle

    def _adopted_late(self, pending: Pending) -> None:
        key = pending.key
        if pending.error is not None or pending.result is None or key is None:
            log.error("positiond refused the adoption of %s: %s", key, pending.error)
            return
        if self._channel.is_open(key):
            return  # a repeated call already took it
        self._channel.open_leg(key, Leg.from_saved(pending.result["leg"]).snapshot())
        log.warning(
            "the adoption of %s was acknowledged late: the leg is ours and takes updates; "
            "mark_position_recovered(%r) returns its handle",
            key, key,
        )  # fmt: skip

    def _resolve_op(self, leg: CrashedLeg | Leg | str, action: str, **fields: Any) -> Step[bool]:
        key = _key_of(leg)
        pending = self._request("resolve", key=key, action=action, **fields)
        result = yield pending
        if result is None:
            self._unanswered(pending, f"{action} of {key}", self._missed(pending))
        return result is not None

    def _orphans_op(self, orphans: list[Orphan]) -> Step[int]:
        rows = [o.to_dict() for o in orphans]
        pending = self._request("orphans", rows=rows)
        result = yield pending
        if result is None:
            self._unanswered(pending, "the orphans record", self._missed(pending))
            return 0
        return int(result["recorded"])

    def _recover_op(
        self, positionbook: Any, keep_protection: bool = False
    ) -> Step[VerificationReport]:
        """Verify this strategy's crashed legs; adopt RESUME, close CLOSED_AT_BROKER, flag the
        rest for review, record orphans. Each leg's outcome is in ``report.actions``."""
        report = yield from self._verify_op(positionbook)
        for verdict in report.verdicts:
            key = verdict.leg.position_key
            try:
                if verdict.verdict == RESUME:
                    report.adopted[key] = yield from self._adopt_op(key, keep_protection)
                    report.actions[key] = "adopted"
                elif verdict.verdict == CLOSED_AT_BROKER:
                    done = yield from self._resolve_op(key, "close", reason=verdict.stored_reason)
                    report.actions[key] = "closed" if done else "close queued"
                else:
                    done = yield from self._resolve_op(key, "review", reason=verdict.stored_reason)
                    report.actions[key] = "flagged for review" if done else "review queued"
            except LegError as exc:  # someone else acted on it first: report, go on
                report.actions[key] = f"not done: {exc}"
                log.error("recovery of %s: %s", key, exc)
        if report.orphans:
            yield from self._orphans_op(report.orphans)
        report.session_id = self.session_id
        self.recovery = report
        return report

    def _verify_op(self, positionbook: Any) -> Step[VerificationReport]:
        crashed = yield from self._crashed_op(None, False)
        known = yield from self._open_op(None)
        # Legs an earlier run of this strategy left open when it stopped are nobody's either:
        # judged and adopted like crashed ones.
        judged = crashed + stranded(known, self.strategy_name)
        if hasattr(positionbook, "positionbook"):  # an OpenAlgo client
            positionbook = positionbook.positionbook()
        return verify_positions(judged, positionbook, known)

    def close(self, timeout: float = 1.0) -> None:
        """Stop the I/O thread, giving unacknowledged messages ``timeout`` seconds first."""
        if not self._closed:
            self._closed = True
            self._channel.close(timeout)
