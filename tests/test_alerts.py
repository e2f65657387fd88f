"""Alerts end to end: a real daemon, real strategies killed with SIGKILL, a real webhook
receiver (tests/alert_receiver.py) and a real command sink."""

from __future__ import annotations

import json
import signal
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from positiond.store.dsn import PgDsn
from positiond_client import PositionPersistenceManager
from tests.alert_receiver import Receiver
from tests.helpers import FACTOR, DaemonProcess, rows, session_status, wait_for
from tests.pg import both_backends
from tests.test_ctl import BN, CE, FIN, PE, ctl, ctl_json, kill_a_strategy, positionbook
from tests.test_daemon import Strategy

LEG_FIELDS = {
    "position_key", "symbol", "exchange", "product", "side", "quantity", "entry_price",
    "stop_price", "highest_price", "last_trail_level",
}  # fmt: skip


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    started: list[Receiver] = []
    yield started
    for receiver in started:
        receiver.close()


def write_config(workdir: Path, *sinks: str) -> Path:
    path = workdir / "positiond.toml"
    path.write_text("\n".join(sinks))
    return path


def webhook(url: str, timeout: float = 5.0, extra: str = "") -> str:
    return (
        f'[[alerts.sink]]\nname = "ops-hook"\ntype = "webhook"\nurl = "{url}"\n'
        f'timeout = {timeout}\nheaders = {{Authorization = "Bearer s3cret-token"}}\n{extra}\n'
    )


def start(workdir: Path, config: Path, db: Path | PgDsn | None = None) -> DaemonProcess:
    return DaemonProcess(
        workdir, "--flush-interval", "0.05", "--config", str(config), heartbeat_timeout=1.0,
        db=db,
    ).start()  # fmt: skip


def deliveries(db: Path | PgDsn) -> list[Any]:
    return rows(db, "SELECT o.alert_id, o.kind, d.sink, d.state, d.attempts FROM alert_outbox o "
                "JOIN alert_deliveries d ON d.alert_id = o.id ORDER BY o.id, d.sink")  # fmt: skip


@both_backends
def test_kill_9_posts_the_documented_body_once_and_runs_the_command(
    db: Path | PgDsn, workdir: Path, receivers: list[Receiver], strategies: list[Strategy]
) -> None:
    receiver = Receiver()
    receivers.append(receiver)
    got = workdir / "command-got.json"
    script = f"import sys; open({str(got)!r}, 'wb').write(sys.stdin.buffer.read())"
    command = (
        f'[[alerts.sink]]\nname = "pager"\ntype = "command"\n'
        f"command = {json.dumps([sys.executable, '-c', script])}\n"
    )
    daemon = start(workdir, write_config(workdir, webhook(receiver.url), command), db)
    try:
        strategy = Strategy(daemon.endpoint, "hold")
        strategies.append(strategy)
        info = strategy.info()
        strategy.proc.send_signal(signal.SIGKILL)
        wait_for(lambda: len(receiver.posts) >= 1, 10, "the webhook POST")
        wait_for(lambda: got.exists() and got.stat().st_size > 0, 10, "the command's stdin")
        wait_for(
            lambda: [r["state"] for r in deliveries(daemon.db)] == ["DELIVERED", "DELIVERED"],
            10,
            "both deliveries recorded",
        )
        body = receiver.posts[0]
        assert len(receiver.posts) == 1  # delivered and recorded: never sent again
        assert receiver.headers[0]["Authorization"] == "Bearer s3cret-token"
        assert body["schema"] == 1 and body["event"] == "crashed"
        assert body["severity"] == "critical"
        assert body["session_id"] == info["session_id"] and body["strategy"] == "expiry_blast"
        assert body["reason"].startswith("process exited") and body["source"] == "DISCONNECT"
        assert body["time"].endswith("Z") and len(body["id"]) == 32
        legs = {leg["symbol"]: leg for leg in body["legs"]}
        assert sorted(legs) == ["NIFTY28NOV2524000CE", "NIFTY28NOV2524000PE"]
        assert all(set(leg) >= LEG_FIELDS for leg in body["legs"])
        ce = legs["NIFTY28NOV2524000CE"]
        assert (ce["side"], ce["quantity"], ce["entry_price"]) == ("BUY", 75, 100.0)
        assert (ce["stop_price"], ce["last_trail_level"]) == (104.0, 2.0)
        assert json.loads(got.read_bytes()) == body  # the command got the same JSON
        code, listed = ctl_json(daemon, "alerts")
        assert code == 0 and not listed["failed"]
        assert [a["id"] for a in listed["alerts"]] == [body["id"]]
        assert {d["sink"]: d["state"] for d in listed["alerts"][0]["deliveries"]} == {
            "ops-hook": "DELIVERED",
            "pager": "DELIVERED",
        }
        table = ctl(daemon, "alerts")
        assert "crashed" in table.stdout and "ops-hook: DELIVERED" in table.stdout
        assert "s3cret-token" not in daemon.output()
        assert "s3cret-token" not in (daemon.sock.parent / "status.json").read_text()
    finally:
        daemon.stop()


def test_a_hanging_webhook_and_a_sleeping_command_delay_no_verdict_and_no_ack(
    workdir: Path,
    receivers: list[Receiver],
    strategies: list[Strategy],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    receiver = Receiver(hang=True)
    receivers.append(receiver)
    pidfile = workdir / "sleeper.pid"
    script = (
        f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(300)"
    )
    sleeper = (
        '[[alerts.sink]]\nname = "pager"\ntype = "command"\n'
        f"timeout = 120\ncommand = {json.dumps([sys.executable, '-c', script])}\n"
    )
    daemon = start(workdir, write_config(workdir, webhook(receiver.url, timeout=120), sleeper))
    try:
        first = Strategy(daemon.endpoint, "hold")
        strategies.append(first)
        one = first.info()
        first.proc.send_signal(signal.SIGKILL)
        wait_for(lambda: session_status(daemon.db, one["session_id"]) == "CRASHED", 5, "CRASHED")  # type: ignore[arg-type]
        wait_for(lambda: len(receiver.posts) == 1, 10, "the webhook to be hanging")
        # While both sinks hang: another strategy's entries are acknowledged (it prints only
        # after its legs are durable) and its kill -9 is a verdict in SQLite at once.
        monkeypatch.setenv("STRATEGY_KEY_PREFIX", "second-")
        second = Strategy(daemon.endpoint, "hold")
        strategies.append(second)
        two = second.info()
        second.proc.send_signal(signal.SIGKILL)
        wait_for(lambda: session_status(daemon.db, two["session_id"]) == "CRASHED", 5, "CRASHED")  # type: ignore[arg-type]
        hanging = [r for r in deliveries(daemon.db) if r["kind"] == "crashed"]
        assert all(r["state"] == "PENDING" for r in hanging)  # the sinks never answered
        assert len(receiver.posts) >= 1 and not receiver.released.is_set()
        code, listed = ctl_json(daemon, "alerts")
        assert code == 0 and len(listed["alerts"]) == 2
        assert {d["state"] for a in listed["alerts"] for d in a["deliveries"]} == {"PENDING"}
        wait_for(lambda: pidfile.exists() and pidfile.read_text(), 10, "the command to run")
        sleeping = Path(f"/proc/{pidfile.read_text()}")
        assert sleeping.exists()
    finally:
        assert daemon.stop() == 0  # a graceful stop is not held up by the hung sinks either
    wait_for(lambda: not sleeping.exists(), 10, "the sleeping command to be killed at stop")


@both_backends
def test_an_alert_survives_a_daemon_killed_before_it_was_delivered(
    db: Path | PgDsn, workdir: Path, receivers: list[Receiver], strategies: list[Strategy]
) -> None:
    receiver = Receiver(statuses=[500])  # the first attempt fails: retried after 1 s
    receivers.append(receiver)
    daemon = start(workdir, write_config(workdir, webhook(receiver.url)), db)
    strategy = Strategy(daemon.endpoint, "hold")
    strategies.append(strategy)
    info = strategy.info()
    strategy.proc.send_signal(signal.SIGKILL)
    wait_for(lambda: session_status(daemon.db, info["session_id"]) == "CRASHED", 5, "CRASHED")  # type: ignore[arg-type]
    wait_for(lambda: len(receiver.posts) >= 1, 10, "the first (refused) POST")
    daemon.kill()  # before the retry
    pending = deliveries(daemon.db)
    if pending[0]["state"] == "PENDING":  # the usual case: killed within the 1 s backoff
        assert len(receiver.posts) == 1
    daemon.start()
    try:
        wait_for(lambda: deliveries(daemon.db)[0]["state"] == "DELIVERED", 15, "delivery")
        assert receiver.ids() == {pending[0]["alert_id"]}  # the same alert, the same id
        assert len(receiver.posts) >= 2  # at least once: the refused try and the good one
        assert all(p["event"] == "crashed" for p in receiver.posts)
    finally:
        daemon.stop()


@both_backends
def test_each_kind_of_verdict_alerts_through_the_daemon_or_posctl(
    db: Path | PgDsn,
    workdir: Path,
    receivers: list[Receiver],
    strategies: list[Strategy],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    receiver = Receiver()
    receivers.append(receiver)
    daemon = start(workdir, write_config(workdir, webhook(receiver.url)), db)
    try:
        kill_a_strategy(daemon, strategies)  # crashed
        book = workdir / "book.json"
        book.write_text(positionbook((CE, "75"), (PE, "75"), (FIN, "-40"), (BN, "30")))
        assert ctl(daemon, "verify", "--positionbook", str(book), "--apply").returncode == 1
        review = ctl(daemon, "resolve", "ce-1", "--review", "qty differs at the broker")
        assert review.returncode == 0, review.stderr
        monkeypatch.setenv("STRATEGY_KEY_PREFIX", "later-")
        late = Strategy(daemon.endpoint, "hold")
        strategies.append(late)
        late_sid = late.info()["session_id"]
        assert daemon.stop() == 0
        late.proc.send_signal(signal.SIGKILL)  # dies while the daemon is down
        late.proc.wait()
        daemon.start()
        wait_for(lambda: len(receiver.posts) >= 5, 15, "five alerts")
        wait_for(lambda: all(r["state"] == "DELIVERED" for r in deliveries(daemon.db)), 10, "all")
    finally:
        daemon.stop()
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for post in receiver.posts:
        by_kind.setdefault(post["event"], []).append(post)
    assert sorted((k, len(v)) for k, v in by_kind.items()) == [
        ("crashed", 1), ("needs_review", 1), ("not_returned", 1), ("orphan", 2),
    ]  # fmt: skip
    assert len(receiver.ids()) == len(receiver.posts)  # one id per alert, each sent once
    review_alert = by_kind["needs_review"][0]
    assert review_alert["reason"] == "qty differs at the broker"
    assert [leg["position_key"] for leg in review_alert["legs"]] == ["ce-1"]
    assert {o["orphan"]["symbol"] for o in by_kind["orphan"]} == {FIN, BN}
    gone = by_kind["not_returned"][0]
    assert gone["session_id"] == late_sid and gone["source"] == "RESTART"
    assert {leg["position_key"] for leg in gone["legs"]} == {"later-ce-1", "later-pe-1"}


def test_the_daemon_alerts_when_its_writes_fail_and_when_they_work_again(
    workdir: Path, receivers: list[Receiver]
) -> None:
    receiver = Receiver()
    receivers.append(receiver)
    config = write_config(workdir, webhook(receiver.url))
    daemon = DaemonProcess(
        workdir, "--config", str(config), "--busy-timeout", "0.2", "--status-interval", "0.2",
        heartbeat_timeout=5.0,
    ).start()  # fmt: skip
    pm = PositionPersistenceManager("s", endpoint=daemon.endpoint, ack_timeout=0.3)
    holder = sqlite3.connect(daemon.db, isolation_level=None)
    try:
        pm.start_session()
        holder.execute("BEGIN IMMEDIATE")  # an operator's write lock: every commit now fails
        pm.save_position_entry(symbol="X", entry_price=1.0, quantity=1)  # not acked: kept
        wait_for(lambda: [p["event"] for p in receiver.posts] == ["unhealthy"], 10, "unhealthy")
        bad = receiver.posts[0]
        assert bad["severity"] == "critical" and "writes are failing" in bad["reason"]
        holder.execute("ROLLBACK")
        wait_for(lambda: len(receiver.posts) == 2, 10, "healthy again")
        good = receiver.posts[1]
        assert (good["event"], good["severity"]) == ("healthy", "info")
        assert good["id"] != bad["id"]
        assert pm.sync(5)
    finally:
        holder.close()
        pm.close()
        daemon.stop()


@both_backends
def test_kill_9_of_several_strategies_reaches_the_phone_as_one_message_fast(
    db: Path | PgDsn,
    workdir: Path,
    receivers: list[Receiver],
    strategies: list[Strategy],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bot_api = Receiver()  # stands in for the Telegram Bot API (path /bot<token>/sendMessage)
    receivers.append(bot_api)
    token = workdir / "telegram.token"
    token.write_text("777:phone-secret-token\n")
    phone = (
        f'[[alerts.sink]]\nname = "phone"\ntype = "telegram"\ntoken_file = "{token}"\n'
        f'chat_id = "123456"\napi_url = "{bot_api.url.rsplit("/", 1)[0]}"\n'
    )
    daemon = start(workdir, write_config(workdir, phone), db)
    try:
        infos = []
        for n in range(3):
            monkeypatch.setenv("STRATEGY_KEY_PREFIX", f"s{n}-")
            strategy = Strategy(daemon.endpoint, "hold")
            strategies.append(strategy)
            infos.append(strategy.info())
        killed = time.monotonic()
        for strategy in strategies:
            strategy.proc.send_signal(signal.SIGKILL)
        wait_for(lambda: bot_api.posts, 10, "the telegram message")
        latency = bot_api.times[0] - killed
        wait_for(
            lambda: [r[3] for r in deliveries(daemon.db)] == ["DELIVERED"] * 3,
            10,
            "all three delivered to the phone",
        )
        assert len(bot_api.posts) == 1  # one message for the burst
        text = bot_api.posts[0]["text"]
        assert text.startswith("positiond: 3 alerts") and text.count("CRITICAL crashed") == 3
        assert bot_api.paths[0] == "/bot777:phone-secret-token/sendMessage"
        assert latency < 1.0 * FACTOR, latency  # group_window 0.5 s: kill -9 -> phone <= 1 s
        assert [r[4] for r in deliveries(daemon.db)] == [1, 1, 1]
        assert "phone-secret-token" not in daemon.output()
        assert "phone-secret-token" not in (daemon.sock.parent / "status.json").read_text()
    finally:
        daemon.stop()
