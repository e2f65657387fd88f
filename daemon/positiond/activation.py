"""systemd socket activation (``sd_listen_fds(3)``) for the daemon's ipc socket.

With ``positiond.socket`` active, systemd owns the listening socket and passes it to the daemon
as fd 3 with ``LISTEN_FDS=1`` and ``LISTEN_PID=<our pid>``. Strategies can then connect before
the daemon runs and while it restarts: their connections wait in the socket's kernel backlog.
The daemon hands the fd to libzmq (``ZMQ_USE_FD``) instead of binding a new socket.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LISTEN_FDS_START", "ActivationError", "Inherited", "inherited_socket", "matches"]

LISTEN_FDS_START = 3
_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class ActivationError(RuntimeError):
    """systemd passed something positiond cannot listen on."""


@dataclass(frozen=True)
class Inherited:
    fd: int
    path: str  # the bound path; "@name" for an abstract socket


def inherited_socket(env: MutableMapping[str, str] | None = None) -> Inherited | None:
    """The listening socket systemd passed us, or None; the variables are removed from ``env``.

    Removing them (as ``sd_listen_fds(1)`` does) keeps them from leaking to anything we start.
    """
    env = os.environ if env is None else env
    pid, count = env.get("LISTEN_PID"), env.get("LISTEN_FDS")
    if pid is None or count is None:
        return None
    if pid != str(os.getpid()):
        return None  # meant for the process that started us
    for name in _VARIABLES:
        env.pop(name, None)
    try:
        n = int(count)
    except ValueError:
        raise ActivationError(f"LISTEN_FDS={count!r} is not a number") from None
    if n == 0:
        return None
    if n != 1:
        raise ActivationError(
            f"systemd passed {n} sockets; positiond.socket must have exactly one ListenStream="
        )
    fd = LISTEN_FDS_START
    try:
        probe = socket.socket(fileno=fd)
    except OSError as exc:
        raise ActivationError(f"fd {fd} from systemd is not a socket: {exc.strerror}") from None
    try:
        if probe.family != socket.AF_UNIX or probe.type != socket.SOCK_STREAM:
            raise ActivationError("the socket from systemd must be a unix stream socket")
        if not probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ActivationError("the socket from systemd is not listening")
        name = probe.getsockname()
    finally:
        probe.detach()  # libzmq will own the fd, Python must never close it
    # Python returns an abstract-namespace name as bytes with a leading NUL, a path as str.
    path = "@" + name[1:].decode(errors="replace") if isinstance(name, bytes) else str(name)
    # Not for our children, and accept() must never block the I/O thread.
    os.set_inheritable(fd, False)
    os.set_blocking(fd, False)
    return Inherited(fd, path)


def matches(endpoint: str, inherited: Inherited) -> bool:
    """Is ``endpoint`` the ipc:// address of the inherited socket?"""
    if not endpoint.startswith("ipc://"):
        return False
    wanted = endpoint[len("ipc://") :]
    if wanted == inherited.path:
        return True
    if wanted.startswith("@") or inherited.path.startswith("@"):
        return False
    try:
        return os.path.samefile(wanted, inherited.path)
    except OSError:  # one of them does not exist
        return Path(wanted).resolve() == Path(inherited.path).resolve()
