"""A strategy process for the fault tests, using only the public client API.

``python fault_strategy.py MODE ENDPOINT JOURNAL [options]``

It appends one JSON line (flushed) to JOURNAL for every durable call whose ack it received, so
the test can hold the daemon to exactly what the strategy was told. Commands arrive on stdin,
one per line: ``stop`` (finish: sync until everything is stored, journal the final state, end
the session, exit 0). Modes:

``churn``   entries, updates and exits over several legs as fast as it can; ``sync`` every
            ``--sync-every`` operations. Journal: ``entry`` (acked: the handle's position_id
            was set when the call returned), ``exit`` (returned True), ``sync`` (returned True,
            with the newest value ``n`` queued for each open leg before the call).
``absent``  starts its session, then on ``begin`` (the daemon is away from now on) enters
            ``--legs`` legs, exits every other one, syncs, timing each durable call; then
            keeps updating the open legs, timing each ``queue_position_update`` call, until
            ``go`` (the daemon is back), then until connected, then ``--min-updates`` more
            calls; then waits for ``stop``.
``latency`` a well-behaved strategy: entry round trips (entry + exit) in a loop, each timed,
            until ``stop``; then syncs; journals (wall time, seconds) of each entry and how
            many calls were not acknowledged within ack_timeout.

A leg's values all derive from one counter ``n`` (0 at entry, +1 per update), so a stored leg
tells which update it holds and whether its fields came from the same one.
"""

from __future__ import annotations

import argparse
import array
import json
import random
import resource
import sys
import threading
import time
from typing import IO, Any

from positiond_client import Leg, PositiondError, PositionPersistenceManager


def values(n: int) -> dict[str, Any]:
    """Every mutable field of a leg at counter ``n`` (what the test expects stored)."""
    return {
        "current_price": 100.0 + n,
        "stop_price": 50.0 + n,
        "highest_price": 101.0 + n,
        "last_trail_level": float(n),
        "state": {"n": n},
    }


class Journal:
    def __init__(self, path: str) -> None:
        self._file: IO[str] = open(path, "a", encoding="utf-8")  # noqa: SIM115 -- process-long

    def write(self, **record: Any) -> None:
        record["t"] = time.time()
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()


class Histogram:
    """Call costs in 100 ns buckets up to 1 ms (exact above): constant memory for any run."""

    STEP, BUCKETS = 100, 10_000

    def __init__(self) -> None:
        self.buckets = array.array("q", bytes(8 * (self.BUCKETS + 1)))
        self.slow: list[int] = []
        self.n = 0
        self.worst = 0

    def add(self, ns: int) -> None:
        self.n += 1
        self.worst = max(self.worst, ns)
        bucket = ns // self.STEP
        if bucket >= self.BUCKETS:
            self.slow.append(ns)
            bucket = self.BUCKETS
        self.buckets[bucket] += 1

    def summary(self) -> dict[str, int]:
        return {
            "calls": self.n,
            "p50_ns": self.quantile(0.5),
            "p99_ns": self.quantile(0.99),
            "p999_ns": self.quantile(0.999),
            "worst_ns": self.worst,
        }

    def quantile(self, q: float) -> int:
        """Upper bound of the q-quantile (a bucket's upper edge, or the exact slow value)."""
        if not self.n:
            return 0
        rank = min(self.n - 1, int(self.n * q))
        seen = 0
        for bucket, count in enumerate(self.buckets):
            if seen + count > rank:
                if bucket == self.BUCKETS:
                    return sorted(self.slow)[rank - seen]
                return (bucket + 1) * self.STEP
            seen += count
        return self.worst


class Commands:
    """stdin, read by a thread: the main loop never blocks on it."""

    def __init__(self) -> None:
        self.begin = threading.Event()
        self.go = threading.Event()
        self.stop = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in sys.stdin:
            command = line.strip()
            if command == "begin":
                self.begin.set()
            elif command == "go":
                self.go.set()
            elif command == "stop":
                self.begin.set()
                self.go.set()
                self.stop.set()
        self.begin.set()
        self.go.set()
        self.stop.set()  # stdin closed: the test is gone


def enter(pm: PositionPersistenceManager, key: str, slot: int) -> Leg:
    initial = values(0)
    return pm.save_position_entry(
        symbol=f"NIFTY{slot}CE",
        leg_type="CE",
        entry_price=100.0,
        stop_price=initial["stop_price"],
        quantity=25 * (slot + 1),
        position_key=key,
        highest_price=initial["highest_price"],
        last_trail_level=initial["last_trail_level"],
        state=initial["state"],
    )


def finish(
    pm: PositionPersistenceManager,
    journal: Journal,
    legs: dict[str, Leg],
    newest: dict[str, int],
    exited: set[str],
    timeout: float,
) -> int:
    """Sync until everything is stored, journal what the strategy sent, end the session."""
    deadline = time.monotonic() + timeout
    synced = False
    while not synced and time.monotonic() < deadline:
        synced = pm.sync(1.0)
    journal.write(
        op="final",
        synced=synced,
        newest=newest,
        exited=sorted(exited),
        ids={key: leg.position_id for key, leg in legs.items()},
        unacknowledged=pm.unacknowledged,
    )
    ended = pm.end_session()
    journal.write(op="end", ok=ended, session_id=pm.session_id)
    pm.close(2.0)
    return 0 if synced and ended else 1


def churn(args: argparse.Namespace, pm: PositionPersistenceManager, journal: Journal) -> int:
    rng = random.Random(args.seed)
    commands = Commands()
    slots: list[str | None] = [None] * args.legs
    legs: dict[str, Leg] = {}
    newest: dict[str, int] = {}
    exited: set[str] = set()
    made = ops = 0
    while not commands.stop.is_set():
        slot = rng.randrange(args.legs)
        key = slots[slot]
        try:
            if key is None:
                made += 1
                key = f"{args.prefix}{slot}-{made}"
                leg = enter(pm, key, slot)
                legs[key], newest[key], slots[slot] = leg, 0, key
                if leg.position_id is not None:
                    journal.write(op="entry", key=key, id=leg.position_id)
            elif rng.random() < args.exit_rate:
                slots[slot] = None
                exited.add(key)
                if pm.save_position_exit(legs[key], exit_price=50.0 + newest[key]):
                    journal.write(op="exit", key=key, n=newest[key])
            else:
                newest[key] += 1
                pm.queue_position_update(legs[key], **values(newest[key]))
        except PositiondError as exc:  # the daemon refused something: the test fails on it
            journal.write(op="error", key=key, code=exc.code, reason=exc.reason)
        ops += 1
        if ops % args.sync_every == 0:
            covered = {k: newest[k] for k in slots if k is not None}
            if pm.sync(args.ack_timeout):
                journal.write(op="sync", legs=covered)
    journal.write(op="stopping", ops=ops)
    return finish(pm, journal, legs, newest, exited, args.final_timeout)


def absent(args: argparse.Namespace, pm: PositionPersistenceManager, journal: Journal) -> int:
    commands = Commands()
    durable: list[float] = []  # seconds per durable call while the daemon is away

    def timed(call: Any, *a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return call(*a, **kw)
        finally:
            durable.append(time.perf_counter() - t0)

    legs: dict[str, Leg] = {}
    newest: dict[str, int] = {}
    exited: set[str] = set()
    order: list[str] = []
    sid = timed(pm.start_session, args.prefix + "session")
    journal.write(op="started", session_id=sid)
    commands.begin.wait()  # the daemon is away from now on
    durable.clear()
    for slot in range(args.legs):
        key = f"{args.prefix}{slot}"
        legs[key] = timed(enter, pm, key, slot)
        newest[key] = 0
        order.append(key)
        if slot % 2 == 0:  # every other leg: a few updates, then its exit
            for _ in range(3):
                newest[key] += 1
                pm.queue_position_update(legs[key], **values(newest[key]))
            exited.add(key)
            timed(pm.save_position_exit, legs[key], exit_price=50.0 + newest[key])
    synced = timed(pm.sync, args.ack_timeout)
    open_keys = [k for k in order if k not in exited]
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    journal.write(
        op="away", order=order, durable=durable, synced=synced, unacknowledged=pm.unacknowledged
    )
    # While away; once told the daemon is back, until connected; then connected.
    away, back, connected = Histogram(), Histogram(), Histogram()
    calls = 0
    while connected.n < args.min_updates:
        if not commands.go.is_set():
            costs = away
        elif connected.n or pm.connected:
            costs = connected
        else:
            costs = back
        key = open_keys[calls % len(open_keys)]
        newest[key] += 1
        fields = values(newest[key])
        t0 = time.perf_counter_ns()
        pm.queue_position_update(legs[key], **fields)
        costs.add(time.perf_counter_ns() - t0)
        calls += 1
    journal.write(
        op="updates",
        away=away.summary(),
        back=back.summary(),
        connected=connected.summary(),
        rss_growth_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before,
    )
    commands.stop.wait()
    return finish(pm, journal, legs, newest, exited, args.final_timeout)


def latency(args: argparse.Namespace, pm: PositionPersistenceManager, journal: Journal) -> int:
    commands = Commands()
    pm.start_session(args.prefix + "session")
    samples: list[tuple[float, float]] = []  # (wall time, seconds) per entry round trip
    late: list[float] = []  # when a call was not acked within ack_timeout (it is re-sent)
    i = 0
    journal.write(op="ready")
    while not commands.stop.is_set():
        i += 1
        when, t0 = time.time(), time.perf_counter()
        leg = enter(pm, f"{args.prefix}{i}", 0)
        samples.append((when, time.perf_counter() - t0))
        if leg.position_id is None:
            late.append(when)
        if not pm.save_position_exit(leg, exit_price=50.0):
            late.append(time.time())
    deadline = time.monotonic() + args.final_timeout
    synced = False
    while not synced and time.monotonic() < deadline:
        synced = pm.sync(1.0)
    journal.write(op="latency", samples=samples, late=late, entered=i, synced=synced)
    ended = pm.end_session()
    journal.write(op="end", ok=ended, session_id=pm.session_id)
    pm.close(2.0)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["churn", "absent", "latency"])
    parser.add_argument("endpoint")
    parser.add_argument("journal")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--legs", type=int, default=6)
    parser.add_argument("--prefix", default="leg-")
    parser.add_argument("--ack-timeout", type=float, default=0.3)
    parser.add_argument("--exit-rate", type=float, default=0.02)
    parser.add_argument("--sync-every", type=int, default=200)
    parser.add_argument("--min-updates", type=int, default=20000)
    parser.add_argument("--final-timeout", type=float, default=30.0)
    args = parser.parse_args()
    pm = PositionPersistenceManager(
        "fault_" + args.mode, endpoint=args.endpoint, ack_timeout=args.ack_timeout
    )
    journal = Journal(args.journal)
    if args.mode == "churn":
        sid = pm.start_session(args.prefix + "session")
        journal.write(op="start", session_id=sid)
        return churn(args, pm, journal)
    if args.mode == "absent":
        return absent(args, pm, journal)
    return latency(args, pm, journal)


if __name__ == "__main__":
    sys.exit(main())
