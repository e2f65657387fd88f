"""Human sinks against real HTTP servers: telegram (a fake Bot API, tests/alert_receiver.py) and
openalgo (tests/fake_openalgo.py); a burst grouped into one message, rate-limited, every alert
in it delivered exactly once per sink; the bot token never in an error."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from positiond.alerts.delivery import Delivery
from positiond.alerts.human import MAX_LISTED, HumanSink, message
from positiond.alerts.settings import AlertsConfig, SinkConfig
from positiond.openalgo import Settings
from positiond.store.schema import migrate
from tests.alert_receiver import Receiver
from tests.fake_openalgo import FakeOpenAlgo, Reply
from tests.helpers import FACTOR
from tests.test_alert_delivery import PROPERTY, START, Scripted, crash

TOKEN = "123456:bot-secret-token"


@pytest.fixture
def bot_api() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.close()


def phone(api: Receiver, window: float = 0.2) -> SinkConfig:
    base = api.url.rsplit("/", 1)[0]
    return SinkConfig(
        "phone", "telegram", token=TOKEN, chat_id="4242", api_url=base, group_window=window
    )


def deliveries(db: Path) -> list[tuple[str, str, int, str | None]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(
            "SELECT sink, state, attempts, last_error FROM alert_deliveries ORDER BY sink, alert_id"
        ).fetchall()
    finally:
        conn.close()


def delivered(db: Path) -> bool:
    rows = deliveries(db)
    return bool(rows) and all(d[1] == "DELIVERED" for d in rows)


async def run_until(delivery: Delivery, done: object, within: float = 10.0) -> None:
    """Step the worker (real sinks, real time for the group window) until ``done()``."""
    assert callable(done)
    async with asyncio.timeout(within * FACTOR):
        while not done():
            await delivery.step()
            await asyncio.sleep(0.02)
        await delivery.settle()


async def test_a_burst_of_20_crashes_is_one_telegram_message_and_20_machine_events(
    tmp_path: Path, bot_api: Receiver
) -> None:
    db = tmp_path / "positiond.db"
    for n in range(20):  # a host's 20 strategies dying together
        crash(db, START + n * 0.01)
    hook = SinkConfig("hook", "command", command=("unused",))
    config = AlertsConfig((phone(bot_api), hook))
    delivery = Delivery(db, config, now=lambda: START + 1)
    await delivery.open()
    machine = Scripted(hook, [True] * 20)
    delivery.sinks["hook"] = machine
    try:
        await run_until(delivery, lambda: delivered(db))
        await asyncio.sleep(0.3)  # a second group, if one were wrongly started, shows now
        for _ in range(3):
            await delivery.step()
        await delivery.settle()
    finally:
        await delivery.close()
    assert len(bot_api.posts) == 1
    assert bot_api.paths == [f"/bot{TOKEN}/sendMessage"]
    sent = bot_api.posts[0]
    assert sent["chat_id"] == "4242" and "parse_mode" not in sent
    text = sent["text"]
    assert text.startswith("positiond: 20 alerts")
    assert text.count("CRITICAL crashed: expiry_blast") == MAX_LISTED
    assert f"and {20 - MAX_LISTED} more" in text
    assert "symbol" in text and "trail" in text and "NIFTY28NOV2524000CE SELL 75" in text
    # Each alert delivered exactly once per sink; the machine sink got one event per alert.
    assert deliveries(db) == [("hook", "DELIVERED", 1, None)] * 20 + [
        ("phone", "DELIVERED", 1, None)
    ] * 20
    assert len({orjson.loads(b)["id"] for b in machine.bodies}) == 20


async def test_a_failed_group_is_retried_whole_a_second_later_without_the_token(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    db = tmp_path / "positiond.db"
    for _ in range(3):
        crash(db, START)
    api = Receiver(statuses=[401])
    clock = [START]
    delivery = Delivery(
        db, AlertsConfig((phone(api, window=0),)), now=lambda: clock[0], min_interval=0.5
    )
    await delivery.open()
    try:
        await run_until(delivery, lambda: len(api.posts) == 1)
        assert deliveries(db) == [("phone", "PENDING", 1, "HTTP 401")] * 3
        clock[0] = START + 1  # the retry is due (backoff 1 s)
        await run_until(delivery, lambda: delivered(db))
    finally:
        await delivery.close()
        api.close()
    assert len(api.posts) == 2 and api.posts[0]["text"] == api.posts[1]["text"]
    assert api.times[1] - api.times[0] >= 0.5  # rate limit: not two messages within 0.5 s
    assert deliveries(db) == [("phone", "DELIVERED", 2, None)] * 3
    assert "retrying" in caplog.text and "bot-secret" not in caplog.text


async def test_an_unreachable_bot_api_error_never_shows_the_token(tmp_path: Path) -> None:
    db = tmp_path / "positiond.db"
    crash(db, START)
    api = Receiver()
    api.close()  # nothing listens there any more: connection refused
    delivery = Delivery(db, AlertsConfig((phone(api, window=0),)), now=lambda: START)
    await delivery.open()
    try:
        await run_until(delivery, lambda: [d[2] for d in deliveries(db)] == [1])
    finally:
        await delivery.close()
    error = deliveries(db)[0][3]
    assert error and TOKEN not in error and "bot-secret" not in error


async def test_openalgo_sink_sends_one_message_through_telegram_notify(tmp_path: Path) -> None:
    db = tmp_path / "positiond.db"
    for _ in range(4):
        crash(db, START)
    key = tmp_path / "openalgo.key"
    key.write_text("oa-secret-key\n")
    bot = SinkConfig("openalgo-bot", "openalgo", username="my_openalgo_user", group_window=0.1)
    with FakeOpenAlgo(api_key="oa-secret-key") as fake:
        fake.reply(
            "telegram/notify", Reply({"status": "error", "message": "user not linked"}, 400)
        )
        clock = [START]
        delivery = Delivery(
            db, AlertsConfig((bot,)), now=lambda: clock[0], openalgo=Settings(fake.url, key),
            min_interval=0.1,
        )  # fmt: skip
        await delivery.open()
        try:
            await run_until(delivery, lambda: len(fake.received("telegram/notify")) == 1)
            await delivery.settle()
            errors = {d[3] for d in deliveries(db)}
            assert errors == {"OpenAlgo telegram/notify: HTTP 400: user not linked"}
            fake.reply("telegram/notify", Reply({"status": "success", "message": "sent"}))
            clock[0] = START + 1
            await run_until(delivery, lambda: delivered(db))
        finally:
            await delivery.close()
        sent = fake.received("telegram/notify")
    assert len(sent) == 2
    assert sent[1]["apikey"] == "oa-secret-key" and sent[1]["username"] == "my_openalgo_user"
    assert sent[1]["message"].startswith("positiond: 4 alerts")
    assert deliveries(db) == [("openalgo-bot", "DELIVERED", 2, None)] * 4


def test_the_message_lists_legs_and_counts_what_it_does_not_list() -> None:
    leg = {"symbol": "BANKNIFTY", "side": "BUY", "quantity": 15, "entry_price": 100.5,
           "stop_price": None, "highest_price": 101.0, "last_trail_level": 2.5}  # fmt: skip
    body = {"id": "x", "event": "stalled", "severity": "warning", "strategy": "s",
            "session_id": 3, "host": "h", "pid": 9,
            "reason": "no progress", "legs": [leg]}  # fmt: skip
    one = message([orjson.dumps(body)])
    assert one.splitlines()[:3] == [
        "positiond: 1 alert", "", "WARNING stalled: s (session 3, h pid 9)",
    ]  # fmt: skip
    assert "BANKNIFTY BUY  15  100.5 -    101     2.5" in one and "more" not in one
    many = message([orjson.dumps(body)] * 25)
    assert many.count("WARNING stalled") == MAX_LISTED and "and 15 more" in many


def posctl_alerts_test(config: Path, *args: str) -> tuple[int, Any]:
    """``posctl --config FILE --json alerts test ARGS`` as an operator would run it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSITIOND_", "POSCTL_"))}
    run = subprocess.run(
        [sys.executable, "-m", "positiond.ctl", "--config", str(config), "--json", "alerts",
         "test", *args],
        capture_output=True, text=True, env=env, timeout=60 * FACTOR,
    )  # fmt: skip
    assert run.stdout, run.stderr
    return run.returncode, json.loads(run.stdout)


def test_posctl_alerts_test_sends_through_each_sink_and_reports_each(
    tmp_path: Path, bot_api: Receiver
) -> None:
    token, key = tmp_path / "telegram.token", tmp_path / "openalgo.key"
    token.write_text(TOKEN + "\n")
    key.write_text("oa-secret-key\n")
    hook = Receiver()
    with FakeOpenAlgo(api_key="oa-secret-key") as fake:
        config = tmp_path / "positiond.toml"
        config.write_text(
            f'db = "{tmp_path / "positiond.db"}"\n'
            f'[openalgo]\nhost = "{fake.url}"\napi_key_file = "{key}"\n'
            f'[[alerts.sink]]\nname = "phone"\ntype = "telegram"\ntoken_file = "{token}"\n'
            f'chat_id = "123456"\napi_url = "{bot_api.url.rsplit("/", 1)[0]}"\n'
            f'[[alerts.sink]]\nname = "openalgo-bot"\ntype = "openalgo"\n'
            f'username = "my_openalgo_user"\n'
            f'[[alerts.sink]]\nname = "ops-hook"\ntype = "webhook"\nurl = "{hook.url}"\n'
            f'[[alerts.sink]]\nname = "pager"\ntype = "command"\ncommand = ["false"]\n'
        )
        try:
            code, out = posctl_alerts_test(config)
            one_code, one = posctl_alerts_test(config, "--sink", "phone")
        finally:
            hook.close()
        notified = fake.received("telegram/notify")
    assert code == 1 and out["failed"] is True
    assert [(r["sink"], r["ok"], r["error"]) for r in out["sinks"]] == [
        ("phone", True, None),
        ("openalgo-bot", True, None),
        ("ops-hook", True, None),
        ("pager", False, "exit status 1"),
    ]
    assert (one_code, [r["sink"] for r in one["sinks"]]) == (0, ["phone"])
    assert len(bot_api.posts) == 2 and "INFO test" in bot_api.posts[0]["text"]
    assert [n["username"] for n in notified] == ["my_openalgo_user"]
    assert hook.posts[0]["event"] == "test" and hook.posts[0]["schema"] == 1
    assert TOKEN not in json.dumps(out) and "oa-secret-key" not in json.dumps(out)


class ScriptedHuman(HumanSink):
    """A human sink at the edge: each message answered as scripted (True: sent)."""

    def __init__(self, config: SinkConfig, outcomes: list[bool]) -> None:
        self.config = config
        self.outcomes = list(outcomes)
        self.groups: list[tuple[list[str], bool]] = []

    async def send_many(self, bodies: list[bytes]) -> str | None:
        ok = self.outcomes.pop(0) if self.outcomes else True
        self.groups.append(([orjson.loads(b)["id"] for b in bodies], ok))
        return None if ok else "HTTP 500"


async def drive_groups(db: Path, waves: list[tuple[int, float]], outcomes: list[bool]) -> Any:
    conn = sqlite3.connect(db, isolation_level=None)
    migrate(conn)  # the schema, before any alert (a wave may bring none)
    conn.close()
    clock = [START]
    config = SinkConfig("phone", "telegram", token="t", chat_id="1", group_window=0)
    delivery = Delivery(db, AlertsConfig((config,), retry_for=86400), now=lambda: clock[0],
                        min_interval=0)  # fmt: skip
    sink = ScriptedHuman(config, outcomes)
    delivery.sinks = {"phone": sink}
    await delivery.open()
    try:
        for new, gap in waves:
            for _ in range(new):
                crash(db, clock[0])
            await delivery.step()
            await delivery.settle()
            clock[0] += gap
        for _ in range(len(outcomes) + 2):  # then long enough for every retry
            clock[0] += 400
            await delivery.step()
            await delivery.settle()
    finally:
        await delivery.close()
    return sink


@PROPERTY
@given(
    waves=st.lists(
        st.tuples(st.integers(0, 4), st.floats(min_value=0, max_value=5)), min_size=1, max_size=6
    ),
    outcomes=st.lists(st.booleans(), max_size=6),
)
def test_grouped_alerts_are_each_delivered_exactly_once_and_every_attempt_recorded(
    tmp_path_factory: pytest.TempPathFactory,
    waves: list[tuple[int, float]],
    outcomes: list[bool],
) -> None:
    db = tmp_path_factory.mktemp("groups") / "positiond.db"
    sink = asyncio.run(drive_groups(db, waves, outcomes))
    conn = sqlite3.connect(db)
    try:
        ids = [r[0] for r in conn.execute("SELECT alert_id FROM alert_outbox ORDER BY id")]
        rows = conn.execute(
            "SELECT o.alert_id, d.state, d.attempts FROM alert_deliveries d "
            "JOIN alert_outbox o ON o.id = d.alert_id"
        ).fetchall()
    finally:
        conn.close()
    assert sorted(r[0] for r in rows) == sorted(ids)  # each alert has its delivery
    assert all(state == "DELIVERED" for _, state, _ in rows)  # none dropped
    for alert_id, _, attempts in rows:
        carried = [ok for group, ok in sink.groups if alert_id in group]
        assert carried.count(True) == 1  # in exactly one successful message
        assert carried[-1] is True  # and never sent again after it
        assert len(carried) == attempts  # every message that carried it is recorded
    assert all(len(set(group)) == len(group) for group, _ in sink.groups)
