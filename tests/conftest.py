from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import DaemonProcess


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short paths: an ipc socket path must fit in 107 bytes, pytest's tmp_path may not.
    path = Path(tempfile.mkdtemp(prefix="pd-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon(workdir: Path) -> Iterator[DaemonProcess]:
    """A real positiond process with a 1 s heartbeat timeout."""
    proc = DaemonProcess(workdir, "--flush-interval", "0.05", heartbeat_timeout=1.0).start()
    try:
        yield proc
    finally:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.stop()
