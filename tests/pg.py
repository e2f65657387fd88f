"""PostgreSQL for the tests: a fresh database per test on the server POSITIOND_TEST_PG_DSN names.

``.ci/run`` starts a throwaway server (``.ci/postgres``) and exports its DSN. Locally:

    D=$(mktemp -d) && export POSITIOND_TEST_PG_DSN=$(.ci/postgres start "$D")
    pytest ...                  # then: .ci/postgres stop "$D"

Without a DSN (or without psycopg) the PostgreSQL tests skip with the reason; under CI (``CI``
set) they fail instead: CI must run them.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from positiond.store.dsn import PG_SCHEMES, PgDsn

__all__ = ["ENV", "admin_dsn", "both_backends", "fresh_database", "pg_rows"]

ENV = "POSITIOND_TEST_PG_DSN"

# A test (or a fixture chain) using the ``backend`` fixture runs once per store.
both_backends = pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI runs every PostgreSQL test (.ci/run starts a server)")
    pytest.skip(reason)


def admin_dsn() -> str:
    """The test server's DSN, or skip (fail under CI) with the reason."""
    dsn = os.environ.get(ENV, "")
    if not dsn:
        _unavailable(f"no PostgreSQL server: {ENV} is unset (see tests/pg.py: .ci/postgres)")
    if not dsn.startswith(PG_SCHEMES):
        pytest.fail(f"{ENV} must be a postgresql:// URL, not {dsn!r}")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable("psycopg is not installed: pip install -e '.[postgres]'")
    return dsn


@contextmanager
def fresh_database(dsn: str) -> Iterator[PgDsn]:
    """An empty database on the server of ``dsn``, dropped afterwards."""
    import psycopg

    name = f"pd_test_{secrets.token_hex(6)}"
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield PgDsn(re.sub(r"^(postgres(?:ql)?://[^/?]*)(/[^?]*)?", rf"\1/{name}", dsn))
    finally:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def pg_rows(dsn: PgDsn, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """``sql`` (SQLite's placeholders) on its own connection: rows by index and by name."""
    import psycopg

    from positiond.store.pgconn import PgConnection

    with psycopg.connect(dsn.url, autocommit=True) as raw:
        return PgConnection(raw).execute(sql, params).fetchall()
