"""Fork safety: a client belongs to the process that created it.

``os.fork()`` copies the strategy's memory but not the client's I/O thread; the child's copy
of the ZeroMQ context and socket must never be used (libzmq is not fork-safe), and its
inherited copy of the connection's file descriptor would keep the connection open after the
parent dies — on ipc:// the daemon would then see the parent's death only by its heartbeat
timeout instead of at once. So in the child, right after the fork, every channel is marked
unusable (each call raises ``SessionError`` with code ``NO_SESSION``, ``close()`` does nothing)
and its connection descriptor is closed — after checking that it is still a socket connected
to the daemon's endpoint (a descriptor number can be reused). A child that needs positiond
creates its own ``PositionPersistenceManager``. A child started with ``exec`` (subprocess,
multiprocessing's spawn and forkserver) is not concerned: libzmq's descriptors are
close-on-exec.
"""

from __future__ import annotations

import os
import socket
import weakref
from typing import Protocol

__all__ = ["close_inherited", "register"]


class Forkable(Protocol):
    def abandon(self) -> None: ...


_CHANNELS: weakref.WeakSet[Forkable] = weakref.WeakSet()


def register(channel: Forkable) -> None:
    """Have ``channel.abandon()`` called in every child forked from this process."""
    _CHANNELS.add(channel)


def close_inherited(fd: int, endpoint: str) -> None:
    """Close this process's copy of a connection to ``endpoint``, if ``fd`` still is one."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return  # not a socket (the descriptor was closed and its number reused)
    try:
        peer = sock.getpeername()
        if endpoint.startswith("ipc://"):
            ours = sock.family == socket.AF_UNIX and peer == endpoint[len("ipc://") :]
        else:
            port = endpoint.rsplit(":", 1)[-1]
            ours = sock.family in (socket.AF_INET, socket.AF_INET6) and str(peer[1]) == port
    except (OSError, IndexError, TypeError):
        ours = False
    if ours:
        sock.close()
    else:
        sock.detach()


def _after_fork_in_child() -> None:
    for channel in list(_CHANNELS):
        channel.abandon()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
