"""A strategy process holding legs: ``python -m bench.protect_proc ENDPOINT STRATEGY LEGS_JSON``.

LEGS_JSON is a list of ``save_position_entry`` keyword arguments. It starts a session, enters
the legs, waits until they are durable, prints one JSON line (session id, leg keys) and idles
until it is killed (the protect tests and the ``protect`` benchmark kill it with SIGKILL).
"""

from __future__ import annotations

import json
import sys
import time

from positiond_client import PositionPersistenceManager

__all__: list[str] = []


def main() -> None:
    endpoint, strategy, legs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    pm = PositionPersistenceManager(strategy, endpoint=endpoint, ack_timeout=5.0)
    sid = pm.start_session()
    keys = [pm.save_position_entry(**leg).key for leg in legs]
    assert pm.sync(5.0)
    print(json.dumps({"session_id": sid, "legs": keys}), flush=True)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
