"""Where a durable round trip's time goes: the floors under positiond's entry latency.

- raw client -> daemon: the daemon alone, without the client library's I/O thread;
- a minimal threaded client -> daemon: the client library's design (the caller hands the
  message to an I/O thread that owns the socket, through a pipe, and waits on a
  ``threading.Event`` set on the ack) stripped to those two hops: what the design costs, apart
  from the library's own bookkeeping;
- raw client -> an asyncio ROUTER that answers at once (``echo``), or after one aiosqlite hop
  committing one row (``commit``): what any asyncio + aiosqlite daemon pays on this machine;
- the store alone: ``apply_batch`` of a one-entry batch, in process, on the writer's SQLite
  connection; and a prototype of one change to the store (auto-checkpoint off, a background
  PASSIVE checkpoint on its own connection) to show what it would do to the tail.
"""

from __future__ import annotations

import collections
import os
import secrets
import shutil
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import zmq

from bench.common import Worker, kill_process, tmp_workdir
from bench.rawproto import RawClient, RawSession

__all__ = ["daemon_rtts", "floor_rtts", "store_apply_ns", "threaded_rtts"]

# Background checkpoint period of the store prototype (seconds).
CHECKPOINT_EVERY = 0.05


def daemon_rtts(endpoint: str, n: int, warmup: int = 20, pause: float = 0.0) -> list[int]:
    """Entry round trips (ns) of a bare blocking client against a running positiond.

    ``pause``: seconds of sleep before each entry (an idle daemon, woken by every message).
    """
    client = RawClient(endpoint)
    try:
        session = RawSession("bench-raw-entry")
        client.call(session.start())
        samples: list[int] = []
        perf = time.perf_counter_ns
        for i in range(warmup + n):
            msg = session.entry(f"{session.key}-{i}")
            if pause:
                time.sleep(pause)
            t0 = perf()
            client.call(msg)
            if i >= warmup:
                samples.append(perf() - t0)
        for i in range(warmup + n):
            client.call(session.exit(f"{session.key}-{i}"))
        client.call(session.end())
        return samples
    finally:
        client.close()


class _ThreadedClient:
    """The client library's hand-off, minimal: caller -> pipe -> I/O thread -> socket, and
    ack -> I/O thread -> Event -> caller."""

    def __init__(self, endpoint: str) -> None:
        self._rfd, self._wfd = os.pipe()
        self._outq: collections.deque[tuple[bytes, int, threading.Event]] = collections.deque()
        self._waiting: dict[int, threading.Event] = {}
        self._stop = False
        self._endpoint = endpoint
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(5)

    def call(self, msg: dict[str, Any], timeout: float = 5.0) -> None:
        done = threading.Event()
        self._outq.append((orjson.dumps(msg), msg["seq"], done))
        os.write(self._wfd, b"\0")
        if not done.wait(timeout):
            raise TimeoutError(f"no answer to seq {msg['seq']}")

    def _run(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self._endpoint)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._rfd, zmq.POLLIN)
        self._ready.set()
        try:
            while not self._stop:
                events = dict(poller.poll(100))
                if self._rfd in events:
                    os.read(self._rfd, 4096)
                while self._outq:
                    payload, seq, done = self._outq.popleft()
                    self._waiting[seq] = done
                    sock.send(payload)
                if sock in events:
                    while True:
                        try:
                            reply = orjson.loads(sock.recv(zmq.NOBLOCK))
                        except zmq.Again:
                            break
                        waiter = self._waiting.pop(reply.get("seq"), None)
                        if waiter is not None:
                            waiter.set()
        finally:
            sock.close(linger=0)
            ctx.term()

    def close(self) -> None:
        self._stop = True
        os.write(self._wfd, b"\0")
        self._thread.join(5)
        os.close(self._rfd)
        os.close(self._wfd)


def threaded_rtts(endpoint: str, n: int, warmup: int = 20) -> list[int]:
    """Entry round trips (ns) through the minimal threaded client against a running positiond."""
    client = _ThreadedClient(endpoint)
    try:
        session = RawSession("bench-threaded-entry")
        client.call(session.start())
        samples: list[int] = []
        perf = time.perf_counter_ns
        for i in range(warmup + n):
            msg = session.entry(f"{session.key}-{i}")
            t0 = perf()
            client.call(msg)
            if i >= warmup:
                samples.append(perf() - t0)
        for i in range(warmup + n):
            client.call(session.exit(f"{session.key}-{i}"))
        client.call(session.end())
        return samples
    finally:
        client.close()


def floor_rtts(mode: str, n: int, warmup: int = 20) -> list[int]:
    """Round trips (ns) of the same messages against a minimal asyncio ROUTER (``mode``)."""
    workdir = tmp_workdir("pdb-floor-")
    endpoint = f"ipc://{workdir}/f.sock"
    worker = Worker(workdir, f"floor-{mode}", "floor", mode, endpoint, str(workdir / "f.db"))
    try:
        worker.wait_ready(time.monotonic() + 30)
        client = RawClient(endpoint)
        try:
            session = RawSession("bench-floor")
            samples: list[int] = []
            perf = time.perf_counter_ns
            for i in range(warmup + n):
                msg = session.entry(f"{session.key}-{i}")
                t0 = perf()
                client.call(msg)
                if i >= warmup:
                    samples.append(perf() - t0)
            return samples
        finally:
            client.close()
    finally:
        kill_process(worker.proc, signal.SIGKILL)
        worker.close()
        shutil.rmtree(workdir, ignore_errors=True)


def store_apply_ns(n: int, *, background_checkpoint: bool) -> list[int]:
    """``apply_batch`` of one entry each (ns), in process, as the writer thread runs it.

    ``background_checkpoint``: the prototype: ``wal_autocheckpoint=0`` on the writer and a
    thread checkpointing (PASSIVE) every CHECKPOINT_EVERY on its own connection, so no commit
    pays for copying the WAL back into the database.
    """
    from positiond.engine import Engine
    from positiond.store.sqlite import prepare_file, setup_connection
    from positiond.store.writes import apply_batch
    from positiond_client.protocol import decode, encode

    workdir = tmp_workdir("pdb-store-")
    db = workdir / "p.db"
    prepare_file(db)
    conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    stop = threading.Event()
    checkpointer: threading.Thread | None = None
    try:
        setup_connection(conn, "NORMAL", 5000)
        if background_checkpoint:
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            checkpointer = threading.Thread(target=_checkpoint_loop, args=(db, stop), daemon=True)
            checkpointer.start()
        engine = Engine(3.0, 1.0)
        rid, key, token = b"\0bench", secrets.token_hex(16), secrets.token_hex(16)
        engine.add_peer(rid, -1, None, None)

        def feed(msg: dict[str, object]) -> None:
            engine.receive(rid, decode(encode(msg)), time.monotonic(), time.time())

        feed({"v": 1, "type": "start", "session": key, "seq": 1, "strategy": "s", "token": token})
        batch = engine.take_batch(time.monotonic())
        engine.committed(batch, apply_batch(conn, batch))
        samples: list[int] = []
        perf = time.perf_counter_ns
        for i in range(n):
            feed(
                {
                    "v": 1, "type": "entry", "session": key, "token": token, "seq": i + 2,
                    "key": f"leg-{i}", "symbol": "NIFTY28NOV2524000CE", "exchange": "NFO",
                    "product": "MIS", "side": "BUY", "quantity": 75, "entry_price": 100.0,
                    "stop_price": 90.0,
                }
            )  # fmt: skip
            batch = engine.take_batch(time.monotonic())
            t0 = perf()
            results = apply_batch(conn, batch)
            samples.append(perf() - t0)
            engine.committed(batch, results)
            time.sleep(0.0001)  # a round trip's gap between two entries
        return samples
    finally:
        stop.set()
        if checkpointer is not None:
            checkpointer.join(5)
        conn.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _checkpoint_loop(db: Path, stop: threading.Event) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        while not stop.wait(CHECKPOINT_EVERY):
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
    finally:
        conn.close()


def message_costs(n: int) -> dict[str, float]:
    """CPU per update message (µs) of each step the daemon takes, in process, one at a time.

    What the raw ceiling's sink does (zmq receive, ``orjson.loads``) against what the daemon
    adds: the protocol's validation (``decode``) and the engine's rules (``Engine.receive``).
    """
    from positiond.engine import Engine
    from positiond_client.protocol import decode

    session = RawSession("bench-costs")
    keys = [f"{session.key}-{j}" for j in range(10)]
    payloads = [session.update(keys[i % 10], 100.0 + i * 0.05) for i in range(n)]
    costs: dict[str, float] = {}
    perf = time.perf_counter_ns

    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        router.rcvhwm = dealer.sndhwm = 0
        router.bind("inproc://bench-costs")
        dealer.connect("inproc://bench-costs")
        for payload in payloads:
            dealer.send(payload)
        recv, noblock = router.recv, int(zmq.NOBLOCK)
        recv(noblock)  # the first message also carries the connection's setup
        router.recv(copy=False)
        t0 = perf()
        for _ in range(n - 1):
            recv(noblock)
            frame = recv(copy=False)
            if frame.more:
                raise AssertionError("one frame per message")
            frame.bytes  # noqa: B018 -- the copy the daemon makes
        costs["zmq receive (id + frame)"] = (perf() - t0) / (n - 1) / 1e3
    finally:
        router.close(linger=0)
        dealer.close(linger=0)
        ctx.term()

    t0 = perf()
    for payload in payloads:
        orjson.loads(payload)
    costs["orjson.loads"] = (perf() - t0) / n / 1e3

    t0 = perf()
    messages = [decode(payload) for payload in payloads]
    costs["decode = loads + validate"] = (perf() - t0) / n / 1e3

    fast = _MemoDecoder()
    t0 = perf()
    for payload in payloads:
        fast.decode(payload)
    costs["prototype: decode, identities memoized"] = (perf() - t0) / n / 1e3

    engine = Engine(3.0, 1.0)
    rid = b"\0costs"
    engine.add_peer(rid, -1, None, None)
    now, wall = time.monotonic(), time.time()
    engine.receive(rid, decode(orjson.dumps(session.start())), now, wall)
    for key in keys:
        engine.receive(rid, decode(orjson.dumps(session.entry(key))), now, wall)
    batch = engine.take_batch(now)
    from positiond.ops import Result

    engine.committed(batch, [Result(True, {"session_id": 1, "position_id": 1})] * len(batch.ops))
    t0 = perf()
    for msg in messages:
        engine.receive(rid, msg, now, wall)
    costs["Engine.receive (coalesce)"] = (perf() - t0) / n / 1e3
    if engine.pending_updates != len(keys):
        raise AssertionError(f"updates not taken: {engine.pending_updates} legs pending")
    return costs


class _MemoDecoder:
    """Prototype of a protocol change (not made): ``update`` messages repeat the same session,
    token and leg key strings thousands of times a second, and the regex checks of those strings
    are most of ``decode``'s cost. Remember the (session, token, key) triples that passed
    ``validate`` once (bounded), and for an update whose fields are all known check only its
    numbers; anything else goes through ``decode`` as today. Same verdicts, same errors."""

    LIMIT = 100_000

    def __init__(self) -> None:
        from positiond_client.protocol import MAX_PRICE, UPDATE_FIELDS, decode

        self._decode = decode
        self._max = MAX_PRICE
        self._fields = frozenset({"v", "type", "session", "token", "key", *UPDATE_FIELDS})
        self._prices = ("current_price", "stop_price", "highest_price")
        self._seen: set[tuple[object, object, object]] = set()

    def decode(self, payload: bytes) -> dict[str, Any]:
        msg = orjson.loads(payload)
        if (
            type(msg) is dict
            and msg.get("type") == "update"
            and msg.get("v") == 1
            and (msg.get("session"), msg.get("token"), msg.get("key")) in self._seen
            and msg.keys() <= self._fields
            and "state" not in msg
            and self._numbers_ok(msg)
        ):
            return msg
        checked = self._decode(payload)  # the full rules; raises ProtocolError
        if checked.get("type") == "update" and len(self._seen) < self.LIMIT:
            self._seen.add((checked.get("session"), checked.get("token"), checked.get("key")))
        return checked

    def _numbers_ok(self, msg: dict[str, Any]) -> bool:
        changed = False
        for name in self._prices:
            if name in msg:
                changed = True
                value = msg[name]
                if value is None:
                    continue
                kind = type(value)
                if (kind is not float and kind is not int) or not 0.0 <= value <= self._max:
                    return False  # NaN fails the comparison too
        level = msg.get("last_trail_level")
        if "last_trail_level" in msg:
            changed = True
            if level is not None and (
                (type(level) is not float and type(level) is not int)
                or not -self._max <= level <= self._max
            ):
                return False
        return changed
