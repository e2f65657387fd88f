"""The ``[alerts]`` section of the daemon's TOML file, parsed into typed sink configs.

::

    [alerts]
    retry_for = 3600          # seconds a delivery is retried before it is marked FAILED

    [[alerts.sink]]
    name = "ops-hook"         # shown in posctl alerts
    type = "webhook"          # webhook | command (telegram | openalgo: reserved)
    url = "http://127.0.0.1:8080/positiond"
    events = ["crashed", "stalled", "needs_review"]   # omitted: all
    min_severity = "warning"  # info | warning | critical (default: info)
    headers = {Authorization = "Bearer ..."}          # or headers_file = "/etc/positiond/hook"
    timeout = 5

    [[alerts.sink]]
    name = "pager"
    type = "command"
    command = ["/usr/local/bin/page-me", "--quiet"]   # the alert's JSON on stdin

    [[alerts.sink]]
    name = "phone"
    type = "telegram"         # the Telegram Bot API
    token_file = "/etc/positiond/telegram.token"      # or $POSITIOND_TELEGRAM_TOKEN
    chat_id = "123456"
    api_url = "https://api.telegram.org"              # the default
    group_window = 0.5        # seconds: a burst becomes one message (human sinks only)

    [[alerts.sink]]
    name = "openalgo-bot"
    type = "openalgo"         # OpenAlgo's telegram/notify: uses [openalgo] host and api key
    username = "my_openalgo_user"

Header values and the bot token are secrets: never logged, never printed by
``--print-config`` (only their names / source), never in status.json. ``headers_file``
holds ``Name: value`` lines.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "HUMAN_TYPES",
    "KINDS",
    "SEVERITIES",
    "SEVERITY",
    "TELEGRAM_TOKEN_ENV",
    "AlertConfigError",
    "AlertsConfig",
    "SinkConfig",
    "format_alerts",
    "parse_alerts",
    "shown_url",
]

# Every alert kind and its severity (docs/PROTOCOL.md, "Alerts").
SEVERITY: dict[str, str] = {
    "crashed": "critical",
    "not_returned": "critical",
    "stalled": "warning",
    "needs_review": "warning",
    "fenced": "warning",
    "orphan": "warning",
    "drift": "warning",  # the positionbook differs from the legs (positiond.reconcile)
    "revived": "info",
    # protective stop orders (positiond.protect, docs/PROTECT.md)
    "protect_planned": "info",
    "protect_placed": "warning",  # an order positiond sent to the broker
    "protect_failed": "critical",  # a crashed leg stays unprotected
    "protect_skipped": "warning",
    "protect_cancelled": "info",
    "protect_kept": "info",
    "protect_triggered": "critical",  # the broker closed the position at the stop
    "unhealthy": "critical",  # the daemon itself (positiond.alerts.health)
    "healthy": "info",
}
KINDS = tuple(SEVERITY)
SEVERITIES = ("info", "warning", "critical")
HUMAN_TYPES = ("telegram", "openalgo")  # a message for people: bursts grouped, rate-limited
TYPES = ("webhook", "command", *HUMAN_TYPES)
TELEGRAM_TOKEN_ENV = "POSITIOND_TELEGRAM_TOKEN"
TELEGRAM_API = "https://api.telegram.org"
GROUP_WINDOW = 0.5  # default seconds a human sink waits to group a burst


class AlertConfigError(ValueError):
    """An invalid alerts setting; ``name`` is its dotted path, for ConfigError."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name, self.reason = name, reason


@dataclass(frozen=True)
class SinkConfig:
    """One sink: where alerts go and which of them."""

    name: str
    type: str
    events: tuple[str, ...] = KINDS
    min_severity: str = "info"
    timeout: float = 5.0
    url: str | None = None  # webhook
    headers: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    headers_source: str = ""  # where the headers came from (shown instead of them)
    command: tuple[str, ...] = ()  # command
    token: str = field(default="", repr=False, compare=False)  # telegram (a secret)
    token_source: str = ""  # where the token came from (shown instead of it)
    chat_id: str = ""  # telegram
    api_url: str = TELEGRAM_API  # telegram
    username: str = ""  # openalgo
    group_window: float = GROUP_WINDOW  # telegram, openalgo

    @property
    def human(self) -> bool:
        """A sink read by people: one message per burst, not one per alert."""
        return self.type in HUMAN_TYPES

    def wants(self, kind: str) -> bool:
        """Does this sink subscribe to alerts of ``kind``?"""
        rank = SEVERITIES.index
        return kind in self.events and rank(SEVERITY[kind]) >= rank(self.min_severity)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(k for k in self.events if self.wants(k))


@dataclass(frozen=True)
class AlertsConfig:
    """The sinks, and how long a delivery is retried before it counts as FAILED."""

    sinks: tuple[SinkConfig, ...] = ()
    retry_for: float = 3600.0
    concurrency: int = 4


def _strings(value: object, name: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AlertConfigError(name, "must be a list of strings")
    return tuple(value)


def _number(value: object, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AlertConfigError(name, f"{value!r} is not a number")
    if not low <= value <= high or math.isnan(value):
        raise AlertConfigError(name, f"{value!r} must be within [{low:g}, {high:g}]")
    return float(value)


def _headers_file(path: Path, name: str) -> dict[str, str]:
    try:
        text = path.expanduser().read_text()
    except OSError as exc:
        raise AlertConfigError(name, f"{path}: {exc.strerror}") from None
    headers = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition(":")
        if not sep or not key.strip():
            # The line may hold a secret: name it by number only.
            raise AlertConfigError(name, f"{path} line {number} is not 'Name: value'")
        headers[key.strip()] = value.strip()
    return headers


_SINK_KEYS = {
    "name", "type", "events", "min_severity", "timeout", "url", "headers", "headers_file",
    "command", "token_file", "chat_id", "api_url", "username", "group_window",
}  # fmt: skip
_HUMAN_KEYS = {"token_file", "chat_id", "api_url", "username", "group_window"}


def _token(raw: dict[str, Any], where: str, env: dict[str, str]) -> tuple[str, str]:
    """The bot token and where it came from: ``token_file``, else $POSITIOND_TELEGRAM_TOKEN."""
    if "token_file" in raw:
        path = raw["token_file"]
        if not isinstance(path, str):
            raise AlertConfigError(f"{where}.token_file", "must be a path")
        try:
            text = Path(path).expanduser().read_text().strip()
        except OSError as exc:
            raise AlertConfigError(f"{where}.token_file", f"{path}: {exc.strerror}") from None
        if not text:
            raise AlertConfigError(f"{where}.token_file", f"{path} is empty")
        return text.splitlines()[0].strip(), f"file {path}"
    token = env.get(TELEGRAM_TOKEN_ENV, "").strip()
    if not token:
        raise AlertConfigError(
            f"{where}.token_file", f"required: the bot token's file (or ${TELEGRAM_TOKEN_ENV})"
        )
    return token, f"${TELEGRAM_TOKEN_ENV}"


def _human(raw: dict[str, Any], kind: str, where: str, env: dict[str, str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    options["group_window"] = _number(
        raw.get("group_window", GROUP_WINDOW), f"{where}.group_window", 0, 60
    )
    if kind == "telegram":
        if "username" in raw:
            raise AlertConfigError(f"{where}.username", "is for openalgo sinks")
        chat = raw.get("chat_id")
        if isinstance(chat, int) and not isinstance(chat, bool):
            chat = str(chat)
        if not isinstance(chat, str) or not chat.strip():
            raise AlertConfigError(f"{where}.chat_id", "required: the chat's id")
        api = raw.get("api_url", TELEGRAM_API)
        if not isinstance(api, str) or not api.startswith(("http://", "https://")):
            raise AlertConfigError(f"{where}.api_url", "must be an http:// or https:// URL")
        token, source = _token(raw, where, env)
        options.update(
            chat_id=chat.strip(), api_url=api.rstrip("/"), token=token, token_source=source
        )
    else:
        for key in ("token_file", "chat_id", "api_url"):
            if key in raw:
                raise AlertConfigError(f"{where}.{key}", "is for telegram sinks")
        user = raw.get("username")
        if not isinstance(user, str) or not user.strip():
            raise AlertConfigError(f"{where}.username", "required: the OpenAlgo user name")
        options["username"] = user.strip()
    if importlib.util.find_spec("httpx") is None:
        raise AlertConfigError(
            f"{where}.type", f"{kind} sinks need httpx: pip install 'positiond[alerts]'"
        )
    return options


def _sink(raw: object, index: int, env: dict[str, str]) -> SinkConfig:
    where = f"alerts.sink[{index}]"
    if not isinstance(raw, dict):
        raise AlertConfigError(where, "must be a table ([[alerts.sink]])")
    unknown = sorted(set(raw) - _SINK_KEYS)
    if unknown:
        raise AlertConfigError(f"{where}.{unknown[0]}", "unknown key")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise AlertConfigError(f"{where}.name", "required: a non-empty string")
    where = f"alerts.sink {name!r}"
    kind = raw.get("type")
    if kind not in TYPES:
        raise AlertConfigError(f"{where}.type", f"must be one of {', '.join(TYPES)}")
    events = _strings(raw["events"], f"{where}.events") if "events" in raw else KINDS
    for event in events:
        if event not in SEVERITY:
            raise AlertConfigError(
                f"{where}.events", f"{event!r} is not an alert kind ({', '.join(KINDS)})"
            )
    severity = raw.get("min_severity", "info")
    if severity not in SEVERITIES:
        raise AlertConfigError(f"{where}.min_severity", f"must be one of {', '.join(SEVERITIES)}")
    timeout = _number(raw.get("timeout", 5.0), f"{where}.timeout", 0.1, 300)
    options: dict[str, Any] = {}
    if kind in HUMAN_TYPES:
        if "url" in raw or "headers" in raw or "headers_file" in raw or "command" in raw:
            raise AlertConfigError(where, "url, headers and command are not for this type")
        options = _human(raw, kind, where, env)
    elif set(raw) & _HUMAN_KEYS:
        key = sorted(set(raw) & _HUMAN_KEYS)[0]
        raise AlertConfigError(f"{where}.{key}", "is for telegram and openalgo sinks")
    elif kind == "webhook":
        url = raw.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise AlertConfigError(f"{where}.url", "required: an http:// or https:// URL")
        if importlib.util.find_spec("httpx") is None:
            raise AlertConfigError(
                f"{where}.type",
                "webhook sinks need httpx: pip install 'positiond[alerts]'",
            )
        headers: dict[str, str] = {}
        sources = []
        if "headers_file" in raw:
            if not isinstance(raw["headers_file"], str):
                raise AlertConfigError(f"{where}.headers_file", "must be a path")
            headers.update(_headers_file(Path(raw["headers_file"]), f"{where}.headers_file"))
            sources.append(f"file {raw['headers_file']}")
        if "headers" in raw:
            inline = raw["headers"]
            if not isinstance(inline, dict) or not all(
                isinstance(v, str) for v in inline.values()
            ):
                raise AlertConfigError(f"{where}.headers", "must be a table of strings")
            headers.update(inline)
            sources.append("inline")
        options.update(url=url, headers=headers, headers_source=" + ".join(sources))
    else:
        if "url" in raw or "headers" in raw or "headers_file" in raw:
            raise AlertConfigError(where, "url and headers are for webhook sinks")
        command = _strings(raw.get("command"), f"{where}.command")
        if not command:
            raise AlertConfigError(f"{where}.command", "required: the program and its arguments")
        options["command"] = command
    return SinkConfig(
        name=name, type=kind, events=events, min_severity=severity, timeout=timeout, **options
    )


def parse_alerts(raw: object, env: Mapping[str, str] | None = None) -> AlertsConfig:
    """The ``[alerts]`` table as read from TOML; raises AlertConfigError naming the key.

    ``env`` (default: the process's) is where $POSITIOND_TELEGRAM_TOKEN is looked up."""
    environ = dict(os.environ if env is None else env)
    if not isinstance(raw, dict):
        raise AlertConfigError("alerts", "must be a table ([alerts] / [[alerts.sink]])")
    unknown = sorted(set(raw) - {"sink", "retry_for", "concurrency"})
    if unknown:
        raise AlertConfigError(f"alerts.{unknown[0]}", "unknown key")
    listed = raw.get("sink", [])
    if not isinstance(listed, list):
        raise AlertConfigError("alerts.sink", "must be an array of tables ([[alerts.sink]])")
    sinks = tuple(_sink(s, i, environ) for i, s in enumerate(listed))
    names = [s.name for s in sinks]
    for name in names:
        if names.count(name) > 1:
            raise AlertConfigError("alerts.sink", f"two sinks are named {name!r}")
    retry_for = _number(raw.get("retry_for", 3600.0), "alerts.retry_for", 1, 7 * 86400)
    concurrency = int(_number(raw.get("concurrency", 4), "alerts.concurrency", 1, 64))
    return AlertsConfig(sinks, retry_for, concurrency)


def _toml(value: object) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def shown_url(url: str) -> str:
    """``url`` without what may be a secret: a user:password and a query string."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    query = "?..." if parts.query else ""
    return urlunsplit((parts.scheme, host, parts.path, "", "")) + query


def format_alerts(alerts: AlertsConfig) -> list[str]:
    """``--print-config`` lines for the section: header names, never their values."""
    lines = ["", "[alerts]", f"retry_for = {alerts.retry_for:g}"]
    lines.append(f"concurrency = {alerts.concurrency}")
    for sink in alerts.sinks:
        lines += ["", "[[alerts.sink]]", f"name = {_toml(sink.name)}", f"type = {_toml(sink.type)}"]
        if sink.events != KINDS:
            lines.append(f"events = {_toml(sink.events)}")
        lines += [f"min_severity = {_toml(sink.min_severity)}", f"timeout = {sink.timeout:g}"]
        if sink.url is not None:
            lines.append(f"url = {_toml(shown_url(sink.url))}")
        if sink.headers:
            names = ", ".join(sorted(sink.headers))
            lines.append(f"# headers: {names} (values hidden; from {sink.headers_source})")
        if sink.command:
            lines.append(f"command = {_toml(sink.command)}")
        if sink.type == "telegram":
            lines.append(f"chat_id = {_toml(sink.chat_id)}")
            lines.append(f"api_url = {_toml(shown_url(sink.api_url))}")
            lines.append(f"# token: hidden (from {sink.token_source})")
        if sink.username:
            lines.append(f"username = {_toml(sink.username)}")
        if sink.human:
            lines.append(f"group_window = {sink.group_window:g}")
    return lines
