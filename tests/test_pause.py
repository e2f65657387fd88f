"""The daemon's own absences: a restart keeps what it knew of a session."""

from __future__ import annotations

import time

from positiond_client import PositionPersistenceManager
from tests.helpers import DaemonProcess, rows, session_status, wait_for


def test_a_session_stalled_before_a_restart_runs_again_with_its_next_updates(
    daemon: DaemonProcess,
) -> None:
    pm = PositionPersistenceManager(
        "expiry_blast", endpoint=daemon.endpoint, ack_timeout=5, progress_deadline=1.0
    )
    try:
        sid = pm.start_session()
        leg = pm.save_position_entry(symbol="X", entry_price=10.0, quantity=1, stop_price=9.0)
        wait_for(lambda: session_status(daemon.db, sid) == "STALLED", 5, "STALLED")
        daemon.stop()
        daemon.start()
        sent = [0.0]

        def loop_turn() -> bool:
            """The strategy's main loop works again: an update every 0.1 s (10 Hz)."""
            if time.monotonic() - sent[0] >= 0.1:
                sent[0] = time.monotonic()
                pm.queue_position_update(leg, stop_price=9.0 + sent[0] % 1)
            return session_status(daemon.db, sid) == "RUNNING"

        wait_for(loop_turn, 5, "RUNNING again after updates")
        kinds = [
            r["event_type"]
            for r in rows(
                daemon.db,
                "SELECT event_type FROM position_events WHERE position_id IS NULL ORDER BY id",
            )
        ]
        assert kinds[0] == "SESSION_START" and kinds[-1] == "PROGRESS", kinds
        assert kinds.count("STALLED") == 1 and kinds.count("PROGRESS") == 1, kinds
        # The deadline is watched on the new daemon too: silent again, stalled again.
        wait_for(lambda: session_status(daemon.db, sid) == "STALLED", 5, "STALLED again")
        assert pm.end_session()
    finally:
        pm.close()
