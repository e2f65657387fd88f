"""How the daemon is doing: the writer's progress marker, the STATUS= line, ``status.json``.

:class:`Reporter` is the thin adapter that publishes the daemon's health snapshot to systemd
(``STATUS=``, ``WATCHDOG=1``) and to ``status.json``; the decisions are :class:`Progress` and
:func:`status_line`, plain code without I/O.

The watchdog must be fed only while the writer really makes progress: a SQLite call stuck on a
lock or a dead disk has to get the daemon restarted, not kept alive by a timer that still runs.
:class:`Progress` is that marker, a plain object driven by the caller's clock.

``status.json`` (next to the ipc socket, in the runtime directory) is the health snapshot of
:meth:`positiond.server.Daemon.health`, replaced atomically every status interval, for operators
and monitoring (``posctl status``) without a round trip to the daemon. Its fields:

``pid``, ``version``, ``time`` (Unix seconds when written), ``status_interval`` (a file older than a
few of these belongs to a dead or hung daemon), ``uptime`` (seconds), ``endpoint``, ``db``,
``db_size`` (bytes, database plus WAL; null for PostgreSQL), ``sessions`` (live), ``legs`` (open),
``pending_ops`` (durable messages not committed yet), ``pending_updates`` (coalesced leg updates not
written yet), ``last_flush_age`` (seconds since the last commit, null before the first),
``writer_stalled`` (seconds since the writer last committed or had nothing to do), ``storage_fault``
(null, or why nothing is written or acknowledged any more: the database file was deleted or
replaced, or is damaged; it says what to do), ``listening`` (the ipc socket file is the one the
daemon listens on; false when it was deleted and could not be bound again, e.g. under socket
activation), ``healthy`` (writes succeed, the writer is not stalled, no storage fault, and the
daemon is listening), ``counters``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from positiond.notify import Notifier
from positiond_client.paths import ensure_private_dir, runtime_dir

__all__ = [
    "STATUS_FILENAME",
    "Progress",
    "Reporter",
    "remove_status_file",
    "status_file_for",
    "status_line",
    "version",
    "write_status_file",
]

log = logging.getLogger(__name__)

STATUS_FILENAME = "status.json"
Health = Callable[[], dict[str, Any]]


class Progress:
    """When did the writer last commit a batch or find nothing to write?

    After a failed write only a commit counts again: between the retries of a failing batch the
    writer has nothing due for a moment, and that must not pass for health.
    """

    def __init__(self, now: float) -> None:
        self.last = now
        self.write_started: float | None = None
        self.failing = False

    def begin(self, now: float) -> None:
        """A batch goes to SQLite."""
        self.write_started = now

    def end(self, now: float, *, committed: bool) -> None:
        """The batch came back, committed or not (then it will be retried)."""
        self.write_started = None
        self.failing = not committed
        if committed:
            self.last = now

    def idle(self, now: float) -> None:
        """Nothing is due: an idle writer is a healthy one, unless a write runs or failed."""
        if self.write_started is None and not self.failing:
            self.last = now

    def stalled_for(self, now: float) -> float:
        return max(0.0, now - self.last)


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 60:
        return f"{seconds:.1f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}min ago"
    return f"{seconds / 3600:.1f}h ago"


def status_line(health: dict[str, Any]) -> str:
    """The one line ``systemctl status positiond`` shows."""
    line = (
        f"{health['sessions']} session(s) live, {health['legs']} leg(s) open, "
        f"{health['pending_ops'] + health['pending_updates']} pending, "
        f"last flush {_ago(health['last_flush_age'])}"
    )
    fault = health.get("storage_fault")
    if fault:
        line += f"; UNHEALTHY: {fault}"
    if health.get("accepting", True) is False:
        line += (
            f"; AT CONNECTION LIMIT ({health['connections']}/{health['connection_limit']}): "
            "new strategies cannot connect"
        )
    if not health["healthy"] and health.get("listening", True) is False:
        line += "; UNHEALTHY: the socket file is gone, new strategies cannot connect"
    elif not health["healthy"] and not fault:
        line += f"; UNHEALTHY: writer stalled {health['writer_stalled']:.1f}s"
        if not health["writes_ok"]:
            line += ", database writes failing"
    return line


def write_status_file(path: Path, health: dict[str, Any]) -> None:
    """Replace ``path`` atomically (a reader never sees half a file); mode 0640."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = json.dumps(health, sort_keys=True).encode() + b"\n"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    os.fchmod(fd, 0o640)  # the unit's UMask=0077 would leave the group out
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def remove_status_file(path: Path) -> None:
    """A stopped daemon leaves no snapshot that could be mistaken for a live one."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def status_file_for(sock_path: Path | None) -> Path | None:
    """status.json goes beside the ipc socket; for tcp:// into the runtime directory."""
    directory = sock_path.parent if sock_path is not None else runtime_dir()
    try:
        if sock_path is None:
            ensure_private_dir(directory)
    except OSError as exc:
        log.warning("no status.json: %s", exc)
        return None
    return directory / STATUS_FILENAME


def version() -> str:
    try:
        return importlib.metadata.version("positiond")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class Reporter:
    """Tells systemd (STATUS=, WATCHDOG=1) and status.json what ``health()`` says."""

    def __init__(self, notifier: Notifier, path: Path | None, health: Health) -> None:
        self.notifier, self.path, self.health = notifier, path, health

    def publish(self, *, notify: bool = True) -> dict[str, Any]:
        """Refresh status.json and (unless ``notify`` is False) the STATUS= line."""
        health = self.health()
        if notify:
            self.notifier.status(status_line(health))
        if self.path is not None:
            try:
                write_status_file(self.path, health)
            except OSError as exc:
                log.warning("cannot write %s: %s", self.path, exc)
        return health

    def remove(self) -> None:
        if self.path is not None:
            remove_status_file(self.path)

    async def status_loop(self, interval: Callable[[], float]) -> None:
        """Publish every ``interval()`` seconds (read each time: SIGHUP may change it)."""
        while True:
            await asyncio.sleep(interval())
            self.publish()

    async def watchdog_loop(self, progressing: Callable[[], bool]) -> None:
        """WATCHDOG=1 every half watchdog timeout, only while ``progressing()``."""
        interval = self.notifier.watchdog_interval
        assert interval is not None
        stuck = False
        while True:
            await asyncio.sleep(interval)
            if progressing():
                if stuck:
                    log.warning("the writer makes progress again; watchdog pings resume")
                    stuck = False
                self.notifier.watchdog()
            elif not stuck:
                stuck = True
                health = self.health()
                log.error(
                    "the writer has made no progress for %.1fs (%d message(s), %d update(s) "
                    "pending): no more watchdog pings, systemd will restart the daemon",
                    health["writer_stalled"],
                    health["pending_ops"],
                    health["pending_updates"],
                )
