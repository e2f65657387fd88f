"""positiond_client: what a strategy imports to persist its positions through positiond.

::

    from positiond_client import PositionPersistenceManager

    pm = PositionPersistenceManager(strategy_name="expiry_blast")
    pm.start_session()
    leg = pm.save_position_entry(symbol="NIFTY28NOV2524000CE", leg_type="CE",
                                 entry_price=100.0, stop_price=90.0, quantity=75)
    pm.queue_position_update(leg, current_price=104.0, stop_price=95.0)
    pm.save_position_exit(leg, exit_price=95.0, exit_reason="STOP_HIT")
    pm.end_session()

The wire protocol is in :mod:`positiond_client.protocol` and docs/PROTOCOL.md.
"""

from positiond_client.core import ClientStatus, Leg
from positiond_client.errors import (
    LegError,
    PositiondError,
    ProtocolError,
    SessionError,
    StorageError,
    UnavailableError,
)
from positiond_client.handles import Protection
from positiond_client.manager import AsyncPositionPersistenceManager, PositionPersistenceManager
from positiond_client.pending import Delivery
from positiond_client.recovery import (
    CLOSED_AT_BROKER,
    MISMATCH,
    RESUME,
    CrashedLeg,
    Orphan,
    Verdict,
    VerificationReport,
    verify_positions,
)
from positiond_client.stop import StopRequested

__all__ = [
    "CLOSED_AT_BROKER",
    "MISMATCH",
    "RESUME",
    "AsyncPositionPersistenceManager",
    "ClientStatus",
    "CrashedLeg",
    "Delivery",
    "Leg",
    "LegError",
    "Orphan",
    "PositionPersistenceManager",
    "PositiondError",
    "Protection",
    "ProtocolError",
    "SessionError",
    "StopRequested",
    "StorageError",
    "UnavailableError",
    "Verdict",
    "VerificationReport",
    "__version__",
    "verify_positions",
]

__version__ = "0.1.0"
