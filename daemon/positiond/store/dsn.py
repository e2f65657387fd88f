"""Which store a ``db`` setting names: a PostgreSQL URL (:class:`PgDsn`) or a SQLite path.

``postgresql://…`` and ``postgres://…`` select the PostgreSQL store (issue 14); anything else is
the path of a SQLite file. This module imports no driver: the configuration and posctl can
tell the two apart without ``positiond[postgres]`` installed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PG_SCHEMES", "PgDsn", "parse_db"]

PG_SCHEMES = ("postgresql://", "postgres://")
_PASSWORD = re.compile(r"^(postgres(?:ql)?://[^:/@?]*):[^@/?]*@")


@dataclass(frozen=True)
class PgDsn:
    """A PostgreSQL connection URL; ``str()`` hides its password (logs, health, messages)."""

    url: str

    def __str__(self) -> str:
        shown = _PASSWORD.sub(r"\1:***@", self.url)
        return re.sub(r"(password=)[^&]*", r"\1***", shown)


def parse_db(raw: str) -> Path | PgDsn:
    """``db`` as given (flag, environment, TOML): a :class:`PgDsn` or an expanded path."""
    if raw.startswith(PG_SCHEMES):
        return PgDsn(raw)
    return Path(raw).expanduser()
