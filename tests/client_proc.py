"""A strategy process for the client tests: ``python client_proc.py ENDPOINT MODE``.

It opens a session with two legs, prints one JSON line ``{"session_id", "legs", "pid"}`` once
they are stored, then behaves as MODE says:

- ``loop``: ``pm.session(stop_signals=...)``, ticks until ``pm.stop_requested``;
- ``stuck``: handlers installed, but a loop that never looks at ``pm.stop_requested``;
- ``exit0`` / ``exit3``: its own SIGTERM handler calls ``sys.exit(0)`` / ``sys.exit(3)``;
- ``plain``: no handlers at all (SIGTERM kills it, SIGINT raises KeyboardInterrupt);
- ``async``: the asyncio twin, ``session(stop_signals=...)``, ticks until stopped;
- ``async-stuck``: the same with a loop that never looks at ``pm.stop_requested``;
- ``fork``: forks; the child tries a durable call and an update, prints what happened as
  ``{"child": ...}``, then sleeps; the parent prints ``{"child_pid"}`` and sleeps;
- ``revive``: idles with the client's log records printed as ``{"log", "msg"}`` lines.

Every tick sends an update, so the stored state shows the loop ran.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from typing import Any

from positiond_client import (
    AsyncPositionPersistenceManager,
    PositiondError,
    PositionPersistenceManager,
)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


class JsonLines(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        say(log=record.levelname, msg=record.getMessage())


def open_legs(pm: PositionPersistenceManager) -> list[Any]:
    legs = [
        pm.save_position_entry(
            symbol=f"NIFTY28NOV2524000{kind}",
            leg_type=kind,
            entry_price=100.0,
            stop_price=90.0,
            quantity=75,
            position_key=f"{kind.lower()}-1",
        )
        for kind in ("CE", "PE")
    ]
    assert pm.sync(5.0)
    say(session_id=pm.session_id, legs=[leg.key for leg in legs], pid=os.getpid())
    return legs


def tick(
    pm: PositionPersistenceManager | AsyncPositionPersistenceManager, legs: list[Any], n: int
) -> None:
    for leg in legs:
        pm.queue_position_update(leg, current_price=100.0 + n * 0.01, last_trail_level=n)


def sync_mode(endpoint: str, mode: str) -> None:
    pm = PositionPersistenceManager("expiry_blast", endpoint=endpoint, ack_timeout=5.0)
    if mode == "exit0" or mode == "exit3":
        code = 0 if mode == "exit0" else 3

        def leave(signum: int, frame: object) -> None:
            sys.exit(code)

        signal.signal(signal.SIGTERM, leave)
    stop_signals = STOP_SIGNALS if mode in ("loop", "stuck") else None
    with pm.session(stop_signals=stop_signals):
        legs = open_legs(pm)
        n = 0
        while mode == "stuck" or not pm.stop_requested:
            n += 1
            tick(pm, legs, n)
            if mode == "loop":
                pm.wait_stop_requested(0.01)  # a pause between ticks that a stop cuts short
            else:
                time.sleep(0.01)
    say(ended=True, ticks=n)


async def async_mode(endpoint: str, stuck: bool) -> None:
    pm = AsyncPositionPersistenceManager("expiry_blast", endpoint=endpoint, ack_timeout=5.0)
    async with pm.session(stop_signals=STOP_SIGNALS):
        legs = [
            await pm.save_position_entry(
                symbol="NIFTY28NOV2524000CE", entry_price=100.0, quantity=75, position_key="ce-1"
            )
        ]
        assert await pm.sync(5.0)
        say(session_id=pm.session_id, legs=[legs[0].key], pid=os.getpid())
        n = 0
        while stuck or not pm.stop_requested:
            n += 1
            tick(pm, legs, n)
            await asyncio.sleep(0.01)
    say(ended=True, ticks=n)
    await pm.aclose()


def fork_mode(endpoint: str) -> None:
    pm = PositionPersistenceManager("expiry_blast", endpoint=endpoint, ack_timeout=2.0)
    pm.start_session()
    legs = open_legs(pm)
    pid = os.fork()
    if pid == 0:
        outcome: dict[str, Any] = {}
        for what, call in (
            ("entry", lambda: pm.save_position_entry(symbol="X", entry_price=1.0, quantity=1)),
            ("update", lambda: pm.queue_position_update(legs[0], stop_price=95.0)),
            ("exit", lambda: pm.save_position_exit(legs[0], exit_price=95.0)),
        ):
            started = time.monotonic()
            try:
                call()
                outcome[what] = "returned"
            except PositiondError as exc:
                outcome[what] = f"{type(exc).__name__} {exc.code}: {exc}"
            outcome[f"{what}_s"] = time.monotonic() - started
        # A manager created in the child works: its own session, its own connection.
        child_pm = PositionPersistenceManager("child", endpoint=endpoint, ack_timeout=5.0)
        outcome["child_session"] = child_pm.start_session()
        say(child=outcome)
        time.sleep(3600)
    say(child_pid=pid)
    time.sleep(3600)


def main() -> None:
    endpoint, mode = sys.argv[1], sys.argv[2]
    if mode.startswith("async"):
        asyncio.run(async_mode(endpoint, stuck=mode == "async-stuck"))
    elif mode == "fork":
        fork_mode(endpoint)
    elif mode == "revive":
        logging.getLogger("positiond_client").addHandler(JsonLines())
        logging.getLogger("positiond_client").setLevel(logging.INFO)
        pm = PositionPersistenceManager("expiry_blast", endpoint=endpoint, ack_timeout=5.0)
        pm.start_session()
        open_legs(pm)
        time.sleep(3600)
    else:
        sync_mode(endpoint, mode)


if __name__ == "__main__":
    main()
