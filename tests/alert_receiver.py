"""The webhook receiver of the alert tests lives in :mod:`bench.alert_receiver` (the benchmarks
use it too and never import the tests)."""

from __future__ import annotations

from bench.alert_receiver import Receiver

__all__ = ["Receiver"]
