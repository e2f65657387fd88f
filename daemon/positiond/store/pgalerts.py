"""The alert triggers on PostgreSQL: SQLite's ``alert_on_event``, ``alert_on_orphan`` and
``alert_on_protect`` (:mod:`positiond.store.schema`, steps 6 and 7) in PL/pgSQL.

As on SQLite, the outbox row is written by a trigger in the very transaction of the verdict
that causes it: a daemon killed right after the COMMIT still sends the alert, and a verdict
rolled back leaves none. Same kinds, same body (the same keys in the same order, the legs
snapshotted at the verdict in ``position_id`` order, the trail level as the strategy sent it),
so the delivery worker and ``posctl alerts`` read the same rows on both backends
(tests/test_alert_delivery.py compares the bodies).

Not a schema step: :func:`install` replaces the functions and triggers whenever the store
opens or migrates (:func:`positiond.store.postgres.migrate`), under the migration lock, so a
newer positiond brings its own version of them. ``gen_random_uuid()``: PostgreSQL 13 or later.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BARRIER", "OUTBOX_LOCK", "TRIGGERS", "install"]

# A double as SQLite's json_object writes it: a whole one keeps its ".0" (100.0, not 100), so
# a consumer sees the same JSON types from both backends.
_REAL = """
CREATE OR REPLACE FUNCTION positiond_alert_real(x DOUBLE PRECISION)
RETURNS json LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN x = trunc(x) AND abs(x) < 1e15 THEN ((x::bigint)::text || '.0')::json
        ELSE to_json(x) END
$$;
"""

_LEGS = """
CREATE OR REPLACE FUNCTION positiond_alert_legs(pos BIGINT, sess BIGINT, want TEXT)
RETURNS json LANGUAGE sql STABLE AS $$
    SELECT coalesce(json_agg(json_build_object(
        'position_key', p.position_key, 'symbol', p.symbol, 'exchange', p.exchange,
        'product', p.product, 'side', p.side, 'quantity', p.quantity,
        'entry_price', positiond_alert_real(p.entry_price),
        'stop_price', positiond_alert_real(p.stop_price),
        'highest_price', positiond_alert_real(p.highest_price),
        'current_price', positiond_alert_real(p.current_price),
        'last_trail_level', CASE WHEN p.last_trail_level_is_int
            AND p.last_trail_level = trunc(p.last_trail_level)
            AND abs(p.last_trail_level) < 9.2e18
            THEN to_json(p.last_trail_level::bigint)
            ELSE positiond_alert_real(p.last_trail_level) END,
        'status', p.status) ORDER BY p.position_id), '[]'::json)
    FROM strategy_positions p
    WHERE CASE WHEN pos IS NOT NULL THEN p.position_id = pos
        ELSE p.session_id = sess AND p.status = want END
$$;
"""

# A payload's field as SQLite's json_extract gives it to json_object: JSON null is SQL NULL.
_FIELD = "nullif(NEW.payload::jsonb -> '{0}', 'null'::jsonb)"

_ON_EVENT = f"""
CREATE OR REPLACE FUNCTION positiond_alert_on_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO alert_outbox (alert_id, kind, created_at, event_id, session_id, body)
    SELECT replace(gen_random_uuid()::text, '-', ''),
        CASE NEW.event_type
            WHEN 'CRASH' THEN CASE NEW.payload::jsonb ->> 'source'
                WHEN 'RESTART' THEN 'not_returned' ELSE 'crashed' END
            WHEN 'FENCED_WRITE' THEN 'fenced'
            ELSE lower(NEW.event_type) END,
        NEW.event_time, NEW.id, NEW.session_id,
        json_build_object(
            'strategy', s.strategy_name, 'session_id', s.id, 'session_key', s.session_key,
            'reason', coalesce({_FIELD.format("reason")},
                to_jsonb((SELECT review_reason FROM strategy_positions
                          WHERE position_id = NEW.position_id))),
            'source', {_FIELD.format("source")},
            'host', s.client_host, 'pid', s.client_pid,
            'legs', CASE
                WHEN NEW.position_id IS NOT NULL
                    THEN positiond_alert_legs(NEW.position_id, NULL, NULL)
                WHEN NEW.event_type = 'CRASH'
                    THEN positiond_alert_legs(NULL, NEW.session_id, 'CRASHED')
                ELSE positiond_alert_legs(NULL, NEW.session_id, 'ACTIVE') END,
            'detail', NEW.payload::json)::text
    FROM strategy_sessions s WHERE s.id = NEW.session_id;
    RETURN NULL;
END
$$;
"""

_ON_ORPHAN = """
CREATE OR REPLACE FUNCTION positiond_alert_on_orphan() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO alert_outbox (alert_id, kind, created_at, body)
    VALUES (replace(gen_random_uuid()::text, '-', ''), 'orphan', NEW.detected_at,
        json_build_object(
            'strategy', NULL, 'session_id', NULL, 'reason',
            'broker position positiond cannot explain (detected by ' || NEW.detected_by || ')',
            'legs', '[]'::json,
            'orphan', json_build_object('id', NEW.id, 'symbol', NEW.symbol,
                'exchange', NEW.exchange, 'product', NEW.product,
                'broker_quantity', NEW.broker_quantity,
                'known_quantity', NEW.known_quantity))::text);
    RETURN NULL;
END
$$;
"""

_ON_PROTECT = f"""
CREATE OR REPLACE FUNCTION positiond_alert_on_protect() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO alert_outbox (alert_id, kind, created_at, event_id, session_id, body)
    SELECT replace(gen_random_uuid()::text, '-', ''), lower(NEW.event_type), NEW.event_time,
        NEW.id, NEW.session_id,
        json_build_object(
            'strategy', s.strategy_name, 'session_id', s.id, 'session_key', s.session_key,
            'reason', {_FIELD.format("reason")},
            'host', s.client_host, 'pid', s.client_pid,
            'legs', positiond_alert_legs(NEW.position_id, NULL, NULL),
            'detail', NEW.payload::json)::text
    FROM strategy_sessions s WHERE s.id = NEW.session_id;
    RETURN NULL;
END
$$;
"""

# DROP + CREATE (not CREATE OR REPLACE TRIGGER, PostgreSQL 14+), in the caller's transaction.
_BIND = """
DROP TRIGGER IF EXISTS alert_on_event ON position_events;
CREATE TRIGGER alert_on_event AFTER INSERT ON position_events FOR EACH ROW
WHEN (NEW.event_type IN ('STALLED', 'REVIVED', 'NEEDS_REVIEW', 'FENCED_WRITE')
    OR (NEW.event_type = 'CRASH' AND NEW.position_id IS NULL))
EXECUTE FUNCTION positiond_alert_on_event();

DROP TRIGGER IF EXISTS alert_on_orphan ON broker_orphans;
CREATE TRIGGER alert_on_orphan AFTER INSERT ON broker_orphans FOR EACH ROW
EXECUTE FUNCTION positiond_alert_on_orphan();

DROP TRIGGER IF EXISTS alert_on_protect ON position_events;
CREATE TRIGGER alert_on_protect AFTER INSERT ON position_events FOR EACH ROW
WHEN (NEW.event_type IN ('PROTECT_PLANNED', 'PROTECT_PLACED', 'PROTECT_FAILED',
    'PROTECT_CANCELLED', 'PROTECT_TRIGGERED', 'PROTECT_SKIPPED', 'PROTECT_KEPT'))
EXECUTE FUNCTION positiond_alert_on_protect();
"""

# Outbox ids are taken at INSERT but seen at COMMIT: on PostgreSQL two transactions can commit
# out of id order (the writer's verdict and the reconciliation's drift), and a reader that went
# past a later id would never see the earlier one. Every transaction that writes the outbox holds
# this lock shared until it commits; the delivery worker takes it exclusively for the moment of
# its read (:func:`positiond.alerts.outbox.enqueue`), so it reads only once every outbox row with
# a smaller id is committed (or rolled back).
OUTBOX_LOCK = 0x706F7364 + 2  # positiond.store.pgschema.LOCK_ID + 2 (+1: the migrations)
BARRIER = f"SELECT pg_advisory_xact_lock({OUTBOX_LOCK})"

_SHARED = f"""
CREATE OR REPLACE FUNCTION positiond_outbox_writer() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared({OUTBOX_LOCK});
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS outbox_writer ON alert_outbox;
CREATE TRIGGER outbox_writer BEFORE INSERT ON alert_outbox FOR EACH STATEMENT
EXECUTE FUNCTION positiond_outbox_writer();
"""

TRIGGERS = _SHARED + _REAL + _LEGS + _ON_EVENT + _ON_ORPHAN + _ON_PROTECT + _BIND


def install(conn: Any) -> None:
    """(Re)create the alert functions and triggers on a psycopg connection, inside the
    caller's transaction (the schema must be at version 7 at least)."""
    conn.execute(TRIGGERS.encode())
