"""Connections as file descriptors: how many the fd limit allows, and who is served.

- :func:`raise_fd_limit`, :class:`Limits`: how many connections the fd limit allows;
- :class:`ConnectionGate`: keeps the number of connections below the file descriptor limit
  (pure: fed the socket monitor's events, it returns what to do);
- :func:`shutdown_connection`, :func:`peer_of`: act on / name one connection libzmq owns.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import socket
import struct
from dataclasses import dataclass

__all__ = [
    "ConnectionGate",
    "Limits",
    "open_fds",
    "peer_of",
    "raise_fd_limit",
    "shutdown_connection",
]

log = logging.getLogger(__name__)


def shutdown_connection(fd: int) -> int:
    """Shut one accepted connection down by its fd; 1 if done, 0 if it is no socket any more.

    libzmq keeps owning the fd: ``shutdown`` (not ``close``) makes its engine read end-of-file,
    close the fd itself and report the disconnect. Should libzmq have closed the fd and reused
    the number for a new connection meanwhile, that one is dropped instead; its client
    reconnects and re-sends what was not acknowledged.
    """
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return 0
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        return 0
    finally:
        with contextlib.suppress(OSError):
            sock.detach()
    return 1


# ---- file descriptors ---------------------------------------------------------------------------

# Beyond any practical number of strategies; also below the kernel's fs.nr_open default.
FD_CEILING = 1 << 20


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard one (each connection is an fd); the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = FD_CEILING if hard == resource.RLIM_INFINITY else min(hard, FD_CEILING)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as exc:  # e.g. a seccomp filter denying setrlimit
            log.warning(
                "cannot raise the file descriptor limit from %d to %d: %s", soft, target, exc
            )
            return soft
        log.info("file descriptor limit raised from %d to %d", soft, target)
        return target
    return min(soft, FD_CEILING) if soft != resource.RLIM_INFINITY else FD_CEILING


def peer_of(fd: int) -> str:
    """ "pid P uid U" of the process on the other end of a unix socket, else "fd N"."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return f"fd {fd}"
    try:
        if sock.family != socket.AF_UNIX:
            return f"fd {fd}"
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _ = struct.unpack("3i", raw)
        return f"pid {pid} uid {uid}"
    except OSError:
        return f"fd {fd}"
    finally:
        with contextlib.suppress(OSError):
            sock.detach()


def open_fds() -> int:
    """How many file descriptors the process has open now."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # minus the one listdir itself holds
    except OSError:
        return 0


@dataclass(frozen=True)
class Limits:
    """Connection thresholds derived from the fd limit (see :class:`ConnectionGate`)."""

    fd_limit: int
    cap: int  # connections served; at this many the daemon stops accepting
    resume_below: int  # ...and accepts again once fewer are open
    spare: int  # fds kept for the daemon's own work and for the accepts after a stop

    @property
    def backlog(self) -> int:
        """The listen backlog: connections queued when accepting stops are still accepted."""
        return min(100, max(4, self.spare // 8))

    @classmethod
    def compute(cls, fd_limit: int, fds_in_use: int, max_connections: int = 0) -> Limits:
        # Accepting stops asynchronously (the socket monitor's events reach the event loop
        # after libzmq accepted): measured, a flood of connects overshoots the stop by up to
        # ~100 connections; a quarter of the limit (at least 32 fds) covers that, the backlog
        # and the daemon's own files.
        spare = max(32, fd_limit // 4)
        auto = max(1, fd_limit - fds_in_use - spare)
        cap = auto if max_connections <= 0 else max(1, min(max_connections, auto))
        return cls(fd_limit, cap, max(1, cap - cap // 10), spare)


class ConnectionGate:
    """Counts connections and decides who is served, from the socket monitor's events.

    libzmq (4.3.5, the wheels' version) aborts the whole process when ``accept`` on an ipc
    listener fails with EMFILE (``Too many open files (src/ipc_listener.cpp:297)``), and it has
    no limit on connections of its own. So the daemon keeps count: at ``cap`` connections it
    stops accepting (the socket file is moved aside), a connection accepted beyond ``cap``
    before that took effect is refused (answered ``BUSY``, then dropped), and accepting
    resumes below ``resume_below``. ``spare`` fds stay free for the daemon itself and for
    the accepts that happen before it reacts.
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.open: set[int] = set()
        self.refused: set[int] = set()
        self.paused = False
        self.peak = 0
        self.refused_total = 0

    def accepted(self, fd: int) -> str | None:
        """A connection came in on ``fd``: None, "refuse" (over the cap) or "pause"."""
        self.open.add(fd)
        count = len(self.open)
        self.peak = max(self.peak, count)
        action: str | None = None
        if count > self.limits.cap:
            self.refused.add(fd)
            self.refused_total += 1
            action = "refuse"
        if not self.paused and count >= self.limits.cap:
            self.paused = True
            action = "pause"
        return action

    def closed(self, fd: int) -> str | None:
        """The connection on ``fd`` ended: "resume" when listening may start again."""
        self.open.discard(fd)
        self.refused.discard(fd)
        return self._maybe_resume()

    def fds_now(self, total: int) -> str | None:
        """The process holds ``total`` fds (a periodic recount; events can be lost)."""
        if not self.paused and total >= self.limits.fd_limit - self.limits.spare // 2:
            self.paused = True
            return "pause"
        return None

    def resume_due(self) -> bool:
        return self._maybe_resume() == "resume"

    def _maybe_resume(self) -> str | None:
        if self.paused and len(self.open) < self.limits.resume_below:
            self.paused = False
            return "resume"
        return None
