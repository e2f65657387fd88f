"""A protected strategy process for the hand-back tests: ``python -m tests.protect_revive_proc
ENDPOINT STRATEGY LEGS_JSON``.

It starts a session with ``protect=True``, enters the legs, prints one JSON line (session id,
leg keys), then every 20 ms queues an update for each leg it still manages and prints, one JSON
line each: every notice (``{"notice": CODE, "info": {...}}``), the first ``LegError`` of a leg
(``{"leg_error": KEY}``) and each change of a leg's ``protection_pending``. The tests freeze it
(SIGSTOP), let the daemon declare it crashed and protect its legs, and thaw it (SIGCONT).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

from positiond_client import LegError, PositionPersistenceManager

__all__: list[str] = []

_lock = threading.Lock()


def say(line: dict[str, Any]) -> None:
    with _lock:
        print(json.dumps(line), flush=True)


def main() -> None:
    endpoint, strategy, legs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    pm = PositionPersistenceManager(
        strategy, endpoint=endpoint, ack_timeout=5.0, heartbeat_interval=0.1,
        on_notice=lambda code, info: say({"notice": code, "info": info}),
    )  # fmt: skip
    sid = pm.start_session(protect=True)
    handles = [pm.save_position_entry(**leg) for leg in legs]
    assert pm.sync(5.0)
    say({"session_id": sid, "legs": [h.key for h in handles]})
    pending = {h.key: h.protection_pending for h in handles}
    failed: set[str] = set()
    price = 100.0
    while True:
        price += 0.05
        for handle in handles:
            if handle.key in failed:
                continue
            try:
                pm.queue_position_update(handle, current_price=round(price, 2))
            except LegError as exc:
                failed.add(handle.key)
                say({"leg_error": handle.key, "message": str(exc)})
            now = handle.protection_pending
            if now != pending[handle.key]:
                pending[handle.key] = now
                say({"pending": handle.key, "value": now})
        time.sleep(0.02)


if __name__ == "__main__":
    main()
