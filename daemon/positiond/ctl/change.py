"""posctl's commands that change data: verify (with --apply), resolve (one leg or --all), prune.

Each builds sessionless protocol messages and hands them to :meth:`positiond.ctl.access.Ctl.write`,
which sends them to the running daemon or applies them directly with the daemon's own store code.
Each command's docstring is its ``--help``.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from positiond.ctl import render
from positiond.ctl.access import (
    EXIT_ATTENTION,
    EXIT_NO_ANSWER,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    Ctl,
    CtlError,
    Written,
    open_readonly,
)
from positiond.ctl.orphans import orphan_records
from positiond.ctl.read import find_leg, position_columns
from positiond.openalgo import (
    OpenAlgo,
    OpenAlgoError,
    OpenAlgoTimeout,
    OpenAlgoUnavailable,
    Settings,
    api_key,
)
from positiond.store.recovery import leg_dict, read_legs
from positiond.store.schema import iso
from positiond_client.recovery import (
    CLOSED_AT_BROKER,
    MISMATCH,
    RESUME,
    CrashedLeg,
    VerificationReport,
    stranded,
    verify_positions,
)

__all__ = ["RESUME_ACTION", "cmd_prune", "cmd_resolve", "cmd_verify"]

RESUME_ACTION = "left CRASHED: its next run adopts it"
RESUME_STRANDED_ACTION = "left ACTIVE (its session is over): its next run adopts it"
ORPHAN_CHUNK = 200  # rows per orphans message, well under the protocol's size limit


# ---- verify --------------------------------------------------------------------------------


def _load_positionbook(source: str) -> Any:
    try:
        raw = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except OSError as exc:
        raise CtlError(EXIT_USAGE, f"cannot read the positionbook {source}: {exc}") from None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise CtlError(EXIT_USAGE, f"the positionbook {source} is not JSON: {exc}") from None


def _fetch_positionbook(args: argparse.Namespace) -> tuple[Any, str]:
    """(the positionbook, where it came from): --positionbook FILE, else OpenAlgo's REST API.

    Every failure to get a success reply from OpenAlgo is a refusal with its message: nothing
    is judged, so nothing can read as flat at the broker.
    """
    if args.positionbook is not None:
        return _load_positionbook(args.positionbook), str(args.positionbook)
    settings: Settings | None = getattr(args, "openalgo_settings", None)
    if settings is None:
        raise CtlError(
            EXIT_USAGE,
            ("--openalgo: no [openalgo] host in the config file"
             if args.openalgo else "verify needs a positionbook: --positionbook FILE")
            + " (or configure [openalgo] host and api_key_file in the daemon's config file, "
            "--config / POSITIOND_CONFIG)",
        )  # fmt: skip
    where = f"OpenAlgo {settings.host}"
    try:
        key = api_key(settings)
        with OpenAlgo(settings, key) as client:
            return client.positionbook(), where
    except OpenAlgoUnavailable as exc:
        raise CtlError(EXIT_USAGE, exc.message) from None
    except OpenAlgoTimeout as exc:
        raise CtlError(EXIT_NO_ANSWER, exc.message) from None
    except OpenAlgoError as exc:
        raise CtlError(EXIT_UNREACHABLE, exc.message) from None


def _apply_verdicts(ctl: Ctl, report: VerificationReport) -> tuple[Written | None, bool]:
    """Close CLOSED_AT_BROKER legs, flag MISMATCH ones, record orphans; RESUME legs stay."""
    messages: list[dict[str, Any]] = []
    keys: list[str] = []
    for verdict in report.verdicts:
        key = verdict.leg.position_key
        if verdict.verdict == RESUME:
            report.actions[key] = (
                RESUME_ACTION if verdict.leg.status == "CRASHED" else RESUME_STRANDED_ACTION
            )
            continue
        action = "close" if verdict.verdict == CLOSED_AT_BROKER else "review"
        messages.append({"type": "resolve", "key": key, "action": action,
                         "reason": verdict.stored_reason})  # fmt: skip
        keys.append(key)
    rows = [o.to_dict() for o in report.orphans]
    for start in range(0, len(rows), ORPHAN_CHUNK):
        messages.append({"type": "orphans", "rows": rows[start : start + ORPHAN_CHUNK]})
    if not messages:
        return None, False
    written = ctl.write(messages)
    refused = False
    recorded = already = 0
    for i, outcome in enumerate(written.outcomes):
        if i >= len(keys):  # an orphans message
            if outcome.ok:
                recorded += int(outcome.data.get("recorded", 0))
                already += int(outcome.data.get("already_recorded", 0))
            else:
                refused = True
                report.actions["orphans"] = f"refused: {outcome.code}: {outcome.reason}"
            continue
        key = keys[i]
        if not outcome.ok:
            refused = True
            report.actions[key] = f"refused: {outcome.code}: {outcome.reason}"
        elif outcome.data.get("duplicate"):
            report.actions[key] = f"already {outcome.data.get('status')}"
        elif outcome.data.get("status") == "CLOSED":
            report.actions[key] = "closed"
        else:
            report.actions[key] = "flagged NEEDS_REVIEW"
    if rows and "orphans" not in report.actions:
        report.actions["orphans"] = f"recorded {recorded} ({already} already recorded)"
    return written, refused


def cmd_verify(ctl: Ctl, args: argparse.Namespace) -> int:
    """Judge each crashed leg (and each leg left ACTIVE by a session that is over) against a
    the broker's positionbook: RESUME (still open at the
    broker), CLOSED_AT_BROKER (flat there: the exit was missed), MISMATCH (quantity or side
    differ: a human decides), and list the orphans (broker positions no leg explains).

    The positionbook is fetched from OpenAlgo (POST /api/v1/positionbook) when [openalgo] is
    configured in the daemon's config file (host, api_key_file or POSITIOND_OPENALGO_API_KEY,
    timeout), or read from --positionbook FILE (- for stdin): the raw client.positionbook()
    response or its list of rows. A non-success reply, an HTTP error or a timeout is refused
    with OpenAlgo's message (exit 3, or 4 for a timeout); nothing is judged then. It is
    compared per instrument with every ACTIVE, CRASHED and NEEDS_REVIEW leg of every strategy.
    The book has no strategy tag, so a net is attributed to a leg only when it admits one
    explanation: legs ACTIVE in a RUNNING session count as certainly there; CRASHED,
    NEEDS_REVIEW and legs of STALLED or finished sessions are uncertain and judged together.
    A leg open in every explanation is RESUME, in none CLOSED_AT_BROKER; otherwise MISMATCH,
    with the other legs it cannot be told from named in the reason.
    --apply closes CLOSED_AT_BROKER legs, flags MISMATCH legs NEEDS_REVIEW with the reason and
    records the orphans; RESUME legs stay as they are for the strategy's next run to adopt (it
    adopts crashed legs and legs an earlier run left open when it stopped). --json
    prints {"verdicts": [...], "orphans": [...]} (plus "actions" with --apply; its "orphans" key
    says what was recorded; each orphan's "resolution" is ACKNOWLEDGED or ADOPTED when a human
    already decided that same position with posctl resolve-orphan). Exit 1 while any MISMATCH or
    undecided orphan remains, 5 if an action was refused.
    """
    book, source = _fetch_positionbook(args)
    if not ctl.json:
        origin = getattr(args, "openalgo_source", None)
        via = f" ({origin})" if origin and args.positionbook is None else ""
        ctl.out.print(f"positionbook: {source}{via}", markup=False, highlight=False)
    conn = open_readonly(ctl.db)
    try:
        crashed = [
            CrashedLeg.from_row(r) for r in read_legs(conn, "crashed", args.strategy)["legs"]
        ]
        found = read_legs(conn, "open", None)
        decided = _decided_orphans(conn)
    finally:
        conn.close()
    if found["truncated"]:
        # Verification nets every open leg on an instrument: a partial list could attribute a
        # position to the wrong leg.
        raise CtlError(
            EXIT_REFUSED,
            f"more open legs than one query returns ({len(found['legs'])}): verification needs "
            "all of them; resolve or prune some first",
        )
    known = [CrashedLeg.from_row(r) for r in found["legs"]]
    crashed += stranded(known, args.strategy)  # left open by a session that is over
    try:
        report = verify_positions(crashed, book, known)
    except ValueError as exc:
        raise CtlError(EXIT_USAGE, f"positionbook {source}: {exc}") from None
    written, refused = _apply_verdicts(ctl, report) if args.apply else (None, False)
    data = report.to_dict()
    unresolved = 0
    for orphan in data["orphans"]:
        key = tuple(orphan[k] for k in _ORPHAN_KEY)
        orphan["resolution"] = decided.get(key)  # ACKNOWLEDGED / ADOPTED by a human, or None
        unresolved += orphan["resolution"] is None
    if ctl.json:
        ctl.emit(data)
    else:
        _print_verify(ctl, data, report, written, args.apply)
    if refused:
        return EXIT_REFUSED
    attention = unresolved or report.by_verdict(MISMATCH)
    return EXIT_ATTENTION if attention else EXIT_OK


_ORPHAN_KEY = ("symbol", "exchange", "product", "broker_quantity", "known_quantity")


def _decided_orphans(conn: sqlite3.Connection) -> dict[tuple[Any, ...], str]:
    """Orphans a human already acknowledged or adopted (posctl resolve-orphan), by what they
    were: the same position found again needs no attention (and is not recorded again)."""
    return {
        tuple(o[k] for k in _ORPHAN_KEY): str(o["status"])
        for o in orphan_records(conn, unresolved=False)
        if o["status"] in ("ACKNOWLEDGED", "ADOPTED")
    }


def _print_verify(
    ctl: Ctl, data: dict[str, Any], report: VerificationReport, written: Written | None,
    applied: bool,
) -> None:  # fmt: skip
    out = ctl.out
    if data["verdicts"]:
        out.print(render.verify_table(out, data["verdicts"]))
    else:
        out.print("No crashed legs to verify.", markup=False)
    if data["orphans"]:
        out.print(render.orphans_table(out, data["orphans"]))
    if report.actions:
        out.print(render.actions_table(out, report.actions))
    counts = {v: len(report.by_verdict(v)) for v in (RESUME, CLOSED_AT_BROKER, MISMATCH)}
    out.print(
        ", ".join(f"{n} {v}" for v, n in counts.items()) + f", {len(report.orphans)} orphan(s).",
        markup=False,
    )
    if written is not None:
        out.print(f"Applied {ctl.via(written)}.", markup=False)
    elif applied:
        out.print("Nothing to apply.", markup=False)
    elif counts[CLOSED_AT_BROKER] or counts[MISMATCH] or report.orphans:
        out.print(
            "Nothing changed: --apply closes the CLOSED_AT_BROKER legs, flags the MISMATCH ones "
            "for review and records the orphans.",
            markup=False,
        )
    if counts[RESUME]:
        out.print(
            f"{counts[RESUME]} RESUME leg(s) stay CRASHED: the strategy's next run adopts them "
            "(or posctl resolve LEG --closed once you exit them by hand).",
            markup=False,
        )


# ---- resolve, prune ------------------------------------------------------------------------


def _key_of(ctl: Ctl, leg: str) -> str:
    """The position key for LEG (a key or an id); LEG itself when the database cannot say."""
    try:
        conn = open_readonly(ctl.db)
    except CtlError:
        return leg
    try:
        row = find_leg(conn, leg)
    finally:
        conn.close()
    return leg if row is None else str(row["position_key"])


def _resolve_message(args: argparse.Namespace, key: str) -> dict[str, Any]:
    msg: dict[str, Any] = {"type": "resolve", "key": key}
    if args.closed:
        msg |= {"action": "close", "exit_reason": "MANUAL_EXIT"}
        if args.exit_price is not None:
            msg["exit_price"] = args.exit_price
    elif args.review is not None:
        msg["action"] = "review"
    else:
        msg["action"] = "requeue"
    reason = args.review if args.review is not None else args.note
    if reason:
        msg["reason"] = reason
    return msg


# Bulk resolve: which legs each decision applies to. A stranded leg (ACTIVE in a session that is
# over: its owner can never exit it) is resolved like a crashed one.
BULK_FROM = {"close": ("CRASHED", "NEEDS_REVIEW"), "review": ("CRASHED",),
             "requeue": ("NEEDS_REVIEW",)}  # fmt: skip
STRANDED_SQL = "(p.status = 'ACTIVE' AND s.status IN ('COMPLETED', 'CRASHED'))"
BULK_VERB = {"close": "Close (CLOSED, MANUAL_EXIT)", "review": "Flag NEEDS_REVIEW",
             "requeue": "Requeue (back to CRASHED)"}  # fmt: skip


def _confirm(question: str) -> bool:
    """Ask on stderr, read the answer from stdin; anything but y/yes (or no answer) is no."""
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline()
    return answer.strip().lower() in ("y", "yes")


def _resolve_all(ctl: Ctl, args: argparse.Namespace) -> int:
    """resolve --all [--strategy S]: one decision for every leg it applies to, confirmed."""
    if args.exit_price is not None:
        raise CtlError(EXIT_USAGE, "--exit-price is one leg's fill: not with --all")
    action = _resolve_message(args, "-")["action"]
    statuses = BULK_FROM[action]
    conn = open_readonly(ctl.db)
    try:
        sql = (
            f"SELECT {position_columns(conn)} FROM strategy_positions p JOIN strategy_sessions s "
            f"ON s.id = p.session_id WHERE (p.status IN ({', '.join('?' * len(statuses))}) "
            f"OR {STRANDED_SQL})"
        )
        params: list[Any] = list(statuses)
        if args.strategy:
            sql += " AND s.strategy_name = ?"
            params.append(args.strategy)
        legs = [leg_dict(r) for r in conn.execute(sql + " ORDER BY p.position_id", params)]
    finally:
        conn.close()
    scope = f" of strategy {args.strategy!r}" if args.strategy else " of every strategy"
    if not legs:
        if ctl.json:
            ctl.emit({"action": action, "legs": [], "results": {}})
        else:
            ctl.out.print(
                f"No {' or '.join(statuses)} or stranded legs{scope}: nothing to do.",
                markup=False,
            )
        return EXIT_OK
    if not ctl.json:
        ctl.out.print(render.resolve_table(ctl.out, legs, f"{len(legs)} leg(s){scope}"))
    question = (
        f"{BULK_VERB[action]}: {len(legs)} {' / '.join(statuses)} or stranded leg(s){scope}?"
    )
    if not args.yes and not _confirm(question):
        print("Nothing changed.", file=sys.stderr)
        return EXIT_ATTENTION
    written = ctl.write([_resolve_message(args, str(leg["position_key"])) for leg in legs])
    results: dict[str, str] = {}
    refused = False
    for leg, outcome in zip(legs, written.outcomes, strict=True):
        name = f"#{leg['position_id']} {leg['position_key']}"
        if not outcome.ok:
            refused = True
            results[name] = f"refused: {outcome.code}: {outcome.reason}"
        elif outcome.data.get("duplicate"):
            results[name] = f"already {outcome.data.get('status')}"
        else:
            results[name] = str(outcome.data.get("status"))
    if ctl.json:
        ctl.emit({"action": action, "via": written.via, "by": written.by,
                  "legs": [leg["position_key"] for leg in legs], "results": results})  # fmt: skip
    else:
        ctl.out.print(render.actions_table(ctl.out, results))
        ctl.out.print(f"Applied {ctl.via(written)}.", markup=False)
    return EXIT_REFUSED if refused else EXIT_OK


def cmd_resolve(ctl: Ctl, args: argparse.Namespace) -> int:
    """Decide a crashed or reviewed leg by hand (LEG: its position key or #id / id), or all of
    them at once (--all, with --strategy S to keep to one strategy).

    --closed: it is flat at the broker (you exited it): CLOSED with exit reason MANUAL_EXIT
    (--exit-price optional, one leg only). --review REASON: NEEDS_REVIEW, nobody adopts it until
    requeued. --resume: a reviewed leg goes back to CRASHED, for its strategy's next run to
    adopt. A leg left ACTIVE by a session that is over (ended with the leg open: stranded) takes
    each of these like a crashed leg. A leg ACTIVE in a live session is refused (exit 5): its
    owner exits it.

    --all applies the decision to every leg it fits (--closed: CRASHED and NEEDS_REVIEW legs;
    --review: CRASHED; --resume: NEEDS_REVIEW), lists them and asks for confirmation on stdin
    unless --yes (no answer is no: exit 1, nothing changed). Exit 5 if any leg was refused.
    """
    if args.exit_price is not None and not args.closed:
        raise CtlError(EXIT_USAGE, "--exit-price goes with --closed")
    if args.all:
        if args.leg is not None:
            raise CtlError(EXIT_USAGE, "give LEG or --all, not both")
        return _resolve_all(ctl, args)
    if args.leg is None:
        raise CtlError(EXIT_USAGE, "give LEG, or --all (with --strategy S) for every leg")
    if args.strategy is not None or args.yes:
        raise CtlError(EXIT_USAGE, "--strategy and --yes go with --all")
    key = _key_of(ctl, args.leg)
    msg = _resolve_message(args, key)
    written = ctl.write([msg])
    outcome = written.outcomes[0]
    if not outcome.ok:
        raise CtlError(EXIT_REFUSED, f"{key}: {outcome.code}: {outcome.reason}", outcome.code)
    if ctl.json:
        ctl.emit({"key": key, "action": msg["action"], "via": written.via, "by": written.by,
                  "result": outcome.data})  # fmt: skip
    else:
        status = outcome.data.get("status")
        done = f"already {status}: nothing changed" if outcome.data.get("duplicate") else status
        ctl.out.print(f"{key}: {done} — {ctl.via(written)}", markup=False)
    return EXIT_OK


def cmd_prune(ctl: Ctl, args: argparse.Namespace) -> int:
    """Delete finished sessions older than --older-than (30d, 12h, 0d) with their legs and
    events, and orphan records as old; report what went and the space freed in the file.

    Never touches a session that is live or has an ACTIVE, CRASHED or NEEDS_REVIEW leg (the
    store enforces it, whichever way the prune runs). Runs in chunks of --chunk sessions, each
    its own short transaction, so a running daemon keeps acknowledging live strategies between
    them; stopping posctl midway keeps what was pruned so far.
    """
    before = time.time() - args.older_than
    total: dict[str, Any] = {}
    chunks = 0
    while True:
        written = ctl.write([{"type": "prune", "before": before, "limit": args.chunk}])
        outcome = written.outcomes[0]
        if not outcome.ok:
            raise CtlError(EXIT_REFUSED, f"prune: {outcome.code}: {outcome.reason}", outcome.code)
        chunks += 1
        for name in ("sessions", "positions", "events", "orphans", "freed_bytes"):
            total[name] = total.get(name, 0) + int(outcome.data.get(name, 0))
        total["by"] = outcome.data.get("by")
        if not outcome.data.get("more"):
            break
    total["chunks"] = chunks
    if ctl.json:
        ctl.emit({"before": iso(before), "via": written.via, "by": written.by,
                  "result": total})  # fmt: skip
    else:
        ctl.out.print(render.prune_table(ctl.out, total, iso(before)))
        ctl.out.print(f"Pruned {ctl.via(written)} in {chunks} chunk(s).", markup=False)
    return EXIT_OK
