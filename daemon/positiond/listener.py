"""The daemon's listening side: where the socket lives, who may connect, and how many.

:class:`Listener` wraps the ROUTER's endpoint for :class:`positiond.router.Router`:

- before anything is bound it refuses an ipc socket in a directory another user could write
  (:class:`UnsafeEndpoint`, exit 2; docs/SECURITY.md);
- it binds (or adopts systemd's socket), with the socket monitor attached first, and drains
  the monitor's events from a selector callback: every connection is counted against the file
  descriptor limit (:class:`~positiond.connections.ConnectionGate`). At the limit it stops
  accepting by moving the socket file aside, and connections accepted beyond it are answered
  ``BUSY`` and closed (libzmq 4.3.5 aborts the process when accept fails with EMFILE);
- once a second it checks that the socket file is still its own (:class:`SocketWatch`) and
  binds it again when it was deleted or replaced.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from positiond.config import Config
from positiond.connections import (
    ConnectionGate,
    Limits,
    open_fds,
    peer_of,
    raise_fd_limit,
    shutdown_connection,
)
from positiond_client.paths import (
    ensure_private_dir,
    ipc_path,
    runtime_dir,
    unsafe_socket_directory,
)
from positiond_client.protocol import error_reply

__all__ = ["SOCKET_CHECK_INTERVAL", "Listener", "SocketWatch", "UnsafeEndpoint", "paused_name"]

log = logging.getLogger(__name__)

NOBLOCK = int(zmq.NOBLOCK)
# How often the socket file is looked at (one stat) and the open fds recounted (a listdir).
SOCKET_CHECK_INTERVAL = 1.0
# A connection refused for the limit is dropped this long after it came in.
REFUSE_GRACE = 0.5


class UnsafeEndpoint(RuntimeError):
    """The ipc socket's directory would let another user take the endpoint over."""


def paused_name(path: Path) -> Path:
    """Where the socket file waits while the daemon is at its connection limit."""
    return path.with_name(f".{path.name}.paused")


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


class SocketWatch:
    """Is the socket file at ``path`` still the one we listen on?

    Strategies find the daemon by that name: if it is deleted (a tmp cleaner, an operator's
    ``rm``) or replaced, new connections fail or reach someone else while the daemon, still
    serving its old connections, looks healthy.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.identity = _identity(path)
        self.ok = True  # False while the file is not ours and could not be made again

    def record(self) -> None:
        """The file now at the path is ours (just bound)."""
        self.identity = _identity(self.path)
        self.ok = self.identity is not None

    def problem(self) -> str | None:
        """What happened to the file ("deleted", "replaced by another file"), or None."""
        current = _identity(self.path)
        if current is None:
            return "deleted"
        if current != self.identity:
            return "replaced by another file"
        return None


class Listener:
    """The endpoint of one daemon; ``ensure_lock(path)`` takes (again) the endpoint lock,
    ``warn_limited`` logs a warning at a bounded rate."""

    def __init__(
        self,
        config: Config,
        *,
        listen_fd: int | None,
        ensure_lock: Callable[[Path], None],
        warn_limited: Callable[..., None],
    ) -> None:
        self.config = config
        self.listen_fd = listen_fd  # a listening socket from systemd (positiond.activation)
        # Its own counters (the daemon's health merges them with the other components').
        self.counters = {"refused_connections": 0, "accept_pauses": 0, "socket_rebinds": 0}
        self.ensure_lock = ensure_lock
        self._warn_limited = warn_limited  # a rate-limited log.warning
        self.path = ipc_path(config.endpoint)
        self.endpoint = config.endpoint
        self.own_file: Path | None = None  # the socket file we made (unlinked at close)
        self.watch: SocketWatch | None = None
        self.gate = ConnectionGate(Limits.compute(1 << 20, 0))
        self.sock: zmq.Socket[bytes] | None = None
        self._monitor: zmq.Socket[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_disconnected: Callable[[int], None] = lambda fd: None
        self._next_check = 0.0

    # ---- before binding --------------------------------------------------------------------

    def prepare(self) -> None:
        """Check and create the socket's directory and take the endpoint lock (ipc only)."""
        path = self.path
        if path is None:
            return
        self._prepare_dir(path)
        # libzmq unlinks an existing socket file on bind: without this lock a second daemon
        # would silently steal the endpoint from the first.
        self.ensure_lock(path.with_name(path.name + ".lock"))
        paused = paused_name(path)
        if paused.exists():  # a daemon that died at its connection limit left it aside
            if self.listen_fd is not None and not path.exists():
                os.rename(paused, path)  # systemd's socket, where its unit expects it
                log.warning("moved the socket file back from %s", paused)
            else:
                paused.unlink(missing_ok=True)  # ours: bind() makes a new one

    @staticmethod
    def _prepare_dir(path: Path) -> None:
        """Create the socket's directory, or refuse one another user could write.

        Someone who can write the directory can bind the socket's name while the daemon is
        stopped (or delete it and bind while it runs) and receive strategies' sessions and
        tokens: refuse it before anything is bound (exit 2; docs/SECURITY.md).
        """
        try:
            if path.parent == runtime_dir():
                ensure_private_dir(path.parent)
            else:
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except PermissionError as exc:
            raise UnsafeEndpoint(f"refusing the socket directory: {exc}") from None
        unsafe = unsafe_socket_directory(path)
        if unsafe is not None:
            raise UnsafeEndpoint(
                f"refusing to listen on {path}: {unsafe}; another user could take the "
                "endpoint over (docs/SECURITY.md). Put the socket in a directory only this "
                "user (and root) can write, e.g. the default one"
            )

    # ---- binding -----------------------------------------------------------------------------

    def bind(self, ctx: zmq.Context[Any], sock: zmq.Socket[bytes]) -> str:
        """Watch ``sock``'s connections, bind it; the endpoint bound (a tcp port resolved)."""
        cfg = self.config
        fd_limit = raise_fd_limit()
        # What still comes in after the daemon stops accepting: keep it within the spare fds.
        sock.setsockopt(zmq.BACKLOG, Limits.compute(fd_limit, 0).backlog)
        if self.listen_fd is not None:
            # Socket activation: libzmq adopts systemd's listening socket (and will close it)
            # instead of unlinking the file and binding a new one; bind only names it.
            sock.setsockopt(zmq.USE_FD, self.listen_fd)
        # Watched from before the first connection: the gate counts every one.
        address = f"inproc://positiond-monitor-{id(self):x}"
        sock.monitor(address, zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        # A plain socket drained from a selector callback, like the ROUTER (drain_monitor).
        monitor: zmq.Socket[bytes] = zmq.Socket(ctx, zmq.PAIR)
        # libzmq drops events beyond the pipe's HWM (1000 + 1000): a flood of connections
        # would lose ACCEPTED events and the gate would count too few. 0 on our side makes
        # the inproc pipe unbounded (libzmq adds both sides' HWMs unless one is 0).
        monitor.setsockopt(zmq.RCVHWM, 0)
        monitor.connect(address)
        self._monitor = monitor
        sock.bind(cfg.endpoint)
        self.sock = sock
        # tcp://host:* binds a free port: report the real one.
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        path = self.path
        if path is not None and self.listen_fd is not None:
            log.info("listening on the socket from systemd (mode: the unit's SocketMode=)")
        elif path is not None:
            os.chmod(path, cfg.socket_mode)
            self._check_group_access(path)
            self.own_file = path
        else:
            log.info("listening on %s with CURVE authentication", self.endpoint)
        if path is not None and not str(path).startswith("@"):
            self.watch = SocketWatch(path)
        limits = Limits.compute(fd_limit, open_fds(), cfg.max_connections)
        self.gate = ConnectionGate(limits)
        log.info(
            "connections: up to %d served (accepting again below %d; file descriptor limit %d)",
            limits.cap,
            limits.resume_below,
            limits.fd_limit,
        )
        return self.endpoint

    def _check_group_access(self, path: Path) -> None:
        if not self.config.socket_mode & 0o070:
            return
        mode = path.parent.stat().st_mode
        if not mode & stat.S_IXGRP:
            log.warning(
                "socket_mode %04o lets the group in, but its directory %s (mode %04o) does not",
                self.config.socket_mode,
                path.parent,
                mode & 0o7777,
            )

    def attach(
        self, loop: asyncio.AbstractEventLoop, on_disconnected: Callable[[int], None]
    ) -> None:
        """Drain the monitor from ``loop``; ``on_disconnected(fd)`` for each dropped one."""
        self._loop = loop
        self._on_disconnected = on_disconnected
        if self._monitor is not None:
            loop.add_reader(self._monitor.fileno(), self.drain_monitor)
        self.drain_monitor()

    # ---- connections ---------------------------------------------------------------------------

    def drain_monitor(self) -> None:
        """Handle every queued socket event (accepted, disconnected) without blocking.

        The daemon also calls it for each new peer: libzmq queues a connection's ACCEPTED
        event before it reads a byte from it, so the gate knows every fd a message comes on.
        """
        monitor = self._monitor
        if monitor is None:
            return
        while True:
            try:
                event = parse_monitor_message(monitor.recv_multipart(NOBLOCK))
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED:
                fd = int(event["value"])
                if self.gate.closed(fd) == "resume":
                    self._resume()
                self._on_disconnected(fd)
            elif event["event"] == zmq.EVENT_ACCEPTED:
                self._accepted(int(event["value"]))

    def refused(self, fd: int) -> bool:
        """Was the connection on ``fd`` accepted beyond the limit (to be answered BUSY)?"""
        return fd in self.gate.refused

    def busy_reply(self) -> bytes:
        limits = self.gate.limits
        return error_reply(
            "BUSY",
            f"positiond is at its connection limit ({limits.cap} served; file descriptor "
            f"limit {limits.fd_limit}): this connection is refused and will be closed; the "
            "client reconnects and re-sends by itself",
        )

    def _accepted(self, fd: int) -> None:
        gate = self.gate
        action = gate.accepted(fd)
        if fd in gate.refused:
            self.counters["refused_connections"] += 1
            self._warn_limited(
                "refusing a new connection (%s): %d open, %d served at most (file descriptor "
                "limit %d; raise LimitNOFILE= or see max_connections)",
                peer_of(fd),
                len(gate.open),
                gate.limits.cap,
                gate.limits.fd_limit,
            )
            # Long enough for its first message to be answered BUSY.
            if self._loop is not None:
                self._loop.call_later(REFUSE_GRACE, self._drop_refused, fd)
        if action == "pause":
            self._pause()

    def _drop_refused(self, fd: int) -> None:
        if fd in self.gate.refused:
            shutdown_connection(fd)

    def _pause(self) -> None:
        """Stop new connections: move the socket file aside (connect() then fails ENOENT).

        Not unbind(): libzmq would close every connection that listener accepted. At most the
        listen backlog (ZMQ_BACKLOG) of connections already queued is still accepted.
        """
        path = self.watch.path if self.watch is not None else None
        if path is None:
            # tcp://: libzmq's tcp listener survives EMFILE (it retries the accept).
            log.error("at the connection limit: %d open", len(self.gate.open))
            return
        try:
            os.rename(path, paused_name(path))
        except OSError as exc:
            log.error("cannot stop accepting connections (%s): %s", path, exc)
            return
        self.counters["accept_pauses"] += 1
        log.error(
            "stopped accepting connections: %d open, %d fds in use of %d; accepting again "
            "below %d (new strategies cannot connect meanwhile)",
            len(self.gate.open),
            open_fds(),
            self.gate.limits.fd_limit,
            self.gate.limits.resume_below,
        )

    def _resume(self) -> None:
        path = self.watch.path if self.watch is not None else None
        if path is None:
            return
        try:
            os.rename(paused_name(path), path)
        except FileNotFoundError:
            pass  # never moved (the rename failed) or deleted meanwhile: the watch binds again
        except OSError as exc:
            log.error("cannot listen again on %s: %s; retrying", self.endpoint, exc)
            self.gate.paused = True  # the next check tries again
            return
        if self.watch is not None:
            self.watch.record()
        log.warning("accepting connections again: %d open", len(self.gate.open))

    # ---- once a second -------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Recount the fds (a lost event must not go unnoticed); check the socket file."""
        if now < self._next_check:
            return
        self._next_check = now + SOCKET_CHECK_INTERVAL
        self.drain_monitor()
        gate = self.gate
        total = open_fds()
        if gate.fds_now(total) == "pause":
            self._pause()
        elif total < gate.limits.fd_limit - gate.limits.spare and gate.resume_due():
            self._resume()  # only with the fds back too, or it would stop again at once
        if self.watch is not None and not gate.paused:
            self._check_socket_file(self.watch)

    def _check_socket_file(self, watch: SocketWatch) -> None:
        """Bind the socket file again if it was deleted or replaced (or report unhealthy)."""
        problem = watch.problem()
        if problem is None:
            if not watch.ok:
                log.warning("the socket file %s is back", watch.path)
                watch.ok = True
            return
        if self.own_file is None:
            # systemd's socket unit owns the file (socket activation): only it can make one.
            if watch.ok:
                log.error(
                    "the socket file %s was %s; new strategies cannot connect: restart "
                    "positiond.socket and positiond (systemctl restart positiond.socket)",
                    watch.path,
                    problem,
                )
            watch.ok = False
            return
        try:
            self._rebind(watch.path)
        except (OSError, zmq.ZMQError, RuntimeError) as exc:  # RuntimeError: unsafe, locked
            if watch.ok:
                log.error(
                    "the socket file %s was %s and cannot be bound again: %s",
                    watch.path,
                    problem,
                    exc,
                )
            watch.ok = False
            return
        watch.record()
        self.counters["socket_rebinds"] += 1
        log.warning(
            "the socket file %s was %s while running; bound it again (connections in place "
            "were kept)",
            watch.path,
            problem,
        )

    def _rebind(self, path: Path) -> None:
        assert self.sock is not None
        self._prepare_dir(path)
        # The directory may have gone with the file: take the endpoint lock again if so.
        self.ensure_lock(path.with_name(path.name + ".lock"))
        # A second listener on the same endpoint. Not unbind() first: libzmq would close every
        # connection the old listener accepted with it. The old one (a listening socket no
        # path leads to any more) stays open until the daemon stops: one fd per incident.
        self.sock.bind(self.endpoint)
        os.chmod(path, self.config.socket_mode)

    # ---- health and shutdown -----------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        gate = self.gate
        return {
            "listening": self.watch is None or self.watch.ok,
            "connections": len(gate.open),
            "connections_peak": gate.peak,
            "connection_limit": gate.limits.cap,
            "fd_limit": gate.limits.fd_limit,
            "accepting": not gate.paused,
        }

    def close_monitor(self) -> None:
        """Before the ROUTER closes: no more events."""
        monitor, self._monitor = self._monitor, None
        if monitor is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(monitor.fileno())
        if self.sock is not None:
            self.sock.disable_monitor()
        monitor.close(linger=0)

    def close(self) -> None:
        """After the ROUTER closed: leave the socket file as a stopped daemon should."""
        self.sock = None
        if self.gate.paused and self.watch is not None:
            self.gate.paused = False
            self._resume()  # systemd's socket goes back where its unit expects it
        if self.own_file is not None:
            # libzmq leaves the file behind; nobody listens on it any more (the endpoint lock
            # says it is ours). A socket from systemd belongs to the .socket unit: kept.
            self.own_file.unlink(missing_ok=True)
            self.own_file = None
