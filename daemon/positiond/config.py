"""The daemon's settings: one dataclass; defaults < TOML file < environment < command-line flags.

The file is ``/etc/positiond/positiond.toml`` when it exists, or the one named by ``--config`` /
``$POSITIOND_CONFIG`` (which must exist). Its keys are the flags' names with underscores
(``heartbeat_timeout = 3``); an unknown key is an error, like any invalid value: the message
names the setting and where the bad value came from, and ``positiond`` exits 2 before it opens
or binds anything. :func:`load` also records where each value came from, for ``--print-config``,
and SIGHUP re-runs it to pick up a changed file (see :data:`RELOADABLE`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sqlite3
import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import zmq

from positiond.alerts.settings import AlertConfigError, AlertsConfig, format_alerts, parse_alerts
from positiond.drift import parse_window
from positiond.liveness import MIN_HEARTBEATS
from positiond.metrics.listen import available as metrics_available
from positiond.metrics.listen import parse_listen
from positiond.protect.settings import (
    ProtectConfig,
    ProtectConfigError,
    format_protect,
    parse_protect,
)
from positiond.store import Synchronous
from positiond.store.dsn import PgDsn, parse_db
from positiond.store.schema import SCHEMA_VERSION
from positiond_client.paths import default_db_path, default_endpoint
from positiond_client.protocol import MAX_MESSAGE_BYTES, PROTOCOL_VERSION

__all__ = [
    "CLIENT_HEARTBEAT_INTERVAL",
    "DEFAULT_CONFIG_FILE",
    "MIN_HEARTBEAT_TIMEOUT",
    "RELOADABLE",
    "Config",
    "ConfigError",
    "Loaded",
    "build_parser",
    "changed",
    "format_config",
    "from_args",
    "load",
]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
SYNCHRONOUS = ("NORMAL", "FULL")
DEFAULT_CONFIG_FILE = Path("/etc/positiond/positiond.toml")
CONFIG_ENV = "POSITIOND_CONFIG"
# The reference client heartbeats this often unless told otherwise (positiond_client).
CLIENT_HEARTBEAT_INTERVAL = 0.5
# A shorter timeout would declare every such client dead between two of its heartbeats.
MIN_HEARTBEAT_TIMEOUT = MIN_HEARTBEATS * CLIENT_HEARTBEAT_INTERVAL
# What SIGHUP can change in a running daemon; everything else needs a restart.
RELOADABLE = frozenset({"log_level", "heartbeat_timeout", "flush_interval", "status_interval"})


class ConfigError(ValueError):
    """An invalid setting; the message (one line) names it."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


@dataclass(frozen=True)
class Config:
    """Everything the daemon can be told. Paths default to the user's state/runtime dirs."""

    # A SQLite file, or a postgresql:// URL: the PostgreSQL store (positiond.store.postgres).
    db: Path | PgDsn = field(default_factory=default_db_path)
    endpoint: str = field(default_factory=default_endpoint)
    heartbeat_timeout: float = 3.0
    flush_interval: float = 1.0
    log_level: str = "INFO"
    synchronous: Synchronous = "NORMAL"
    max_message_bytes: int = MAX_MESSAGE_BYTES
    # 0600: only the daemon's user. 0660 + a shared group lets strategy units in.
    socket_mode: int = 0o600
    # How long a write waits for another connection's lock (a backup, an operator's sqlite3).
    busy_timeout: float = 5.0
    # PostgreSQL only (several daemons on one database, positiond.store.lease): this daemon's
    # name among them and how long its lease lives unrenewed (renewed every third of it).
    # Accepted and unused with SQLite (one daemon per file, nothing to share).
    host_id: str = field(default_factory=socket.gethostname)
    lease_ttl: float = 10.0
    # How often STATUS= and status.json are refreshed.
    status_interval: float = 5.0
    # tcp:// only, and then required: the daemon's CURVE certificate (.key_secret) and the
    # directory of the public certificates (*.key) of the clients it accepts.
    curve_secret_key: Path | None = None
    curve_clients: Path | None = None
    # Connections served at most; 0: as many as the file descriptor limit allows (see
    # positiond.connections.Limits). Lower only: the fd limit always bounds it.
    max_connections: int = 0
    # The [openalgo] section (TOML table, or openalgo_* keys): OpenAlgo's REST API, for
    # posctl verify --openalgo (positiond.openalgo). Unset host: no OpenAlgo.
    openalgo_host: str | None = None
    openalgo_api_key_file: Path | None = None
    openalgo_timeout: float = 10.0
    # Periodic reconciliation (positiond.reconcile): every N seconds (0: off), inside the
    # HH:MM-HH:MM window of local time in openalgo_timezone (unset: at any hour).
    openalgo_reconcile_interval: float = 0.0
    openalgo_reconcile_window: str | None = None
    openalgo_timezone: str = "Asia/Kolkata"
    # The [alerts] section (file only): sinks and their filters (positiond.alerts.settings).
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    # The [protect] section (file only): protective stop orders for crashed legs
    # (positiond.protect.settings; off by default).
    protect: ProtectConfig = field(default_factory=ProtectConfig)
    # Prometheus /metrics at HOST:PORT (positiond.metrics); unset: no endpoint. Loopback only
    # unless metrics_allow_remote.
    metrics_listen: str | None = None
    metrics_allow_remote: bool = False

    def __post_init__(self) -> None:
        if not (self.endpoint.startswith("ipc://") or self.endpoint.startswith("tcp://")):
            raise ConfigError("endpoint", f"{self.endpoint!r} must start with ipc:// or tcp://")
        if self.endpoint.startswith("ipc://") and len(self.endpoint) - 6 > 107:
            raise ConfigError("endpoint", "ipc paths are limited to 107 characters")
        if not MIN_HEARTBEAT_TIMEOUT <= self.heartbeat_timeout <= 3600:  # also refuses NaN
            raise ConfigError(
                "heartbeat_timeout",
                f"{self.heartbeat_timeout!r} must be within [{MIN_HEARTBEAT_TIMEOUT:g}, 3600]: "
                f"clients heartbeat every {CLIENT_HEARTBEAT_INTERVAL:g}s, and a timeout shorter "
                f"than {MIN_HEARTBEATS:g} of their heartbeats declares live strategies CRASHED",
            )
        _within("flush_interval", self.flush_interval, 0.001, 3600)
        if self.log_level not in LOG_LEVELS:
            raise ConfigError("log_level", f"must be one of {', '.join(LOG_LEVELS)}")
        if self.synchronous not in SYNCHRONOUS:
            raise ConfigError("synchronous", f"must be one of {', '.join(SYNCHRONOUS)}")
        _within("max_message_bytes", self.max_message_bytes, 1024, 64 * 1024 * 1024)
        if not 0 <= self.socket_mode <= 0o777:
            raise ConfigError("socket_mode", f"{self.socket_mode:#o} is not a file mode")
        if self.socket_mode & 0o007:
            raise ConfigError(
                "socket_mode",
                f"{self.socket_mode:#o} lets every local user write sessions; "
                "give access through a group (0660) instead",
            )
        _within("busy_timeout", self.busy_timeout, 0.0, 3600)
        _within("lease_ttl", self.lease_ttl, 0.3, 3600)
        if not self.host_id or len(self.host_id) > 255 or not self.host_id.isprintable():
            raise ConfigError("host_id", f"{self.host_id!r} must be 1 to 255 printable characters")
        _within("status_interval", self.status_interval, 0.1, 3600)
        _within("max_connections", self.max_connections, 0, 1 << 20)
        if self.openalgo_host is not None and not self.openalgo_host.startswith(
            ("http://", "https://")
        ):
            raise ConfigError(
                "openalgo_host", f"{self.openalgo_host!r} must start with http:// or https://"
            )
        _within("openalgo_timeout", self.openalgo_timeout, 0.01, 600)
        for sink in self.alerts.sinks:
            if sink.type == "openalgo" and self.openalgo_host is None:
                raise ConfigError(
                    f"alerts.sink {sink.name!r}.type",
                    "an openalgo sink needs [openalgo] host (and api_key_file)",
                )
        if self.openalgo_reconcile_interval != 0:
            _within("openalgo_reconcile_interval", self.openalgo_reconcile_interval, 1, 86400)
            if self.openalgo_host is None:
                raise ConfigError("openalgo_reconcile_interval", "needs host in [openalgo]")
        if self.protect.enabled and self.openalgo_host is None:
            raise ConfigError(
                "protect.mode", f"{self.protect.mode!r} needs [openalgo] host (and api_key_file)"
            )
        if self.openalgo_reconcile_window is not None:
            try:
                parse_window(self.openalgo_reconcile_window)
            except ValueError as exc:
                raise ConfigError("openalgo_reconcile_window", str(exc)) from None
        try:
            ZoneInfo(self.openalgo_timezone)
        except (ValueError, ZoneInfoNotFoundError):
            raise ConfigError(
                "openalgo_timezone", f"{self.openalgo_timezone!r}: no such zone"
            ) from None
        if self.metrics_listen is not None:
            try:
                parse_listen(self.metrics_listen, allow_remote=self.metrics_allow_remote)
            except ValueError as exc:
                raise ConfigError("metrics_listen", str(exc)) from None
            if not metrics_available():
                raise ConfigError(
                    "metrics_listen",
                    "needs prometheus_client: pip install 'positiond[metrics]'",
                )
        if self.endpoint.startswith("tcp://"):
            if self.curve_secret_key is None or self.curve_clients is None:
                raise ConfigError(
                    "endpoint",
                    "tcp:// is only served with CURVE: set curve_secret_key and curve_clients "
                    "(docs/SECURITY.md)",
                )
            if not self.curve_secret_key.is_file():
                raise ConfigError("curve_secret_key", f"{self.curve_secret_key}: no such file")
            if not self.curve_clients.is_dir():
                raise ConfigError("curve_clients", f"{self.curve_clients}: no such directory")


def _within(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:  # also refuses NaN
        raise ConfigError(name, f"{value!r} must be within [{low:g}, {high:g}]")


# ---- how each setting is spelled and parsed in each layer ---------------------------------


def _float(raw: str) -> float:
    return float(raw)


def _int(raw: str) -> int:
    return int(raw, 0)


def _octal(raw: str) -> int:
    text = raw.strip().lower()
    return int(text[2:] if text.startswith("0o") else text, 8)


def _path(raw: str) -> Path:
    return Path(raw).expanduser()


def _upper(raw: str) -> str:
    return raw.strip().upper()


def _bool(raw: str) -> bool:
    text = raw.strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


@dataclass(frozen=True)
class _Setting:
    name: str
    parse: Callable[[str], Any]  # from a flag, the environment or a TOML string
    toml: tuple[type, ...]  # TOML value types accepted as they are
    metavar: str
    help: str

    @property
    def env(self) -> str:
        return "POSITIOND_" + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


_NUMBER = (int, float)
SETTINGS: tuple[_Setting, ...] = (
    _Setting(
        "db",
        parse_db,
        (),
        "PATH|URL",
        "SQLite database (default: $STATE_DIRECTORY, else $XDG_STATE_HOME/positiond, else "
        "~/.local/state/positiond; file positiond.db), or a postgresql://user@host:port/dbname "
        "URL: the PostgreSQL store (pip install 'positiond[postgres]')",
    ),
    _Setting(
        "endpoint",
        str,
        (),
        "ENDPOINT",
        "ipc:// or tcp:// endpoint to bind (default: ipc socket positiond.sock in "
        "$RUNTIME_DIRECTORY, else $XDG_RUNTIME_DIR/positiond, else /tmp/positiond-$UID)",
    ),
    _Setting(
        "heartbeat_timeout",
        _float,
        _NUMBER,
        "SECONDS",
        "declare a silent session CRASHED after this long, counting only time the daemon "
        f"runs; at least {MIN_HEARTBEAT_TIMEOUT:g} ({MIN_HEARTBEATS:g} heartbeats of a client) "
        "(default: {})",
    ),
    _Setting(
        "flush_interval",
        _float,
        _NUMBER,
        "SECONDS",
        "write coalesced updates this often (default: {})",
    ),
    _Setting("log_level", _upper, (), "LEVEL", f"{', '.join(LOG_LEVELS)} (default: {{}})"),
    _Setting(
        "synchronous",
        _upper,
        (),
        "MODE",
        "SQLite synchronous mode: NORMAL survives any crash of the process, FULL also a power "
        "loss at some cost per commit (default: {})",
    ),
    _Setting(
        "max_message_bytes",
        _int,
        (int,),
        "BYTES",
        "largest message accepted; a peer sending more is disconnected (default: {})",
    ),
    _Setting(
        "socket_mode",
        _octal,
        (int,),
        "MODE",
        "octal mode of the ipc socket file; 0660 lets a shared group connect (default: {})",
    ),
    _Setting(
        "busy_timeout",
        _float,
        _NUMBER,
        "SECONDS",
        "how long a write waits for another connection's lock before it is retried (default: {})",
    ),
    _Setting(
        "host_id",
        str,
        (),
        "NAME",
        "PostgreSQL: this daemon's name among the daemons sharing the database; one daemon "
        "per name (default: the machine's hostname)",
    ),
    _Setting(
        "lease_ttl",
        _float,
        _NUMBER,
        "SECONDS",
        "PostgreSQL: how long this daemon's lease lives unrenewed; it is renewed every third "
        "of it, and another daemon marks this host's sessions CRASHED once it ran out "
        "(default: {})",
    ),
    _Setting(
        "status_interval",
        _float,
        _NUMBER,
        "SECONDS",
        "refresh systemd's STATUS= line and status.json this often (default: {})",
    ),
    _Setting(
        "curve_secret_key",
        _path,
        (),
        "FILE",
        "tcp:// only (required there): the daemon's CURVE certificate, a .key_secret file",
    ),
    _Setting(
        "curve_clients",
        _path,
        (),
        "DIR",
        "tcp:// only (required there): directory of the allowed clients' public *.key files",
    ),
    _Setting(
        "max_connections",
        _int,
        (int,),
        "N",
        "connections served at most; newer ones are refused (error BUSY) and closed, and "
        "accepting stops near the file descriptor limit, whose soft value is raised to the "
        "hard one at start; 0 derives the limit from the file descriptors (default: {})",
    ),
    _Setting(
        "openalgo_host",
        str,
        (),
        "URL",
        "OpenAlgo's address, e.g. http://127.0.0.1:5000; TOML: host in [openalgo] "
        "(default: none)",
    ),
    _Setting(
        "openalgo_api_key_file",
        _path,
        (),
        "FILE",
        "file holding the OpenAlgo API key (or set POSITIOND_OPENALGO_API_KEY to the key); "
        "TOML: api_key_file in [openalgo] (default: none)",
    ),
    _Setting(
        "openalgo_timeout",
        _float,
        _NUMBER,
        "SECONDS",
        "how long an OpenAlgo call may take; TOML: timeout in [openalgo] (default: {})",
    ),
    _Setting(
        "openalgo_reconcile_interval",
        _float,
        _NUMBER,
        "SECONDS",
        "check every open leg against OpenAlgo's positionbook every SECONDS and alert "
        "(event drift) on a difference; 0 is off; TOML: reconcile_interval in [openalgo] "
        "(default: {})",
    ),
    _Setting(
        "openalgo_reconcile_window",
        str,
        (),
        "HH:MM-HH:MM",
        "reconcile only inside this local-time window, e.g. 09:15-15:30; TOML: "
        "reconcile_window in [openalgo] (default: at any hour)",
    ),
    _Setting(
        "openalgo_timezone",
        str,
        (),
        "ZONE",
        "the time zone of reconcile_window; TOML: timezone in [openalgo] (default: {})",
    ),
    _Setting(
        "metrics_listen",
        str,
        (),
        "HOST:PORT",
        "serve Prometheus metrics at http://HOST:PORT/metrics, e.g. 127.0.0.1:9464 (needs "
        "positiond[metrics]; docs/MONITORING.md) (default: off)",
    ),
    _Setting(
        "metrics_allow_remote",
        _bool,
        (bool,),
        "BOOL",
        "let metrics_listen be an address other hosts can reach (/metrics has no "
        "authentication) (default: {})",
    ),
)
_BY_NAME = {s.name: s for s in SETTINGS}
# setting -> environment variable (the client reads POSITIOND_ENDPOINT too)
ENV = {s.name: s.env for s in SETTINGS}


def _show(name: str, value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if name == "socket_mode" and isinstance(value, int):
        return f"{value:04o}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def version_text() -> str:
    """``positiond 0.1.0 (protocol 1, schema 4; Python ..., pyzmq ..., libzmq ..., SQLite ...)``."""
    from positiond import __version__  # here: the package imports this module first

    return (
        f"positiond {__version__} (protocol {PROTOCOL_VERSION}, schema {SCHEMA_VERSION}; "
        f"Python {platform.python_version()}, pyzmq {zmq.pyzmq_version()}, "
        f"libzmq {zmq.zmq_version()}, SQLite {sqlite3.sqlite_version})"
    )


class _VersionAction(argparse.Action):
    """``--version``: one unwrapped line on stdout, exit 0 — before any setting is read."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.update(nargs=0, default=argparse.SUPPRESS)
        super().__init__(option_strings, argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        sys.stdout.write(version_text() + "\n")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    d = Config(db=Path("-"), endpoint="ipc://-")  # only for the defaults shown in --help
    parser = argparse.ArgumentParser(
        prog="positiond",
        description="Position persistence daemon: strategies push their legs over ZeroMQ, "
        "positiond keeps them in SQLite and marks a strategy that dies CRASHED.",
        epilog="Precedence: defaults < config file < environment < flags; the environment "
        "variable of each flag is in brackets, its TOML key is the flag's name with "
        "underscores. Runs in the foreground and logs to stderr (syslog-style priorities "
        "under systemd). SIGTERM/SIGINT stop it gracefully (everything pending is written "
        "first); SIGHUP re-reads the config file and the allowed CURVE client keys. "
        "Alerts ([[alerts.sink]] in the config file only: webhook, command, telegram, "
        "openalgo; try them with posctl alerts test): docs/PROTOCOL.md section 10. "
        "Protective stop orders for crashed legs ([protect] in the config file only; off by "
        "default): docs/PROTECT.md. "
        "Protocol: docs/PROTOCOL.md; deployment as a systemd service: docs/DEPLOY.md.",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help=f"TOML config file [{CONFIG_ENV}] (default: {DEFAULT_CONFIG_FILE}, if it exists)",
    )
    parser.add_argument(
        "--version",
        action=_VersionAction,
        help="print the version (and the protocol, schema and libraries it runs with), then exit",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective settings and where each came from, then exit",
    )
    for s in SETTINGS:
        text = s.help.format(_show(s.name, getattr(d, s.name)))
        parser.add_argument(s.flag, dest=s.name, metavar=s.metavar, help=f"{text} [{s.env}]")
    return parser


# ---- resolution -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Loaded:
    """The effective settings, where each came from, and the file that was read (if any)."""

    config: Config
    sources: dict[str, str]
    file: Path | None
    print_config: bool = False


def load(
    argv: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    default_file: Path | None = DEFAULT_CONFIG_FILE,
) -> Loaded:
    """Resolve defaults < file < environment < flags; raises ConfigError naming the setting."""
    env = os.environ if env is None else env
    args = build_parser().parse_args(argv)
    values: dict[str, object] = {}
    sources = {s.name: "default" for s in SETTINGS}

    path = _config_file(args.config, env, default_file)
    if path is not None:
        where = f"file {path}"
        data = _read_toml(path)
        if "alerts" in data:
            try:
                values["alerts"] = parse_alerts(data.pop("alerts"), env)
            except AlertConfigError as exc:
                raise ConfigError(exc.name, f"{exc.reason} (from {where})") from None
        if "protect" in data:
            try:
                values["protect"] = parse_protect(data.pop("protect"))
            except ProtectConfigError as exc:
                raise ConfigError(exc.name, f"{exc.reason} (from {where})") from None
        for name, raw in data.items():
            values[name] = _from_toml(name, raw, where)
            sources[name] = where
    for s in SETTINGS:
        raw = env.get(s.env)
        if raw:
            values[s.name] = _parse(s, raw, f"env {s.env}")
            sources[s.name] = f"env {s.env}"
    for s in SETTINGS:
        raw = getattr(args, s.name)
        if raw is not None:
            values[s.name] = _parse(s, raw, f"flag {s.flag}")
            sources[s.name] = f"flag {s.flag}"

    # The path defaults, computed without the variables that are layers of their own.
    base_env = {k: v for k, v in env.items() if k not in ("POSITIOND_DB", "POSITIOND_ENDPOINT")}
    values.setdefault("db", default_db_path(base_env))
    values.setdefault("endpoint", default_endpoint(base_env))
    try:
        config = Config(**values)  # type: ignore[arg-type]
    except ConfigError as exc:
        source = sources.get(exc.name, "default")
        raise ConfigError(exc.name, f"{exc.reason} (from {source})") from None
    return Loaded(config, sources, path, bool(args.print_config))


def from_args(
    argv: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    default_file: Path | None = DEFAULT_CONFIG_FILE,
) -> Config:
    """Build the Config from flags over environment over file over defaults."""
    return load(argv, env, default_file).config


def _config_file(flag: str | None, env: Mapping[str, str], default: Path | None) -> Path | None:
    explicit = flag if flag is not None else env.get(CONFIG_ENV)
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError("config", f"{path}: no such file")
        return path
    if default is not None and default.is_file():
        return default
    return None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"{path}: {exc}") from None
    except OSError as exc:
        raise ConfigError("config", f"{path}: {exc.strerror}") from None
    data = _flatten_openalgo(data, path)
    unknown = sorted(set(data) - set(_BY_NAME) - {"alerts", "protect"})
    if unknown:
        raise ConfigError(
            unknown[0],
            f"unknown setting in {path} (known: {', '.join(s.name for s in SETTINGS)})",
        )
    return data


OPENALGO_KEYS = (
    "host", "api_key_file", "timeout", "reconcile_interval", "reconcile_window", "timezone",
)  # fmt: skip


def _flatten_openalgo(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """``[openalgo] host = ...`` -> ``openalgo_host = ...`` (either spelling is accepted)."""
    if "openalgo" not in data:
        return data
    table = data.pop("openalgo")
    if not isinstance(table, dict):
        raise ConfigError("openalgo", f"must be a table ([openalgo]) in {path}")
    for key, value in table.items():
        if key not in OPENALGO_KEYS:
            raise ConfigError(
                f"openalgo.{key}",
                f"unknown setting in {path} (known: {', '.join(OPENALGO_KEYS)})",
            )
        data[f"openalgo_{key}"] = value
    return data


def _parse(s: _Setting, raw: str, where: str) -> object:
    try:
        return s.parse(raw)
    except (TypeError, ValueError):
        raise ConfigError(s.name, f"{raw!r} is not a valid value (from {where})") from None


def _from_toml(name: str, raw: object, where: str) -> object:
    s = _BY_NAME[name]
    if isinstance(raw, bool) and bool not in s.toml:  # bool is an int, never a number
        raise ConfigError(name, f"{raw!r} is not a valid value (from {where})")
    if s.toml and isinstance(raw, s.toml):
        return float(raw) if s.parse is _float else raw  # type: ignore[arg-type]
    if isinstance(raw, str):
        return _parse(s, raw, where)
    raise ConfigError(name, f"{raw!r} is not a valid value (from {where})")


def changed(old: Config, new: Config) -> list[str]:
    """Names of the settings whose values differ."""
    return [f.name for f in fields(Config) if getattr(old, f.name) != getattr(new, f.name)]


def format_config(loaded: Loaded) -> str:
    """The effective settings as TOML, each value's source in a comment."""
    cfg = loaded.config
    lines = [
        "# positiond: effective settings (defaults < file < environment < flags)",
        f"# config file: {loaded.file if loaded.file is not None else 'none'}",
    ]
    body = []
    for s in SETTINGS:
        value = getattr(cfg, s.name)
        if value is None:
            body.append((f"# {s.name} (unset)", loaded.sources[s.name]))
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif s.name == "socket_mode":
            text = f"0o{value:03o}"
        elif isinstance(value, Path | PgDsn):  # a PgDsn's str() hides its password
            text = json.dumps(str(value))
        elif isinstance(value, str):
            text = json.dumps(value)
        else:
            text = repr(value)
        body.append((f"{s.name} = {text}", loaded.sources[s.name]))
    width = max(len(line) for line, _ in body)
    lines += [f"{line:<{width}}  # {source}" for line, source in body]
    if cfg.alerts.sinks:
        lines += format_alerts(cfg.alerts)
    if cfg.protect.enabled:
        lines += format_protect(cfg.protect)
    return "\n".join(lines) + "\n"
