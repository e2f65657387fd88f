"""``posctl watch``: follow the daemon live, on a full-screen board or as JSON lines.

:class:`Feed` is the watcher's side of docs/PROTOCOL.md §4.14: it subscribes on the daemon's
socket, reports what it read (``watching``), and subscribes again when it is dropped, misses a
frame, or hears nothing for :data:`SILENT` seconds (the daemon stopped or restarted). While no
daemon answers it reads the database read-only (the same snapshot, from a read transaction) so
the board shows its last state, and tries the daemon again every :data:`RETRY` seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sqlite3
import sys
import termios
import time
import tty
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import orjson
import zmq
from rich.live import Live

from positiond.ctl.access import EXIT_OK, Ctl, listening, open_readonly
from positiond.ctl.board import Board, render
from positiond.store.dsn import PgDsn
from positiond.store.snapshot import read_snapshot
from positiond_client.paths import ipc_path
from positiond_client.protocol import PROTOCOL_VERSION

__all__ = ["REFRESH", "RETRY", "SILENT", "Feed", "cmd_watch"]

SILENT = 3.0  # seconds without a frame (health comes each second): the daemon is gone
RETRY = 1.0  # seconds between attempts to reach a daemon that is down
REFRESH = 0.25  # the board is redrawn at least this often (4 times a second)
DB_EVERY = 2.0  # while the daemon is down, the database is read again this often


class Feed:
    """One subscription to the daemon, renewed as needed; ``poll`` yields what came."""

    def __init__(
        self, db: Path | PgDsn, endpoint: str, strategy: str | None, by: str
    ) -> None:
        self.db, self.endpoint, self.strategy, self.by = db, endpoint, strategy, by
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.sock: zmq.Socket[bytes] | None = None
        self.live = False  # subscribed: the snapshot came
        self.heard = 0.0
        self.next_try = 0.0
        self.expect = 1  # the n of the next changes frame
        self.seq = 0
        self.why = "connecting"
        self.is_down = False  # a ``down`` was reported and no snapshot came since

    def close(self) -> None:
        self._drop_socket()
        self.ctx.term()

    def _drop_socket(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None
        self.live = False

    def _went_down(self, why: str, now: float) -> list[dict[str, Any]]:
        """No daemon (any more): try again later; a ``down`` item once per outage."""
        self._drop_socket()
        self.why = why
        self.next_try = now + RETRY
        if self.is_down:
            return []
        self.is_down = True
        return [{"type": "down", "reason": why}]

    def resubscribe(self, now: float) -> None:
        """Ask for a new snapshot (the daemon replaces the subscription)."""
        if self.sock is not None:
            self._subscribe(now)

    def _subscribe(self, now: float) -> str | None:
        """Send ``watch``; why not, when no daemon listens."""
        path = ipc_path(self.endpoint)
        if path is not None and not listening(path):
            return f"no daemon listens on {self.endpoint}"
        if self.sock is None:
            self.sock = self.ctx.socket(zmq.DEALER)
            self.sock.setsockopt(zmq.LINGER, 0)
            self.sock.connect(self.endpoint)
        self.seq += 1
        msg: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": "watch", "seq": self.seq}
        msg["by"] = self.by
        if self.strategy:
            msg["strategy"] = self.strategy
        self.sock.send(orjson.dumps(msg))
        self.heard = now
        return None

    def poll(self, timeout: float, now: float) -> list[dict[str, Any]]:
        """Wait up to ``timeout`` s; the frames that came (a ``snapshot`` first after each
        subscription), and ``down`` once when the daemon is (or went) away."""
        out: list[dict[str, Any]] = []
        if self.sock is None:
            if now >= self.next_try:
                why = self._subscribe(now)
                if why is not None:
                    out += self._went_down(why, now)
            if self.sock is None:
                time.sleep(min(timeout, max(0.0, self.next_try - now)))
                return out
        sock = self.sock
        if sock.poll(int(timeout * 1000)):
            while self.sock is sock and sock.poll(0):
                out.extend(self._frame(orjson.loads(sock.recv()), time.monotonic()))
        now = time.monotonic()
        if self.sock is not None and now - self.heard > SILENT:
            out += self._went_down(f"the daemon at {self.endpoint} stopped answering", now)
        return out

    def _frame(self, msg: Any, now: float) -> list[dict[str, Any]]:
        if not isinstance(msg, dict):
            return []
        kind = msg.get("type")
        self.heard = now
        if kind == "ack" and msg.get("seq") == self.seq and "snapshot" in msg:
            self.live, self.expect, self.is_down = True, 1, False
            return [{"type": "snapshot", "snapshot": msg["snapshot"]}]
        if kind == "error":
            if msg.get("code") == "BUSY" and msg.get("seq") == self.seq:
                return self._went_down(f"refused: {msg.get('reason')}", now)
            if msg.get("code") == "NOT_WATCHING" and self.sock is not None:
                self._subscribe(now)
            return []
        if kind == "dropped":
            self._subscribe(now)  # the daemon let us go: start over from a new snapshot
            return [{"type": "dropped", "reason": msg.get("reason")}]
        if kind not in ("changes", "health") or not self.live:
            return []
        n = msg.get("n")
        if kind == "changes":
            if n != self.expect:  # a frame was lost: the board would be wrong from here
                self._subscribe(now)
                return []
            self.expect += 1
        if self.sock is not None and isinstance(n, int):
            self.sock.send(orjson.dumps({"v": PROTOCOL_VERSION, "type": "watching", "n": n}))
        return [{k: v for k, v in msg.items() if k != "v"}]

    def database(self) -> dict[str, Any] | str:
        """The database's state read-only (while the daemon is down), or why it cannot be."""
        try:
            conn = open_readonly(self.db)
        except Exception as exc:  # CtlError and whatever opening a file may raise
            return str(getattr(exc, "message", exc))
        try:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            return read_snapshot(conn.cursor(), self.strategy, version)
        except sqlite3.Error as exc:
            return f"cannot read {self.db}: {exc}"
        finally:
            conn.close()


@contextlib.contextmanager
def _keys() -> Iterator[int | None]:
    """stdin in cbreak mode (keys without Enter, Ctrl-C still a signal); restored on the way out."""
    fd = sys.stdin.fileno() if sys.stdin is not None and sys.stdin.isatty() else None
    saved = termios.tcgetattr(fd) if fd is not None else None
    previous = signal.getsignal(signal.SIGTERM)

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        if fd is not None:
            tty.setcbreak(fd)
        yield fd
    finally:
        if fd is not None and saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        signal.signal(signal.SIGTERM, previous)


def _quit_pressed(fd: int | None, timeout: float) -> bool:
    if fd is None:
        return False
    poller = zmq.Poller()
    poller.register(fd, zmq.POLLIN)
    if not poller.poll(int(timeout * 1000)):
        return False
    return b"q" in os.read(fd, 64).lower()


def _board(ctl: Ctl, feed: Feed) -> int:
    board = Board()
    read_at = 0.0
    with _keys() as fd, Live(
        render(board), console=ctl.out, screen=True, auto_refresh=False, redirect_stderr=False
    ) as live:
        while True:
            now = time.monotonic()
            for item in feed.poll(0.0 if fd is not None else REFRESH, now):
                kind = item["type"]
                if kind == "snapshot":
                    board.load(item["snapshot"])
                    board.live, board.down, board.health = True, False, None
                elif kind in ("changes", "health"):
                    board.apply(item)
                elif kind == "down":
                    board.live, board.down, read_at = False, True, 0.0
            if board.stale_orphans and feed.live:
                feed.resubscribe(now)  # the next snapshot brings the orphans as they are
                board.stale_orphans = False
            if board.down and now >= read_at:
                state = feed.database()
                read_at = now + DB_EVERY
                if isinstance(state, dict):
                    board.load(state)
                    board.note = f"{feed.why}; the database's last state, read-only"
                else:
                    board.note = f"{feed.why}; {state}"
            live.update(render(board), refresh=True)
            if _quit_pressed(fd, REFRESH):
                return EXIT_OK


def _json(feed: Feed) -> int:
    out = sys.stdout
    while True:
        for item in feed.poll(REFRESH, time.monotonic()):
            if item["type"] == "down":
                state = feed.database()
                if isinstance(state, dict):
                    item["snapshot"] = state
                else:
                    item["database"] = state
            out.write(orjson.dumps(item).decode() + "\n")
            out.flush()


def cmd_watch(ctl: Ctl, args: argparse.Namespace) -> int:
    """Watch the daemon live: a full-screen board, refreshed 4 times a second.

    The daemon's health; what needs attention on top (crashed sessions and legs, NEEDS_REVIEW,
    orphans at the broker); every session (strategy, host/pid, status, last seen); each open or
    crashed leg (symbol, side, qty, entry, stop, highest, trail level, last price, age of its
    last update); the latest events. Fed by the daemon's subscribe stream (docs/PROTOCOL.md
    §4.14): nothing is polled, and a watcher never slows the daemon. When the daemon is down the
    board says so, shows the database's last state (read-only) and reconnects when it is back.
    q or Ctrl-C quits.

    --json: the same stream as JSON lines for scripts: {"type":"snapshot",...} first (again
    after every reconnect), then {"type":"changes","n":N,"events":[...]} and once a second
    {"type":"health",...}; {"type":"down",...} (with the database's snapshot) while the daemon
    is away. Runs until interrupted.
    """
    feed = Feed(ctl.db, ctl.endpoint, args.strategy, ctl.by)
    try:
        return _json(feed) if ctl.json else _board(ctl, feed)
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        feed.close()
