"""A program in a real terminal for the tests: a pty of a fixed size and a small screen reader.

:class:`Screen` understands what a full-screen rich program writes (text, CR/LF, cursor moves
and positioning, erasing, the alternate screen, colours ignored); :class:`PtyProgram` runs a
command on a pty and feeds its output to one.
"""

from __future__ import annotations

import fcntl
import os
import re
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Sequence

from tests.helpers import UNIT

__all__ = ["PtyProgram", "Screen"]

_CSI = re.compile(r"\x1b\[([?0-9;]*)([A-Za-z@])|\x1b[()][0-9A-B]|\x1b[=>78]|\x1b\][^\x07]*\x07")


class Screen:
    """A ``rows`` x ``cols`` grid of characters, as a terminal would show them."""

    def __init__(self, rows: int = 30, cols: int = 80) -> None:
        self.rows, self.cols = rows, cols
        self.grid = [[" "] * cols for _ in range(rows)]
        self.y = self.x = 0
        self.alternate = False  # in the alternate screen (a full-screen program runs)
        self.left_alternate = False  # and left it again (the terminal was restored)

    def feed(self, data: str) -> None:
        pos = 0
        for match in _CSI.finditer(data):
            self._text(data[pos : match.start()])
            self._control(match.group(1), match.group(2), match.group(0))
            pos = match.end()
        self._text(data[pos:])

    def _text(self, text: str) -> None:
        for ch in text:
            if ch == "\r":
                self.x = 0
            elif ch == "\n":
                self.y = min(self.rows - 1, self.y + 1)
            elif ch == "\b":
                self.x = max(0, self.x - 1)
            elif ch >= " ":
                if self.x >= self.cols:
                    self.x, self.y = 0, min(self.rows - 1, self.y + 1)
                self.grid[self.y][self.x] = ch
                self.x += 1

    def _control(self, params: str | None, final: str | None, raw: str) -> None:
        if final is None:
            return
        private = params is not None and params.startswith("?")
        nums = [int(p) if p else 0 for p in (params or "").lstrip("?").split(";")]
        first = nums[0] if nums else 0
        if private and final in "hl" and 1049 in nums:
            if final == "h":
                self.alternate = True
            else:
                self.left_alternate = self.alternate
            self.clear()
        elif private:
            return
        elif final == "H" or final == "f":
            row = nums[0] if nums and nums[0] else 1
            col = nums[1] if len(nums) > 1 and nums[1] else 1
            self.y, self.x = min(self.rows, row) - 1, min(self.cols, col) - 1
        elif final == "J":
            if first == 2:
                self.clear()
            elif first == 0:
                self.grid[self.y][self.x :] = [" "] * (self.cols - self.x)
                for line in self.grid[self.y + 1 :]:
                    line[:] = [" "] * self.cols
        elif final == "K":
            if first == 0:
                self.grid[self.y][self.x :] = [" "] * (self.cols - self.x)
            elif first == 2:
                self.grid[self.y] = [" "] * self.cols
        elif final in "ABCD":
            step = max(1, first)
            if final == "A":
                self.y = max(0, self.y - step)
            elif final == "B":
                self.y = min(self.rows - 1, self.y + step)
            elif final == "C":
                self.x = min(self.cols - 1, self.x + step)
            else:
                self.x = max(0, self.x - step)
        elif final == "G":
            self.x = min(self.cols, max(1, first)) - 1

    def clear(self) -> None:
        self.grid = [[" "] * self.cols for _ in range(self.rows)]
        self.y = self.x = 0

    def text(self) -> str:
        return "\n".join("".join(line).rstrip() for line in self.grid)


def _controlling_terminal() -> None:
    """In the child, after setsid: its pty (stdin) becomes its terminal, so Ctrl-C typed there
    is a SIGINT, as in a terminal window."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class PtyProgram:
    """``argv`` on a pty of ``rows`` x ``cols``; its output is read into :attr:`screen`."""

    def __init__(
        self, argv: Sequence[str], env: dict[str, str], rows: int = 30, cols: int = 80
    ) -> None:
        self.screen = Screen(rows, cols)
        self.raw: list[str] = []
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.master = master
        self.proc = subprocess.Popen(
            list(argv), stdin=slave, stdout=slave, stderr=slave, env=env,
            start_new_session=True, preexec_fn=_controlling_terminal,
        )  # fmt: skip
        os.close(slave)
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: the program and every holder of the pty are gone
                return
            if not data:
                return
            text = data.decode("utf-8", "replace")
            with self._lock:
                self.raw.append(text)
                self.screen.feed(text)

    def shows(self, pattern: str) -> re.Match[str] | None:
        """The screen as it is now, searched for ``pattern`` (a regular expression)."""
        with self._lock:
            return re.search(pattern, self.screen.text())

    def wait_for(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout * UNIT
        while True:
            found = self.shows(pattern)
            if found is not None:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not on the screen:\n{self.text()}")
            time.sleep(0.05)

    def text(self) -> str:
        with self._lock:
            return self.screen.text()

    def redraws(self) -> int:
        """How often the program moved to the top left corner (a full-screen redraw)."""
        with self._lock:
            return "".join(self.raw).count("\x1b[H")

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(5)
        os.close(self.master)
