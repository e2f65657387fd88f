"""systemd's notification protocol (sd_notify), without a library: one datagram per message.

A service of ``Type=notify`` tells systemd how it is doing by sending ``KEY=value`` lines in a
datagram to the ``AF_UNIX`` socket named in ``$NOTIFY_SOCKET`` (a name starting with ``@`` is in
the abstract namespace). Outside systemd the variable is absent and every method is a no-op, so
the daemon calls them unconditionally. Sending never blocks and never raises: losing a status
line must not hurt the daemon; a lost ``WATCHDOG=1`` is covered by the next one.

The watchdog is enabled when ``$WATCHDOG_USEC`` is set (and ``$WATCHDOG_PID``, when present, is
our pid); :attr:`Notifier.watchdog_interval` is then half of it, the rhythm ``sd_notify(3)``
recommends.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

__all__ = ["Notifier", "notify_address"]

log = logging.getLogger(__name__)


def notify_address(value: str | None) -> str | bytes | None:
    """The address to send to for a ``$NOTIFY_SOCKET`` value (None: not under systemd)."""
    if not value:
        return None
    if value.startswith("@"):
        # Abstract namespace: a leading NUL instead of the '@', no file in the filesystem.
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    # systemd ≥ 254 may also pass vsock:... addresses (VMs); positiond runs on the host.
    log.warning("NOTIFY_SOCKET=%r is not a unix socket path; notifications disabled", value)
    return None


class Notifier:
    """Sends notifications to systemd when ``$NOTIFY_SOCKET`` is set; does nothing otherwise."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.address = notify_address(env.get("NOTIFY_SOCKET"))
        self._sock: socket.socket | None = None
        if self.address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)
        self.watchdog_usec = _watchdog_usec(env)
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings (half the timeout), or None without a watchdog."""
        if self.watchdog_usec is None or self._sock is None:
            return None
        return self.watchdog_usec / 2e6

    def send(self, **fields: object) -> bool:
        """Send ``KEY=value`` lines in one datagram; True if it went out."""
        if self._sock is None or self.address is None:
            return False
        lines = []
        for key, value in fields.items():
            # A newline inside a value would start a new assignment: keep STATUS one line.
            lines.append(f"{key}={str(value).replace(chr(10), ' ')}")
        try:
            self._sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:
            if not self._failed:  # say it once, not every watchdog interval
                log.warning("cannot notify systemd at %r: %s", self.address, exc)
                self._failed = True
            return False
        self._failed = False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1: the database is open and the socket accepts connections."""
        if status is None:
            return self.send(READY=1)
        return self.send(READY=1, STATUS=status)

    def status(self, text: str) -> bool:
        """STATUS=: the one-line summary ``systemctl status`` shows."""
        return self.send(STATUS=text)

    def watchdog(self) -> bool:
        """WATCHDOG=1: the daemon is making progress."""
        return self.send(WATCHDOG=1)

    def reloading(self) -> bool:
        """RELOADING=1 (with the MONOTONIC_USEC systemd ≥ 253 expects); READY=1 ends it."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send(RELOADING=1, MONOTONIC_USEC=usec)

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1: shutting down; systemd stops watching the watchdog."""
        if status is None:
            return self.send(STOPPING=1)
        return self.send(STOPPING=1, STATUS=status)

    def extend_timeout(self, seconds: float) -> bool:
        """EXTEND_TIMEOUT_USEC=: the current (stop) timeout now ends ``seconds`` from now."""
        return self.send(EXTEND_TIMEOUT_USEC=int(seconds * 1e6))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    raw = env.get("WATCHDOG_USEC")
    if not raw:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (we were started by one that was watched)
    try:
        usec = int(raw)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", raw)
        return None
    return usec if usec > 0 else None
