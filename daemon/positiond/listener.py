"""The listening side of the daemon, outside the ROUTER itself.

- :func:`check_socket_path`: an ipc socket only in directories nobody else can write (refused
  otherwise, before anything is bound);
- :func:`shutdown_connection`: end one connection libzmq owns, by its fd;
- :class:`SocketWatch`: notices that the socket file was deleted or replaced while the daemon
  runs (new strategies could not connect while it looked healthy).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from pathlib import Path

__all__ = ["SOCKET_CHECK_INTERVAL", "SocketWatch", "shutdown_connection"]

# How often the socket file is looked at (one stat).
SOCKET_CHECK_INTERVAL = 1.0

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

    def __init__(self, path: Path, interval: float = SOCKET_CHECK_INTERVAL) -> None:
        self.path = path
        self.interval = interval
        self.identity = _identity(path)
        self.ok = True
        self._next = 0.0

    def record(self) -> None:
        """The file now at the path is ours (just bound)."""
        self.identity = _identity(self.path)
        self.ok = self.identity is not None

    def due(self, now: float) -> bool:
        if now < self._next:
            return False
        self._next = now + self.interval
        return True

    def problem(self) -> str | None:
        """ "deleted", "replaced by another file", or None while it is ours."""
        current = _identity(self.path)
        if current is None:
            return "deleted"
        if current != self.identity:
            return "replaced by another file"
        return None
