"""Where alerts go: a :class:`Sink` takes one alert body (JSON bytes) and returns None when it
was delivered, or a one-line reason why not (the worker retries it).

A sink never raises for a failed delivery and never takes longer than its timeout (the worker
enforces it too). ``webhook``: an HTTP POST of the body (httpx), any 2xx counts; ``command``:
the program run with the body on stdin, exit status 0 counts. ``telegram`` and ``openalgo``
(:mod:`positiond.alerts.human`) send one message for a group of alerts (``send_many``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Protocol

from positiond.alerts.settings import SinkConfig

if TYPE_CHECKING:
    import httpx

    from positiond.openalgo import Settings

__all__ = ["CommandSink", "Sink", "WebhookSink", "build_sink"]

log = logging.getLogger(__name__)


class Sink(Protocol):
    """One configured destination."""

    config: SinkConfig

    async def send(self, body: bytes) -> str | None:
        """Deliver ``body``; None on success, else why it failed (no secrets in it)."""
        ...

    async def aclose(self) -> None:
        """Release what the sink holds (connections)."""
        ...


class WebhookSink:
    """HTTP POST of the alert body with the configured headers."""

    def __init__(self, config: SinkConfig) -> None:
        import httpx  # here: only a daemon with a webhook sink needs it (the alerts extra)

        self.config = config
        self._client: httpx.AsyncClient = httpx.AsyncClient(
            timeout=config.timeout, follow_redirects=False
        )
        self._headers = {"Content-Type": "application/json", **config.headers}

    async def send(self, body: bytes) -> str | None:
        import httpx

        assert self.config.url is not None
        try:
            reply = await self._client.post(self.config.url, content=body, headers=self._headers)
        except httpx.TimeoutException:
            return f"no answer within {self.config.timeout:g}s"
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        if 200 <= reply.status_code < 300:
            return None
        return f"HTTP {reply.status_code}"

    async def aclose(self) -> None:
        await self._client.aclose()


class CommandSink:
    """Run the configured program with the alert body on stdin."""

    def __init__(self, config: SinkConfig) -> None:
        self.config = config

    async def send(self, body: bytes) -> str | None:
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.config.command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # a signal to the daemon's group does not reach it
            )
        except OSError as exc:
            return f"cannot run {self.config.command[0]}: {exc.strerror}"
        try:
            async with asyncio.timeout(self.config.timeout):
                _, err = await proc.communicate(body)
        except TimeoutError:
            return f"no exit within {self.config.timeout:g}s (killed)"
        finally:
            if proc.returncode is None:  # timed out, or the daemon stops: leave no child
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await asyncio.shield(proc.wait())
        if proc.returncode == 0:
            return None
        tail = err.decode(errors="replace").strip().splitlines()[-1:] if err else []
        return f"exit status {proc.returncode}" + (f": {tail[0][:200]}" if tail else "")

    async def aclose(self) -> None:
        return None


def build_sink(config: SinkConfig, openalgo: Settings | None = None) -> Sink:
    """The sink for ``config.type`` (``openalgo``: with the ``[openalgo]`` settings)."""
    from positiond.alerts.human import OpenAlgoSink, TelegramSink

    if config.type == "telegram":
        return TelegramSink(config)
    if config.type == "openalgo":
        return OpenAlgoSink(config, openalgo)
    if config.type == "webhook":
        return WebhookSink(config)
    if config.type == "command":
        return CommandSink(config)
    raise ValueError(f"no sink of type {config.type!r}")
