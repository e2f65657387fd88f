"""Scenario ``hostloss``: how long a lost host's sessions stay RUNNING (PostgreSQL, two daemons).

Two daemons with host ids ``a`` and ``b`` on one fresh PostgreSQL database; a session on ``a``;
``a`` SIGKILLed; the time until ``b`` has marked that session CRASHED (``crash_source`` HOST),
for a few lease TTLs, a few runs each. The bound is the TTL plus one renew period (TTL / 3):
the lease runs out at most a TTL after the kill, and ``b`` looks once per renew period.

Needs a server: ``POSITIOND_BENCH_PG_DSN`` (else ``POSITIOND_TEST_PG_DSN``), a superuser's DSN
on which a throwaway database is created and dropped (``.ci/postgres start DIR`` makes one).
"""

from __future__ import annotations

import os
import re
import signal
import time
import uuid
from typing import Any

from bench.common import BenchError, DaemonProcess, poll_until
from bench.report import Scenario, at_most
from positiond.store.dsn import PgDsn

__all__ = ["run"]


def _server() -> str:
    dsn = os.environ.get("POSITIOND_BENCH_PG_DSN") or os.environ.get("POSITIOND_TEST_PG_DSN")
    if not dsn:
        raise BenchError(
            "hostloss needs PostgreSQL: set POSITIOND_BENCH_PG_DSN (.ci/postgres start DIR)"
        )
    return dsn


def _database(admin: str) -> tuple[PgDsn, str]:
    import psycopg

    name = f"pd_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return PgDsn(re.sub(r"^(postgres(?:ql)?://[^/?]*)(/[^?]*)?", rf"\1/{name}", admin)), name


def _drop(admin: str, name: str) -> None:
    import psycopg

    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _daemon(db: PgDsn, host: str, ttl: float) -> DaemonProcess:
    daemon = DaemonProcess(extra=("--host-id", host, "--lease-ttl", f"{ttl:g}"))
    daemon.args[daemon.args.index("--db") + 1] = db.url
    return daemon


def _status(db: PgDsn, sid: int) -> str | None:
    import psycopg

    with psycopg.connect(db.url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT crash_source FROM strategy_sessions WHERE id = %s AND status = 'CRASHED'",
            (sid,),
        ).fetchone()
    return None if row is None else str(row[0])


def _once(admin: str, ttl: float) -> float:
    db, name = _database(admin)
    try:
        with _daemon(db, "a", ttl) as a, _daemon(db, "b", ttl):
            pm = a.manager("bench-hostloss", ack_timeout=2.0)
            try:
                sid = pm.start_session()
                if sid is None:
                    raise BenchError("no session on daemon a")
                t0 = time.monotonic()
                assert a.proc is not None
                a.proc.send_signal(signal.SIGKILL)
                a.proc.wait()
                source = poll_until(lambda: _status(db, sid), 4 * ttl + 10, "the verdict")
                took = time.monotonic() - t0
            finally:
                pm.close(0.2)
            if source != "HOST":
                raise BenchError(f"crash_source {source}, expected HOST")
            return took
    finally:
        _drop(admin, name)


def run(quick: bool) -> Scenario:
    admin = _server()
    sc = Scenario("hostloss")
    ttls = (1.0,) if quick else (1.0, 2.0, 5.0)
    runs = 2 if quick else 3
    raw: dict[str, Any] = {}
    for ttl in ttls:
        times = [_once(admin, ttl) for _ in range(runs)]
        raw[f"ttl_{ttl:g}"] = times
        sc.row(
            f"host loss detected (s), lease_ttl {ttl:g}s", times,
            target=at_most(ttl * 4 / 3 + 0.5, "s"),
        )  # fmt: skip
    sc.raw = raw
    sc.notes.append(
        "hostloss: SIGKILL of daemon a to its session CRASHED (HOST) by daemon b, same "
        "PostgreSQL; the bound is lease_ttl + lease_ttl/3 (+0.5 s of polling and commit)"
    )
    return sc
