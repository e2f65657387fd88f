"""The Prometheus endpoint: scraped over real HTTP from a real daemon during a scripted day,
its settings, and what it refuses (off by default, loopback only, a taken port).

Real daemon processes, real sockets, real SQLite files; strategies are subprocesses killed
with SIGKILL or stopped with SIGSTOP, posctl runs as a subprocess.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import sqlite3
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from positiond.config import ConfigError, build_parser, format_config, load
from positiond.metrics.endpoint import IDLE_TIMEOUT
from positiond.metrics.listen import Listen, parse_listen
from positiond.store.dsn import PgDsn
from positiond_client import PositionPersistenceManager
from tests.helpers import UNIT, DaemonProcess, wait_for
from tests.pg import both_backends
from tests.test_ctl import crash_in_process, ctl, managers
from tests.test_daemon import Strategy

__all__ = ["managers"]  # the fixture, used here

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# ---- helpers -------------------------------------------------------------------------------


def metrics_url(daemon: DaemonProcess) -> str:
    url: str = wait_for(lambda: daemon.status().get("metrics"), 5, "the metrics URL")
    return url


def scrape(url: str) -> Samples:
    """One real HTTP GET of /metrics, parsed by prometheus_client's own parser."""
    with urllib.request.urlopen(url, timeout=5 * UNIT) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def until(url: str, what: str, check: Callable[[Samples], bool], timeout: float = 5) -> Samples:
    """Scrape until ``check`` holds (the database counts are cached for 0.5 s)."""

    def scraped() -> Samples | None:
        samples = scrape(url)
        return samples if check(samples) else None

    return wait_for(scraped, timeout, what)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


def start(
    workdir: Path, *extra: str, config: str | None = None, db: Path | PgDsn | None = None
) -> DaemonProcess:
    args = ["--flush-interval", "0.05", "--metrics-listen", "127.0.0.1:0", *extra]
    if config is not None:
        path = workdir / "positiond.toml"
        path.write_text(config)
        args += ["--config", str(path)]
    return DaemonProcess(workdir, *args, heartbeat_timeout=1.0, db=db).start()


@pytest.fixture
def started() -> Iterator[list[DaemonProcess]]:
    daemons: list[DaemonProcess] = []
    yield daemons
    for daemon in daemons:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop()


# Two alert sinks: one that works, one that always fails (so both results move).
SINKS = (
    '[[alerts.sink]]\nname = "pager"\ntype = "command"\n'
    f"command = {json.dumps([sys.executable, '-c', 'import sys; sys.stdin.read()'])}\n"
    '[[alerts.sink]]\nname = "broken"\ntype = "command"\ncommand = ["false"]\n'
)


# ---- a scripted day --------------------------------------------------------------------------


@both_backends
def test_a_scripted_day_moves_the_metrics_as_it_should(
    db: Path | PgDsn,
    workdir: Path,
    started: list[DaemonProcess],
    strategies: list[Strategy],
    managers: list[PositionPersistenceManager],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    daemon = start(workdir, config=SINKS, db=db)
    started.append(daemon)
    url = metrics_url(daemon)
    assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")

    # Morning: nothing yet, every labelled series already there at 0.
    m = scrape(url)
    for status in ("RUNNING", "COMPLETED", "CRASHED", "STALLED"):
        assert value(m, "positiond_sessions", status=status) == 0
    for cause in ("disconnect", "heartbeat", "not_returned", "reported"):
        assert value(m, "positiond_crashes_total", cause=cause) == 0
    assert value(m, "positiond_crash_detection_seconds_count") == 0
    assert value(m, "positiond_attention_legs") == 0
    assert value(m, "positiond_messages_total", type="update") == 0
    assert value(m, "positiond_alert_deliveries_total", sink="pager", result="delivered") == 0
    assert value(m, "positiond_healthy") == 1 and value(m, "positiond_database_writable") == 1
    assert value(m, "positiond_database_readable") == 1
    # PostgreSQL keeps its own files: no size of ours to report.
    assert ("positiond_database_size_bytes" in names(m)) == isinstance(db, Path)
    info = [k for k in m if k[0] == "positiond_build_info"]
    assert len(info) == 1 and m[info[0]] == 1

    # Start, entries, updates: strategy_proc "hold" opens ce-1 and pe-1, closes ce-closed and
    # moves ce-1's stop; an in-process strategy streams updates on its own leg.
    strategy = Strategy(daemon.endpoint, "hold")
    strategies.append(strategy)
    strategy.info()
    pm = PositionPersistenceManager("trend", endpoint=daemon.endpoint, ack_timeout=5)
    managers.append(pm)
    assert pm.start_session() is not None
    leg = pm.save_position_entry(symbol="NIFTY28NOV2524500CE", leg_type="CE", entry_price=50.0,
                                 stop_price=40.0, quantity=25, position_key="trend-1")  # fmt: skip
    for i in range(5):  # each sent before the next (a sync waits for it): none coalesced
        pm.queue_position_update(leg, current_price=51.0 + i, stop_price=41.0 + i)
        assert pm.sync(timeout=5 * UNIT)

    m = until(
        url, "two sessions, three open legs, the updates",
        lambda m: value(m, "positiond_sessions", status="RUNNING") == 2
        and value(m, "positiond_legs", status="ACTIVE") == 3
        and value(m, "positiond_legs", status="CLOSED") == 1
        and value(m, "positiond_messages_total", type="update") >= 5,
    )  # fmt: skip
    assert value(m, "positiond_messages_total", type="start") == 2
    assert value(m, "positiond_messages_total", type="entry") == 4
    assert value(m, "positiond_messages_total", type="exit") == 1
    assert value(m, "positiond_acks_total") >= 12  # 2 starts, 4 entries, 1 exit, 5 syncs
    assert value(m, "positiond_commit_duration_seconds_count") >= 1
    commits = value(m, "positiond_commit_duration_seconds_count")
    assert value(m, "positiond_batch_ops_count") == commits
    assert value(m, "positiond_attention_legs") == 0
    assert value(m, "positiond_crashes_total", cause="disconnect") == 0

    # kill -9: the disconnect verdict, its detection delay, its legs needing attention.
    strategy.proc.send_signal(signal.SIGKILL)

    m = until(url, "crashes_total{cause=disconnect} 1",
              lambda m: value(m, "positiond_crashes_total", cause="disconnect") == 1)  # fmt: skip
    assert value(m, "positiond_crash_detection_seconds_count") == 1
    # ~ from its last message (a heartbeat every 0.5 s) to the commit: not the heartbeat timeout
    assert 0 <= value(m, "positiond_crash_detection_seconds_sum") < 5 * UNIT
    m = until(url, "attention 2", lambda m: value(m, "positiond_attention_legs") == 2)
    assert value(m, "positiond_sessions", status="CRASHED") == 1
    assert value(m, "positiond_sessions", status="RUNNING") == 1
    assert value(m, "positiond_legs", status="CRASHED") == 2
    assert value(m, "positiond_legs", status="ACTIVE") == 1
    deliveries = "positiond_alert_deliveries_total"
    until(url, "the crash alert delivered to pager",
          lambda m: value(m, deliveries, sink="pager", result="delivered") == 1, 10)  # fmt: skip
    until(url, "the broken sink's retry counted",
          lambda m: value(m, deliveries, sink="broken", result="retried") >= 1, 10)  # fmt: skip

    # A review flag via posctl: still attention, now as NEEDS_REVIEW.
    assert ctl(daemon, "resolve", "pe-1", "--review", "broker shows 50").returncode == 0
    m = until(url, "NEEDS_REVIEW 1",
              lambda m: value(m, "positiond_legs", status="NEEDS_REVIEW") == 1)  # fmt: skip
    assert value(m, "positiond_legs", status="CRASHED") == 1
    assert value(m, "positiond_attention_legs") == 2
    assert value(m, "positiond_messages_total", type="resolve") == 1
    # Closed by hand: no longer needs anyone.
    assert ctl(daemon, "resolve", "ce-1", "--closed", "--exit-price", "99").returncode == 0
    until(url, "attention 1", lambda m: value(m, "positiond_attention_legs") == 1)

    # A strategy stuck (SIGSTOP): missed heartbeats, detected after the heartbeat timeout.
    monkeypatch.setenv("STRATEGY_KEY_PREFIX", "stuck-")  # legs of its own
    stuck = Strategy(daemon.endpoint, "hold")
    strategies.append(stuck)
    stuck.info()
    before = value(scrape(url), "positiond_crash_detection_seconds_sum")
    stuck.proc.send_signal(signal.SIGSTOP)
    try:
        m = until(url, "a heartbeat verdict",
                  lambda m: value(m, "positiond_crashes_total", cause="heartbeat") == 1, 10)
    finally:
        stuck.proc.send_signal(signal.SIGCONT)
    assert value(m, "positiond_crash_detection_seconds_count") == 2
    assert value(m, "positiond_crash_detection_seconds_sum") - before >= 0.9  # >= the 1 s timeout

    # A strategy that reports its own crash: counted, but no detection delay to measure.
    crash_in_process(daemon, managers, "bn-1")
    m = until(url, "a reported crash",
              lambda m: value(m, "positiond_crashes_total", cause="reported") == 1)  # fmt: skip
    assert value(m, "positiond_crash_detection_seconds_count") == 2
    assert value(m, "positiond_bad_messages_total") == 0
    assert daemon.warnings() == [] or all("Traceback" not in w for w in daemon.warnings())


def test_only_metrics_is_served(workdir: Path, started: list[DaemonProcess]) -> None:
    daemon = start(workdir)
    started.append(daemon)
    url = metrics_url(daemon)
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(url.removesuffix("metrics") + "other", timeout=5 * UNIT)
    caught.value.close()
    assert caught.value.code == 404
    assert "process_cpu_seconds_total" in names(scrape(url))  # the process' own, too


def test_a_silent_scraper_holds_up_nothing_and_is_dropped(
    workdir: Path, started: list[DaemonProcess], managers: list[PositionPersistenceManager]
) -> None:
    daemon = start(workdir)
    started.append(daemon)
    url = metrics_url(daemon)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
    try:
        # Scrapes and strategies go on while 20 connections say nothing.
        assert value(scrape(url), "positiond_healthy") == 1
        pm = PositionPersistenceManager("busy", endpoint=daemon.endpoint, ack_timeout=5)
        managers.append(pm)
        assert pm.start_session() is not None
        # The endpoint drops them after its idle timeout (5 s): the server closes, recv -> b"".
        for sock in silent:
            sock.settimeout(IDLE_TIMEOUT * 2 * UNIT)
            assert sock.recv(1) == b""
    finally:
        for sock in silent:
            sock.close()
    assert "Traceback" not in daemon.output()  # routine, not an error in the log


def test_bad_messages_are_counted(workdir: Path, started: list[DaemonProcess]) -> None:
    import zmq

    daemon = start(workdir)
    started.append(daemon)
    url = metrics_url(daemon)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.connect(daemon.endpoint)
        sock.send(b"not json")
        assert sock.poll(int(5000 * UNIT)), "no error reply"
        sock.recv()
    finally:
        sock.close(linger=0)
        ctx.term()
    assert value(scrape(url), "positiond_bad_messages_total") == 1


# ---- writer health ---------------------------------------------------------------------------


def test_a_held_write_lock_shows_as_a_stalled_unwritable_writer_and_clears(
    workdir: Path, started: list[DaemonProcess], managers: list[PositionPersistenceManager]
) -> None:
    daemon = start(workdir, "--busy-timeout", "0.2")
    started.append(daemon)
    url = metrics_url(daemon)
    pm = PositionPersistenceManager("locked", endpoint=daemon.endpoint, ack_timeout=0.3)
    managers.append(pm)
    assert pm.start_session() is not None
    holder = sqlite3.connect(daemon.db, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # an operator's write lock: every commit now fails
        pm.save_position_entry(symbol="X", entry_price=1.0, quantity=1)  # not acked: kept
        m = until(
            url, "an unwritable, stalled writer",
            lambda m: value(m, "positiond_database_writable") == 0
            and value(m, "positiond_writer_stalled_seconds") >= 0.5
            and value(m, "positiond_pending_ops") >= 1
            and value(m, "positiond_failed_commits_total") >= 1, 10,
        )  # fmt: skip
        assert value(m, "positiond_healthy") == 0
        # The scrape reads on its own connection: a write lock does not hold it up.
        assert value(m, "positiond_database_readable") == 1
        assert value(m, "positiond_legs", status="ACTIVE") == 0  # the entry is not stored
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert pm.sync(5 * UNIT)
    m = until(
        url, "the writer back",
        lambda m: value(m, "positiond_database_writable") == 1
        and value(m, "positiond_writer_stalled_seconds") == 0
        and value(m, "positiond_pending_ops") == 0
        and value(m, "positiond_legs", status="ACTIVE") == 1,
    )  # fmt: skip
    assert value(m, "positiond_healthy") == 1


def test_a_deleted_database_is_unwritable_for_good_and_the_scrape_still_answers(
    workdir: Path, started: list[DaemonProcess]
) -> None:
    daemon = start(workdir)
    started.append(daemon)
    url = metrics_url(daemon)
    daemon.db.unlink()
    m = until(url, "a storage fault", lambda m: value(m, "positiond_database_writable") == 0)
    assert value(m, "positiond_healthy") == 0
    assert daemon.proc is not None and daemon.proc.poll() is None  # serving, not dead
    assert value(scrape(url), "positiond_database_writable") == 0  # for good


# ---- off by default, loopback only, a taken port ---------------------------------------------


def _listening_tcp_ports(pid: int) -> list[int]:
    """TCP ports process ``pid`` listens on (/proc: its socket inodes in the LISTEN state)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = []
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as handle:
            for line in handle.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    ports.append(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_the_endpoint_is_off_by_default(daemon: DaemonProcess) -> None:
    assert daemon.status()["metrics"] is None
    assert _listening_tcp_ports(daemon.pid) == []


def test_the_endpoint_listens_where_told(workdir: Path, started: list[DaemonProcess]) -> None:
    daemon = start(workdir)
    started.append(daemon)
    port = int(metrics_url(daemon).rsplit(":", 1)[1].split("/")[0])
    assert _listening_tcp_ports(daemon.pid) == [port]
    assert f"metrics: http://127.0.0.1:{port}/metrics" in daemon.output()
    assert daemon.stop() == 0  # a graceful stop closes the endpoint with everything else
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port)):
        pass


def test_a_taken_port_stops_the_start_with_one_line(workdir: Path) -> None:
    taken = socket.socket()
    try:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = DaemonProcess(workdir, "--metrics-listen", f"127.0.0.1:{port}")
        with pytest.raises(AssertionError, match="exited with 1"):
            daemon.start()
    finally:
        taken.close()
    errors = [line for line in daemon.output().splitlines() if " ERROR " in line]
    assert len(errors) == 1 and f"cannot serve metrics on 127.0.0.1:{port}" in errors[0]
    assert "Traceback" not in daemon.output()
    assert not (workdir / "pd.sock").exists()  # nothing was bound


def test_an_address_not_on_this_host_is_exit_2_not_retried(workdir: Path) -> None:
    # 192.0.2.1 is TEST-NET-1: never a local address, so binding fails for good.
    daemon = DaemonProcess(workdir, "--metrics-listen", "192.0.2.1:9464",
                           "--metrics-allow-remote", "true")  # fmt: skip
    with pytest.raises(AssertionError, match="exited with 2"):
        daemon.start()
    errors = [line for line in daemon.output().splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "cannot serve metrics on 192.0.2.1:9464" in errors[0]


def test_a_remote_address_is_refused_unless_allowed(workdir: Path) -> None:
    daemon = DaemonProcess(workdir, "--metrics-listen", "0.0.0.0:9464")
    with pytest.raises(AssertionError, match="exited with 2"):
        daemon.start()
    assert "metrics_allow_remote" in daemon.output()


# ---- settings --------------------------------------------------------------------------------


def test_settings_from_file_env_and_flag(tmp_path: Path) -> None:
    assert load([], {}, default_file=None).config.metrics_listen is None
    text = " ".join(build_parser().format_help().split())
    assert "--metrics-listen HOST:PORT" in text and "[POSITIOND_METRICS_LISTEN]" in text
    assert "(default: false) [POSITIOND_METRICS_ALLOW_REMOTE]" in text
    path = tmp_path / "positiond.toml"
    path.write_text('metrics_listen = "127.0.0.1:9464"\n')
    loaded = load(["--config", str(path)], {}, default_file=None)
    assert loaded.config.metrics_listen == "127.0.0.1:9464"
    assert loaded.sources["metrics_listen"] == f"file {path}"
    env = {"POSITIOND_METRICS_LISTEN": "[::1]:9465"}
    assert load(["--config", str(path)], env, None).config.metrics_listen == "[::1]:9465"
    flag = ["--config", str(path), "--metrics-listen", "localhost:9466"]
    assert load(flag, env, None).config.metrics_listen == "localhost:9466"


def test_remote_needs_metrics_allow_remote_in_any_layer(tmp_path: Path) -> None:
    path = tmp_path / "positiond.toml"
    path.write_text('metrics_listen = "0.0.0.0:9464"\n')
    with pytest.raises(ConfigError, match=r"metrics_listen: 0\.0\.0\.0 is reachable"):
        load(["--config", str(path)], {}, None)
    path.write_text('metrics_listen = "0.0.0.0:9464"\nmetrics_allow_remote = true\n')
    loaded = load(["--config", str(path)], {}, None)
    assert loaded.config.metrics_allow_remote is True
    assert "metrics_allow_remote = true" in format_config(loaded)  # TOML, not Python's True
    path.write_text('metrics_listen = "0.0.0.0:9464"\n')
    env = {"POSITIOND_METRICS_ALLOW_REMOTE": "yes"}
    assert load(["--config", str(path)], env, None).config.metrics_allow_remote is True
    flag = ["--config", str(path), "--metrics-allow-remote", "false"]
    with pytest.raises(ConfigError, match="metrics_listen"):
        load(flag, env, None)
    with pytest.raises(ConfigError, match="metrics_allow_remote"):
        load(["--metrics-allow-remote", "maybe"], {}, None)
    path.write_text("metrics_allow_remote = 1\n")  # a number is not a boolean
    with pytest.raises(ConfigError, match="metrics_allow_remote"):
        load(["--config", str(path)], {}, None)


@pytest.mark.parametrize(
    ("text", "listen"),
    [
        ("127.0.0.1:9464", Listen("127.0.0.1", 9464)),
        ("127.1.2.3:0", Listen("127.1.2.3", 0)),
        ("localhost:9464", Listen("127.0.0.1", 9464)),
        ("[::1]:9464", Listen("::1", 9464)),
    ],
)
def test_loopback_addresses_are_accepted(text: str, listen: Listen) -> None:
    assert parse_listen(text) == listen


@pytest.mark.parametrize(
    "text",
    ["9464", ":9464", "127.0.0.1", "127.0.0.1:http", "127.0.0.1:70000", "::1:9464",
     "prometheus.example:9464", "[::1]:-1"],
)  # fmt: skip
def test_malformed_addresses_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_listen(text, allow_remote=True)


LOOPBACK_V4 = ipaddress.ip_network("127.0.0.0/8")


@given(st.ip_addresses(), st.integers(0, 65535), st.booleans())
def test_only_loopback_is_served_unless_remote_is_allowed(
    address: Any, port: int, allow_remote: bool
) -> None:
    text = f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"
    loopback = address in LOOPBACK_V4 or address == ipaddress.ip_address("::1")
    try:
        listen = parse_listen(text, allow_remote=allow_remote)
    except ValueError:
        assert not allow_remote and not loopback
    else:
        assert allow_remote or loopback
        assert ipaddress.ip_address(listen.host) == address and listen.port == port


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_postgresql_counts_are_read_again_after_the_connection_is_lost(db: PgDsn) -> None:
    from positiond.metrics.database import DatabaseCounts
    from tests.helpers import rows
    from tests.test_alert_delivery import START, crash

    crash(db, START)  # one CRASHED session with one CRASHED leg
    clock = [0.0]
    counts = DatabaseCounts(db, monotonic=lambda: clock[0])
    try:
        first = counts.get()
        assert first is not None and first.sessions["CRASHED"] == 1 and first.attention == 1
        ours = "application_name = 'positiond' AND pid <> pg_backend_pid()"
        ended = rows(db, f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE {ours}")
        assert [r[0] for r in ended] == [True]
        clock[0] += 1
        assert counts.get() is None  # this scrape: unreadable (positiond_database_readable 0)
        clock[0] += 1
        again = counts.get()  # the next one connects again
        assert again is not None and again.legs["CRASHED"] == 1
    finally:
        counts.close()
