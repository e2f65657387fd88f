"""Where positiond keeps its database and socket when nobody says otherwise.

The daemon and the client compute the same defaults, so a strategy on the same machine as the
daemon needs no configuration at all. ``POSITIOND_ENDPOINT`` / ``POSITIOND_DB`` override them.
"""

from __future__ import annotations

import contextlib
import os
import pwd
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
    "runtime_dir",
    "socket_owner_warning",
    "unsafe_socket_directory",
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


# The account the packaged systemd units run the daemon as (sysusers.d/positiond.conf).
DAEMON_USER = "positiond"


def unsafe_socket_directory(socket_path: Path, uid: int | None = None) -> str | None:
    """Why an ipc socket at ``socket_path`` could be taken over by another user, or None.

    The ssh rule for its directories: every one from the socket's up to ``/`` must belong to
    ``uid`` (default: ours) or root and be writable by nobody else. A world- or group-writable
    directory with the sticky bit (``/tmp``) is accepted above the socket's own directory,
    since no one else can rename what we own in it; never as the socket's own directory,
    where another user can bind the free name while the daemon is stopped.
    """
    uid = os.getuid() if uid is None else uid
    own = Path(os.path.realpath(socket_path.parent))
    for directory in (own, *own.parents):
        try:
            info = directory.stat()
        except OSError as exc:
            return f"{directory}: {exc.strerror}"
        mode = stat.S_IMODE(info.st_mode)
        if info.st_uid not in (uid, 0):
            return f"{directory} belongs to uid {info.st_uid}, neither to uid {uid} nor to root"
        if mode & 0o022 and (directory == own or not mode & stat.S_ISVTX):
            return f"{directory} (mode {mode:04o}) is writable by other users"
    return None


def _expected_owners(env: Mapping[str, str]) -> set[int]:
    owners = {os.getuid(), 0}
    names = [DAEMON_USER]
    explicit = env.get("POSITIOND_DAEMON_USER")
    if explicit:
        names.append(explicit)
    for name in names:
        if name.isdigit():
            owners.add(int(name))
            continue
        with contextlib.suppress(KeyError):
            owners.add(pwd.getpwnam(name).pw_uid)
    return owners


def socket_owner_warning(endpoint: str, env: Mapping[str, str] | None = None) -> str | None:
    """Why the socket file of ``endpoint`` may not be positiond's own, or None.

    It is expected to belong to us, root, the ``positiond`` user or ``$POSITIOND_DAEMON_USER``
    (a name or a uid); the check needs the file to exist, so a daemon not started yet (or an
    abstract socket, a tcp:// endpoint) gets no verdict.
    """
    env = os.environ if env is None else env
    path = ipc_path(endpoint)
    if path is None or str(path).startswith("@"):
        return None
    try:
        info = path.stat()
    except OSError:
        return None
    owners = _expected_owners(env)
    if info.st_uid not in owners:
        return (
            f"the socket {path} belongs to uid {info.st_uid}, not to positiond's user: another "
            "user may be listening there and would receive this strategy's session, legs and "
            "token (set POSITIOND_DAEMON_USER if the daemon runs as that user)"
        )
    unsafe = unsafe_socket_directory(path, info.st_uid)
    if unsafe is not None:
        return f"the socket {path} is in an unsafe directory: {unsafe}"
    return None
