"""A strategy that forks after creating its manager: the child cannot use the parent's client
(it raises at once instead of pretending), can create its own, and does not keep the parent's
connection open (the parent's death is seen at once, not by heartbeat)."""

from __future__ import annotations

import contextlib
import os
import signal

from tests.client_support import ClientProc
from tests.helpers import UNIT, DaemonProcess, rows, session_status, wait_for


def test_a_forked_child_fails_loudly_and_the_parents_death_is_seen_at_once(
    daemon: DaemonProcess,
) -> None:
    proc = ClientProc(daemon.workdir, daemon.endpoint, "fork")
    child_pid = None
    try:
        parent = proc.json()
        sid, parent_pid = int(parent["session_id"]), int(parent["pid"])
        child_pid = int(proc.json_until("child_pid")["child_pid"])
        child = proc.json_until("child")["child"]
        for what in ("entry", "update", "exit"):
            # Loud and at once: no silent no-op, no ack_timeout wait, no "will be re-sent".
            assert child[what].startswith("SessionError NO_SESSION"), child
            assert "forked child" in child[what] and "create a new" in child[what]
            assert child[f"{what}_s"] < 0.1 * UNIT, child
        assert isinstance(child["child_session"], int)  # its own manager works
        assert "re-sent" not in proc.stderr()

        os.kill(parent_pid, signal.SIGKILL)  # the child lives on
        wait_for(lambda: session_status(daemon.db, sid) == "CRASHED", 5, "the parent CRASHED")
        found = rows(
            daemon.db,
            "SELECT crash_source, crash_reason FROM strategy_sessions WHERE id = ?",
            (sid,),
        )[0]
        # Its connection dropped with it (before: the child's inherited copy kept it open and
        # only the heartbeat timeout caught the death).
        assert found["crash_source"] == "DISCONNECT", dict(found)
        assert found["crash_reason"] == f"process exited (pid {parent_pid})"
        child_session = rows(
            daemon.db, "SELECT status FROM strategy_sessions WHERE strategy_name = 'child'"
        )[0]
        assert child_session["status"] == "RUNNING"
    finally:
        if child_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child_pid, signal.SIGKILL)
        proc.close()
