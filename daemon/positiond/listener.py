"""The listening side of the daemon, outside the ROUTER itself.

- :func:`check_socket_path`: an ipc socket only in directories nobody else can write (refused
  otherwise, before anything is bound);
- :func:`shutdown_connection`: end one connection libzmq owns, by its fd;
"""

from __future__ import annotations

import contextlib
import logging
import socket

__all__ = ["shutdown_connection"]

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
