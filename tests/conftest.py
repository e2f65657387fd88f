from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from positiond.store.dsn import PgDsn
from tests.helpers import DaemonProcess
from tests.pg import admin_dsn, fresh_database

# `pytest --soak` runs the fault and fuzz tests long: every count the tests scale with
# Soak.count() is multiplied by --soak-scale (kills of the daemon: 20 -> 2000 by default).
SOAK_SCALE = 100.0


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("positiond")
    group.addoption(
        "--soak",
        action="store_true",
        help="run the fault and fuzz tests long (thousands of daemon kills, millions of "
        "fuzzed messages); tests marked soak run only then",
    )
    group.addoption(
        "--soak-scale",
        type=float,
        default=SOAK_SCALE,
        metavar="FACTOR",
        help=f"with --soak, multiply the tests' counts by this (default {SOAK_SCALE:g})",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "soak: a long-running test; runs only with --soak")
    global SOAK
    SOAK = Soak(bool(config.getoption("--soak")), config.getoption("--soak-scale"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    soaking = config.getoption("--soak")
    skip = pytest.mark.skip(reason="long-running: run with --soak")
    for item in items:
        if not soaking:
            if item.get_closest_marker("soak") is not None:
                item.add_marker(skip)
        elif "soak" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.timeout(0))  # a soak run takes as long as it takes


class Soak:
    """How long to run: ``count(n)`` is ``n``, or ``n * --soak-scale`` under ``--soak``."""

    def __init__(self, enabled: bool, scale: float) -> None:
        self.enabled = enabled
        self.scale = scale if enabled else 1.0

    def count(self, default: int) -> int:
        return max(1, round(default * self.scale))


# The run's setting, for what is decided at import time (hypothesis' max_examples).
SOAK = Soak(False, 1.0)


@pytest.fixture(scope="session")
def soak() -> Soak:
    return SOAK


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short paths: an ipc socket path must fit in 107 bytes, pytest's tmp_path may not.
    path = Path(tempfile.mkdtemp(prefix="pd-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """``sqlite`` unless a test runs on both (``@both_backends``, tests/pg.py)."""
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture
def db(backend: str, workdir: Path) -> Iterator[Path | PgDsn]:
    """The database a test's daemon or store uses: a SQLite file in ``workdir``, or a fresh
    PostgreSQL database (skipped without a server, failed under CI: tests/pg.py)."""
    if backend == "sqlite":
        yield workdir / "positiond.db"
        return
    with fresh_database(admin_dsn()) as dsn:
        yield dsn


@pytest.fixture
def daemon(workdir: Path, db: Path | PgDsn) -> Iterator[DaemonProcess]:
    """A real positiond process with a 1 s heartbeat timeout, on ``db``."""
    proc = DaemonProcess(workdir, "--flush-interval", "0.05", heartbeat_timeout=1.0, db=db)
    proc.start()
    try:
        yield proc
    finally:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.stop()


@pytest.fixture
def strategies() -> Iterator[list[Any]]:
    """Strategy subprocesses a test starts (tests.test_daemon.Strategy); killed at the end."""
    started: list[Any] = []
    yield started
    for strategy in started:
        strategy.close()
