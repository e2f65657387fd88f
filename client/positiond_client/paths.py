"""Where positiond keeps its database and socket when nobody says otherwise.

The daemon and the client compute the same defaults, so a strategy on the same machine as the
daemon needs no configuration at all. ``POSITIOND_ENDPOINT`` / ``POSITIOND_DB`` override them.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "DB_FILENAME",
    "SOCKET_FILENAME",
    "default_db_path",
    "default_endpoint",
    "ensure_private_dir",
    "ipc_path",
]

DB_FILENAME = "positiond.db"
SOCKET_FILENAME = "positiond.sock"
# sun_path is 108 bytes including the terminating NUL.
MAX_IPC_PATH = 107


def _first(value: str | None) -> str | None:
    # systemd passes several directories colon-separated when a unit lists several.
    if not value:
        return None
    return value.split(":")[0] or None


def state_dir(env: Mapping[str, str] | None = None) -> Path:
    """$STATE_DIRECTORY (systemd), else $XDG_STATE_HOME/positiond, else ~/.local/state/positiond."""
    env = os.environ if env is None else env
    systemd = _first(env.get("STATE_DIRECTORY"))
    if systemd:
        return Path(systemd)
    xdg = env.get("XDG_STATE_HOME")
    home = env.get("HOME")
    base = Path(xdg) if xdg else (Path(home) if home else Path.home()) / ".local" / "state"
    return base / "positiond"


def runtime_dir(env: Mapping[str, str] | None = None) -> Path:
    """$RUNTIME_DIRECTORY (systemd), else $XDG_RUNTIME_DIR/positiond, else /tmp/positiond-$UID."""
    env = os.environ if env is None else env
    systemd = _first(env.get("RUNTIME_DIRECTORY"))
    if systemd:
        return Path(systemd)
    xdg = env.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "positiond"
    return Path(f"/tmp/positiond-{os.getuid()}")


def default_db_path(env: Mapping[str, str] | None = None) -> Path:
    """The database path used when neither --db nor POSITIOND_DB is given."""
    env = os.environ if env is None else env
    explicit = env.get("POSITIOND_DB")
    return Path(explicit) if explicit else state_dir(env) / DB_FILENAME


def default_endpoint(env: Mapping[str, str] | None = None) -> str:
    """The endpoint used when neither --endpoint nor POSITIOND_ENDPOINT is given."""
    env = os.environ if env is None else env
    explicit = env.get("POSITIOND_ENDPOINT")
    if explicit:
        return explicit
    return "ipc://" + str(runtime_dir(env) / SOCKET_FILENAME)


def ipc_path(endpoint: str) -> Path | None:
    """The socket file of an ipc:// endpoint, or None for other transports."""
    if endpoint.startswith("ipc://"):
        return Path(endpoint[len("ipc://") :])
    return None


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` (mode 0700) or check that an existing one is ours and closed to others.

    A directory in /tmp could have been planted by another user to catch our socket; refuse it.
    """
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700, parents=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise PermissionError(f"{path} exists and is not a directory")
    if info.st_uid != os.getuid():
        raise PermissionError(f"{path} belongs to uid {info.st_uid}, not to us ({os.getuid()})")
    if info.st_mode & 0o002:
        raise PermissionError(f"{path} is writable by everyone (mode {info.st_mode & 0o777:o})")
