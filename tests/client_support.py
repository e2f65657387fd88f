"""A strategy subprocess running tests/client_proc.py, with its output read on a thread."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from tests.helpers import UNIT

__all__ = ["ClientProc"]

SCRIPT = Path(__file__).with_name("client_proc.py")


class ClientProc:
    """``python tests/client_proc.py ENDPOINT MODE``; stderr goes to a file in ``workdir``."""

    def __init__(self, workdir: Path, endpoint: str, mode: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(SCRIPT.parent.parent)}
        self.stderr_path = workdir / f"client-{mode}-{id(self)}.err"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(SCRIPT), endpoint, mode],
                stdout=subprocess.PIPE,
                stderr=err,
                env=env,
                text=True,
            )
        self._lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)

    def json(self, timeout: float = 10) -> dict[str, Any]:
        """The next JSON line it prints (fails after ``timeout`` units)."""
        try:
            line = self._lines.get(timeout=timeout * UNIT)
        except queue.Empty:
            raise AssertionError(f"client printed nothing in time:\n{self.stderr()}") from None
        result: dict[str, Any] = json.loads(line)
        return result

    def json_until(self, key: str, timeout: float = 10) -> dict[str, Any]:
        """Skip lines until one has ``key``."""
        while True:
            line = self.json(timeout)
            if key in line:
                return line

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait(self, timeout: float = 10) -> int:
        try:
            return self.proc.wait(timeout * UNIT)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"client did not exit in time:\n{self.stderr()}") from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
