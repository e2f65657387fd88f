"""Hand-back end to end: the protect worker and the engine together, a real daemon, real strategy
processes (frozen with SIGSTOP, killed with SIGKILL), the fake OpenAlgo broker with its order
book. A leg taken back — by its own revived session or by an adopting one — never has two stops
live: its protective order is cancelled (or kept on request) and the client told; an order that
filled closes the leg, and its strategy can no longer manage it."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from positiond.openalgo import OpenAlgo, Settings
from positiond_client import PositionPersistenceManager
from tests.fake_openalgo import FakeOpenAlgo
from tests.helpers import UNIT, DaemonProcess, rows, wait_for
from tests.protect_support import CE, KEY, PE, Holder, leg, orders, settled, start_daemon

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake() -> Iterator[FakeOpenAlgo]:
    with FakeOpenAlgo(api_key=KEY) as server:
        server.orders.set_position(CE, 75)
        server.orders.set_position(PE, -50)
        yield server
        assert server.forbidden() == [], "an account-wide call reached the broker"


class Frozen:
    """tests/protect_revive_proc.py: a protected strategy that can be frozen and thawed."""

    def __init__(self, endpoint: str, legs: list[dict[str, Any]]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.protect_revive_proc", endpoint, "guarded",
             json.dumps(legs)],
            stdout=subprocess.PIPE, text=True, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        first = self.next(lambda line: "session_id" in line, "the strategy's start")
        self.session_id: int = first["session_id"]

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))

    def next(self, match: Any, what: str) -> dict[str, Any]:
        """The first line (seen or to come) that ``match`` accepts."""
        def found() -> dict[str, Any] | None:
            while True:
                try:
                    self.seen.append(self.lines.get_nowait())
                except queue.Empty:
                    break
            return next((line for line in self.seen if match(line)), None)

        return wait_for(found, 20, what)

    def notices(self, code: str) -> list[dict[str, Any]]:
        return [line["info"] for line in self.seen if line.get("notice") == code]

    def freeze(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait()
        self.reader.join(5 * UNIT)  # EOF: the process is gone
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def strategies() -> Iterator[list[Frozen | Holder]]:
    made: list[Frozen | Holder] = []
    yield made
    for one in made:
        one.kill()


def leg_row(db: Path, key: str) -> dict[str, Any]:
    return dict(rows(db, "SELECT * FROM strategy_positions WHERE position_key = ?", (key,))[0])


def order_of(db: Path, key: str) -> dict[str, Any]:
    return [o for o in orders(db) if o["position_key"] == key][-1]


def frozen_until_protected(daemon: DaemonProcess, strategy: Frozen, n: int) -> None:
    strategy.freeze()
    wait_for(lambda: rows(daemon.db, "SELECT status FROM strategy_sessions WHERE id = ?",
                          (strategy.session_id,))[0]["status"] == "CRASHED", 10,
             "the heartbeat verdict")  # fmt: skip
    found = settled(daemon.db, n)
    assert {o["state"] for o in found} == {"PLACED"}


def test_a_revived_session_gets_its_legs_back_with_the_stops_cancelled_first(
    workdir: Path, fake: FakeOpenAlgo, strategies: list[Frozen | Holder]
) -> None:
    daemon = start_daemon(workdir, fake)
    try:
        strategy = Frozen(daemon.endpoint, [
            leg(CE, 92.5, 75, "BUY", position_key="ce"),
            leg(PE, 118.0, 50, "SELL", position_key="pe"),
        ])  # fmt: skip
        strategies.append(strategy)
        frozen_until_protected(daemon, strategy, 2)
        assert len(fake.orders.live()) == 2
        strategy.thaw()
        strategy.next(lambda line: line.get("notice") == "REVIVED", "the revival")
        for key in ("ce", "pe"):
            strategy.next(lambda line, key=key: line.get("notice") == "PROTECTION_RELEASED"
                          and line["info"]["key"] == key, f"{key} released")  # fmt: skip
        wait_for(lambda: not fake.orders.live(), 10, "both stops cancelled at the broker")
        for key in ("ce", "pe"):
            row = order_of(daemon.db, key)
            assert (row["state"], row["release"], row["release_session"]) == (
                "CANCELLED", "CANCEL", strategy.session_id)  # fmt: skip
            assert leg_row(daemon.db, key)["status"] == "ACTIVE"
        assert {n["outcome"] for n in strategy.notices("PROTECTION_RELEASED")} == {"cancelled"}
        # It manages its legs again: its updates are written, and it was never refused.
        before = leg_row(daemon.db, "ce")["current_price"]
        wait_for(lambda: leg_row(daemon.db, "ce")["current_price"] != before, 10, "updates")
        assert not [line for line in strategy.seen if "leg_error" in line]
        assert len(fake.received("placeorder")) == 2
    finally:
        daemon.stop()


def test_a_stop_that_filled_while_the_strategy_was_frozen_closes_the_leg_for_good(
    workdir: Path, fake: FakeOpenAlgo, strategies: list[Frozen | Holder]
) -> None:
    daemon = start_daemon(workdir, fake)
    try:
        strategy = Frozen(daemon.endpoint, [
            leg(CE, 92.5, 75, "BUY", position_key="ce"),
            leg(PE, 118.0, 50, "SELL", position_key="pe"),
        ])  # fmt: skip
        strategies.append(strategy)
        frozen_until_protected(daemon, strategy, 2)
        fake.orders.trigger(order_of(daemon.db, "ce")["order_id"], 92.1)
        wait_for(lambda: leg_row(daemon.db, "ce")["status"] == "CLOSED", 10, "the leg closed")
        strategy.thaw()
        strategy.next(lambda line: line.get("leg_error") == "ce", "LegError for the closed leg")
        strategy.next(lambda line: line.get("notice") == "PROTECTION_RELEASED", "pe released")
        wait_for(lambda: not fake.orders.live(), 10, "the PE stop cancelled")
        closed = leg_row(daemon.db, "ce")
        assert (closed["status"], closed["exit_reason"], closed["exit_price"]) == (
            "CLOSED", "PROTECTIVE_STOP", 92.1)  # fmt: skip
        assert leg_row(daemon.db, "pe")["status"] == "ACTIVE"
        assert order_of(daemon.db, "ce")["state"] == "TRIGGERED"
        assert order_of(daemon.db, "pe")["state"] == "CANCELLED"
        # The revived session never got the closed leg back, and the broker got no new order.
        assert len(fake.received("placeorder")) == 2
        book = {r["symbol"]: r for r in fake.orders.positionbook()}
        assert int(book[CE]["quantity"]) == 0  # the stop sold the 75 bought
    finally:
        daemon.stop()


def test_a_fill_racing_the_revival_still_closes_the_leg_once(
    workdir: Path, fake: FakeOpenAlgo, strategies: list[Frozen | Holder]
) -> None:
    # Slow polling: the revival's release usually comes before the worker sees the fill, so the
    # cancel finds the order filled; either way round the leg ends closed, once, and its
    # strategy is told.
    daemon = start_daemon(workdir, fake, poll_interval=3.0)
    try:
        strategy = Frozen(daemon.endpoint, [leg(CE, 92.5, 75, "BUY", position_key="ce")])
        strategies.append(strategy)
        frozen_until_protected(daemon, strategy, 1)
        fake.orders.trigger(order_of(daemon.db, "ce")["order_id"], 92.3)
        strategy.thaw()
        strategy.next(lambda line: line.get("leg_error") == "ce", "LegError for the closed leg")
        wait_for(lambda: leg_row(daemon.db, "ce")["status"] == "CLOSED", 10, "the leg closed")
        closed = leg_row(daemon.db, "ce")
        assert (closed["exit_reason"], closed["exit_price"]) == ("PROTECTIVE_STOP", 92.3)
        exits = rows(daemon.db, "SELECT payload FROM position_events WHERE event_type = 'EXIT'")
        assert len(exits) == 1
        assert order_of(daemon.db, "ce")["state"] == "TRIGGERED"
        assert len(fake.received("placeorder")) == 1
    finally:
        daemon.stop()


@pytest.mark.parametrize("keep", [False, True])
def test_an_adopting_run_learns_the_stop_and_it_is_cancelled_or_kept(
    workdir: Path, fake: FakeOpenAlgo, strategies: list[Frozen | Holder], keep: bool
) -> None:
    daemon = start_daemon(workdir, fake)
    try:
        holder = Holder(daemon.endpoint, "guarded", [
            leg(CE, 92.5, 75, "BUY", position_key="ce"),
            leg(PE, 118.0, 50, "SELL", position_key="pe"),
        ])  # fmt: skip
        strategies.append(holder)
        holder.kill()
        placed = {o["position_key"]: o for o in settled(daemon.db, 2)}
        notices: list[tuple[str, dict[str, Any]]] = []
        pm = PositionPersistenceManager(
            "guarded", endpoint=daemon.endpoint, ack_timeout=5.0 * UNIT,
            on_notice=lambda code, info: notices.append((code, info)),
        )  # fmt: skip
        try:
            with OpenAlgo(Settings(host=fake.url), KEY) as broker:
                report = pm.start_session(recover=True, positionbook=broker,
                                          keep_protection=keep)  # fmt: skip
            adopted = dict(report.adopted)
            assert set(adopted) == {"ce", "pe"}
            for key, handle in adopted.items():
                assert handle.protection is not None
                assert (handle.protection.order_id, handle.protection.trigger_price) == (
                    placed[key]["order_id"], placed[key]["trigger_price"])  # fmt: skip
            wait_for(lambda: len([n for n in notices if n[0] == "PROTECTION_RELEASED"]) == 2,
                     10, "both released")  # fmt: skip
            released = [info for code, info in notices if code == "PROTECTION_RELEASED"]
            assert {n["outcome"] for n in released} == {"kept" if keep else "cancelled"}
            assert not any(h.protection_pending for h in adopted.values())
            live = {o["symbol"] for o in fake.orders.live()}
            assert live == ({CE, PE} if keep else set())
            for key in ("ce", "pe"):
                row = order_of(daemon.db, key)
                assert (row["state"], row["release_session"]) == (
                    "KEPT" if keep else "CANCELLED", pm.session_id)  # fmt: skip
            assert len(fake.received("placeorder")) == 2
        finally:
            pm.close()
    finally:
        daemon.stop()
