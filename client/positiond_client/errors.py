"""The one exception tree of positiond, shared by the daemon's replies and the client.

::

    PositiondError                 code: every error has a wire code (docs/PROTOCOL.md)
    ├── ProtocolError              the message itself is wrong (BAD_MESSAGE, BAD_FIELD, ...)
    ├── SessionError               UNKNOWN_SESSION, SESSION_CLOSED, NO_SESSION, BAD_TOKEN
    ├── LegError                   UNKNOWN_LEG, LEG_CLOSED, KEY_CONFLICT, FENCED, BAD_STATE
    ├── StorageError               STORAGE: the daemon could not commit (nothing was acked)
    └── UnavailableError           UNAVAILABLE: a read got no answer (raised by the client)

``ProtocolError`` is also a ``ValueError``: a strategy that passes a NaN price or a negative
quantity gets the exception it would expect from any Python API.
"""

from __future__ import annotations

__all__ = [
    "CODES",
    "LegError",
    "PositiondError",
    "ProtocolError",
    "SessionError",
    "StorageError",
    "UnavailableError",
    "error_for",
]

# Every error code the daemon can answer with, and what it means. docs/PROTOCOL.md mirrors this.
CODES: dict[str, str] = {
    "BAD_MESSAGE": "not a JSON object, or not decodable",
    "BAD_VERSION": "unsupported protocol version",
    "BAD_TYPE": "unknown message type",
    "BAD_FIELD": "a field is missing, unknown, of the wrong type or out of its limits",
    "BAD_FRAMES": "a message must be exactly one frame",
    "NO_SESSION": "the message names no session this connection may write to",
    "UNKNOWN_SESSION": "no session with this key exists",
    "BAD_TOKEN": "the message's token is not the one the daemon issued for this session",
    "SESSION_CLOSED": "the session ended or crashed by its own report; start a new one",
    "UNKNOWN_LEG": "no leg with this key exists",
    "LEG_CLOSED": "the leg is no longer open",
    "KEY_CONFLICT": "the position key already belongs to another session's leg",
    "FENCED": "the leg now belongs to another session",
    "BAD_STATE": "the leg's status does not allow this (e.g. adopting a leg that is not CRASHED)",
    "UNKNOWN_ORPHAN": "no recorded orphan with this id exists",
    "NOT_WATCHING": "this connection is no watcher (any more): send watch again",
    "STORAGE": "the daemon could not write to its database; nothing was committed",
    "INTERNAL": "an unexpected error in the daemon",
    "BUSY": "the daemon is at its connection limit: this connection is refused and closed",
    # Raised by the client only, never sent: a read could not be answered.
    "UNAVAILABLE": "the daemon did not answer in time (a read cannot fall back to anything)",
}


class PositiondError(Exception):
    """Base of every positiond error; ``code`` is the wire error code."""

    code: str = "INTERNAL"
    # The ``seq`` of the message this error answers, when known.
    seq: int | None = None

    def __init__(self, reason: str, code: str | None = None) -> None:
        super().__init__(reason)
        if code is not None:
            self.code = code
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.code}: {self.reason}"


class ProtocolError(PositiondError, ValueError):
    """A message or an argument breaks the protocol's rules."""

    code = "BAD_FIELD"


class SessionError(PositiondError):
    """The session is unknown, closed, or not this connection's."""

    code = "UNKNOWN_SESSION"


class LegError(PositiondError):
    """The leg is unknown, closed, taken by another session, or its key is taken."""

    code = "UNKNOWN_LEG"


class UnavailableError(PositiondError):
    """The daemon did not answer a read (e.g. the crashed-legs query) in time.

    Writes never raise this (they stay in the outbox); a read must, or "no answer" would look
    like "no crashed legs" and a strategy would enter its positions a second time.
    """

    code = "UNAVAILABLE"


class StorageError(PositiondError):
    """The daemon could not commit; the message was not acknowledged."""

    code = "STORAGE"


_CLASS_BY_CODE: dict[str, type[PositiondError]] = {
    "BAD_MESSAGE": ProtocolError,
    "BAD_VERSION": ProtocolError,
    "BAD_TYPE": ProtocolError,
    "BAD_FIELD": ProtocolError,
    "BAD_FRAMES": ProtocolError,
    "NO_SESSION": SessionError,
    "UNKNOWN_SESSION": SessionError,
    "BAD_TOKEN": SessionError,
    "SESSION_CLOSED": SessionError,
    "UNKNOWN_LEG": LegError,
    "LEG_CLOSED": LegError,
    "KEY_CONFLICT": LegError,
    "FENCED": LegError,
    "BAD_STATE": LegError,
    "UNKNOWN_ORPHAN": LegError,
    "STORAGE": StorageError,
}


def error_for(code: str, reason: str) -> PositiondError:
    """Build the exception that matches a wire error code."""
    cls = _CLASS_BY_CODE.get(code, PositiondError)
    return cls(reason, code)
