"""``posctl``: the operator's tool for positiond (the seed's check_crashed_trades.py, grown up).

Reads open the database read-only, so they work when the daemon is down, which is exactly when
they are needed. Changes (``verify --apply``, ``resolve``, ``prune``) go through the daemon when it
runs and are written directly, under the daemon's own lock, when it does not: see
:mod:`positiond.ctl.access`. Human output is rich tables (:mod:`positiond.ctl.render`); ``--json``
prints stable keys for scripts. Each command's docstring is its ``--help``.
"""

from __future__ import annotations

import argparse
import inspect
import io
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from positiond import __version__
from positiond.config import ConfigError
from positiond.ctl import keys, render
from positiond.ctl.access import EXIT_USAGE, Ctl, CtlError, who
from positiond.ctl.alerts import cmd_alerts
from positiond.ctl.change import cmd_prune, cmd_resolve, cmd_verify
from positiond.ctl.locate import locate
from positiond.ctl.migrate import cmd_migrate
from positiond.ctl.orphans import cmd_orphans, cmd_resolve_orphan
from positiond.ctl.read import cmd_crashed, cmd_events, cmd_positions, cmd_sessions, cmd_status
from positiond.ctl.watch import cmd_watch
from positiond.ops import PRUNE_CHUNK, PRUNE_MAX_CHUNK
from positiond.store.dsn import parse_db
from positiond.store.schema import iso

__all__ = ["main"]

EPILOG = """\
exit codes:
  0  done: nothing crashed, nothing needs attention
  1  attention needed: crashed or NEEDS_REVIEW legs, legs open in a finished session,
     unresolved orphans (crashed, orphans), a MISMATCH or an orphan (verify), an unhealthy
     daemon (status); a bulk resolve not confirmed
  2  usage: bad arguments, an unreadable positionbook file, an invalid config file, no
     OpenAlgo API key, httpx not installed (pip install 'positiond[openalgo]')
  3  database missing or unreadable; daemon not running or unreachable; OpenAlgo
     unreachable or not answering success (verify)
  4  the daemon runs but did not answer in time (--timeout); OpenAlgo did not answer
     within its [openalgo] timeout
  5  refused: unknown leg or orphan, a status that does not allow it, a leg its live
     session owns

Reads open the database read-only and work whether or not the daemon runs. Changes go through
the daemon when it runs, and are written directly (holding the daemon's lock, so none can start
meanwhile) when it does not. Which database: --db, else POSITIOND_DB, else db in the daemon's
config file (--config, POSITIOND_CONFIG, else /etc/positiond/positiond.toml), else the
service's /var/lib/positiond when it exists, else this user's default; the endpoint likewise
(the service's /run/positiond socket with its database). Human output starts with the database
it read and why that one. Output piped into a closed pipe (posctl ... | head) ends quietly with
the exit code the command had.
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


def record_id(text: str) -> int:
    """``12`` or ``#12`` (as the tables show it) -> 12."""
    digits = text[1:] if text.startswith("#") else text
    if not digits.isdigit() or int(digits) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an id like 12 or #12")
    return int(digits)


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
        "--version", action="version", version=version(), help="print the version and exit"
    )
    parser.add_argument(
        "--db",
        type=parse_db,
        metavar="PATH|URL",
        default=None,
        help="the database: a SQLite file or a postgresql:// URL (default: POSITIOND_DB, else "
        "db in the config file, else the service's /var/lib/positiond/positiond.db if that "
        "directory exists, else the daemon's default for this user)",
    )
    parser.add_argument(
        "--endpoint",
        default=None,
        metavar="E",
        help="the daemon's endpoint (default: POSITIOND_ENDPOINT, else endpoint in the config "
        "file, else the service's socket with the service's database, else the daemon's "
        "default)",
    )
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="the daemon's config file to take db, endpoint and [openalgo] from (default: "
        "POSITIOND_CONFIG, else /etc/positiond/positiond.toml if it exists)",
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

    def add(name: str, fn: Command, aliases: Sequence[str] = ()) -> argparse.ArgumentParser:
        summary, doc = _doc(fn)
        sub = commands.add_parser(
            name,
            aliases=list(aliases),
            help=summary,
            description=doc,
            parents=[common],
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.set_defaults(func=fn)
        return sub

    sub = add("crashed", cmd_crashed, aliases=["attention"])
    sub.add_argument("--strategy", help="only this strategy's legs (orphans are not shown)")
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
    source = sub.add_mutually_exclusive_group()
    source.add_argument(
        "--openalgo",
        action="store_true",
        help="fetch the positionbook from OpenAlgo's REST API ([openalgo] in the config file; "
        "the default when it is configured)",
    )
    source.add_argument(
        "--positionbook",
        metavar="FILE.json",
        help="a saved OpenAlgo positionbook response or list of rows; - for stdin",
    )
    sub.add_argument("--strategy", help="verify only this strategy's crashed legs")
    sub.add_argument("--apply", action="store_true", help="act on the safe verdicts")
    sub = add("resolve", cmd_resolve)
    sub.add_argument("leg", metavar="LEG", nargs="?", help="position key or position id (#12)")
    sub.add_argument(
        "--all", action="store_true", help="every leg the decision applies to (see above)"
    )
    sub.add_argument("--strategy", metavar="S", help="with --all: only this strategy's legs")
    sub.add_argument("--yes", action="store_true", help="with --all: do not ask for confirmation")
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
    sub = add("alerts", cmd_alerts)
    sub.add_argument(
        "action",
        nargs="?",
        choices=["test"],
        help="test: send a test alert through each sink of the config file's [alerts] (from "
        "posctl itself, not the daemon) and say per sink OK or why not",
    )
    sub.add_argument("--sink", metavar="NAME", help="with test: that sink only")
    sub.add_argument("--limit", type=int, default=50, help="at most the newest N (50)")
    sub = add("orphans", cmd_orphans)
    sub.add_argument("--all", action="store_true", help="also the resolved ones")
    sub.add_argument("--limit", type=int, default=200, help="at most the newest N (200)")
    sub = add("resolve-orphan", cmd_resolve_orphan)
    sub.add_argument(
        "orphan_id", type=record_id, metavar="ID", help="its id: 12 or #12 (posctl orphans)"
    )
    decision = sub.add_mutually_exclusive_group(required=True)
    decision.add_argument(
        "--acknowledge", action="store_true", help="known and intended: stop reporting it"
    )
    decision.add_argument("--adopt", metavar="STRATEGY", help="this strategy takes it over")
    decision.add_argument("--closed", action="store_true", help="squared off at the broker")
    sub.add_argument("--session", type=int, metavar="ID", help="with --adopt: that session")
    sub.add_argument("--note", required=True, metavar="WHY", help="why (kept with who decided)")
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
    sub = add("watch", cmd_watch)
    sub.add_argument("--strategy", metavar="S", help="only this strategy's sessions and legs")
    keys.add_arguments(add("keys", keys.cmd_keys))
    sub = add("migrate", cmd_migrate)
    sub.add_argument(
        "--to", required=True, metavar="URL", help="the PostgreSQL database: postgresql://..."
    )
    sub.add_argument(
        "--from",
        dest="source",
        type=Path,
        metavar="PATH",
        help="the SQLite database to copy (default: the one posctl locates: --db, ...)",
    )
    return parser


def version() -> str:
    """``positiond X.Y.Z``: the installed package's version (the module's when not installed)."""
    try:
        return f"positiond {metadata.version('positiond')}"
    except metadata.PackageNotFoundError:
        return f"positiond {__version__}"


class PipeSafe(io.TextIOBase):
    """stdout that survives its reader going away (``posctl ... | head``): the first
    BrokenPipeError points the descriptor at /dev/null, and the command runs on to its exit code.
    """

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.broken = False

    def _closed_pipe(self) -> None:
        self.broken = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())  # later flushes (at exit too) go nowhere
        os.close(devnull)

    def write(self, text: str) -> int:
        try:
            return int(self._stream.write(text))
        except BrokenPipeError:
            self._closed_pipe()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._closed_pipe()

    def isatty(self) -> bool:
        return bool(self._stream.isatty())

    def fileno(self) -> int:
        return int(self._stream.fileno())

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return str(self._stream.encoding)


def main(argv: Sequence[str] | None = None) -> int:
    """Run posctl; return its exit code."""
    real_stdout = sys.stdout
    sys.stdout = PipeSafe(real_stdout)  # --help and --version print too
    try:
        return _run(build_parser().parse_args(argv))
    finally:
        sys.stdout.flush()
        sys.stdout = real_stdout


def _run(args: argparse.Namespace) -> int:
    try:
        located = locate(args.db, args.endpoint, args.config)
    except ConfigError as exc:
        print(f"posctl: config {exc}", file=sys.stderr)
        return EXIT_USAGE
    ctl = Ctl(
        db=located.db,
        endpoint=located.endpoint,
        json=args.json,
        timeout=args.timeout,
        out=render.console(),
        by=who(),
        db_source=located.db_source,
    )
    args.openalgo_settings = located.openalgo  # verify's default positionbook source
    args.openalgo_source = located.openalgo_source
    args.alerts_config = located.alerts  # posctl alerts test
    if not ctl.json and args.func not in (cmd_status, cmd_watch):
        ctl.out.print(located.header(), markup=False, highlight=False)
    try:
        code: int = args.func(ctl, args)
    except CtlError as exc:
        if ctl.json:
            ctl.emit(
                {"error": {"message": exc.message, "code": exc.code, "exit_code": exc.exit_code}}
            )
        print(f"posctl: {exc.message}", file=sys.stderr)
        return exc.exit_code
    return code

