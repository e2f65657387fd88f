"""What the engine keeps in memory about the live world: sessions, their open legs, the peers.

Plain records, no behaviour beyond the token check: :class:`~positiond.engine.Engine` owns and
changes them; :class:`~positiond.writequeue.WriteQueue` reads and moves legs' stop and trail
level when it makes trail events.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field

from positiond.ops import EntryOp, token_hash

__all__ = ["Leg", "Peer", "Session"]


@dataclass(slots=True)
class Session:
    key: str
    strategy: str
    id: int | None = None
    confirmed: bool = False  # its start (or resume) has committed
    rid: bytes | None = None
    legs: set[str] = field(default_factory=set)
    token: str | None = None  # every message must carry it
    token_hash: str | None = None  # loaded from the database until the token is seen again
    last_wall: float = 0.0  # wall time of its latest message (for the crash reason)

    def authentic(self, token: object) -> bool:
        """Does the message's token prove it comes from the session's own client?"""
        if self.token is not None:
            return isinstance(token, str) and hmac.compare_digest(token, self.token)
        if self.token_hash is not None:
            if not isinstance(token, str) or not hmac.compare_digest(
                self.token_hash, token_hash(token)
            ):
                return False
            self.token = token  # verified once: compare plainly from now on
        return True  # a session from before tokens existed


@dataclass(slots=True)
class Leg:
    key: str
    session_key: str
    stop_price: float | None = None
    last_trail_level: float | None = None
    pending_entry: EntryOp | None = None  # set until the entry commits


@dataclass(slots=True)
class Peer:
    rid: bytes
    fd: int = -1
    uid: int | None = None
    pid: int | None = None
    sessions: set[str] = field(default_factory=set)
