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

Header values are secrets: never logged, never printed by ``--print-config`` (only their
names), never in status.json. ``headers_file`` holds ``Name: value`` lines.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "KINDS",
    "RESERVED_TYPES",
    "SEVERITIES",
    "SEVERITY",
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
    "unhealthy": "critical",  # the daemon itself (positiond.alerts.health)
    "healthy": "info",
}
KINDS = tuple(SEVERITY)
SEVERITIES = ("info", "warning", "critical")
TYPES = ("webhook", "command")
RESERVED_TYPES = ("telegram", "openalgo")  # names kept for sinks still to come


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
    "command",
}  # fmt: skip


def _sink(raw: object, index: int) -> SinkConfig:
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
    if kind in RESERVED_TYPES:
        raise AlertConfigError(f"{where}.type", f"{kind!r} sinks are not available yet")
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
    if kind == "webhook":
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


def parse_alerts(raw: object) -> AlertsConfig:
    """The ``[alerts]`` table as read from TOML; raises AlertConfigError naming the key."""
    if not isinstance(raw, dict):
        raise AlertConfigError("alerts", "must be a table ([alerts] / [[alerts.sink]])")
    unknown = sorted(set(raw) - {"sink", "retry_for", "concurrency"})
    if unknown:
        raise AlertConfigError(f"alerts.{unknown[0]}", "unknown key")
    listed = raw.get("sink", [])
    if not isinstance(listed, list):
        raise AlertConfigError("alerts.sink", "must be an array of tables ([[alerts.sink]])")
    sinks = tuple(_sink(s, i) for i, s in enumerate(listed))
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
    return lines
