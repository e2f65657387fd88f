"""Figures and how they are shown: percentiles, per-run summaries, targets, the markdown table.

A scenario repeats its measurement a few times (``runs``). A table cell is the **median over
the runs** of a per-run figure (a p50, a p99, a rate...); the spread column shows the smallest
and largest run, so a noisy machine shows itself instead of hiding in one lucky run.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Row",
    "Scenario",
    "Stats",
    "Target",
    "at_least",
    "at_most",
    "markdown_table",
    "percentile",
    "ratio_at_least",
    "stats",
]

Value = float | str | None
Runs = Sequence[float]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of already sorted values, linear interpolation."""
    if not sorted_values:
        return math.nan
    if len(sorted_values) == 1:
        return float(sorted_values[0])
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = pos - lo
    return float(sorted_values[lo]) + (float(sorted_values[hi]) - float(sorted_values[lo])) * frac


@dataclass(frozen=True)
class Stats:
    n: int
    p50: float
    p99: float
    p999: float
    max: float
    mean: float
    min: float

    def as_dict(self) -> dict[str, float]:
        return {
            "n": self.n,
            "min": self.min,
            "p50": self.p50,
            "p99": self.p99,
            "p99.9": self.p999,
            "max": self.max,
            "mean": self.mean,
        }


def stats(values: Iterable[float], scale: float = 1.0) -> Stats:
    """Summary of ``values`` multiplied by ``scale`` (e.g. 1e-6 for ns -> ms)."""
    data = sorted(v * scale for v in values)
    if not data:
        return Stats(0, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan)
    return Stats(
        n=len(data),
        p50=percentile(data, 50),
        p99=percentile(data, 99),
        p999=percentile(data, 99.9),
        max=data[-1],
        mean=sum(data) / len(data),
        min=data[0],
    )


@dataclass(frozen=True)
class Target:
    """What the issue asks of a figure: ``text`` for the table, ``check`` decides met/not met."""

    text: str
    check: Callable[[float | None, float | None], bool]  # (positiond, ratio) -> met?


def at_most(limit: float, unit: str = "") -> Target:
    return Target(f"≤ {limit:g}{unit}", lambda p, r: p is not None and p <= limit)


def at_least(limit: float, unit: str = "") -> Target:
    return Target(f"≥ {limit:g}{unit}", lambda p, r: p is not None and p >= limit)


def ratio_at_least(limit: float) -> Target:
    return Target(f"ratio ≥ {limit:g}x", lambda p, r: r is not None and r >= limit)


def _median(value: Value | Runs) -> tuple[Value, list[float]]:
    if value is None or isinstance(value, str | int | float):
        return value, []
    runs = [float(v) for v in value if not math.isnan(v)]
    return (statistics.median(runs) if runs else math.nan), runs


@dataclass(frozen=True)
class Row:
    """One line of the table; ``ratio`` is baseline / positiond (>1: positiond is better).

    For a rate (higher is better) pass ``higher_is_better``: the ratio becomes positiond /
    baseline, so >1 still means positiond is ahead.
    """

    scenario: str
    metric: str
    positiond: Value
    baseline: Value = None
    positiond_runs: tuple[float, ...] = ()
    baseline_runs: tuple[float, ...] = ()
    target: Target | None = None
    higher_is_better: bool = False

    @property
    def ratio(self) -> float | None:
        p, b = self.positiond, self.baseline
        if not (isinstance(p, int | float) and isinstance(b, int | float)):
            return None
        if math.isnan(p) or math.isnan(b):
            return None
        if self.higher_is_better:
            return float(p) / float(b) if b > 0 else None
        return float(b) / float(p) if p > 0 else None

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        p = self.positiond if isinstance(self.positiond, int | float) else None
        if p is not None and math.isnan(p):
            p = None
        return self.target.check(p, self.ratio)

    def as_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "positiond": self.positiond,
            "baseline": self.baseline,
            "positiond_runs": list(self.positiond_runs),
            "baseline_runs": list(self.baseline_runs),
            "ratio": self.ratio,
            "target": None if self.target is None else self.target.text,
            "met": self.met,
        }


@dataclass
class Scenario:
    """What one scenario hands back: table rows, raw figures for --json, remarks for the reader."""

    name: str
    rows: list[Row] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def row(
        self,
        metric: str,
        positiond: Value | Runs,
        baseline: Value | Runs = None,
        *,
        target: Target | None = None,
        higher_is_better: bool = False,
    ) -> Row:
        """Add a row; a sequence of per-run values is shown as its median and its spread."""
        p, p_runs = _median(positiond)
        b, b_runs = _median(baseline)
        row = Row(self.name, metric, p, b, tuple(p_runs), tuple(b_runs), target, higher_is_better)
        self.rows.append(row)
        return row


def _fmt(value: Value) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    if math.isnan(value):
        return "nan"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _spread(runs: Sequence[float]) -> str:
    if len(runs) < 2:
        return "—"
    return f"{_fmt(min(runs))} to {_fmt(max(runs))}"


def _verdict(row: Row) -> str:
    met = row.met
    if met is None:
        return ""
    return "met" if met else "**not met**"


def markdown_table(rows: Sequence[Row]) -> str:
    header = ["scenario", "metric", "positiond", "runs", "baseline", "runs", "ratio", "target", ""]
    body = [
        [
            r.scenario,
            r.metric,
            _fmt(r.positiond),
            _spread(r.positiond_runs),
            _fmt(r.baseline),
            _spread(r.baseline_runs),
            "—" if r.ratio is None else f"{r.ratio:.2f}x",
            "" if r.target is None else r.target.text,
            _verdict(r),
        ]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    left = {0, 1, 7, 8}

    def render(cells: Sequence[str]) -> str:
        padded = [
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join(
            ("-" * (w + 2)) if i in left else ("-" * (w + 1) + ":") for i, w in enumerate(widths)
        )
        + "|"
    )
    return "\n".join([render(header), rule, *(render(line) for line in body)])
