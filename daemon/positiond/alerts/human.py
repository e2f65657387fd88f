"""Sinks read by people: ``telegram`` (the Telegram Bot API) and ``openalgo`` (OpenAlgo's own
``telegram/notify``), and the short plain-text message they send.

A human sink sends one message for a group of alerts (a burst: a host's strategies dying
together, sessions that did not return after a restart): :meth:`HumanSink.send_many`. The
delivery worker groups them (``group_window``) and keeps to :data:`MIN_INTERVAL` between two
messages of a sink (Telegram allows about one message a second per chat). A message lists at
most :data:`MAX_LISTED` alerts and ends with "and N more" for the rest: none is dropped
silently. Plain text (no ``parse_mode``), so nothing needs escaping.

The bot token is a secret: it is in the request URL only, and cut out of every error.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import orjson

from positiond.alerts.settings import SinkConfig

if TYPE_CHECKING:
    import httpx

    from positiond.openalgo import AsyncOpenAlgo, Settings

__all__ = [
    "MAX_CHARS",
    "MAX_LISTED",
    "MIN_INTERVAL",
    "HumanSink",
    "OpenAlgoSink",
    "TelegramSink",
    "message",
]

log = logging.getLogger(__name__)

MIN_INTERVAL = 1.0  # seconds between two messages of one human sink (Telegram: ~1/s per chat)
MAX_LISTED = 10  # alerts spelled out in one message; the rest are counted
MAX_CHARS = 3500  # under Telegram's 4096 limit for one message
_HTTP_LOGGERS = ("httpx", "httpcore")  # they log request URLs; the bot token is in ours
LEG_COLUMNS = ("symbol", "side", "qty", "entry", "stop", "highest", "trail")


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _legs(legs: list[dict[str, Any]]) -> list[str]:
    rows = [LEG_COLUMNS] + [
        (
            str(leg.get("symbol", "?")),
            str(leg.get("side", "?")),
            _num(leg.get("quantity")),
            _num(leg.get("entry_price")),
            _num(leg.get("stop_price")),
            _num(leg.get("highest_price")),
            _num(leg.get("last_trail_level")),
        )
        for leg in legs
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(LEG_COLUMNS))]
    return ["  " + " ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in rows]  # fmt: skip


def _one(alert: dict[str, Any]) -> list[str]:
    who = alert.get("strategy") or ("positiond" if alert.get("orphan") is None else "broker")
    head = f"{str(alert.get('severity', '')).upper()} {alert.get('event')}: {who}"
    if alert.get("session_id") is not None:
        head += f" (session {alert['session_id']}"
        if alert.get("host"):
            head += f", {alert['host']} pid {alert.get('pid')}"
        head += ")"
    lines = [head]
    if alert.get("reason"):
        lines.append(f"  {alert['reason']}")
    orphan = alert.get("orphan")
    if isinstance(orphan, dict):
        lines.append(
            f"  orphan {orphan.get('symbol')} {orphan.get('exchange')} "
            f"broker {orphan.get('broker_quantity')} known {orphan.get('known_quantity')}"
        )
    legs = alert.get("legs") or []
    if legs:
        lines += _legs(legs)
    return lines


def message(bodies: list[bytes]) -> str:
    """One plain-text message for these alert bodies: at most MAX_LISTED spelled out (and at
    most MAX_CHARS), then "and N more"."""
    alerts = [orjson.loads(b) for b in bodies]
    lines = ["positiond: " + ("1 alert" if len(alerts) == 1 else f"{len(alerts)} alerts")]
    listed = 0
    for alert in alerts[:MAX_LISTED]:
        part = ["", *_one(alert)]
        if listed and sum(len(x) + 1 for x in lines + part) > MAX_CHARS - 40:
            break
        lines += part
        listed += 1
    if listed < len(alerts):
        lines += ["", f"and {len(alerts) - listed} more (posctl alerts)"]
    return "\n".join(lines)[:MAX_CHARS]


class HumanSink:
    """A sink that sends one message for many alerts (:meth:`send_many`)."""

    config: SinkConfig

    async def send(self, body: bytes) -> str | None:
        return await self.send_many([body])

    async def send_many(self, bodies: list[bytes]) -> str | None:
        return await self.send_text(message(bodies))

    async def send_text(self, text: str) -> str | None:  # pragma: no cover - overridden
        raise NotImplementedError

    async def aclose(self) -> None:
        return None


class _Redact(logging.Filter):
    """Cuts ``secret`` out of log records: httpx logs every request's URL (token included)."""

    def __init__(self, secret: str) -> None:
        super().__init__()
        self.secret = secret

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if self.secret and self.secret in text:
            record.msg, record.args = text.replace(self.secret, "<token>"), ()
        return True


class TelegramSink(HumanSink):
    """``POST {api_url}/bot{token}/sendMessage`` with ``chat_id`` and ``text``."""

    def __init__(self, config: SinkConfig) -> None:
        import httpx

        self.config = config
        self._client: httpx.AsyncClient = httpx.AsyncClient(
            timeout=config.timeout, follow_redirects=False
        )
        self._redact = _Redact(config.token)
        for name in _HTTP_LOGGERS:
            logging.getLogger(name).addFilter(self._redact)

    def _hide(self, text: str) -> str:
        token = self.config.token
        return text.replace(token, "<token>") if token else text

    async def send_text(self, text: str) -> str | None:
        import httpx

        url = f"{self.config.api_url}/bot{self.config.token}/sendMessage"
        payload = {"chat_id": self.config.chat_id, "text": text}
        try:
            reply = await self._client.post(url, json=payload)
        except httpx.TimeoutException:
            return f"no answer within {self.config.timeout:g}s"
        except httpx.HTTPError as exc:
            return self._hide(f"{type(exc).__name__}: {exc}")
        if 200 <= reply.status_code < 300:
            return None
        try:
            said = str(orjson.loads(reply.content).get("description", ""))[:200]
        except (orjson.JSONDecodeError, AttributeError):
            said = ""
        return self._hide(f"HTTP {reply.status_code}" + (f": {said}" if said else ""))

    async def aclose(self) -> None:
        await self._client.aclose()
        for name in _HTTP_LOGGERS:
            logging.getLogger(name).removeFilter(self._redact)


class OpenAlgoSink(HumanSink):
    """OpenAlgo's ``telegram/notify`` for ``username``, with ``[openalgo]`` host and key."""

    def __init__(self, config: SinkConfig, settings: Settings | None) -> None:
        self.config = config
        self._settings = settings
        self._client: AsyncOpenAlgo | None = None

    def _connect(self) -> AsyncOpenAlgo:
        from positiond.openalgo import AsyncOpenAlgo, OpenAlgoUnavailable, Settings, api_key

        if self._client is None:
            if self._settings is None:
                raise OpenAlgoUnavailable("no [openalgo] host configured")
            # The sink's own timeout bounds the call, like every sink's.
            settings = Settings(self._settings.host, self._settings.api_key_file,
                                self.config.timeout)  # fmt: skip
            self._client = AsyncOpenAlgo(settings, api_key(settings))
        return self._client

    async def send_text(self, text: str) -> str | None:
        from positiond.openalgo import OpenAlgoError

        try:
            await self._connect().telegram_notify(self.config.username, text)
        except OpenAlgoError as exc:
            return exc.message
        return None

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
