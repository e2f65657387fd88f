"""The benchmark code must not rot: each scenario runs once at its tiny (--quick) size.

No timing is asserted (a loaded CI machine would make that flaky); only that every scenario
produces its rows, that the figures are numbers of the right sign, and that the report renders
as markdown and JSON.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

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
    seed,
    update,
    watch,
)
from bench.report import Row, Scenario, markdown_table

ROOT = Path(__file__).resolve().parent.parent


def _numbers(rows: list[Row]) -> list[float]:
    return [
        float(v)
        for r in rows
        for v in (r.positiond, r.baseline, *r.positiond_runs, *r.baseline_runs)
        if isinstance(v, int | float)
    ]


def _check(result: Scenario, name: str, min_rows: int) -> None:
    assert result.name == name
    assert len(result.rows) >= min_rows, [r.metric for r in result.rows]
    values = _numbers(result.rows)
    assert values, "no figures at all"
    assert all(math.isfinite(v) for v in values), values
    # Latencies, rates, sizes and growths: only RSS/database growth may be negative (tiny).
    assert all(v >= 0 for r in result.rows if "growth" not in r.metric for v in _numbers([r]))
    for row in result.rows:
        if row.target is not None:
            assert row.met in (True, False), row.metric  # judged, whatever the verdict
    table = markdown_table(result.rows)
    assert table.count("\n") == len(result.rows) + 1
    json.dumps([r.as_dict() for r in result.rows] + [result.raw], default=str)


SCENARIOS: list[tuple[str, Callable[[bool], Scenario], int]] = [
    ("entry", entry.run, 10),
    ("update", update.run, 6),
    ("ingest", ingest.run, 3),
    ("crash", crash.run, 6),
    ("footprint", footprint.run, 8),
    ("load", load.run, 4),
    ("outage", outage.run, 8),
    ("prune", prune.run, 10),
    ("alerts", alerts.run, 6),
    ("scrape", scrape.run, 12),
    ("watch", watch.run, 4),
    ("protect", protect.run, 3),
]


@pytest.mark.parametrize(("name", "scenario", "min_rows"), SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_scenario_runs_at_tiny_size(
    name: str, scenario: Callable[[bool], Scenario], min_rows: int
) -> None:
    _check(scenario(True), name, min_rows)


def test_pgstore_runs_at_tiny_size_on_the_test_server() -> None:
    from tests.pg import admin_dsn

    admin_dsn()  # skips without a server (fails under CI); the scenario takes the same one
    result = pgstore.run(True)
    _check(result, "pgstore", 4)
    assert result.raw["per_run"]["postgres_ingest"][0] > 0


def test_hostloss_runs_at_tiny_size(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.pg import admin_dsn  # skips without a PostgreSQL server (fails under CI)

    monkeypatch.setenv("POSITIOND_BENCH_PG_DSN", admin_dsn())
    _check(hostloss.run(True), "hostloss", 1)


def test_entry_baseline_without_sqlalchemy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the bench extra the seed-style baseline falls back to the same SQL on sqlite3."""
    monkeypatch.setattr(seed, "orm_available", lambda: False)
    result = entry.run(True)
    _check(result, "entry", 10)
    assert result.raw["baseline"].startswith("sqlite3")


def test_command_line_writes_table_and_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "update", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| update" in proc.stdout and "| target" in proc.stdout
    report = json.loads(out.read_text())
    rows = report["scenarios"]["update"]["rows"]
    assert rows and all("positiond_runs" in r and "met" in r for r in rows)


def test_the_tests_and_the_benchmarks_launch_the_daemon_one_way() -> None:
    """One launcher (bench.launcher) under both; the benchmarks never import the test suite."""
    import ast

    from bench import common, launcher
    from tests import helpers

    assert issubclass(helpers.DaemonProcess, launcher.DaemonProcess)
    assert issubclass(common.DaemonProcess, launcher.DaemonProcess)
    for module in (helpers, common):
        source = Path(str(module.__file__)).read_text()
        assert "Popen(" not in source.split("class DaemonProcess", 1)[1].split("\nclass ", 1)[0]
    for path in (ROOT / "bench").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom | ast.Import):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [
                    a.name for a in node.names
                ]
                assert not any(n.split(".")[0] == "tests" for n in names), path
