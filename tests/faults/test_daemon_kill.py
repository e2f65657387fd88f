"""Guarantee 1: the daemon killed (-9) at any moment loses no acknowledged write, and the
client's re-sends after each restart duplicate nothing.

A strategy process (fault_strategy.py ``churn``) writes entries, updates and exits over several
legs as fast as it can and journals every ack it received. The daemon is SIGKILLed at random
moments and restarted on the same database and socket. Right after each kill — before any
client can re-send anything — the database must already hold every write acked so far; at the
end, after the strategy's final sync, it must hold everything the strategy sent, once.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any

from tests.conftest import Soak
from tests.faults.support import (
    StrategyProcess,
    integrity_ok,
    legs_by_key,
    reap,
    start,
    stored_n,
)
from tests.helpers import DaemonProcess, rows, wait_for

SEED = int(os.environ.get("POSITIOND_FAULT_SEED", "20251128"))


class Ledger:
    """What the strategy was told, folded from its journal, checked against the database."""

    def __init__(self) -> None:
        self.entries: dict[str, int] = {}  # acked entry -> position_id
        self.exits: dict[str, int] = {}  # acked exit -> the leg's newest n when it was sent
        self.synced: dict[str, int] = {}  # leg -> n covered by its latest successful sync
        self.errors: list[dict[str, Any]] = []
        self.syncs = 0

    def fold(self, records: list[dict[str, Any]]) -> list[str]:
        """Take in new journal records; return the legs they say something about."""
        touched = []
        for r in records:
            op = r["op"]
            if op == "entry":
                self.entries[r["key"]] = r["id"]
                touched.append(r["key"])
            elif op == "exit":
                self.exits[r["key"]] = r["n"]
                touched.append(r["key"])
            elif op == "sync":
                self.syncs += 1
                self.synced.update(r["legs"])
                touched.extend(r["legs"])
            elif op == "error":
                self.errors.append(r)
        return touched

    def check(self, db: Path, keys: list[str]) -> tuple[int, int]:
        """(lost, duplicated) among these legs: every acked write must be stored, once."""
        found = legs_by_key(db, sorted(set(keys)))
        lost = duplicated = 0
        for key in set(keys):
            row = found.get(key)
            acked = key in self.entries or key in self.exits or key in self.synced
            if row is None:
                lost += acked
                continue
            if key in self.entries:
                assert row["position_id"] == self.entries[key], key
            duplicated += row["entries"] > 1 or row["exits"] > 1
            if key in self.exits:
                # closed once, with the final state the exit carried
                closed = row["status"] == "CLOSED" and row["exits"] == 1
                lost += not closed or stored_n(row) != self.exits[key]
            elif key in self.synced and stored_n(row) < self.synced[key]:
                lost += 1
        return lost, duplicated


def test_sigkill_at_random_moments_loses_and_duplicates_nothing(workdir: Path, soak: Soak) -> None:
    kills = soak.count(20)
    rng = random.Random(SEED)
    print(f"\nseed {SEED} (POSITIOND_FAULT_SEED), {kills} kills")
    daemon = start(DaemonProcess(workdir, "--flush-interval", "0.5", "--log-level", "INFO"))
    strategy = StrategyProcess(
        workdir, "churn", daemon.endpoint, "--seed", str(SEED), "--legs", "8",
        "--ack-timeout", "0.3", "--sync-every", "150",
    )  # fmt: skip
    ledger = Ledger()
    journal = strategy.journal
    lost = duplicated = 0
    started = time.monotonic()
    try:
        wait_for(lambda: journal.of("start"), 10, "the strategy's session")
        for kill in range(kills):
            # Kill while the strategy is busy with this daemon: after it got an ack from it.
            # (0..2 further acks, then 0..0.3 s: the random moment is the point, not a wait.)
            mark = journal.count() + rng.randrange(3)
            wait_for(lambda m=mark: journal.count() > m, 20, f"progress before kill {kill}")  # type: ignore[misc]
            time.sleep(rng.uniform(0.0, 0.3))
            assert strategy.alive(), strategy.output()
            daemon.kill()
            # The daemon is dead: only what it committed counts. Everything acked must be there.
            touched = ledger.fold(journal.read())
            got = ledger.check(daemon.db, touched)
            lost, duplicated = lost + got[0], duplicated + got[1]
            assert got == (0, 0), f"kill {kill}: lost {got[0]}, duplicated {got[1]}"
            start(daemon)
        elapsed = time.monotonic() - started
        assert strategy.finish() == 0, strategy.output()
        daemon.stop()
        ledger.fold(journal.read())
        final = journal.of("final")[0]
        assert journal.of("end")[0]["ok"], "end_session was not acknowledged"
        assert final["synced"] and final["unacknowledged"] == 0, final
        assert ledger.errors == [], ledger.errors

        # Everything acked during the run, once more, now that every re-send is done.
        every = list(ledger.entries) + list(ledger.exits) + list(ledger.synced)
        assert ledger.check(daemon.db, every) == (0, 0)
        # And everything the strategy sent at all: one row per leg it entered, no other row.
        legs = legs_by_key(daemon.db)
        newest: dict[str, int] = final["newest"]
        assert sorted(legs) == sorted(newest), "legs stored differ from legs entered"
        for key, n in newest.items():
            row = legs[key]
            assert (row["entries"], row["exits"]) == (1, int(key in final["exited"])), key
            assert row["status"] == ("CLOSED" if key in final["exited"] else "ACTIVE"), key
            assert stored_n(row) == n, f"{key}: stored update {stored_n(row)}, newest sent {n}"
            assert row["position_id"] == final["ids"][key], key
        (session,) = rows(daemon.db, "SELECT * FROM strategy_sessions")
        assert session["status"] == "COMPLETED"
        verdicts = rows(
            daemon.db,
            "SELECT COUNT(*) AS n FROM position_events WHERE position_id IS NULL "
            "AND event_type = 'CRASH'",
        )[0]["n"]
        integrity_ok(daemon.db)
        print(
            f"kills survived: {kills} in {elapsed:.1f}s, lost {lost}, duplicated {duplicated}; "
            f"acked entries {len(ledger.entries)}, acked exits {len(ledger.exits)}, "
            f"successful syncs {ledger.syncs}, legs {len(newest)}, "
            f"updates sent {sum(newest.values())}, crash verdicts on the session {verdicts}"
        )
    finally:
        strategy.close()
        reap(daemon)
