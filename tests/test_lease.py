"""positiond.store.lease on a real PostgreSQL: registration and epochs, one daemon per host id,
the takeover of a lost host by exactly one daemon, fencing of the old epoch's writes, and the
rule that a stuck event loop does not renew its lease (pure, with an injected clock)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any, cast

import pytest

from positiond.ops import Batch
from positiond.store.dbfile import DatabaseLocked, Fenced
from positiond.store.dsn import PgDsn
from tests.helpers import UNIT, rows, wait_for
from tests.pg import admin_dsn, fresh_database
from tests.test_pg_store import apply, entry, start

pytest.importorskip("psycopg")

from positiond.store import lease
from positiond.store.postgres import PostgresStore, apply_direct, connect, migrate


@pytest.fixture
def pg() -> Iterator[PgDsn]:
    with fresh_database(admin_dsn()) as dsn:
        yield dsn


def test_each_registration_bumps_the_epoch_and_a_live_lease_refuses_the_same_host_id(
    pg: PgDsn,
) -> None:
    first, second = connect(pg), connect(pg)
    try:
        migrate(first)
        assert lease.register(first, "a", 30) == 1
        assert lease.register(second, "b", 30) == 1  # another host id: its own row
        with pytest.raises(DatabaseLocked, match="already running as host id 'a'"):
            lease.register(second, "a", 30)
        lease.release(first, "a", 1)  # a clean stop: the next one need not wait
        assert lease.register(second, "a", 30) == 2
    finally:
        first.close()
        second.close()


def test_a_stuck_event_loop_does_not_keep_its_lease_alive() -> None:
    clock = [0.0]
    held = lease.Lease(cast(Any, None), "a", 1, 3.0, monotonic=lambda: clock[0])
    held.beat()
    clock[0] = 1.9
    assert held.alive()
    clock[0] = 2.1  # two thirds of the TTL without the loop: no renewal
    assert not held.alive()
    held.beat()
    assert held.alive()


async def test_a_lost_host_is_taken_over_once_and_its_old_epoch_is_fenced(pg: PgDsn) -> None:
    ttl = 0.5
    a = await PostgresStore.open(pg, 1.0, "a", ttl)
    assert a.lease is not None
    await apply(a, start("s1"))
    await apply(a, entry("leg-1"))
    a.lease.stop()  # host a stops renewing (its writer connection is still open)
    b1 = lease.Lease(lambda: connect(pg), "b", 1, ttl)
    b2 = lease.Lease(lambda: connect(pg), "c", 1, ttl)
    wait_for(
        lambda: rows(pg, "SELECT 1 FROM daemons WHERE host_id = 'a' AND lease_expires < now()"),
        5, "the lease of a to run out",
    )  # fmt: skip
    counts: list[int] = []

    def sweep(held: lease.Lease) -> None:
        with connect(pg) as conn:
            counts.append(held.sweep(conn))

    sweepers = [threading.Thread(target=sweep, args=(h,)) for h in (b1, b2)]
    for t in sweepers:
        t.start()
    for t in sweepers:
        t.join(10 * UNIT)
    assert sorted(counts) == [0, 1]  # two daemons looked, one took it over
    session = rows(pg, "SELECT status, crash_source, crash_reason FROM strategy_sessions")[0]
    assert (session["status"], session["crash_source"]) == ("CRASHED", "HOST")
    assert session["crash_reason"].startswith("host lost: positiond on a stopped renewing")
    crashes = rows(pg, "SELECT count(*) AS n FROM position_events WHERE event_type = 'CRASH'")
    assert crashes[0]["n"] == 2  # the session and its leg, once
    # The old epoch's writer: refused, nothing committed.
    with pytest.raises(Fenced, match="no longer this daemon's"):
        await a.apply(Batch(ops=[entry("leg-2")], time=1.7e9))
    assert [r[0] for r in rows(pg, "SELECT position_key FROM strategy_positions")] == ["leg-1"]
    await a.close()
    # The host comes back: a new epoch, the revival under it.
    again = await PostgresStore.open(pg, 1.0, "a", ttl)
    try:
        assert again.epoch == 2
        revived = await apply(again, start("s1"))
        assert revived[0].ok and revived[0].data.get("revived"), revived
        owner = rows(pg, "SELECT host_id, owner_epoch, status FROM strategy_sessions")[0]
        assert tuple(owner) == ("a", 2, "RUNNING")
    finally:
        await again.close()


async def test_an_expired_lease_nobody_took_over_is_renewed_and_the_writer_goes_on(
    pg: PgDsn,
) -> None:
    a = await PostgresStore.open(pg, 1.0, "a", 0.3)
    assert a.lease is not None
    a.lease.stop()
    wait_for(  # past the TTL by the database's clock, nobody judging
        lambda: rows(pg, "SELECT 1 FROM daemons WHERE lease_expires < now()"), 5, "expiry"
    )
    with connect(pg) as conn:
        assert a.lease.renew(conn)  # nobody decided anything: the same epoch goes on
    await apply(a, start("s1"))
    await a.close()


async def test_posctl_s_direct_write_is_refused_while_a_daemon_s_lease_is_live(pg: PgDsn) -> None:
    a = await PostgresStore.open(pg, 1.0, "a", 30)
    try:
        with pytest.raises(DatabaseLocked, match="host id 'a'"):
            apply_direct(pg, Batch(ops=[start("s1")], time=1.7e9))
    finally:
        await a.close()  # a clean stop ends the lease
    assert apply_direct(pg, Batch(ops=[start("s1")], time=1.7e9))[0].ok
