"""The database schema and its migrations, versioned with ``PRAGMA user_version``.

Table and column names follow the seed design (strategy_sessions, strategy_positions,
position_events) so its queries run verbatim. Allowed statuses and event types live in small
lookup tables referenced by foreign keys: a later version adds a status with an INSERT in a
migration, never by rebuilding or dropping a table.

Timestamps are ISO 8601 text in UTC with milliseconds (``2025-11-28T10:00:22.123Z``): they sort
as text, SQLite's date functions read them, and they mean the same on every machine.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "TYPED_TRAIL_VERSION",
    "SchemaError",
    "is_int",
    "iso",
    "migrate",
    "trail_level_sql",
]


class SchemaError(RuntimeError):
    """The database cannot be used by this version of positiond."""


def iso(ts: float) -> str:
    """Epoch seconds -> the stored timestamp text."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


_V1 = """
CREATE TABLE session_statuses (name TEXT PRIMARY KEY) WITHOUT ROWID;
INSERT INTO session_statuses VALUES ('RUNNING'), ('COMPLETED'), ('CRASHED');

CREATE TABLE position_statuses (name TEXT PRIMARY KEY) WITHOUT ROWID;
INSERT INTO position_statuses VALUES ('ACTIVE'), ('CLOSED'), ('CRASHED');

CREATE TABLE event_types (name TEXT PRIMARY KEY) WITHOUT ROWID;
INSERT INTO event_types VALUES
    ('SESSION_START'), ('SESSION_RESUMED'), ('SESSION_END'), ('REVIVED'),
    ('ENTRY'), ('EXIT'), ('TRAIL_UPDATE'), ('CRASH');

CREATE TABLE strategy_sessions (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    session_key         TEXT NOT NULL UNIQUE,      -- chosen by the client, stable across reconnects
    strategy_name       TEXT NOT NULL,
    status              TEXT NOT NULL REFERENCES session_statuses(name),
    start_time          TEXT NOT NULL,
    end_time            TEXT,
    last_heartbeat      TEXT,
    crash_timestamp     TEXT,
    crash_reason        TEXT,
    crash_source        TEXT,                      -- CLIENT, HEARTBEAT, DISCONNECT, RESTART
    client_host         TEXT,
    client_pid          INTEGER,                   -- as the client reports it
    peer_uid            INTEGER,                   -- from the ipc connection (SO_PEERCRED)
    peer_pid            INTEGER,
    heartbeat_interval  REAL
);
CREATE INDEX strategy_sessions_status ON strategy_sessions(status, strategy_name);

CREATE TABLE strategy_positions (
    position_id       INTEGER PRIMARY KEY AUTOINCREMENT,
    position_key      TEXT NOT NULL UNIQUE,        -- idempotency key, chosen by the client
    session_id        INTEGER NOT NULL REFERENCES strategy_sessions(id),
    symbol            TEXT NOT NULL,
    exchange          TEXT NOT NULL,
    product           TEXT NOT NULL,
    leg_type          TEXT,
    side              TEXT NOT NULL CHECK (side IN ('BUY', 'SELL')),
    quantity          INTEGER NOT NULL CHECK (quantity > 0),
    entry_price       REAL NOT NULL,
    entry_time        TEXT NOT NULL,
    current_price     REAL,
    stop_price        REAL,
    highest_price     REAL,
    last_trail_level  REAL,
    state             TEXT NOT NULL DEFAULT '{}',  -- JSON object: strategy-specific fields
    status            TEXT NOT NULL REFERENCES position_statuses(name),
    was_crashed       BOOLEAN NOT NULL DEFAULT FALSE,
    exit_price        REAL,
    exit_time         TEXT,
    exit_reason       TEXT,
    updated_at        TEXT NOT NULL
);
CREATE INDEX strategy_positions_session ON strategy_positions(session_id, status);
CREATE INDEX strategy_positions_status ON strategy_positions(status);

CREATE TABLE position_events (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    position_id  INTEGER REFERENCES strategy_positions(position_id),  -- NULL: session event
    session_id   INTEGER NOT NULL REFERENCES strategy_sessions(id),
    event_type   TEXT NOT NULL REFERENCES event_types(name),
    event_time   TEXT NOT NULL,
    payload      TEXT NOT NULL DEFAULT '{}'                           -- JSON object
);
CREATE INDEX position_events_position ON position_events(position_id);
CREATE INDEX position_events_session ON position_events(session_id);
"""

# Recovery: statuses and event types of the seed's vocabulary, the review reason, and a table of
# broker positions nobody could explain. Only additions: no table is rebuilt or dropped.
_V2 = """
INSERT INTO position_statuses VALUES
    ('RECOVERED'), ('NEEDS_REVIEW'), ('ORPHANED'), ('MANUAL_EXIT'), ('EXPIRED');
INSERT INTO event_types VALUES
    ('RECOVERY'), ('NEEDS_REVIEW'), ('REQUEUED'), ('FENCED_WRITE'), ('ORPHAN'),
    ('STOP_HIT'), ('ATM_CHANGE');

ALTER TABLE strategy_positions ADD COLUMN review_reason TEXT;

CREATE TABLE broker_orphans (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    detected_at       TEXT NOT NULL,
    symbol            TEXT NOT NULL,
    exchange          TEXT NOT NULL,
    product           TEXT NOT NULL,
    broker_quantity   INTEGER NOT NULL,   -- signed net quantity at the broker
    known_quantity    INTEGER NOT NULL,   -- signed sum of the legs positiond knows there
    status            TEXT NOT NULL DEFAULT 'ORPHANED' REFERENCES position_statuses(name),
    detected_by       TEXT NOT NULL,      -- 'session 42 (expiry_blast)' or 'posctl user@host'
    row               TEXT NOT NULL DEFAULT '{}'   -- the broker's row as it came (JSON)
);
CREATE INDEX broker_orphans_instrument ON broker_orphans(symbol, exchange, product);
"""

# Reliability and security: a session whose main loop stopped making progress is STALLED (not
# crashed); each session's daemon-issued token is kept as a hash only.
_V3 = """
INSERT INTO session_statuses VALUES ('STALLED');
INSERT INTO event_types VALUES ('STALLED'), ('PROGRESS');
ALTER TABLE strategy_sessions ADD COLUMN token_hash TEXT;
ALTER TABLE strategy_sessions ADD COLUMN progress_deadline REAL;
"""

# The trail level comes back as the strategy sent it. last_trail_level is REAL (the seed's
# column, read by its queries as it is), and REAL affinity stores 12 as 12.0; changing its type
# means rebuilding the table. So a flag beside it records that the value was sent as an integer
# (NULL on rows written before version 4: read as stored).
_V4 = """
ALTER TABLE strategy_positions ADD COLUMN last_trail_level_is_int BOOLEAN;
"""

# Orphans an operator resolved: ACKNOWLEDGED (known, leave it), ADOPTED (a named strategy took
# it over), CLOSED (squared off at the broker), with when, who, why. Only additions.
_V5 = """
INSERT INTO position_statuses VALUES ('ACKNOWLEDGED'), ('ADOPTED');
ALTER TABLE broker_orphans ADD COLUMN resolved_at TEXT;
ALTER TABLE broker_orphans ADD COLUMN resolved_by TEXT;
ALTER TABLE broker_orphans ADD COLUMN resolution_reason TEXT;
ALTER TABLE broker_orphans ADD COLUMN adopted_by TEXT;      -- 'expiry_blast' or '... (session 42)'
CREATE INDEX broker_orphans_status ON broker_orphans(status);
"""

# Alerts (docs/PROTOCOL.md, "Alerts"): an outbox written by triggers in the very transaction of
# the verdict that causes the alert (a daemon killed right after the commit still sends it), and
# one delivery row per alert and sink. Each alert snapshots what a manual exit needs (its legs)
# at the moment of the verdict. No foreign keys: pruning sessions and events leaves alerts be.
_V6_LEGS = """
    SELECT coalesce(json_group_array(json_object(
        'position_key', p.position_key, 'symbol', p.symbol, 'exchange', p.exchange,
        'product', p.product, 'side', p.side, 'quantity', p.quantity,
        'entry_price', p.entry_price, 'stop_price', p.stop_price,
        'highest_price', p.highest_price, 'current_price', p.current_price,
        'last_trail_level', CASE WHEN p.last_trail_level_is_int
            AND p.last_trail_level = CAST(p.last_trail_level AS INTEGER)
            THEN CAST(p.last_trail_level AS INTEGER) ELSE p.last_trail_level END,
        'status', p.status)), '[]')
    FROM strategy_positions p
"""
_V6 = f"""
CREATE TABLE alert_outbox (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    alert_id    TEXT NOT NULL UNIQUE,   -- stable id sent to every sink (they dedupe by it)
    kind        TEXT NOT NULL,          -- crashed, not_returned, stalled, revived, ...
    created_at  TEXT NOT NULL,
    event_id    INTEGER,                -- the position_events row that caused it (if any)
    session_id  INTEGER,
    body        TEXT NOT NULL           -- JSON object: strategy, session, reason, legs, detail
);

CREATE TABLE alert_deliveries (
    alert_id      INTEGER NOT NULL,     -- alert_outbox.id
    sink          TEXT NOT NULL,        -- the sink's configured name
    state         TEXT NOT NULL CHECK (state IN ('PENDING', 'DELIVERED', 'FAILED')),
    attempts      INTEGER NOT NULL DEFAULT 0,
    next_attempt  TEXT NOT NULL,
    last_error    TEXT,
    done_at       TEXT,
    PRIMARY KEY (alert_id, sink)
) WITHOUT ROWID;
CREATE INDEX alert_deliveries_due ON alert_deliveries(state, next_attempt);

CREATE TRIGGER alert_on_event AFTER INSERT ON position_events
WHEN NEW.event_type IN ('STALLED', 'REVIVED', 'NEEDS_REVIEW', 'FENCED_WRITE')
    OR (NEW.event_type = 'CRASH' AND NEW.position_id IS NULL)
BEGIN
    INSERT INTO alert_outbox (alert_id, kind, created_at, event_id, session_id, body)
    SELECT lower(hex(randomblob(16))),
        CASE NEW.event_type
            WHEN 'CRASH' THEN CASE json_extract(NEW.payload, '$.source')
                WHEN 'RESTART' THEN 'not_returned' ELSE 'crashed' END
            WHEN 'FENCED_WRITE' THEN 'fenced'
            ELSE lower(NEW.event_type) END,
        NEW.event_time, NEW.id, NEW.session_id,
        json_object(
            'strategy', s.strategy_name, 'session_id', s.id, 'session_key', s.session_key,
            'reason', coalesce(json_extract(NEW.payload, '$.reason'),
                (SELECT review_reason FROM strategy_positions
                 WHERE position_id = NEW.position_id)),
            'source', json_extract(NEW.payload, '$.source'),
            'host', s.client_host, 'pid', s.client_pid,
            'legs', json(CASE
                WHEN NEW.position_id IS NOT NULL THEN ({_V6_LEGS}
                    WHERE p.position_id = NEW.position_id)
                WHEN NEW.event_type = 'CRASH' THEN ({_V6_LEGS}
                    WHERE p.session_id = NEW.session_id AND p.status = 'CRASHED')
                ELSE ({_V6_LEGS}
                    WHERE p.session_id = NEW.session_id AND p.status = 'ACTIVE') END),
            'detail', json(NEW.payload))
    FROM strategy_sessions s WHERE s.id = NEW.session_id;
END;

CREATE TRIGGER alert_on_orphan AFTER INSERT ON broker_orphans
BEGIN
    INSERT INTO alert_outbox (alert_id, kind, created_at, body)
    VALUES (lower(hex(randomblob(16))), 'orphan', NEW.detected_at, json_object(
        'strategy', NULL, 'session_id', NULL, 'reason',
        'broker position positiond cannot explain (detected by ' || NEW.detected_by || ')',
        'legs', json('[]'),
        'orphan', json_object('id', NEW.id, 'symbol', NEW.symbol, 'exchange', NEW.exchange,
            'product', NEW.product, 'broker_quantity', NEW.broker_quantity,
            'known_quantity', NEW.known_quantity)));
END;
"""

# Protective stop orders (docs/PROTECT.md): what a session asked for at its start, and one row
# per protective order positiond planned for a crashed leg. The row is written (PLANNED) before
# the HTTP call that places the order, so a daemon killed in between finds it after a restart
# and reconciles it against the broker's orderbook instead of placing a second one; at most one
# PLANNED or PLACED row per leg (the partial unique index). ``release`` is set when the leg is
# handed back (adopted, revived: CANCEL or KEEP) or resolved closed (CANCEL); the protect worker
# acts on it. Every step is also a PROTECT_* leg event, and those raise alerts.
_V7 = f"""
ALTER TABLE strategy_sessions ADD COLUMN protect BOOLEAN;  -- NULL: follow the config; 0: opted out
INSERT INTO event_types VALUES
    ('PROTECT_PLANNED'), ('PROTECT_PLACED'), ('PROTECT_FAILED'), ('PROTECT_CANCELLED'),
    ('PROTECT_TRIGGERED'), ('PROTECT_SKIPPED'), ('PROTECT_KEPT');

CREATE TABLE protective_orders (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    position_id     INTEGER NOT NULL REFERENCES strategy_positions(position_id),
    session_id      INTEGER NOT NULL,       -- the crashed session whose leg it protects
    crash_event_id  INTEGER NOT NULL UNIQUE,  -- the leg's CRASH event: one plan per crash
    state           TEXT NOT NULL CHECK (state IN ('PLANNED', 'PLACED', 'FAILED', 'SKIPPED',
                        'DRY_RUN', 'CANCELLED', 'TRIGGERED', 'KEPT')),
    mode            TEXT NOT NULL CHECK (mode IN ('on', 'dry-run')),
    symbol          TEXT NOT NULL,
    exchange        TEXT NOT NULL,
    product         TEXT NOT NULL,
    action          TEXT NOT NULL CHECK (action IN ('BUY', 'SELL')),   -- opposite of the leg
    quantity        INTEGER NOT NULL CHECK (quantity > 0),
    pricetype       TEXT NOT NULL CHECK (pricetype IN ('SL-M', 'SL')),
    trigger_price   REAL,                   -- the leg's saved stop (NULL: none, SKIPPED)
    price           REAL,                   -- SL: the limit; SL-M: NULL
    tag             TEXT NOT NULL,          -- OpenAlgo's strategy field
    order_id        TEXT,                   -- the broker's, once known
    planned_at      TEXT NOT NULL,
    placed_at       TEXT,
    updated_at      TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    reason          TEXT,                   -- why FAILED/SKIPPED, or what happened last
    fill_price      REAL,                   -- TRIGGERED: the broker's average fill price
    release         TEXT CHECK (release IN ('CANCEL', 'KEEP')),
    release_session INTEGER                 -- the session the leg was handed to (if any)
);
CREATE UNIQUE INDEX protective_orders_live ON protective_orders(position_id)
    WHERE state IN ('PLANNED', 'PLACED');
CREATE INDEX protective_orders_state ON protective_orders(state);
CREATE INDEX position_events_type ON position_events(event_type, id);

CREATE TRIGGER alert_on_protect AFTER INSERT ON position_events
WHEN NEW.event_type IN ('PROTECT_PLANNED', 'PROTECT_PLACED', 'PROTECT_FAILED',
    'PROTECT_CANCELLED', 'PROTECT_TRIGGERED', 'PROTECT_SKIPPED', 'PROTECT_KEPT')
BEGIN
    INSERT INTO alert_outbox (alert_id, kind, created_at, event_id, session_id, body)
    SELECT lower(hex(randomblob(16))), lower(NEW.event_type), NEW.event_time, NEW.id,
        NEW.session_id,
        json_object(
            'strategy', s.strategy_name, 'session_id', s.id, 'session_key', s.session_key,
            'reason', json_extract(NEW.payload, '$.reason'),
            'host', s.client_host, 'pid', s.client_pid,
            'legs', json(({_V6_LEGS} WHERE p.position_id = NEW.position_id)),
            'detail', json(NEW.payload))
    FROM strategy_sessions s WHERE s.id = NEW.session_id;
END;
"""

# Several daemons on one database (PostgreSQL, positiond.store.lease): each one's registration
# and lease, and which of them owns each session with which epoch. The same tables here so the
# schemas stay the same; SQLite has one daemon per file and leaves them empty (NULL owners).
_V8 = """
CREATE TABLE daemons (
    host_id        TEXT PRIMARY KEY,        -- --host-id: one daemon per name
    epoch          INTEGER NOT NULL,        -- bumped at every start (and after being fenced)
    started_at     TEXT NOT NULL,           -- times from the database's clock, not the hosts'
    lease_expires  TEXT NOT NULL,
    renewed_at     TEXT NOT NULL,
    pid            INTEGER,
    version        TEXT,                    -- positiond's
    lost_at        TEXT,                    -- another daemon found the lease run out
    machine        TEXT                     -- '<hostname> <boot id>' where it registered
) WITHOUT ROWID;
ALTER TABLE strategy_sessions ADD COLUMN host_id TEXT;        -- the owning daemon's
ALTER TABLE strategy_sessions ADD COLUMN owner_epoch INTEGER;  -- and its epoch then
CREATE INDEX strategy_sessions_host ON strategy_sessions(host_id, status);
"""

# Index i holds the script that takes the schema from version i to i + 1.
MIGRATIONS: list[str] = [_V1, _V2, _V3, _V4, _V5, _V6, _V7, _V8]
SCHEMA_VERSION = len(MIGRATIONS)


TYPED_TRAIL_VERSION = 4  # the first schema that knows which trail levels were integers


def is_int(value: object) -> bool | None:
    """The flag stored beside a trail level: was it sent as an integer? (None: no value)"""
    if value is None:
        return None
    return type(value) is int


def trail_level_sql(alias: str, version: int = SCHEMA_VERSION) -> str:
    """``last_trail_level`` in a SELECT, as the strategy sent it: 12 comes back 12, 2.5 and
    12.0 as they were. ``version``: the database's schema (older ones have no flag)."""
    column = f"{alias}.last_trail_level"
    if version < TYPED_TRAIL_VERSION:
        return f"{column} AS last_trail_level"
    whole = f"CAST({column} AS INTEGER)"
    return (
        f"CASE WHEN {alias}.last_trail_level_is_int AND {column} = {whole} THEN {whole} "
        f"ELSE {column} END AS last_trail_level"
    )


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the database to SCHEMA_VERSION, each step in its own transaction; return it."""
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise SchemaError(
            f"database schema version {version} is newer than this positiond knows "
            f"({SCHEMA_VERSION}); upgrade positiond"
        )
    while version < SCHEMA_VERSION:
        script = MIGRATIONS[version]
        # executescript() commits first and runs its own statements; BEGIN inside keeps the
        # step atomic: a crash mid-migration leaves the previous version intact.
        try:
            conn.executescript(
                f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version = {version + 1};\nCOMMIT;"
            )
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        version += 1
    return version
