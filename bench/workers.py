"""Processes the scenarios start: ``python -m bench.workers MODE ARGS`` (see bench.common.Worker).

Each prints ``READY {json}`` when set up, waits for ``GO {json}``, prints ``DONE {json}`` (the
strategies and the session holder take any number of GOs), and exits (ending its session
cleanly) when its stdin closes. Times in GO are ``time.monotonic()``
values, shared by every process on the machine.

modes:
  ingest-client ENDPOINT LEGS   a strategy: PositionPersistenceManager, LEGS legs, updates as
                                fast as it can between GO's start and end
  ingest-raw ENDPOINT LEGS [session]
                                the same update messages on a bare DEALER: to the sink (the
                                raw ceiling), or with ``session`` to positiond, after a start
                                and the legs' entries
  sink ENDPOINT                 a bare ROUTER: poll, drain, orjson-decode, count (no storage)
  trader ENDPOINT               a strategy entering and exiting one leg after another (GO's
                                "pause": seconds between two cycles)
  sessions ENDPOINT N LEGS      N raw-protocol sessions x LEGS legs, heartbeating every 0.5 s;
                                each GO floods {"updates": M} update messages over their legs
                                and says DONE once a sync after them is acknowledged
  floor MODE ENDPOINT DB        an asyncio ROUTER like the daemon's: MODE echo answers at once,
                                commit answers after one aiosqlite hop committing a row
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson
import zmq

from bench.rawproto import RawClient, RawSession
from positiond_client import Leg, PositionPersistenceManager

HEARTBEAT = 0.5
DRAIN_MAX = 2000  # the sink's drain, as the daemon's
PIPELINE = 500  # durable messages in flight at once from one raw client
# Check the clock every this many sends: often enough for a 1 ms-accurate end.
CLOCK_EVERY = 256


def _say(word: str, data: dict[str, Any]) -> None:
    sys.stdout.write(f"{word} {json.dumps(data)}\n")
    sys.stdout.flush()


def _command(timeout: float | None = None) -> dict[str, Any] | None:
    """The next GO's parameters; None when stdin closed (or nothing came within timeout)."""
    readable, _, _ = select.select([sys.stdin], [], [], timeout)
    if not readable:
        return None
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    word, _, rest = line.strip().partition(" ")
    if word != "GO":
        raise SystemExit(f"unexpected command {line!r}")
    data: dict[str, Any] = json.loads(rest or "{}")
    return data


def _wait_go() -> dict[str, Any]:
    while True:
        try:
            go = _command()
        except EOFError:
            raise SystemExit(0) from None
        if go is not None:
            return go


def _next_go() -> dict[str, Any] | None:
    """The next GO's parameters, or None once stdin closed (the worker should finish)."""
    while True:
        try:
            go = _command()
        except EOFError:
            return None
        if go is not None:
            return go


def _beat(client: RawClient, beats: list[bytes]) -> None:
    for beat in beats:
        client.send(beat)
    client.drain()


def _heartbeat_until_go(beat: Callable[[], None] | None) -> dict[str, Any] | None:
    """Wait for the next GO (None: stdin closed), calling ``beat`` every HEARTBEAT meanwhile."""
    while True:
        if beat is not None:
            beat()
        try:
            go = _command(HEARTBEAT if beat is not None else None)
        except EOFError:
            return None
        if go is not None:
            return go


def _until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def _wait_eof() -> None:
    while True:
        try:
            _command()
        except EOFError:
            return


# ---- ingest ------------------------------------------------------------------------------


def _enter(pm: PositionPersistenceManager, symbol: str, price: float) -> Leg:
    return pm.save_position_entry(
        symbol=symbol, leg_type=symbol[-2:], entry_price=price, stop_price=price / 2, quantity=75
    )


def ingest_client(endpoint: str, legs: int) -> None:
    pm = PositionPersistenceManager(
        strategy_name=f"bench-ingest-{os.getpid()}", endpoint=endpoint, ack_timeout=10.0
    )
    try:
        if pm.start_session() is None:
            raise SystemExit("session start not acknowledged")
        handles = [_enter(pm, f"NIFTY28NOV25{24000 + j}CE", 1.0) for j in range(legs)]
        _say("READY", {"session": pm.session_key, "legs": [leg.key for leg in handles]})
        counts = [0] * legs
        update = pm.queue_position_update
        clock = time.monotonic
        while (go := _next_go()) is not None:
            _until(go["start"])
            end, calls, j = go["end"], 0, 0
            while True:
                counts[j] += 1
                # current_price - 1.0 = how many updates this leg has had: visible progress.
                update(handles[j], current_price=1.0 + counts[j])
                j = j + 1 if j + 1 < legs else 0
                calls += 1
                if calls % CLOCK_EVERY == 0 and clock() >= end:
                    break
            final = {h.key: counts[i] for i, h in enumerate(handles)}
            _say("DONE", {"calls": calls, "final": final})
        pm.end_session()
    finally:
        pm.close(1.0)


def ingest_raw(endpoint: str, legs: int, announce: bool) -> None:
    """``announce``: talk to positiond (a session and its legs first), not to the sink."""
    client = RawClient(endpoint)
    session = RawSession("bench-raw")
    keys = [f"{session.key}-{j}" for j in range(legs)]
    if announce:
        client.call(session.start())
        seqs = set()
        for key in keys:
            msg = session.entry(key, 1.0)
            client.send(orjson.dumps(msg))
            seqs.add(msg["seq"])
        client.collect(seqs, 60.0)
    _say("READY", {})
    beat = (lambda: _beat(client, [session.heartbeat()])) if announce else None
    go = _heartbeat_until_go(beat)
    if go is None:
        raise SystemExit(0)
    send, encode = client.sock.send, session.update
    counts = [0] * legs
    _until(go["start"])
    end, sent, j = go["end"], 0, 0
    clock = time.monotonic
    while True:
        counts[j] += 1
        send(encode(keys[j], 1.0 + counts[j]))
        j = j + 1 if j + 1 < legs else 0
        sent += 1
        if sent % CLOCK_EVERY == 0 and clock() >= end:
            break
    _say("DONE", {"calls": sent, "final": dict(zip(keys, counts, strict=True))})
    _heartbeat_until_go(beat)  # until stdin closes: the session must not look dead meanwhile
    if announce:
        client.call(session.end(), 30.0)
    client.close()


def sink(endpoint: str) -> None:
    """The raw ceiling's receiver: poll, then drain without blocking, decode every message."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    _say("READY", {})
    go = _wait_go()
    recv, loads, poll, clock = sock.recv, orjson.loads, sock.poll, time.monotonic
    count, samples = 0, []
    end = go["end"]
    next_sample = go["start"]
    while True:
        now = clock()
        if now >= next_sample:
            samples.append((now, count))
            next_sample = now + 0.01
            if now >= end:
                break
        if not poll(5):
            continue
        for _ in range(DRAIN_MAX):  # then look at the clock again
            try:
                recv(zmq.NOBLOCK)  # routing id
            except zmq.Again:
                break
            loads(recv())
            count += 1
    _say("DONE", {"samples": samples, "count": count})
    _wait_eof()
    sock.close(linger=0)
    ctx.term()


# ---- durable load ------------------------------------------------------------------------


def trader(endpoint: str) -> None:
    pm = PositionPersistenceManager(
        strategy_name=f"bench-trader-{os.getpid()}", endpoint=endpoint, ack_timeout=10.0
    )
    try:
        if pm.start_session() is None:
            raise SystemExit("session start not acknowledged")
        _say("READY", {"session": pm.session_key})
        perf = time.perf_counter_ns
        i = 0
        while (go := _next_go()) is not None:
            entries: list[int] = []
            exits: list[int] = []
            failed = 0
            _until(go["start"])
            pause = float(go.get("pause", 0.0))  # seconds between two entry/exit cycles
            while time.monotonic() < go["end"]:
                if pause:
                    time.sleep(pause)
                i += 1
                t0 = perf()
                leg = _enter(pm, f"NIFTY28NOV25{24000 + i % 500}PE", 100.0)
                t1 = perf()
                ok = pm.save_position_exit(leg, exit_price=95.0, exit_reason="BENCH")
                t2 = perf()
                if leg.position_id is None or not ok:
                    failed += 1
                entries.append(t1 - t0)
                exits.append(t2 - t1)
            _say("DONE", {"entry_ns": entries, "exit_ns": exits, "failed": failed})
        pm.end_session()
    finally:
        pm.close(1.0)


# ---- many sessions -----------------------------------------------------------------------


def sessions(endpoint: str, count: int, legs: int) -> None:
    client = RawClient(endpoint)
    mine = [RawSession(f"bench-idle-{i % 50}") for i in range(count)]
    keys = [(s, f"{s.key}-{j}") for s in mine for j in range(legs)]
    # Pipelined, but never more answers in flight than the daemon's queue to us holds (SNDHWM
    # 1000: beyond it replies are dropped, and this generator does not re-send).
    for chunk in range(0, count, PIPELINE):
        for s in mine[chunk : chunk + PIPELINE]:
            client.send(orjson.dumps(s.start()))
        # The sessions' answers share seq numbers: wait for a count of acks instead.
        _collect_count(client, len(mine[chunk : chunk + PIPELINE]), 60.0)
    for chunk in range(0, len(keys), PIPELINE):
        for s, key in keys[chunk : chunk + PIPELINE]:
            client.send(orjson.dumps(s.entry(key)))
        _collect_count(client, len(keys[chunk : chunk + PIPELINE]), 60.0)
    _say("READY", {"sessions": count, "legs": count * legs})
    beats = [s.heartbeat() for s in mine]
    send = client.sock.send
    next_beat = time.monotonic()
    while True:
        now = time.monotonic()
        if now >= next_beat:
            for beat in beats:
                send(beat)
            client.drain()
            next_beat = now + HEARTBEAT
        try:
            go = _command(max(0.0, next_beat - time.monotonic()))
        except EOFError:
            break
        if go is None:
            continue
        t0 = time.monotonic()
        total = int(go["updates"])
        for i in range(total):
            s, key = keys[i % len(keys)]
            send(s.update(key, 100.0 + (i // len(keys)) * 0.05))
            if i % CLOCK_EVERY == 0 and time.monotonic() >= next_beat:
                for beat in beats:
                    send(beat)
                client.drain()
                next_beat = time.monotonic() + HEARTBEAT
        # A sync is answered once everything sent before it on this connection is stored.
        client.call(mine[0].sync(), 120.0)
        _say("DONE", {"sent": total, "seconds": time.monotonic() - t0})
    for chunk in range(0, count, PIPELINE):
        for s in mine[chunk : chunk + PIPELINE]:
            client.send(orjson.dumps(s.end()))
        _collect_count(client, len(mine[chunk : chunk + PIPELINE]), 60.0)
    client.close()


def _collect_count(client: RawClient, count: int, timeout: float) -> None:
    """Wait for ``count`` acks (pings skipped); raise on an error."""
    deadline = time.monotonic() + timeout
    got = 0
    while got < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not client.sock.poll(int(remaining * 1000) + 1):
            raise SystemExit(f"{count - got} acks missing after {timeout:.0f}s")
        reply = orjson.loads(client.sock.recv())
        kind = reply.get("type")
        if kind == "ack":
            got += 1
        elif kind == "error":
            raise SystemExit(f"positiond refused: {reply}")


# ---- the adapter's floor -----------------------------------------------------------------


async def _floor(mode: str, endpoint: str, db: str) -> None:
    import aiosqlite

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    loop = asyncio.get_running_loop()
    conn = await aiosqlite.connect(db, isolation_level=None)
    await conn.execute("PRAGMA journal_mode = WAL")
    await conn.execute("PRAGMA synchronous = NORMAL")
    await conn.execute("CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY, v TEXT)")
    raw = conn._conn

    def commit(rows: list[tuple[str, str]]) -> None:
        cur = raw.cursor()
        cur.execute("BEGIN IMMEDIATE")
        cur.executemany("INSERT OR REPLACE INTO t VALUES (?, ?)", rows)
        cur.execute("COMMIT")

    pending: list[tuple[bytes, dict[str, Any]]] = []
    wake = asyncio.Event()

    def ack(rid: bytes, msg: dict[str, Any]) -> None:
        reply = orjson.dumps({"v": 1, "type": "ack", "seq": msg.get("seq")})
        sock.send_multipart([rid, reply], zmq.NOBLOCK)

    def readable() -> None:
        while True:
            try:
                rid = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            msg = orjson.loads(sock.recv())
            if mode == "echo":
                ack(rid, msg)
            else:
                pending.append((rid, msg))
        if pending:
            wake.set()

    loop.add_reader(sock.fileno(), readable)
    _say("READY", {})
    while True:
        await wake.wait()
        wake.clear()
        batch = pending[:]
        pending.clear()
        await conn._execute(commit, [(str(m.get("key")), "x") for _, m in batch])  # type: ignore[no-untyped-call]
        for rid, msg in batch:
            ack(rid, msg)
        if int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            loop.call_soon(readable)
        if pending:
            wake.set()


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    mode, args = argv[0], argv[1:]
    if mode == "ingest-client":
        ingest_client(args[0], int(args[1]))
    elif mode == "ingest-raw":
        ingest_raw(args[0], int(args[1]), args[2:] == ["session"])
    elif mode == "sink":
        sink(args[0])
    elif mode == "trader":
        trader(args[0])
    elif mode == "sessions":
        sessions(args[0], int(args[1]), int(args[2]))
    elif mode == "floor":
        asyncio.run(_floor(args[0], args[1], args[2]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
