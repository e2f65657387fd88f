"""The monitoring docs against a running daemon: every metric docs/MONITORING.md lists is
exposed (and every exposed one listed, with its type), the Grafana dashboard and the alert
rules name only metrics a real daemon exposes, and the rules pass promtool (check and unit
tests) when it is installed, a structural check otherwise.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fake_openalgo import FakeOpenAlgo, Reply, book
from tests.helpers import UNIT, DaemonProcess, wait_for

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "MONITORING.md"
DASHBOARD = ROOT / "docs" / "grafana" / "positiond.json"
RULES = ROOT / "docs" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "docs" / "prometheus" / "alerts_test.yml"
ALERTS = {
    "PositiondDown", "PositiondStrategyCrashed", "PositiondLegsNeedAttention",
    "PositiondWriterStalled", "PositiondDatabaseNotWritable", "PositiondAlertDeliveryFailing",
    "PositiondProtectiveOrderFailed",
}  # fmt: skip
METRIC = re.compile(r"\b((?:positiond|process)_[a-z_]+)\b|\b(up)\{")


@pytest.fixture(scope="module")
def exposition() -> Iterator[str]:
    """One scrape of a daemon with everything optional on: alert sinks, reconciliation,
    protective orders (dry-run)."""
    workdir = Path(tempfile.mkdtemp(prefix="pd-", dir="/tmp"))
    key_file = workdir / "openalgo.key"
    key_file.write_text("k" * 32 + "\n")
    with FakeOpenAlgo(api_key="k" * 32) as fake:
        fake.reply("positionbook", Reply(book()))
        config = workdir / "positiond.toml"
        config.write_text(
            f'[openalgo]\nhost = "{fake.url}"\napi_key_file = "{key_file}"\n'
            "reconcile_interval = 1\n"
            '[[alerts.sink]]\nname = "pager"\ntype = "command"\n'
            f"command = {json.dumps([sys.executable, '-c', 'pass'])}\n"
            '[protect]\nmode = "dry-run"\nstrategies = ["*"]\n'
        )
        daemon = DaemonProcess(workdir, "--config", str(config), "--metrics-listen",
                               "127.0.0.1:0")  # fmt: skip
        daemon.start()
        try:
            url: str = wait_for(lambda: daemon.status().get("metrics"), 5, "the metrics URL")
            with urllib.request.urlopen(url, timeout=5 * UNIT) as reply:
                yield reply.read().decode()
        finally:
            daemon.stop()
            shutil.rmtree(workdir, ignore_errors=True)


def exposed_types(text: str) -> dict[str, str]:
    """``# TYPE name type`` lines: family name (counters with _total) -> type."""
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))


def sample_names(text: str) -> set[str]:
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines()
            if line and not line.startswith("#")}  # fmt: skip


def documented() -> dict[str, str]:
    """The metrics table of docs/MONITORING.md: name -> type."""
    rows = re.findall(r"^\| `(positiond_[a-z_]+)` \| (\w+) \|", DOC.read_text(), re.MULTILINE)
    return dict(rows)


def referenced(text: str) -> set[str]:
    return {a or b for a, b in METRIC.findall(text)} - {""}


def test_every_metric_is_documented_with_its_type(exposition: str) -> None:
    ours = {k: v for k, v in exposed_types(exposition).items() if k.startswith("positiond_")}
    assert ours == documented()


def test_labelled_series_start_at_zero_and_carry_no_ids(exposition: str) -> None:
    labels = set(re.findall(r"[{,](\w+)=", exposition))
    assert labels <= {"status", "type", "cause", "sink", "result", "le", "version", "protocol",
                      "schema", "python", "sqlite"}  # fmt: skip
    assert 'positiond_alert_deliveries_total{result="failed",sink="pager"} 0.0' in exposition
    assert "positiond_reconcile_drift 0.0" in exposition
    for result in ("planned", "placed", "skipped", "failed", "triggered", "cancelled"):
        assert f'positiond_protective_orders_total{{result="{result}"}} 0.0' in exposition


def test_the_dashboard_names_only_exposed_metrics(exposition: str) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]
    assert len(exprs) >= 20
    names = set().union(*(referenced(e) for e in exprs))
    assert names - {"up"} <= sample_names(exposition), names - sample_names(exposition)
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("alive", "crash", "attention", "detection", "messages", "ack", "writer"):
        assert topic in titles, topic
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert all(p["datasource"]["uid"] == "${DS_PROMETHEUS}" for p in dashboard["panels"]
               if p["type"] != "row")  # fmt: skip


def test_the_rules_name_only_exposed_metrics(exposition: str) -> None:
    names = referenced(RULES.read_text())
    assert "up" in names  # the daemon-down rule
    assert names - {"up"} <= sample_names(exposition), names - sample_names(exposition)


def _check_structure(text: str) -> set[str]:
    """Without promtool (and without a YAML library): each rule has what Prometheus needs."""
    assert text.startswith("#") and "\ngroups:\n" in text and "\t" not in text
    blocks = re.split(r"\n      - alert: ", text)[1:]
    names = set()
    for block in blocks:
        name = block.split("\n", 1)[0].strip()
        names.add(name)
        assert re.search(r"\n        expr: \S", block), name
        assert re.search(r"\n        labels:\n          severity: (critical|warning)\n", block)
        assert re.search(r"\n        annotations:\n          summary: \"", block), name
        for duration in re.findall(r"\n        for: (\S+)", block):
            assert re.fullmatch(r"\d+[smh]", duration), (name, duration)
    return names


def test_the_rules_are_valid_and_cover_what_operators_page_on() -> None:
    assert _check_structure(RULES.read_text()) == ALERTS
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("no promtool (Debian: apt-get install prometheus); structure checked only")
    check = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True,
                           text=True, timeout=60 * UNIT)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in check.stdout
    # The unit tests: each alert fires (and stays quiet) on synthetic series as intended.
    unit = subprocess.run([promtool, "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent,
                          capture_output=True, text=True, timeout=60 * UNIT)  # fmt: skip
    assert unit.returncode == 0, unit.stdout + unit.stderr
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert tested == ALERTS
