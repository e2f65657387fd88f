"""``[protect]``: which crashed legs get a protective stop order at the broker, and how.

Off unless the config says otherwise::

    [protect]
    mode = "on"                        # "off" (default) | "dry-run" | "on"
    strategies = ["expiry_blast"]      # or ["*"]: every strategy
    trading_window = "09:15-15:30"     # exchange local time; unset: at any hour
    timezone = "Asia/Kolkata"
    pricetype = "SL-M"                 # or "SL", with limit_offset > 0
    limit_offset = 0.0                 # SL only: how far past the trigger the limit sits
    tag = "positiond-protect"          # OpenAlgo's ``strategy`` field on every order
    rate = 10                          # orders per second at most (OpenAlgo's default limit)
    retry_for = 60                     # seconds a transient failure is retried
    poll_interval = 2                  # seconds between looks at live protective orders

A session narrows it: ``start_session(protect=False)`` opts out; ``protect=True`` (or saying
nothing) follows the config. A session can never turn protection on where the config does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from positiond.drift import parse_window

__all__ = [
    "MODES",
    "PRICETYPES",
    "ProtectConfig",
    "ProtectConfigError",
    "format_protect",
    "parse_protect",
]

MODES = ("off", "dry-run", "on")
PRICETYPES = ("SL-M", "SL")
_KEYS = {
    "mode", "strategies", "trading_window", "timezone", "pricetype", "limit_offset", "tag",
    "rate", "retry_for", "poll_interval",
}  # fmt: skip


class ProtectConfigError(ValueError):
    """A bad ``[protect]`` key: ``name`` says which (``protect.mode``), ``reason`` why."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name, self.reason = name, reason


@dataclass(frozen=True)
class ProtectConfig:
    """The ``[protect]`` section (defaults: off)."""

    mode: str = "off"
    strategies: tuple[str, ...] = ()
    trading_window: str | None = None
    timezone: str = "Asia/Kolkata"
    pricetype: str = "SL-M"
    limit_offset: float = 0.0
    tag: str = "positiond-protect"
    rate: float = 10.0
    retry_for: float = 60.0
    poll_interval: float = 2.0

    @property
    def enabled(self) -> bool:
        """Orders are placed (``on``) or only planned and logged (``dry-run``)."""
        return self.mode != "off"

    def allows(self, strategy: str) -> bool:
        """Does the config protect this strategy's crashed legs?"""
        return self.enabled and ("*" in self.strategies or strategy in self.strategies)

    def protects(self, strategy: str, session_choice: bool | None) -> bool:
        """The effective choice for a session: the config, narrowed by what the session said
        (``None``: nothing, follow the config; ``False``: opted out)."""
        return self.allows(strategy) and session_choice is not False


def _number(raw: object, name: str, low: float, high: float) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise ProtectConfigError(name, f"must be a number, not {raw!r}")
    if not low <= raw <= high:
        raise ProtectConfigError(name, f"must be between {low:g} and {high:g}, not {raw!r}")
    return float(raw)


def _text(raw: object, name: str) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise ProtectConfigError(name, f"must be a non-empty string, not {raw!r}")
    return raw.strip()


def parse_protect(raw: object) -> ProtectConfig:
    """The ``[protect]`` table as read from TOML; raises ProtectConfigError naming the key."""
    if not isinstance(raw, dict):
        raise ProtectConfigError("protect", "must be a table ([protect])")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise ProtectConfigError(f"protect.{unknown[0]}", f"unknown key (known: {sorted(_KEYS)})")
    mode = raw.get("mode", "off")
    if mode not in MODES:
        raise ProtectConfigError("protect.mode", f"must be one of {MODES}, not {mode!r}")
    listed = raw.get("strategies", [])
    if not isinstance(listed, list) or not all(isinstance(s, str) and s for s in listed):
        raise ProtectConfigError("protect.strategies", 'must be a list of names, or ["*"]')
    if mode != "off" and not listed:
        raise ProtectConfigError(
            "protect.strategies", 'names no strategy: list them, or ["*"] for every one'
        )
    window = raw.get("trading_window")
    if window is not None:
        try:
            parse_window(_text(window, "protect.trading_window"))
        except ValueError as exc:
            raise ProtectConfigError("protect.trading_window", str(exc)) from None
    timezone = _text(raw.get("timezone", "Asia/Kolkata"), "protect.timezone")
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ProtectConfigError("protect.timezone", f"{timezone!r}: no such zone") from None
    pricetype = raw.get("pricetype", "SL-M")
    if pricetype not in PRICETYPES:
        raise ProtectConfigError(
            "protect.pricetype", f"must be one of {PRICETYPES}, not {pricetype!r}"
        )
    offset = _number(raw.get("limit_offset", 0.0), "protect.limit_offset", 0.0, 1e9)
    if pricetype == "SL" and offset <= 0:
        raise ProtectConfigError(
            "protect.limit_offset",
            "an SL order needs limit_offset > 0 (how far past the trigger the limit sits)",
        )
    return ProtectConfig(
        mode=mode,
        strategies=tuple(dict.fromkeys(listed)),
        trading_window=None if window is None else window.strip(),
        timezone=timezone,
        pricetype=pricetype,
        limit_offset=offset,
        tag=_text(raw.get("tag", "positiond-protect"), "protect.tag"),
        rate=_number(raw.get("rate", 10.0), "protect.rate", 0.1, 10.0),
        retry_for=_number(raw.get("retry_for", 60.0), "protect.retry_for", 1.0, 3600.0),
        poll_interval=_number(raw.get("poll_interval", 2.0), "protect.poll_interval", 0.05, 60.0),
    )


def _toml(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_protect(protect: ProtectConfig) -> list[str]:
    """``--print-config`` lines for the section."""
    lines = ["", "[protect]", f"mode = {_toml(protect.mode)}"]
    lines.append("strategies = [" + ", ".join(_toml(s) for s in protect.strategies) + "]")
    if protect.trading_window is not None:
        lines.append(f"trading_window = {_toml(protect.trading_window)}")
    lines += [
        f"timezone = {_toml(protect.timezone)}",
        f"pricetype = {_toml(protect.pricetype)}",
        f"limit_offset = {protect.limit_offset:g}",
        f"tag = {_toml(protect.tag)}",
        f"rate = {protect.rate:g}",
        f"retry_for = {protect.retry_for:g}",
        f"poll_interval = {protect.poll_interval:g}",
    ]
    return lines
