"""The OpenAlgo stand-in of the tests lives in :mod:`bench.fake_openalgo` (the benchmarks use it
too and never import the tests)."""

from __future__ import annotations

from bench.fake_openalgo import ACCOUNT_WIDE, FakeOpenAlgo, Received, Reply, book, main

__all__ = ["ACCOUNT_WIDE", "FakeOpenAlgo", "Received", "Reply", "book", "main"]
