"""The seed-style baseline: in-process persistence through the SQLAlchemy ORM, as the seed's
reference implementation wrote it (``pip install -e '.[bench]'``).

A ``scoped_session`` over ``create_engine("sqlite:///...")`` with SQLAlchemy's defaults (SQLite's
rollback journal, ``synchronous=FULL``: what an application gets without tuning). Per entry: one
``StrategyPosition`` row and one ``PositionEvent`` row, then ``commit()``, in the strategy's own
thread. Updates go to a list under a lock; ``flush()`` writes them with one ORM bulk UPDATE and
a commit, inline in the caller's thread.
"""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import ForeignKey, String, Text, create_engine, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, scoped_session, sessionmaker

__all__ = ["OrmSeedStore"]


class _Base(DeclarativeBase):
    pass


class StrategySession(_Base):
    __tablename__ = "strategy_sessions"
    id: Mapped[int] = mapped_column(primary_key=True)
    strategy_name: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(20), default="RUNNING")
    start_time: Mapped[datetime]
    end_time: Mapped[datetime | None]
    last_heartbeat: Mapped[datetime | None]
    crash_timestamp: Mapped[datetime | None]
    crash_reason: Mapped[str | None] = mapped_column(Text)


class StrategyPosition(_Base):
    __tablename__ = "strategy_positions"
    position_id: Mapped[int] = mapped_column(primary_key=True)
    position_key: Mapped[str] = mapped_column(String(100), unique=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("strategy_sessions.id"), index=True)
    symbol: Mapped[str] = mapped_column(String(50))
    exchange: Mapped[str] = mapped_column(String(10))
    product: Mapped[str] = mapped_column(String(10))
    leg_type: Mapped[str | None] = mapped_column(String(10))
    side: Mapped[str] = mapped_column(String(4))
    quantity: Mapped[int]
    entry_price: Mapped[float]
    entry_time: Mapped[datetime]
    current_price: Mapped[float | None]
    stop_price: Mapped[float | None]
    highest_price: Mapped[float | None]
    last_trail_level: Mapped[float | None]
    status: Mapped[str] = mapped_column(String(20), default="ACTIVE")
    was_crashed: Mapped[bool] = mapped_column(default=False)
    exit_price: Mapped[float | None]
    exit_time: Mapped[datetime | None]
    exit_reason: Mapped[str | None] = mapped_column(String(50))
    updated_at: Mapped[datetime]


class PositionEvent(_Base):
    __tablename__ = "position_events"
    id: Mapped[int] = mapped_column(primary_key=True)
    position_id: Mapped[int | None] = mapped_column(ForeignKey("strategy_positions.position_id"))
    session_id: Mapped[int] = mapped_column(ForeignKey("strategy_sessions.id"))
    event_type: Mapped[str] = mapped_column(String(20))
    event_time: Mapped[datetime]
    payload: Mapped[str] = mapped_column(Text, default="{}")


def _now() -> datetime:
    return datetime.now(UTC)


class OrmSeedStore:
    """The seed's PositionPersistenceManager writes, in the caller's process and thread."""

    def __init__(self, path: Path) -> None:
        self.engine = create_engine(f"sqlite:///{path}")
        _Base.metadata.create_all(self.engine)
        self.db = scoped_session(sessionmaker(bind=self.engine, autoflush=False))
        session = StrategySession(strategy_name="bench-seed", start_time=_now())
        self.db.add(session)
        self.db.commit()
        self.session_id = session.id
        self._lock = threading.Lock()
        self._queue: list[dict[str, Any]] = []
        self._ids: dict[str, int] = {}

    def save_position_entry(
        self,
        key: str,
        symbol: str,
        leg_type: str | None,
        entry_price: float,
        stop_price: float | None,
        quantity: int,
    ) -> int:
        """One position row + one ENTRY event + commit: the seed's durable entry."""
        now = _now()
        try:
            position = StrategyPosition(
                position_key=key, session_id=self.session_id, symbol=symbol, exchange="NFO",
                product="MIS", leg_type=leg_type, side="BUY", quantity=quantity,
                entry_price=entry_price, entry_time=now, current_price=entry_price,
                stop_price=stop_price, highest_price=entry_price, updated_at=now,
            )  # fmt: skip
            self.db.add(position)
            self.db.flush()  # INSERT now: the event row needs the position's id
            position_id = position.position_id
            payload = {
                "symbol": symbol,
                "leg_type": leg_type,
                "entry_price": entry_price,
                "stop_price": stop_price,
                "quantity": quantity,
            }
            self.db.add(
                PositionEvent(
                    position_id=position_id,
                    session_id=self.session_id,
                    event_type="ENTRY",
                    event_time=now,
                    payload=json.dumps(payload),
                )
            )
            self.db.commit()
        except BaseException:
            self.db.rollback()
            raise
        self._ids[key] = position_id
        return position_id

    def queue_position_update(
        self, key: str, current_price: float, stop_price: float, highest_price: float
    ) -> None:
        """The seed's update: append under a lock (the flush is the caller's business)."""
        item = {
            "position_id": self._ids[key],
            "current_price": current_price,
            "stop_price": stop_price,
            "highest_price": highest_price,
            "updated_at": _now(),
        }
        with self._lock:
            self._queue.append(item)

    def flush(self) -> int:
        """Inline flush in the caller's thread: one ORM bulk UPDATE by primary key + commit."""
        with self._lock:
            queue, self._queue = self._queue, []
        if queue:
            try:
                self.db.execute(update(StrategyPosition), queue)
                self.db.commit()
            except BaseException:
                self.db.rollback()
                raise
        return len(queue)

    def read_leg(self, key: str) -> tuple[Any, ...] | None:
        row = self.db.execute(
            select(
                StrategyPosition.current_price,
                StrategyPosition.stop_price,
                StrategyPosition.highest_price,
            ).where(StrategyPosition.position_key == key)
        ).first()
        self.db.commit()
        return None if row is None else tuple(row)

    def close(self) -> None:
        self.db.remove()
        self.engine.dispose()
