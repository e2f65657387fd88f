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


def daemon_rtts(endpoint: str, n: int, warmup: int = 20) -> list[int]:
    """Entry round trips (ns) of a bare blocking client against a running positiond."""
    client = RawClient(endpoint)
    try:
        session = RawSession("bench-raw-entry")
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
    from positiond.store import _setup, apply_batch, prepare_file
    from positiond_client.protocol import decode, encode

    workdir = tmp_workdir("pdb-store-")
    db = workdir / "p.db"
    prepare_file(db)
    conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    stop = threading.Event()
    checkpointer: threading.Thread | None = None
    try:
        _setup(conn, "NORMAL", 5000)
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
