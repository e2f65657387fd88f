"""Logging for the ``positiond`` entry point (library modules only call ``getLogger``).

Under systemd, stderr goes to the journal, which stamps every line itself and reads a leading
``<N>`` as the line's syslog priority (``sd-daemon(3)``): there we write ``<6>positiond: ...``
so ``journalctl -p warning`` works. Anywhere else: a readable line with a timestamp.
``$JOURNAL_STREAM`` (``device:inode``) names the journal's stream; it is only believed when it is
really our stderr, so a shell started from a unit that redirects stderr to a file stays readable.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO

__all__ = ["PRIORITY", "JournalFormatter", "set_level", "setup_logging", "stderr_is_journal"]

# Python level -> syslog priority (sd-daemon.h: SD_ERR 3, SD_WARNING 4, SD_INFO 6, SD_DEBUG 7).
PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}

READABLE_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class JournalFormatter(logging.Formatter):
    """``<priority>logger: message``; continuation lines (tracebacks) keep the priority."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        # journald splits on newlines: prefix every line, or a traceback would lose its level.
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


def priority(levelno: int) -> int:
    for level, prio in PRIORITY.items():  # highest first
        if levelno >= level:
            return prio
    return 7


def stderr_is_journal(env: Mapping[str, str] | None = None, stream: TextIO | None = None) -> bool:
    """True when ``$JOURNAL_STREAM`` names the file our stderr is connected to."""
    env = os.environ if env is None else env
    value = env.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    stream = sys.stderr if stream is None else stream
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (info.st_dev, info.st_ino) == (int(dev), int(ino))


def setup_logging(level: str, env: Mapping[str, str] | None = None) -> bool:
    """Configure the root logger on stderr; True when writing for the journal."""
    journal = stderr_is_journal(env)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JournalFormatter() if journal else logging.Formatter(READABLE_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    set_level(level)
    return journal


def set_level(level: str) -> None:
    """Change the level at runtime too (SIGHUP)."""
    root = logging.getLogger()
    root.setLevel(level)
    # aiosqlite logs every statement at DEBUG: too much even when debugging positiond.
    logging.getLogger("aiosqlite").setLevel(max(logging.INFO, root.level))
