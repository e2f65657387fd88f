"""``python -m bench [--quick] [--json PATH] [--only NAME]`` from the repository root."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import (
    alerts,
    crash,
    entry,
    footprint,
    hostloss,
    ingest,
    load,
    outage,
    pgstore,
    protect,
    prune,
    scrape,
    update,
    watch,
)
from bench.common import environment
from bench.report import Row, Scenario, markdown_table

SCENARIOS: dict[str, Callable[[bool], Scenario]] = {
    "entry": entry.run,
    "update": update.run,
    "ingest": ingest.run,
    "crash": crash.run,
    "footprint": footprint.run,
    "load": load.run,
    "outage": outage.run,
    "prune": prune.run,
    "alerts": alerts.run,
    "scrape": scrape.run,
    "watch": watch.run,
    "protect": protect.run,
    "pgstore": pgstore.run,
    "hostloss": hostloss.run,  # PostgreSQL: needs POSITIOND_BENCH_PG_DSN
}

NEEDS_SERVER = {"hostloss"}  # run by default only when a PostgreSQL DSN is given


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark positiond (a real daemon subprocess) against the seed's "
        "in-process SQLite writes. Ratio = baseline / positiond (>1: positiond is faster).",
    )
    parser.add_argument("--quick", action="store_true", help="tiny run (a few seconds)")
    parser.add_argument("--json", metavar="PATH", type=Path, help="write raw figures here")
    parser.add_argument("--only", choices=sorted(SCENARIOS), help="run one scenario")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    names = [args.only] if args.only else [n for n in SCENARIOS if n not in NEEDS_SERVER or any(
        os.environ.get(v) for v in ("POSITIOND_BENCH_PG_DSN", "POSITIOND_TEST_PG_DSN"))]
    rows: list[Row] = []
    notes: list[str] = []
    report: dict[str, Any] = {
        "quick": args.quick,
        "environment": environment(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "scenarios": {},
    }
    failed: list[str] = []
    for name in names:
        print(f"running {name}...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            result = SCENARIOS[name](args.quick)
        except Exception as exc:
            failed.append(name)
            traceback.print_exc()
            report["scenarios"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        took = time.perf_counter() - t0
        print(f"  {name} done in {took:.1f}s", file=sys.stderr, flush=True)
        rows += result.rows
        notes += result.notes
        report["scenarios"][name] = {
            "seconds": took,
            "rows": [r.as_dict() for r in result.rows],
            "raw": result.raw,
            "notes": result.notes,
        }
    env = report["environment"]
    print(
        f"\npositiond bench{' (--quick)' if args.quick else ''}: Python {env['python']}, "
        f"SQLite {env['sqlite']}, libzmq {env['libzmq']}, {env['cpus']} CPUs, load average "
        f"{env['loadavg'][0]:.1f} at start and {os.getloadavg()[0]:.1f} at end; ratio = "
        "baseline / positiond (positiond / baseline for rates): above 1 positiond is ahead\n"
    )
    if rows:
        print(markdown_table(rows))
    for note in notes:
        print(f"\n- {note}")
    if failed:
        print(f"\nFAILED: {', '.join(failed)}")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2, default=str))
        print(f"\nraw figures: {args.json}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
