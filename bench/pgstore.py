"""Scenario ``pgstore``: the same daemon on SQLite and on PostgreSQL, same run, same machine.

Two figures per backend, runs alternating between the backends:

- **durable entry ack**: ``save_position_entry`` returns once the daemon's transaction
  committed (SQLite's WAL commit, or PostgreSQL's COMMIT on its server): p50 and p99;
- **sustained update ingest**: K bare-protocol senders (no client-side coalescing: every update
  is one message) x L legs, updates as fast as they go; the rate at which updates become visible
  in the database (leg j's n-th update sets its price to 1 + n, so ``sum(current_price - 1)``
  counts them), read from a connection of the bench's own, and the messages the daemon decoded.

The PostgreSQL server is the one ``POSITIOND_TEST_PG_DSN`` names (a superuser's DSN: a fresh
database is made per run and dropped), else a throwaway cluster started with ``.ci/postgres``
(unix socket, fsync off: the figures are the daemon's and the driver's costs, not a disk's).
Without psycopg or a server the scenario fails with the reason.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.common import BenchError, DaemonProcess, start_workers, tmp_workdir
from bench.report import Scenario, stats

__all__ = ["run"]

ENV = "POSITIOND_TEST_PG_DSN"
REPO = Path(__file__).resolve().parent.parent
WARMUP = 20
FLUSH_INTERVAL = 0.1
POLL = 0.01
K, LEGS = 4, 10


@contextmanager
def _server() -> Iterator[tuple[str, str]]:
    """(admin DSN, where it came from)."""
    dsn = os.environ.get(ENV, "")
    if dsn:
        yield dsn, ENV
        return
    where = tmp_workdir("pdb-pg-")
    try:
        started = subprocess.run(
            [str(REPO / ".ci" / "postgres"), "start", str(where)],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        if started.returncode != 0:
            raise BenchError(f"no PostgreSQL: set {ENV} or fix .ci/postgres: {started.stderr}")
        yield started.stdout.strip(), ".ci/postgres"
    finally:
        subprocess.run([str(REPO / ".ci" / "postgres"), "stop", str(where)], check=False)
        shutil.rmtree(where, ignore_errors=True)


@contextmanager
def _database(admin: str) -> Iterator[str]:
    import psycopg

    name = f"pd_bench_{secrets.token_hex(5)}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield re.sub(r"^(postgres(?:ql)?://[^/?]*)(/[^?]*)?", rf"\1/{name}", admin)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _reader(db: str) -> tuple[Callable[[], float], Callable[[], None]]:
    """(visible updates now, close) on SQLite's file or PostgreSQL's database ``db``."""
    query = (
        "SELECT coalesce(sum(current_price - 1.0), 0) FROM strategy_positions "
        "WHERE status = 'ACTIVE'"
    )
    if db.startswith("postgres"):
        import psycopg

        pg = psycopg.connect(db, autocommit=True)
        return (lambda: float(pg.execute(query).fetchone()[0])), pg.close  # type: ignore[index]
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5, isolation_level=None)
    return (lambda: float(conn.execute(query).fetchone()[0])), conn.close


def _daemon(db: str | None) -> DaemonProcess:
    extra = ["--status-interval", "0.1"]
    daemon = DaemonProcess(flush_interval=FLUSH_INTERVAL, log_level="WARNING", extra=extra)
    if db is not None:
        daemon.args[daemon.args.index("--db") + 1] = db
    return daemon


def _entries(daemon: DaemonProcess, run: int, n: int) -> list[int]:
    pm = daemon.manager("bench-pgstore", ack_timeout=10.0)
    samples: list[int] = []
    try:
        if pm.start_session() is None:
            raise BenchError("the session start was not acknowledged")
        perf = time.perf_counter_ns
        for i in range(WARMUP + n):
            t0 = perf()
            leg = pm.save_position_entry(
                symbol=f"NIFTY28NOV25{24000 + i}CE", leg_type="CE", entry_price=100.0,
                stop_price=90.0, quantity=75, position_key=f"pg{run}-{i}",
            )  # fmt: skip
            elapsed = perf() - t0
            if leg.position_id is None:
                raise BenchError(f"entry {i} returned without its position id")
            if i >= WARMUP:
                samples.append(elapsed)
        pm.end_session()
    finally:
        pm.close(1.0)
    return samples


def _ingest(daemon: DaemonProcess, db: str, seconds: float) -> tuple[float, float]:
    """(updates visible /s, messages decoded /s) over ``seconds`` of K x LEGS bare senders."""
    spec = [(f"bare-{i}", "ingest-raw", [daemon.endpoint, str(LEGS), "session"])
            for i in range(K)]  # fmt: skip
    workers = start_workers(daemon.workdir, spec)
    visible, close = _reader(db)
    try:
        start = time.monotonic() + 0.3
        a, b = start + 0.5, start + 0.5 + seconds
        for worker in workers:
            worker.go(start=start, end=b)
        samples: list[tuple[float, float]] = []
        msgs: list[tuple[float, float]] = []
        while time.monotonic() < b + 0.05:
            now = time.monotonic()
            if now >= a:
                value = visible()
                if not samples or value != samples[-1][1]:
                    samples.append((now, value))
                status = daemon.status()
                age = time.time() - float(status["time"])
                msgs.append((now - age, float(status["counters"]["messages"])))
            time.sleep(POLL)
        for worker in workers:
            worker.result(time.monotonic() + 30)
    finally:
        close()
        for worker in workers:
            worker.close()
    inside = [s for s in samples if a <= s[0] <= b]
    if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
        raise BenchError(f"fewer than two commits seen in {seconds:g}s: {samples[-3:]}")
    (ta, va), (tb, vb) = inside[0], inside[-1]
    wire = [m for m in msgs if a <= m[0] <= b] or msgs
    (ma_t, ma), (mb_t, mb) = wire[0], wire[-1]
    return (vb - va) / (tb - ta), (mb - ma) / (mb_t - ma_t) if mb_t > ma_t else float("nan")


def run(quick: bool) -> Scenario:
    runs, n, seconds = (1, 100, 1.0) if quick else (3, 1000, 3.0)
    sc = Scenario("pgstore")
    per: dict[str, list[float]] = {}

    def record(name: str, value: float) -> None:
        per.setdefault(name, []).append(value)

    with _server() as (admin, source):
        for r in range(runs):
            for backend in ("sqlite", "postgres"):
                with _database(admin) if backend == "postgres" else _nothing() as url:
                    daemon = _daemon(url)
                    with daemon:
                        db = url or str(daemon.db)
                        s = stats(_entries(daemon, r, n), 1e-6)
                        record(f"{backend}_p50", s.p50)
                        record(f"{backend}_p99", s.p99)
                        visible, wire = _ingest(daemon, db, seconds)
                        record(f"{backend}_ingest", visible)
                        record(f"{backend}_wire", wire)
                        sc.raw.setdefault("warnings", []).extend(daemon.warnings())
    sc.row(f"durable entry ack p50 (ms), {runs} runs x {n}: PostgreSQL vs SQLite",
           per["postgres_p50"], per["sqlite_p50"])  # fmt: skip
    sc.row("durable entry ack p99 (ms): PostgreSQL vs SQLite",
           per["postgres_p99"], per["sqlite_p99"])  # fmt: skip
    sc.row(f"K={K} x L={LEGS} bare senders: updates written /s, PostgreSQL vs SQLite",
           per["postgres_ingest"], per["sqlite_ingest"], higher_is_better=True)  # fmt: skip
    sc.row("  ... messages the daemon decoded /s, PostgreSQL vs SQLite",
           per["postgres_wire"], per["sqlite_wire"], higher_is_better=True)  # fmt: skip
    sc.raw.update(runs=runs, n=n, warmup=WARMUP, ingest_s=seconds, k=K, legs=LEGS,
                  flush_interval=FLUSH_INTERVAL, server=source, per_run=per)  # fmt: skip
    sc.notes.append(
        f"pgstore: 'positiond' column = the daemon on PostgreSQL (server from {source}), "
        "'baseline' = the same daemon on SQLite (WAL, synchronous NORMAL), alternating runs; "
        "ratio > 1: PostgreSQL ahead"
    )
    return sc


@contextmanager
def _nothing() -> Iterator[None]:
    yield None
