"""The one module that talks to OpenAlgo's REST API (``POST {host}/api/v1/<name>``).

Requests are built and replies judged by plain functions (:func:`positionbook_request`,
:func:`telegram_notify_request`, :func:`placeorder_request`, :func:`cancelorder_request`,
:func:`orderstatus_request`, :func:`orderbook_request`, :func:`judge`) with no I/O, so the
sync client posctl uses (:class:`OpenAlgo`, on ``httpx.Client``) and the async one the daemon
uses (:class:`AsyncOpenAlgo`, on ``httpx.AsyncClient``) share them. httpx is the optional extra
``positiond[openalgo]``; it is imported only when a client is made, and its absence is an
:class:`OpenAlgoUnavailable` saying what to install.

Every failure is an :class:`OpenAlgoError` carrying the broker's message: a reply whose
``status`` is not ``success``, an HTTP error status, a body that is not JSON, a timeout, a
connection refused. None of them may ever read as "flat at the broker". ``status_code`` keeps
the HTTP status (None: no answer) and :func:`transient` says whether trying again may help.

Orders (the protect worker, docs/PROTECT.md) are placed and cancelled one by one with
``placeorder`` and ``cancelorder``; there is deliberately no builder for a call that acts on the
whole account (``closeposition``, ``placesmartorder``, ``cancelallorder``).

The API key comes from ``api_key_file`` or ``$POSITIOND_OPENALGO_API_KEY`` (:func:`api_key`);
it travels only in request bodies, is never logged and never appears in an error or a repr.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    import httpx

    from positiond.config import Config

__all__ = [
    "API_KEY_ENV",
    "DEFAULT_TIMEOUT",
    "AsyncOpenAlgo",
    "OpenAlgo",
    "OpenAlgoError",
    "OpenAlgoTimeout",
    "OpenAlgoUnavailable",
    "Request",
    "Settings",
    "api_key",
    "cancelorder_request",
    "judge",
    "orderbook_request",
    "orderstatus_request",
    "placeorder_request",
    "positionbook_request",
    "settings_of",
    "telegram_notify_request",
    "transient",
]

logger = logging.getLogger(__name__)

API_KEY_ENV = "POSITIOND_OPENALGO_API_KEY"
DEFAULT_TIMEOUT = 10.0
INSTALL_HINT = "install positiond[openalgo] (pip install 'positiond[openalgo]') for httpx"


class OpenAlgoError(Exception):
    """OpenAlgo did not answer with a success: the message says what it said (never the key)."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code  # the HTTP status of the answer; None: no answer


class OpenAlgoTimeout(OpenAlgoError):
    """No complete answer within the timeout."""


class OpenAlgoUnavailable(OpenAlgoError):
    """httpx is not installed, or no API key is configured."""


@dataclass(frozen=True)
class Settings:
    """``[openalgo]``: where OpenAlgo listens, where its API key is, how long to wait."""

    host: str
    api_key_file: Path | None = None
    timeout: float = DEFAULT_TIMEOUT


def settings_of(config: Config) -> Settings | None:
    """The ``[openalgo]`` section of a Config; None when no host is configured."""
    if config.openalgo_host is None:
        return None
    return Settings(config.openalgo_host, config.openalgo_api_key_file, config.openalgo_timeout)


def api_key(settings: Settings, env: Mapping[str, str] | None = None) -> str:
    """The API key: ``$POSITIOND_OPENALGO_API_KEY``, else the first line of ``api_key_file``."""
    env = os.environ if env is None else env
    from_env = env.get(API_KEY_ENV, "").strip()
    if from_env:
        return from_env
    if settings.api_key_file is None:
        raise OpenAlgoUnavailable(
            f"no OpenAlgo API key: set api_key_file in [openalgo] or {API_KEY_ENV}"
        )
    try:
        text = settings.api_key_file.read_text()
    except OSError as exc:
        raise OpenAlgoUnavailable(
            f"cannot read the OpenAlgo API key file {settings.api_key_file}: {exc.strerror}"
        ) from None
    key = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not key:
        raise OpenAlgoUnavailable(f"the OpenAlgo API key file {settings.api_key_file} is empty")
    return key


@dataclass(frozen=True)
class Request:
    """One REST call: ``POST {host}/api/v1/{name}`` with a JSON body (which holds the key)."""

    name: str
    body: dict[str, Any] = field(repr=False)

    @property
    def path(self) -> str:
        return f"/api/v1/{self.name}"

    def content(self) -> bytes:
        return orjson.dumps(self.body)


def positionbook_request(key: str) -> Request:
    """``positionbook``: the account's net per (symbol, exchange, product)."""
    return Request("positionbook", {"apikey": key})


def telegram_notify_request(key: str, username: str, message: str) -> Request:
    """``telegram/notify``: a message to an OpenAlgo user's linked Telegram chat."""
    return Request("telegram/notify", {"apikey": key, "username": username, "message": message})


def placeorder_request(
    key: str,
    *,
    strategy: str,
    symbol: str,
    exchange: str,
    product: str,
    action: str,
    quantity: int,
    pricetype: str,
    trigger_price: float = 0.0,
    price: float = 0.0,
) -> Request:
    """``placeorder``: one order for one instrument (never an account-wide call)."""
    return Request("placeorder", {
        "apikey": key, "strategy": strategy, "symbol": symbol, "action": action,
        "exchange": exchange, "pricetype": pricetype, "product": product,
        "quantity": str(quantity), "price": str(price), "trigger_price": str(trigger_price),
        "disclosed_quantity": "0",
    })  # fmt: skip


def cancelorder_request(key: str, strategy: str, order_id: str) -> Request:
    """``cancelorder``: cancel one order by its id."""
    return Request("cancelorder", {"apikey": key, "strategy": strategy, "orderid": order_id})


def orderstatus_request(key: str, strategy: str, order_id: str) -> Request:
    """``orderstatus``: one order's ``data`` (``order_status``, ``average_price``, ...)."""
    return Request("orderstatus", {"apikey": key, "strategy": strategy, "orderid": order_id})


def orderbook_request(key: str) -> Request:
    """``orderbook``: the day's orders (``data.orders[]``)."""
    return Request("orderbook", {"apikey": key})


def transient(exc: OpenAlgoError) -> bool:
    """May the same call succeed later? No answer, a rate limit (429), a server fault (5xx).
    An error OpenAlgo answered otherwise (400 "rejected", 403 bad key, status error) is final."""
    if isinstance(exc, OpenAlgoUnavailable):
        return False
    code = exc.status_code
    return code is None or code == 429 or code >= 500


def _message(data: Any) -> str:
    if isinstance(data, Mapping):
        for name in ("message", "error", "detail"):
            if data.get(name):
                return str(data[name])[:300]
    return f"{data!r:.300}"


def judge(name: str, status_code: int, content: bytes) -> dict[str, Any]:
    """The JSON reply of a success; OpenAlgoError naming the call and the broker's message else.

    Unknown fields (analyzer mode's ``"mode": "analyze"``, totals, per-row extras) are kept as
    they are: the callers read only what they know.
    """
    try:
        data = orjson.loads(content) if content else None
    except orjson.JSONDecodeError:
        data = None
        if status_code < 400:
            raise OpenAlgoError(
                f"OpenAlgo {name}: HTTP {status_code} with a body that is not JSON: "
                f"{content[:200]!r}",
                status_code,
            ) from None
    if status_code >= 400:
        said = _message(data) if data is not None else content[:200].decode("utf-8", "replace")
        raise OpenAlgoError(f"OpenAlgo {name}: HTTP {status_code}: {said}", status_code)
    if not isinstance(data, dict):
        raise OpenAlgoError(
            f"OpenAlgo {name}: the reply is not a JSON object: {data!r:.200}", status_code
        )
    if data.get("status") != "success":
        raise OpenAlgoError(
            f"OpenAlgo {name}: status {data.get('status')!r}: {_message(data)}", status_code
        )
    return data


def _redacted(exc: OpenAlgoError, key: str) -> OpenAlgoError:
    """The same error with the key cut out of its message (a broker that echoes its input)."""
    if not key or key not in exc.message:
        return exc
    return type(exc)(exc.message.replace(key, "<api key>"), exc.status_code)


def _httpx() -> Any:
    try:
        import httpx
    except ImportError:
        raise OpenAlgoUnavailable(f"OpenAlgo needs httpx: {INSTALL_HINT}") from None
    return httpx


def _failure(name: str, settings: Settings, exc: Exception) -> OpenAlgoError:
    host = settings.host
    if isinstance(exc, _httpx().TimeoutException):
        return OpenAlgoTimeout(
            f"OpenAlgo {name}: no answer from {host} within {settings.timeout:g}s"
        )
    return OpenAlgoError(f"OpenAlgo {name}: cannot reach {host}: {type(exc).__name__}: {exc}")


def _order_id(reply: dict[str, Any], name: str) -> str:
    order_id = reply.get("orderid")
    if not isinstance(order_id, str | int) or isinstance(order_id, bool) or not str(order_id):
        # An answer that says success without an id: the order may be live (status None: ambiguous).
        raise OpenAlgoError(f"OpenAlgo {name}: success without an order id: {reply!r:.200}")
    return str(order_id)


def _data(reply: dict[str, Any]) -> dict[str, Any]:
    data = reply.get("data")
    if not isinstance(data, dict):
        raise OpenAlgoError(f"OpenAlgo orderstatus: no data object: {reply!r:.200}", 200)
    return data


def _orders(reply: dict[str, Any]) -> list[dict[str, Any]]:
    data = reply.get("data")
    orders = data.get("orders") if isinstance(data, dict) else data
    if orders is None:
        return []  # no order today
    if not isinstance(orders, list):
        raise OpenAlgoError(f"OpenAlgo orderbook: no list of orders: {reply!r:.200}", 200)
    return [o for o in orders if isinstance(o, dict)]


_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}


class OpenAlgo:
    """Sync client (posctl): one ``httpx.Client`` for every call; close it, or use ``with``."""

    def __init__(
        self, settings: Settings, key: str, transport: httpx.BaseTransport | None = None
    ) -> None:
        httpx_ = _httpx()
        self.settings = settings
        self._key = key
        self._client: httpx.Client = httpx_.Client(
            base_url=settings.host, timeout=settings.timeout, transport=transport
        )

    def __repr__(self) -> str:
        return f"OpenAlgo(host={self.settings.host!r})"

    def call(self, request: Request) -> dict[str, Any]:
        """POST the request; the success reply, or OpenAlgoError."""
        try:
            try:
                reply = self._client.post(request.path, content=request.content(), headers=_HEADERS)
            except _httpx().HTTPError as exc:
                raise _failure(request.name, self.settings, exc) from None
            logger.debug("OpenAlgo %s: HTTP %d", request.name, reply.status_code)
            return judge(request.name, reply.status_code, reply.content)
        except OpenAlgoError as exc:
            raise _redacted(exc, self._key) from None

    def positionbook(self) -> dict[str, Any]:
        """The positionbook reply (parse it with positiond_client.recovery.parse_positionbook)."""
        return self.call(positionbook_request(self._key))

    def telegram_notify(self, username: str, message: str) -> dict[str, Any]:
        return self.call(telegram_notify_request(self._key, username, message))

    def placeorder(self, **order: Any) -> str:
        """Place one order (:func:`placeorder_request`'s fields); the broker's order id."""
        return _order_id(self.call(placeorder_request(self._key, **order)), "placeorder")

    def cancelorder(self, strategy: str, order_id: str) -> dict[str, Any]:
        return self.call(cancelorder_request(self._key, strategy, order_id))

    def orderstatus(self, strategy: str, order_id: str) -> dict[str, Any]:
        """The order's ``data`` object."""
        return _data(self.call(orderstatus_request(self._key, strategy, order_id)))

    def orderbook(self) -> list[dict[str, Any]]:
        """The day's orders (``data.orders``)."""
        return _orders(self.call(orderbook_request(self._key)))

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> OpenAlgo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncOpenAlgo:
    """Async twin (the daemon): one ``httpx.AsyncClient``; ``await aclose()`` or ``async with``."""

    def __init__(
        self, settings: Settings, key: str, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        httpx_ = _httpx()
        self.settings = settings
        self._key = key
        self._client: httpx.AsyncClient = httpx_.AsyncClient(
            base_url=settings.host, timeout=settings.timeout, transport=transport
        )

    def __repr__(self) -> str:
        return f"AsyncOpenAlgo(host={self.settings.host!r})"

    async def call(self, request: Request) -> dict[str, Any]:
        """POST the request; the success reply, or OpenAlgoError."""
        try:
            try:
                reply = await self._client.post(
                    request.path, content=request.content(), headers=_HEADERS
                )
            except _httpx().HTTPError as exc:
                raise _failure(request.name, self.settings, exc) from None
            logger.debug("OpenAlgo %s: HTTP %d", request.name, reply.status_code)
            return judge(request.name, reply.status_code, reply.content)
        except OpenAlgoError as exc:
            raise _redacted(exc, self._key) from None

    async def positionbook(self) -> dict[str, Any]:
        """The positionbook reply."""
        return await self.call(positionbook_request(self._key))

    async def telegram_notify(self, username: str, message: str) -> dict[str, Any]:
        """Send a Telegram message through OpenAlgo."""
        return await self.call(telegram_notify_request(self._key, username, message))

    async def placeorder(self, **order: Any) -> str:
        """Place one order (:func:`placeorder_request`'s fields); the broker's order id."""
        return _order_id(await self.call(placeorder_request(self._key, **order)), "placeorder")

    async def cancelorder(self, strategy: str, order_id: str) -> dict[str, Any]:
        return await self.call(cancelorder_request(self._key, strategy, order_id))

    async def orderstatus(self, strategy: str, order_id: str) -> dict[str, Any]:
        """The order's ``data`` object."""
        return _data(await self.call(orderstatus_request(self._key, strategy, order_id)))

    async def orderbook(self) -> list[dict[str, Any]]:
        """The day's orders (``data.orders``)."""
        return _orders(await self.call(orderbook_request(self._key)))

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._client.aclose()

    async def __aenter__(self) -> AsyncOpenAlgo:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
