"""Guarantee 2: a missing daemon never hurts a strategy.

A strategy process (fault_strategy.py ``absent``) keeps working while the daemon is not there:
durable calls return within ack_timeout without raising, updates cost microseconds (measured
and printed), its memory stays flat; when the daemon comes, everything arrives in order.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import Soak
from tests.faults.support import (
    StrategyProcess,
    integrity_ok,
    legs_by_key,
    reap,
    start,
    stored_n,
)
from tests.helpers import UNIT, DaemonProcess, rows, wait_for

ACK_TIMEOUT = 0.2
LEGS = 6


def run_absent(workdir: Path, soak: Soak, how: str, away_for: float) -> None:
    daemon = DaemonProcess(workdir, "--flush-interval", "0.2", "--log-level", "INFO")
    if how == "stopped":
        start(daemon)
    strategy = StrategyProcess(
        workdir, "absent", daemon.endpoint, "--ack-timeout", str(ACK_TIMEOUT),
        "--legs", str(LEGS), "--min-updates", "20000",
    )  # fmt: skip
    journal = strategy.journal
    try:
        started = wait_for(lambda: journal.of("started"), 10, "the session start")[0]
        if how == "stopped":
            assert started["session_id"] is not None, "start not acked by a running daemon"
            assert daemon.stop(signal.SIGTERM) == 0
        else:
            assert started["session_id"] is None
        strategy.command("begin")
        away = wait_for(lambda: journal.of("away"), 10, "the calls made while away")[0]
        # Durable calls while nobody answers: each returns after ack_timeout, none raised.
        durable = away["durable"]
        assert len(durable) == LEGS + LEGS // 2 + 1, durable
        assert max(durable) <= ACK_TIMEOUT + 0.15 * UNIT, durable
        assert not away["synced"]
        # Kept, not dropped: start (if never acked), entries, exits, the sync.
        assert away["unacknowledged"] == len(durable) + (how == "never"), away
        # The strategy goes on updating while the daemon stays away (this is the point of
        # the test, not a wait for a condition).
        time.sleep(away_for)
        assert strategy.alive(), strategy.output()
        start(daemon)
        strategy.command("go")
        updates = wait_for(lambda: journal.of("updates"), 30, "the update loop to end")[0]
        assert strategy.finish() == 0, strategy.output()
        daemon.stop()

        final = journal.of("final")[0]
        end = journal.of("end")[0]
        assert final["synced"] and final["unacknowledged"] == 0 and end["ok"], (final, end)
        legs = legs_by_key(daemon.db)
        order: list[str] = away["order"]
        assert sorted(legs) == sorted(order)
        # In order: the entries were stored in the order they were made ...
        ids = [legs[key]["position_id"] for key in order]
        assert ids == sorted(ids), ids
        for key in order:
            row = legs[key]
            # ... each leg holds its newest state ...
            assert stored_n(row) == final["newest"][key], key
            closed = key in final["exited"]
            assert row["status"] == ("CLOSED" if closed else "ACTIVE"), key
            events = [
                e["event_type"]
                for e in rows(
                    daemon.db,
                    "SELECT event_type FROM position_events WHERE position_id = ? "
                    "AND event_type IN ('ENTRY', 'EXIT') ORDER BY id",
                    (row["position_id"],),
                )
            ]
            # ... and an exit comes after its entry, once.
            assert events == (["ENTRY", "EXIT"] if closed else ["ENTRY"]), (key, events)
        (session,) = rows(daemon.db, "SELECT * FROM strategy_sessions")
        assert session["id"] == end["session_id"] and session["status"] == "COMPLETED"
        integrity_ok(daemon.db)

        def figures(h: dict[str, int]) -> str:
            return (
                f"{h['calls']} calls, p50 {h['p50_ns'] / 1000:.1f} us, "
                f"p99 {h['p99_ns'] / 1000:.1f} us, p99.9 {h['p999_ns'] / 1000:.1f} us, "
                f"worst {h['worst_ns'] / 1000:.1f} us"
            )

        print(
            f"\ndaemon {how}, away {away_for + sum(durable):.1f}s. Update calls while away: "
            f"{figures(updates['away'])}; while it came back: {figures(updates['back'])}; "
            f"connected again: {figures(updates['connected'])}. "
            f"Durable calls while away: {min(durable) * 1000:.0f}..{max(durable) * 1000:.0f} ms "
            f"(ack_timeout {ACK_TIMEOUT * 1000:.0f} ms). "
            f"Max RSS growth {updates['rss_growth_kib']} KiB"
        )
        # Sanity only (timings are printed, not asserted): an update never waits for a daemon.
        worst = max(updates[phase]["worst_ns"] for phase in ("away", "back", "connected"))
        assert worst < 0.25e9 * UNIT, json.dumps(updates)
        # Memory stays flat: updates are coalesced per leg, not queued.
        assert updates["rss_growth_kib"] < 16 * 1024, updates
    finally:
        strategy.close()
        reap(daemon)


@pytest.mark.parametrize("how", ["never", "stopped"])
def test_strategy_runs_on_without_a_daemon_and_everything_arrives_in_order(
    workdir: Path, soak: Soak, how: str
) -> None:
    run_absent(workdir, soak, how, 1.5 * UNIT)


@pytest.mark.soak
def test_daemon_stopped_for_a_minute(workdir: Path, soak: Soak) -> None:
    run_absent(workdir, soak, "stopped", 60.0)
