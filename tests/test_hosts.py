"""Several daemons ("hosts", told apart by --host-id) on one PostgreSQL database, real processes:
a host lost (its daemon and strategies SIGKILLed) has its sessions marked CRASHED by the other
daemon within the lease TTL plus one renew period; a daemon frozen past its lease (SIGSTOP) is
fenced when it wakes: it commits nothing over the other's verdict, re-registers with a new
epoch, and its strategy revives its session; PostgreSQL restarted under load loses no
acknowledged entry or exit and stores none twice. (docs/DATABASE.md §6.)"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from positiond.store.dsn import PgDsn
from positiond_client import Delivery, PositionPersistenceManager
from tests.helpers import UNIT, DaemonProcess, rows, wait_for
from tests.pg import admin_dsn, fresh_database
from tests.test_daemon import Strategy

pytest.importorskip("psycopg")

TTL = 1.5 * UNIT  # the lease; renewed every TTL / 3


@pytest.fixture
def pg() -> Iterator[PgDsn]:
    with fresh_database(admin_dsn()) as dsn:
        yield dsn


@pytest.fixture
def hosts(workdir: Path, pg: PgDsn) -> Iterator[dict[str, DaemonProcess]]:
    made: dict[str, DaemonProcess] = {}
    for host in ("host-a", "host-b"):
        (workdir / host).mkdir()
        made[host] = DaemonProcess(
            workdir / host, "--host-id", host, "--lease-ttl", f"{TTL:g}", db=pg
        ).start()
    yield made
    for daemon in made.values():
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.proc.send_signal(signal.SIGCONT)
            daemon.stop()


@pytest.fixture
def strategies() -> Iterator[list[Strategy]]:
    made: list[Strategy] = []
    yield made
    for strategy in made:
        strategy.close()


def session(pg: PgDsn, sid: object) -> dict[str, object]:
    found = rows(
        pg,
        "SELECT status, crash_source, crash_reason, host_id, owner_epoch FROM strategy_sessions "
        "WHERE id = ?",
        (sid,),
    )
    return dict(found[0])


def epoch(pg: PgDsn, host: str) -> int:
    return int(rows(pg, "SELECT epoch FROM daemons WHERE host_id = ?", (host,))[0]["epoch"])


def synced(strategy: Strategy, notices: list[str] | None = None) -> dict[str, object]:
    """Ask a streaming strategy for a sync; its answer (notices printed meanwhile go to
    ``notices``)."""
    strategy.send("sync")
    while True:
        answer: dict[str, object] = json.loads(strategy.line())
        if "notice" not in answer:
            return answer
        if notices is not None:
            notices.append(str(answer["notice"]))


def start(
    daemon: DaemonProcess, strategies: list[Strategy], prefix: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[Strategy, int]:
    with monkeypatch.context() as env:  # position keys are unique across hosts
        env.setenv("STRATEGY_KEY_PREFIX", prefix)
        strategy = Strategy(daemon.endpoint, "stream", "20")
    strategies.append(strategy)
    info = strategy.info()
    return strategy, int(info["session_id"])  # type: ignore[call-overload]


def test_a_lost_host_s_sessions_are_crashed_by_the_other_and_it_comes_back_with_a_new_epoch(
    hosts: dict[str, DaemonProcess],
    strategies: list[Strategy],
    pg: PgDsn,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = hosts["host-a"], hosts["host-b"]
    on_a, sid_a = start(a, strategies, "a-", monkeypatch)
    on_b, sid_b = start(b, strategies, "b-", monkeypatch)
    assert session(pg, sid_a)["host_id"] == "host-a" and session(pg, sid_b)["host_id"] == "host-b"
    first = epoch(pg, "host-a")
    assert session(pg, sid_a)["owner_epoch"] == first

    killed = time.monotonic()
    on_a.proc.send_signal(signal.SIGKILL)
    a.proc.send_signal(signal.SIGKILL)  # the whole host: daemon and strategy at once
    a.proc.wait()
    wait_for(lambda: session(pg, sid_a)["status"] == "CRASHED", 4 * TTL, "host-a's session CRASHED")
    took = time.monotonic() - killed
    print(f"host loss detected in {took:.2f}s (lease ttl {TTL:g}s, bound {TTL * 4 / 3:.2f}s)")
    crashed = session(pg, sid_a)
    assert crashed["crash_source"] == "HOST"
    assert str(crashed["crash_reason"]).startswith(
        "host lost: positiond on host-a stopped renewing its lease at "
    )
    assert took <= TTL * 4 / 3 + 1.0 * UNIT  # the TTL, one renew period, polling
    legs = rows(pg, "SELECT status, was_crashed FROM strategy_positions WHERE session_id = ? "
                    "AND status != 'CLOSED'", (sid_a,))  # fmt: skip
    assert [tuple(r) for r in legs] == [("CRASHED", True)] * 2
    events = rows(
        pg, "SELECT count(*) AS n FROM position_events WHERE session_id = ? AND event_type = "
        "'CRASH'", (sid_a,),
    )  # fmt: skip
    assert events[0]["n"] == 3  # the session and its two open legs
    alerted = rows(pg, "SELECT body FROM alert_outbox WHERE kind = 'crashed' AND session_id = ?",
                   (sid_a,))  # fmt: skip
    assert len(alerted) == 1 and "host lost: positiond on host-a" in alerted[0]["body"]
    # host-b's strategy never noticed: its syncs keep being acknowledged, its session lives.
    notices: list[str] = []
    for _ in range(3):
        assert synced(on_b, notices)["synced"] is True
    assert notices == []
    assert session(pg, sid_b)["status"] == "RUNNING"
    assert not [w for w in b.warnings() if "host lost" not in w]

    a.start()  # the same host id again: a new epoch
    assert epoch(pg, "host-a") == first + 1
    assert rows(pg, "SELECT lost_at FROM daemons WHERE host_id = 'host-a'")[0]["lost_at"] is None


def test_a_frozen_daemon_is_fenced_and_commits_nothing_over_the_other_s_verdict(
    hosts: dict[str, DaemonProcess],
    strategies: list[Strategy],
    pg: PgDsn,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a = hosts["host-a"]  # host-b, running too, gives the verdict
    on_a, sid_a = start(a, strategies, "a-", monkeypatch)
    first = epoch(pg, "host-a")
    a.proc.send_signal(signal.SIGSTOP)  # frozen: its lease runs out, its strategy keeps going
    wait_for(lambda: session(pg, sid_a)["status"] == "CRASHED", 4 * TTL, "host-b's verdict")
    verdict = rows(pg, "SELECT max(id) AS id FROM position_events WHERE session_id = ?", (sid_a,))
    a.proc.send_signal(signal.SIGCONT)
    # It wakes with updates of the old epoch pending: fenced, logged, registered again, and its
    # strategy re-announces and revives its session under the new epoch.
    wait_for(lambda: "fenced" in a.output(), 5, "host-a to see it is fenced")
    wait_for(lambda: epoch(pg, "host-a") == first + 1, 10, "host-a registered again")
    wait_for(lambda: session(pg, sid_a)["status"] == "RUNNING", 10, "the session revived")
    assert session(pg, sid_a)["owner_epoch"] == first + 1
    after = rows(
        pg, "SELECT event_type FROM position_events WHERE session_id = ? AND id > ? ORDER BY id",
        (sid_a, verdict[0]["id"]),
    )  # fmt: skip
    # Nothing of the old epoch landed after the verdict: the revival comes first.
    assert after and after[0]["event_type"] == "REVIVED", [r["event_type"] for r in after]
    wait_for(lambda: synced(on_a).get("synced") is True, 10, "the strategy acknowledged again")
    a.alive()


def _cluster() -> Path:
    """The directory of the .ci/postgres cluster the tests run on (its DSN's host)."""
    host = parse_qs(urlparse(admin_dsn()).query).get("host", [""])[0]
    if not host or not (Path(host) / "bindir").exists():
        pytest.skip("restarting PostgreSQL needs the .ci/postgres cluster (.ci/postgres restart)")
    return Path(host)


def test_postgresql_restarted_under_load_loses_no_acked_entry_or_exit_and_duplicates_none(
    workdir: Path, pg: PgDsn
) -> None:
    cluster = _cluster()
    daemon = DaemonProcess(
        workdir, "--host-id", "solo", "--lease-ttl", f"{TTL:g}", "--flush-interval", "0.05", db=pg
    ).start()
    pm = PositionPersistenceManager("restart", endpoint=daemon.endpoint, ack_timeout=1.0)
    entries: set[str] = set()  # acknowledged (Delivery.STORED)
    exits: set[str] = set()
    stop = threading.Event()

    def load() -> None:
        i = 0
        while not stop.is_set():
            leg = pm.save_position_entry(
                symbol="NIFTY28NOV2524000CE", entry_price=100.0, quantity=75, position_key=f"k{i}"
            )
            if leg.delivery is Delivery.STORED:
                entries.add(leg.key)
            if i % 2 == 0 and pm.save_position_exit(leg, 101.0, "TARGET") is Delivery.STORED:
                exits.add(leg.key)
            i += 1

    try:
        assert pm.start_session() is not None
        worker = threading.Thread(target=load, daemon=True)
        worker.start()
        wait_for(lambda: len(entries) >= 20, 10, "entries acknowledged")
        subprocess.run([".ci/postgres", "restart", str(cluster)], check=True, timeout=120)
        before = len(entries)
        wait_for(lambda: len(entries) >= before + 20, 30, "acknowledgements after the restart")
        stop.set()
        worker.join(10 * UNIT)
        assert pm.sync(20 * UNIT)
        stored = rows(pg, "SELECT position_key, status FROM strategy_positions")
        keys = [r[0] for r in stored]
        assert len(keys) == len(set(keys))
        assert entries <= set(keys), "an acknowledged entry was lost"
        assert exits <= {r[0] for r in stored if r[1] == "CLOSED"}, "an acknowledged exit lost"
        twice = rows(
            pg, "SELECT position_id, event_type FROM position_events WHERE event_type IN "
            "('ENTRY', 'EXIT') GROUP BY position_id, event_type HAVING count(*) > 1",
        )  # fmt: skip
        assert twice == []
        print(f"{len(entries)} entries and {len(exits)} exits acknowledged, all stored once")
        assert "fenced" not in daemon.output()  # its own lease, renewed after: no restart
    finally:
        stop.set()
        pm.close(1.0)
        daemon.stop()


def test_a_host_frozen_inside_a_write_stalls_the_others_only_until_its_lease_runs_out(
    hosts: dict[str, DaemonProcess],
    strategies: list[Strategy],
    pg: PgDsn,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # host-a freezes in the middle of a batch: its writer's transaction stays open holding the
    # one write lock and its own daemons row. Every writer waits for that lock; the other
    # host's sweeper must not: it ends that transaction once host-a's lease ran out, crashes
    # host-a's sessions, and host-b's writes go on. (A raw connection named as host-a's writer
    # stands in for the frozen one, opened before host-a is killed so its lease stops.)
    import psycopg

    from positiond.store.pgconn import WRITE_LOCK

    a, b = hosts["host-a"], hosts["host-b"]
    on_a, sid_a = start(a, strategies, "a-", monkeypatch)
    on_b, sid_b = start(b, strategies, "b-", monkeypatch)
    frozen = psycopg.connect(str(pg), application_name="positiond:host-a")
    try:
        frozen.execute(f"SELECT pg_advisory_xact_lock({WRITE_LOCK})")
        frozen.execute("SELECT 1 FROM daemons WHERE host_id = 'host-a' FOR SHARE")
        on_a.proc.send_signal(signal.SIGKILL)
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait()
        wait_for(lambda: session(pg, sid_a)["status"] == "CRASHED", 6 * TTL,
                 "host-a's session CRASHED past its frozen transaction")  # fmt: skip
        with pytest.raises(psycopg.OperationalError):  # ended by host-b's sweeper
            frozen.execute("SELECT 1")
    finally:
        frozen.close()
    # host-b's writer waited for the lock meanwhile (its strategy may have seen it as slow);
    # now it writes again, and nothing of host-b was declared dead.
    wait_for(lambda: synced(on_b)["synced"] is True, 10, "host-b's writes again")
    assert synced(on_b)["synced"] is True
    assert session(pg, sid_b)["status"] == "RUNNING"
