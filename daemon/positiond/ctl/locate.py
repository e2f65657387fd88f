"""Which database and socket posctl uses when it is not told: the service's, before the user's.

On a systemd host the service keeps its database in its ``StateDirectory=``
(``/var/lib/positiond``, see systemd/positiond.service) and its socket in its
``RuntimeDirectory=`` (``/run/positiond``), while a ``positiond`` once run by hand leaves a
database under ``~/.local/state``. Reading that one and answering "nothing crashed" is the worst
answer posctl can give, so the order is:

1. ``--db`` / ``--endpoint``;
2. ``POSITIOND_DB`` / ``POSITIOND_ENDPOINT``;
3. ``db`` / ``endpoint`` (and ``[openalgo]``, for ``posctl verify``) in the daemon's config
   file — found and parsed by the daemon's own :func:`positiond.config.load`
   (``--config FILE``, ``POSITIOND_CONFIG``, else ``/etc/positiond/positiond.toml`` when it
   exists);
4. the service's state directory when it exists: its ``positiond.db`` and the service's socket.
   If the directory exists but this user may not read it, posctl still names it (and a read
   fails, exit 3, saying so) rather than quietly reading another database;
5. the daemon's defaults for this user (``$XDG_STATE_HOME``, ``~/.local/state``, ...).

Every human output starts with the database it read and why that one. The system locations can
be moved with ``POSCTL_SYSTEM_CONFIG``, ``POSCTL_SYSTEM_STATE_DIR`` and
``POSCTL_SYSTEM_RUNTIME_DIR`` (tests, unusual installs).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from positiond.alerts.settings import AlertsConfig
from positiond.config import DEFAULT_CONFIG_FILE, load
from positiond.openalgo import Settings, settings_of
from positiond.store.dsn import PgDsn
from positiond_client.paths import DB_FILENAME, SOCKET_FILENAME, default_db_path, default_endpoint

__all__ = [
    "SYSTEM_RUNTIME_DIR",
    "SYSTEM_STATE_DIR",
    "Located",
    "locate",
]

SYSTEM_STATE_DIR = Path("/var/lib/positiond")  # positiond.service: StateDirectory=positiond
SYSTEM_RUNTIME_DIR = Path("/run/positiond")  # positiond.service: RuntimeDirectory=positiond
CONFIG_ENV = "POSCTL_SYSTEM_CONFIG"
STATE_ENV = "POSCTL_SYSTEM_STATE_DIR"
RUNTIME_ENV = "POSCTL_SYSTEM_RUNTIME_DIR"


@dataclass(frozen=True)
class Located:
    """The database and endpoint posctl uses, each with where it came from (for the header)."""

    db: Path | PgDsn
    db_source: str
    endpoint: str
    endpoint_source: str
    config_file: Path | None = None
    # [openalgo] of the same config file (or POSITIOND_OPENALGO_*): posctl verify's default.
    openalgo: Settings | None = None
    openalgo_source: str | None = None
    # [alerts] of the same config file: posctl alerts test sends through these sinks.
    alerts: AlertsConfig = field(default_factory=AlertsConfig)

    def header(self) -> str:
        return f"database: {self.db} ({self.db_source})"


def _readable_dir(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.R_OK | os.X_OK)


def locate(
    db: Path | PgDsn | None,
    endpoint: str | None,
    config: str | None,
    env: Mapping[str, str] | None = None,
) -> Located:
    """Resolve the database and endpoint (see the module docstring); ConfigError if the config
    file cannot be used, as the daemon would refuse it."""
    env = os.environ if env is None else env
    system_config = Path(env.get(CONFIG_ENV) or DEFAULT_CONFIG_FILE)
    state = Path(env.get(STATE_ENV) or SYSTEM_STATE_DIR)
    runtime = Path(env.get(RUNTIME_ENV) or SYSTEM_RUNTIME_DIR)
    loaded = load(["--config", config] if config else [], env, system_config)
    sources = loaded.sources

    def layer(name: str) -> str | None:
        where = sources[name]
        if where.startswith("file "):
            return f"{name} in {where[len('file ') :]}"
        if where.startswith("env "):
            return where[len("env ") :]
        return None

    service = state.is_dir()
    db_path: Path | PgDsn
    if db is not None:
        db_path, db_source = db, "--db"
    elif (source := layer("db")) is not None:
        db_path, db_source = loaded.config.db, source
    elif service:
        db_path = state / DB_FILENAME
        db_source = "the service's state directory"
        if not _readable_dir(state):
            db_source += ", not readable by this user: run posctl as root or positiond"
    else:
        db_path = default_db_path({k: v for k, v in env.items() if k != "POSITIOND_DB"})
        db_source = f"this user's default: no {state}"
    if endpoint is not None:
        ep, ep_source = endpoint, "--endpoint"
    elif (source := layer("endpoint")) is not None:
        ep, ep_source = loaded.config.endpoint, source
    elif service and db is None and layer("db") is None:
        ep, ep_source = f"ipc://{runtime / SOCKET_FILENAME}", "the service's runtime directory"
    else:
        ep = default_endpoint({k: v for k, v in env.items() if k != "POSITIOND_ENDPOINT"})
        ep_source = "this user's default"
    openalgo = settings_of(loaded.config)
    oa_source = layer("openalgo_host") if openalgo is not None else None
    if oa_source is not None:
        oa_source = oa_source.replace("openalgo_host in", "[openalgo] in")
    return Located(
        db_path, db_source, ep, ep_source, loaded.file, openalgo, oa_source, loaded.config.alerts
    )
