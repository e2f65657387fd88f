"""A stand-in strategy process for the crash scenario: ``python bench/strategy_proc.py ENDPOINT``.

Starts a session, enters two legs, streams updates, prints ``READY <session_id>`` once all of
it is durably stored, then keeps streaming updates until it is killed.
"""

from __future__ import annotations

import logging
import sys
import time

from positiond_client import PositionPersistenceManager

# Pace of the update stream (seconds): a busy strategy on a live feed.
UPDATE_PERIOD = 0.005


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: strategy_proc.py ENDPOINT", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    pm = PositionPersistenceManager(strategy_name="bench-crash", endpoint=argv[1], ack_timeout=5.0)
    session_id = pm.start_session()
    if session_id is None:
        print("ERROR session start not acknowledged", flush=True)
        return 1
    legs = [
        pm.save_position_entry(
            symbol=f"NIFTY28NOV2524000{side}",
            leg_type=side,
            entry_price=100.0,
            stop_price=90.0,
            quantity=75,
        )
        for side in ("CE", "PE")
    ]
    for i in range(10):
        pm.queue_position_update(legs[i & 1], current_price=100.0 + i * 0.05)
    if not pm.sync(5.0):
        print("ERROR sync not acknowledged", flush=True)
        return 1
    print(f"READY {session_id}", flush=True)
    i = 0
    while True:
        i += 1
        price = 100.0 + (i % 200) * 0.05
        pm.queue_position_update(legs[i & 1], current_price=price, highest_price=price + 1.0)
        time.sleep(UPDATE_PERIOD)  # the strategy's own pacing, not a wait for a condition


if __name__ == "__main__":
    sys.exit(main(sys.argv))
