"""The daemon's settings: one dataclass; defaults < environment < command-line flags."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from positiond.store import Synchronous
from positiond_client.paths import default_db_path, default_endpoint
from positiond_client.protocol import MAX_MESSAGE_BYTES

__all__ = ["Config", "ConfigError", "build_parser", "from_args"]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
SYNCHRONOUS = ("NORMAL", "FULL")


class ConfigError(ValueError):
    """An invalid setting; the message names it."""


@dataclass(frozen=True)
class Config:
    """Everything the daemon can be told. Paths default to the user's state/runtime dirs."""

    db: Path = field(default_factory=default_db_path)
    endpoint: str = field(default_factory=default_endpoint)
    heartbeat_timeout: float = 3.0
    flush_interval: float = 1.0
    log_level: str = "INFO"
    synchronous: Synchronous = "NORMAL"
    max_message_bytes: int = MAX_MESSAGE_BYTES

    def __post_init__(self) -> None:
        if not (self.endpoint.startswith("ipc://") or self.endpoint.startswith("tcp://")):
            raise ConfigError(f"endpoint: {self.endpoint!r} must start with ipc:// or tcp://")
        if self.endpoint.startswith("ipc://") and len(self.endpoint) - 6 > 107:
            raise ConfigError("endpoint: ipc paths are limited to 107 characters")
        if not 0.05 <= self.heartbeat_timeout <= 3600:
            raise ConfigError("heartbeat_timeout: must be within [0.05, 3600] seconds")
        if not 0.001 <= self.flush_interval <= 3600:
            raise ConfigError("flush_interval: must be within [0.001, 3600] seconds")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log_level: must be one of {', '.join(LOG_LEVELS)}")
        if self.synchronous not in SYNCHRONOUS:
            raise ConfigError(f"synchronous: must be one of {', '.join(SYNCHRONOUS)}")
        if not 1024 <= self.max_message_bytes <= 64 * 1024 * 1024:
            raise ConfigError("max_message_bytes: must be within [1024, 67108864]")


# setting -> environment variable (the client reads POSITIOND_ENDPOINT too)
ENV = {
    "db": "POSITIOND_DB",
    "endpoint": "POSITIOND_ENDPOINT",
    "heartbeat_timeout": "POSITIOND_HEARTBEAT_TIMEOUT",
    "flush_interval": "POSITIOND_FLUSH_INTERVAL",
    "log_level": "POSITIOND_LOG_LEVEL",
    "synchronous": "POSITIOND_SYNCHRONOUS",
}


def build_parser() -> argparse.ArgumentParser:
    d = Config(db=Path("-"), endpoint="ipc://-")  # only for the defaults shown in --help
    parser = argparse.ArgumentParser(
        prog="positiond",
        description="Position persistence daemon: strategies push their legs over ZeroMQ, "
        "positiond keeps them in SQLite and marks a strategy that dies CRASHED.",
        epilog="Runs in the foreground and logs to stderr. SIGTERM/SIGINT stop it gracefully "
        "(everything pending is written first). Protocol: docs/PROTOCOL.md.",
    )
    parser.add_argument(
        "--db",
        metavar="PATH",
        help="SQLite database [POSITIOND_DB] (default: $STATE_DIRECTORY, else "
        "$XDG_STATE_HOME/positiond, else ~/.local/state/positiond; file positiond.db)",
    )
    parser.add_argument(
        "--endpoint",
        metavar="ENDPOINT",
        help="ipc:// or tcp:// endpoint to bind [POSITIOND_ENDPOINT] (default: ipc socket "
        "positiond.sock in $RUNTIME_DIRECTORY, else $XDG_RUNTIME_DIR/positiond, else "
        "/tmp/positiond-$UID)",
    )
    parser.add_argument(
        "--heartbeat-timeout",
        type=float,
        metavar="SECONDS",
        help=f"declare a silent session CRASHED after this long "
        f"[POSITIOND_HEARTBEAT_TIMEOUT] (default: {d.heartbeat_timeout:g})",
    )
    parser.add_argument(
        "--flush-interval",
        type=float,
        metavar="SECONDS",
        help=f"write coalesced updates this often [POSITIOND_FLUSH_INTERVAL] "
        f"(default: {d.flush_interval:g})",
    )
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        help=f"[POSITIOND_LOG_LEVEL] (default: {d.log_level})",
    )
    parser.add_argument(
        "--synchronous",
        type=str.upper,
        choices=SYNCHRONOUS,
        help="SQLite synchronous mode [POSITIOND_SYNCHRONOUS]: NORMAL survives any crash of "
        "the process, FULL also a power loss at some cost per commit "
        f"(default: {d.synchronous})",
    )
    return parser


def from_args(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Build the Config from flags over environment over defaults (raises ConfigError)."""
    env = os.environ if env is None else env
    args = build_parser().parse_args(argv)
    types = {f.name: f.type for f in fields(Config)}
    values: dict[str, object] = {}
    for name, var in ENV.items():
        if env.get(var):
            values[name] = _convert(name, env[var], types[name])
    for name in ENV:
        flag = getattr(args, name, None)
        if flag is not None:
            values[name] = _convert(name, flag, types[name])
    return Config(**values)  # type: ignore[arg-type]


def _convert(name: str, raw: object, kind: object) -> object:
    try:
        if kind in (float, "float"):
            return float(raw)  # type: ignore[arg-type]
        if kind in (Path, "Path"):
            return Path(str(raw)).expanduser()
        if name in ("log_level", "synchronous"):
            return str(raw).upper()
        return raw
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: {raw!r} is not a valid value") from None
