"""Where a durable round trip's time goes: the floors under positiond's entry latency.

- raw client -> daemon: the daemon alone, without the client library's I/O thread;
- raw client -> an asyncio ROUTER that answers at once (``echo``), or after one aiosqlite hop
  committing one row (``commit``): what any asyncio + aiosqlite daemon pays on this machine;
- the store alone: ``apply_batch`` of a one-entry batch, in process, on the writer's SQLite
  connection; and a prototype of one change to the store (auto-checkpoint off, a background
  PASSIVE checkpoint on its own connection) to show what it would do to the tail.
"""

from __future__ import annotations

import secrets
import shutil
import signal
import sqlite3
import threading
import time
from pathlib import Path

from bench.common import Worker, kill_process, tmp_workdir
from bench.rawproto import RawClient, RawSession

__all__ = ["daemon_rtts", "floor_rtts", "store_apply_ns"]

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
