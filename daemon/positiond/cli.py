"""``positiond`` command line: parse settings, configure logging, run the daemon until a signal."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from positiond.config import Config, ConfigError, from_args
from positiond.schema import SchemaError
from positiond.server import AlreadyRunning, Daemon

__all__ = ["async_main", "main"]

log = logging.getLogger("positiond")


def setup_logging(level: str) -> None:
    """The only place handlers are configured: stderr, one line per record."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiosqlite logs every statement at DEBUG: too much even when debugging positiond.
    logging.getLogger("aiosqlite").setLevel(max(logging.INFO, root.level))


async def async_main(config: Config) -> int:
    """Run the daemon until SIGTERM/SIGINT; return the exit code."""
    daemon = Daemon(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.request_stop)
    log.info("database: %s", config.db)
    log.info("endpoint: %s", config.endpoint)
    try:
        await daemon.run()
    except AlreadyRunning as exc:
        log.error("%s", exc)
        return 1
    except SchemaError as exc:
        log.error("%s", exc)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``positiond`` console script and ``python -m positiond``."""
    try:
        config = from_args(argv)
    except ConfigError as exc:
        print(f"positiond: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level)
    return asyncio.run(async_main(config))


if __name__ == "__main__":
    sys.exit(main())
