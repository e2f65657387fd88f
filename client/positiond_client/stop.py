"""Stopping a strategy on request, and telling a stop from a crash.

A trader who stops a strategy (``systemctl stop``, Ctrl-C, ``kill -TERM``) expects its session
to end ``COMPLETED``, not ``CRASHED``. The rule the session helpers (``pm.session()``) apply
to what ends the ``with`` block:

======================================================  ==========================================
how the block ends                                      the session
======================================================  ==========================================
normally (the loop saw ``pm.stop_requested``)           ``COMPLETED``
``SystemExit`` with code 0 or None (``sys.exit()``)     ``COMPLETED``
:class:`StopRequested` (a second stop signal)           ``COMPLETED``
``KeyboardInterrupt`` / asyncio ``CancelledError``      ``COMPLETED`` if a stop was requested
  (Ctrl-C, ``asyncio.run`` cancelling on SIGINT)        before, else ``CRASHED``
``SystemExit`` with any other code, any other           ``CRASHED`` (``crash_source`` ``CLIENT``)
  exception
the process killed (SIGKILL, an uncaught SIGTERM)       ``CRASHED`` by the daemon (``process
                                                        exited``, ``DISCONNECT``)
======================================================  ==========================================

Why an unrequested ``KeyboardInterrupt`` is a crash: Python raises it wherever the main thread
happens to be — possibly between a broker fill and its ``save_position_entry``. A session
marked ``CRASHED`` sends its open legs through recovery (verified against the broker, then
adopted), which is what a strategy cut at an unknown point needs. Install the handlers to
make Ctrl-C and SIGTERM a clean stop.

With :meth:`StopControl.install` (``pm.install_signal_handlers()``, or
``pm.session(stop_signals=...)``) the first SIGTERM or SIGINT only sets
``pm.stop_requested``: the strategy's loop finishes its step and leaves the ``with`` block at a
safe point. A second one interrupts wherever the strategy is (sync: :class:`StopRequested`
raised in the main thread; asyncio: the task is cancelled, and ``pm.session()`` turns the
cancellation into :class:`StopRequested` once the session is ended) and still ends the
session ``COMPLETED``: the operator insisted. Legs still open stay ``ACTIVE`` and are listed
as open at the end (they are not closed at the broker by stopping the strategy).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable, Iterable
from types import FrameType

__all__ = ["DEFAULT_STOP_SIGNALS", "StopControl", "StopRequested", "ends_cleanly"]

log = logging.getLogger(__name__)

DEFAULT_STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)


class StopRequested(SystemExit):
    """A second stop signal: the operator wants the strategy to stop now, wherever it is.

    A ``SystemExit`` with code 0: ``except Exception`` in strategy code does not swallow it,
    and uncaught it ends the process quietly with exit status 0 (a stop, not a failure, for
    systemd's ``Restart=on-failure``). ``signal`` names the signal.
    """

    def __init__(self, signal_name: str) -> None:
        super().__init__(0)
        self.signal = signal_name

    def __str__(self) -> str:
        return f"stop requested ({self.signal})"


def ends_cleanly(exc: BaseException, stop_requested: bool) -> bool:
    """Whether ``exc`` leaving ``pm.session()`` ends the session COMPLETED (see the table)."""
    if isinstance(exc, StopRequested):
        return True
    if isinstance(exc, SystemExit):
        return exc.code is None or exc.code == 0
    if isinstance(exc, (KeyboardInterrupt, asyncio.CancelledError)):
        return stop_requested
    return False


class StopControl:
    """The stop request of one manager: a flag any thread may set, and signal handlers."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason: str | None = None
        self._listeners: list[Callable[[], None]] = []

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def request(self, reason: str = "requested") -> None:
        """Ask the strategy to stop (idempotent); thread-safe."""
        if self._event.is_set():
            return
        self.reason = reason
        self._event.set()
        for fn in list(self._listeners):
            fn()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a stop is requested (True) or ``timeout`` passes (False)."""
        return self._event.wait(timeout)

    def add_listener(self, fn: Callable[[], None]) -> None:
        self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[], None]) -> None:
        if fn in self._listeners:
            self._listeners.remove(fn)

    def install(self, signals: Iterable[int] = DEFAULT_STOP_SIGNALS) -> Callable[[], None]:
        """Handle ``signals`` in the main thread: first a stop request, then StopRequested.

        Returns a function restoring the previous handlers.
        """
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("signal handlers can only be installed from the main thread")

        def handler(signum: int, frame: FrameType | None) -> None:
            name = signal.Signals(signum).name
            if not self.requested:
                log.warning(
                    "%s: stop requested; the strategy stops at its next check of "
                    "pm.stop_requested (send it again to interrupt it at once)",
                    name,
                )
                self.request(name)
            else:
                log.warning("%s again: interrupting the strategy now", name)
                raise StopRequested(name)

        previous = {int(s): signal.signal(s, handler) for s in signals}

        def restore() -> None:
            for s, old in previous.items():
                signal.signal(s, old)

        return restore

    def install_async(
        self,
        loop: asyncio.AbstractEventLoop,
        task: asyncio.Task[object] | None,
        signals: Iterable[int] = DEFAULT_STOP_SIGNALS,
    ) -> Callable[[], None]:
        """The asyncio twin: the loop's signal handlers; a second signal cancels ``task``."""
        installed = [int(s) for s in signals]

        def handler(signum: int) -> None:
            name = signal.Signals(signum).name
            if not self.requested:
                log.warning("%s: stop requested (send it again to cancel the strategy)", name)
                self.request(name)
            else:
                log.warning("%s again: cancelling the strategy now", name)
                if task is not None:
                    task.cancel(f"stop requested ({name})")

        for s in installed:
            loop.add_signal_handler(s, handler, s)

        def restore() -> None:
            for s in installed:
                loop.remove_signal_handler(s)

        return restore
