"""A stand-in strategy process for the tests: ``python strategy_proc.py ENDPOINT MODE [ARG]``.

It prints one JSON line (session id, leg keys) once its state is durably stored, then behaves
as MODE says. Modes: ``hold`` (keep running, idle), ``busy SECONDS`` (burn CPU in pure Python,
then end the session), ``raise`` (crash inside ``with pm.session()``), ``updates`` (keep
sending updates; the newest stop is printed after every sync), ``stream HZ`` (send an update HZ
times a second, like a strategy's main loop, and answer ``sync`` lines on stdin).
In ``updates`` and ``stream`` modes every notice from the daemon (REVIVED, FENCED) is printed.
``$STRATEGY_KEY_PREFIX`` prefixes the position keys (several strategies on one daemon).
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time

from positiond_client import PositiondError, PositionPersistenceManager


def main() -> None:
    endpoint, mode = sys.argv[1], sys.argv[2]
    prefix = os.environ.get("STRATEGY_KEY_PREFIX", "")

    def notice(code: str, info: dict[str, object]) -> None:
        if mode in ("updates", "stream"):  # the fencing and pause tests look for these
            print(json.dumps({"notice": code, "key": info.get("key")}), flush=True)

    pm = PositionPersistenceManager(
        "expiry_blast", endpoint=endpoint, ack_timeout=5.0, on_notice=notice
    )
    if mode == "raise":
        try:
            with pm.session():
                leg = pm.save_position_entry(
                    symbol="NIFTY28NOV2524000CE",
                    leg_type="CE",
                    entry_price=100.0,
                    stop_price=90.0,
                    quantity=75,
                )
                print(json.dumps({"session_id": pm.session_id, "legs": [leg.key]}), flush=True)
                {}["missing_key"]  # the strategy's bug
        except KeyError:
            sys.exit(3)
    sid = pm.start_session()
    ce = pm.save_position_entry(
        symbol="NIFTY28NOV2524000CE",
        leg_type="CE",
        entry_price=100.0,
        stop_price=90.0,
        quantity=75,
        position_key=prefix + "ce-1",
    )
    pe = pm.save_position_entry(
        symbol="NIFTY28NOV2524000PE",
        leg_type="PE",
        entry_price=80.0,
        stop_price=72.0,
        quantity=75,
        position_key=prefix + "pe-1",
    )
    closed = pm.save_position_entry(
        symbol="NIFTY28NOV2523900CE",
        leg_type="CE",
        entry_price=50.0,
        stop_price=45.0,
        quantity=75,
        position_key=prefix + "ce-closed",
    )
    pm.queue_position_update(
        ce, current_price=112.0, highest_price=112.0, stop_price=104.0, last_trail_level=2
    )
    pm.queue_position_update(
        pe,
        current_price=86.0,
        highest_price=86.5,
        stop_price=79.0,
        last_trail_level=1,
        state={"atm": 24000},
    )
    pm.save_position_exit(closed, exit_price=45.0, exit_reason="STOP_HIT")
    assert pm.sync(5.0)
    print(json.dumps({"session_id": sid, "legs": [ce.key, pe.key]}), flush=True)
    if mode == "hold":
        while True:
            time.sleep(1)
    elif mode == "busy":
        deadline = time.monotonic() + float(sys.argv[3])
        n = 0
        while time.monotonic() < deadline:
            n += sum(i * i for i in range(1000))  # pure-Python work holding the GIL
        pm.end_session()
        print("DONE", flush=True)
    elif mode == "stream":
        period = 1.0 / float(sys.argv[3])
        commands: queue.Queue[str] = queue.Queue()
        threading.Thread(
            target=lambda: [commands.put(line.strip()) for line in sys.stdin], daemon=True
        ).start()
        stop, sent = 104.0, 0
        next_at = time.monotonic()
        while True:
            try:
                command = commands.get(timeout=max(0.0, next_at - time.monotonic()))
            except queue.Empty:
                stop += 0.25
                pm.queue_position_update(ce, current_price=stop + 8, stop_price=stop)
                sent += 1
                next_at += period
                continue
            if command == "sync":
                try:
                    synced = pm.sync(5.0)
                except PositiondError as exc:
                    print(json.dumps({"error": exc.code}), flush=True)
                else:
                    print(json.dumps({"synced": synced, "sent": sent}), flush=True)
    elif mode == "updates":
        stop = 104.0
        for line in sys.stdin:  # one command per line
            command = line.strip()
            try:
                if command == "sync":  # answers once everything sent so far is stored
                    print(json.dumps({"synced": pm.sync(5.0), "stop": stop}), flush=True)
                elif command == "exit":
                    done = pm.save_position_exit(ce, exit_price=stop, exit_reason="STOP_HIT")
                    print(json.dumps({"exited": done}), flush=True)
                else:
                    stop += 1.0
                    pm.queue_position_update(ce, current_price=stop + 8, stop_price=stop)
                    if command == "tick-report":
                        print(json.dumps({"queued": stop}), flush=True)
            except PositiondError as exc:
                print(json.dumps({"error": exc.code}), flush=True)


if __name__ == "__main__":
    main()
