"""``posctl``: the operator's tool for positiond (the seed's check_crashed_trades.py, grown up).

Reads open the database read-only, so they work when the daemon is down, which is exactly when
they are needed. Changes (``verify --apply``, ``resolve``, ``prune``) go through the daemon when it
runs and are written directly, under the daemon's own lock, when it does not: see
:mod:`positiond.ctl_access`. Human output is rich tables (:mod:`positiond.ctl_render`); ``--json``
prints stable keys for scripts. Each command's docstring is its ``--help``.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

from positiond import ctl_keys
from positiond import ctl_render as render
from positiond.ctl_access import EXIT_OK, Ctl, CtlError, who
from positiond.ctl_change import cmd_prune, cmd_resolve, cmd_verify
from positiond.ctl_read import cmd_crashed, cmd_events, cmd_positions, cmd_sessions, cmd_status
from positiond.ops import PRUNE_CHUNK, PRUNE_MAX_CHUNK
from positiond.schema import iso
from positiond_client.paths import default_db_path, default_endpoint

__all__ = ["main"]

EPILOG = """\
exit codes:
  0  done: nothing crashed, nothing needs attention
  1  attention needed: crashed legs (crashed), a MISMATCH or an orphan (verify),
     an unhealthy daemon (status)
  2  usage: bad arguments, an unreadable positionbook file
  3  database missing or unreadable; daemon not running or unreachable
  4  the daemon runs but did not answer in time (--timeout)
  5  refused: unknown leg, a status that does not allow it, a leg its live session owns

Reads open the database read-only and work whether or not the daemon runs. Changes go through
the daemon when it runs, and are written directly (holding the daemon's lock, so none can start
meanwhile) when it does not. Defaults: --db from POSITIOND_DB, else the daemon's default
database; --endpoint from POSITIOND_ENDPOINT, else the daemon's default socket.
"""

DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([dh])")


# ---- argument types ------------------------------------------------------------------------


def duration(text: str) -> float:
    """``30d`` / ``12h`` / ``0d`` -> seconds."""
    match = DURATION.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30d or 12h")
    return float(match[1]) * (86400 if match[2] == "d" else 3600)


def chunk(text: str) -> int:
    """A prune chunk size: 1 .. PRUNE_MAX_CHUNK sessions."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= PRUNE_MAX_CHUNK:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of sessions, 1..{PRUNE_MAX_CHUNK}")
    return value


def since(text: str) -> str:
    """A date, a local date-time, an ISO time with zone, or a duration back (``2h``) -> ISO UTC."""
    if DURATION.fullmatch(text.strip()):
        return iso(time.time() - duration(text))
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a date (2025-11-28, 2025-11-28T15:30, ...) or a duration (2h, 1d)"
        ) from None
    return iso(when.astimezone().timestamp())  # a naive time is local time


# ---- command line --------------------------------------------------------------------------

Command = Callable[[Ctl, argparse.Namespace], int]


def _doc(fn: Command) -> tuple[str, str]:
    """(one-line summary, full text) of a command's docstring."""
    doc = inspect.cleandoc(fn.__doc__ or "")
    return " ".join(doc.split("\n\n")[0].split()), doc


def build_parser() -> argparse.ArgumentParser:
    """``posctl [--db PATH] [--endpoint E] [--json] [--timeout S] COMMAND ...``."""
    parser = argparse.ArgumentParser(
        prog="posctl",
        description="Inspect and resolve what positiond stored: crashed legs, sessions,\n"
        "positions, audit trails; verify crashed legs against the broker; prune old data.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--db",
        type=Path,
        metavar="PATH",
        default=None,
        help="the database (default: POSITIOND_DB, else the daemon's default)",
    )
    parser.add_argument(
        "--endpoint",
        default=None,
        metavar="E",
        help="the daemon's endpoint (default: POSITIOND_ENDPOINT, else the daemon's default)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        default=5.0,
        help="seconds to wait for the daemon's answer to a change (default 5)",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    # --json also after the command; SUPPRESS keeps a global --json from being reset.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Command) -> argparse.ArgumentParser:
        summary, doc = _doc(fn)
        sub = commands.add_parser(
            name,
            help=summary,
            description=doc,
            parents=[common],
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.set_defaults(func=fn)
        return sub

    sub = add("crashed", cmd_crashed)
    sub.add_argument("--strategy", help="only this strategy's crashes")
    sub.add_argument(
        "--since",
        type=since,
        help="only crashes since DATE (2025-11-28, "
        "2025-11-28T15:00 local, or a duration back: 2h, 1d)",
    )
    sub = add("sessions", cmd_sessions)
    sub.add_argument(
        "--status",
        action="append",
        help="RUNNING, CRASHED, COMPLETED, ... (repeatable or comma-separated)",
    )
    sub.add_argument("--strategy", help="only this strategy")
    sub.add_argument("--limit", type=int, default=50, help="at most N, newest first (50)")
    sub = add("positions", cmd_positions)
    sub.add_argument(
        "--status",
        action="append",
        help="ACTIVE, CRASHED, NEEDS_REVIEW, CLOSED, "
        "... or ALL (repeatable or comma-separated; default: the live three)",
    )
    sub.add_argument("--strategy", help="only this strategy")
    sub.add_argument("--limit", type=int, default=200, help="at most N, newest first (200)")
    sub = add("events", cmd_events)
    sub.add_argument("leg", metavar="LEG", help="position key or position id")
    sub = add("verify", cmd_verify)
    sub.add_argument(
        "--positionbook",
        required=True,
        metavar="FILE.json",
        help="a saved OpenAlgo positionbook response or list of rows; - for stdin",
    )
    sub.add_argument("--strategy", help="verify only this strategy's crashed legs")
    sub.add_argument("--apply", action="store_true", help="act on the safe verdicts")
    sub = add("resolve", cmd_resolve)
    sub.add_argument("leg", metavar="LEG", help="position key or position id")
    decision = sub.add_mutually_exclusive_group(required=True)
    decision.add_argument(
        "--closed", action="store_true", help="flat at the broker: CLOSED, exit reason MANUAL_EXIT"
    )
    decision.add_argument("--review", metavar="REASON", help="flag NEEDS_REVIEW with REASON")
    decision.add_argument(
        "--resume",
        action="store_true",
        help="back to CRASHED, for the strategy's next run to adopt",
    )
    sub.add_argument("--exit-price", type=float, metavar="P", help="with --closed")
    sub.add_argument("--note", help="why (kept in the leg's audit trail)")
    sub = add("prune", cmd_prune)
    sub.add_argument(
        "--older-than",
        type=duration,
        required=True,
        metavar="AGE",
        help="30d, 12h, 0d (everything finished)",
    )
    sub.add_argument(
        "--chunk",
        type=chunk,
        default=PRUNE_CHUNK,
        metavar="N",
        help=f"sessions per transaction ({PRUNE_CHUNK}; at most {PRUNE_MAX_CHUNK})",
    )
    add("status", cmd_status)
    ctl_keys.add_arguments(add("keys", ctl_keys.cmd_keys))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run posctl; return its exit code."""
    args = build_parser().parse_args(argv)
    ctl = Ctl(
        db=args.db if args.db is not None else default_db_path(),
        endpoint=args.endpoint or default_endpoint(),
        json=args.json,
        timeout=args.timeout,
        out=render.console(),
        by=who(),
    )
    try:
        code: int = args.func(ctl, args)
    except CtlError as exc:
        if ctl.json:
            ctl.emit(
                {"error": {"message": exc.message, "code": exc.code, "exit_code": exc.exit_code}}
            )
        print(f"posctl: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # `posctl ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
