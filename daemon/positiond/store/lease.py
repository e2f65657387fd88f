"""Several daemons on one PostgreSQL database: registration, leases, fencing, host loss.

Each daemon is named by its ``host_id`` (one daemon per name) and holds a row of ``daemons``:

- **Registration** (:func:`register`, at every start): one statement makes the row or bumps its
  ``epoch`` (previous + 1), refused while another daemon's lease for the same name is live
  (unless that daemon registered on this machine and is surely gone: a restart after a kill);
  in the same transaction the host's live sessions become this epoch's. All times are the
  database's ``now()``, never a host's clock.
- **Lease** (:class:`Lease`, a thread with a connection of its own): renewed every third of
  ``lease_ttl``, only while the daemon's event loop shows signs of life (:meth:`Lease.beat`):
  a loop that is stuck does not keep its host's sessions alive. A renewal that finds the lease
  gone (expired, or taken over) makes the daemon *fenced*.
- **Fencing** (:func:`fence_check`, first statement of every batch of the writer): the batch
  commits only if this daemon's row still has its epoch and was not taken over; the row is read
  ``FOR SHARE``, so a takeover (``FOR UPDATE``) and a batch are ordered: a batch either commits
  before the takeover (which then sees it) or finds itself fenced (:class:`Fenced`: nothing
  of it is acknowledged).
- **Host loss** (:meth:`Lease.sweep`): a lease that ran out (``lease_expires < now()``) gets
  its host's RUNNING/STALLED sessions and their ACTIVE legs CRASHED (crash_source ``HOST``,
  revivable), one CRASH event per session and leg, by whichever daemon locks the row first
  (the others find nothing left to do). A daemon judges others only after a whole TTL of
  successful renewals of its own (after the database was away, every lease ran out).
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import psycopg

from positiond import __version__
from positiond.ops import HOST, Batch, CrashOp, Op
from positiond.store.dbfile import DatabaseLocked, Fenced
from positiond.store.pgconn import PgConnection
from positiond.store.writes import apply_batch

__all__ = ["Lease", "application_name", "fence_check", "machine", "register", "release"]

log = logging.getLogger(__name__)

_LIVE = "('RUNNING', 'STALLED')"

_REGISTER = """
INSERT INTO daemons AS d (host_id, epoch, started_at, lease_expires, renewed_at, pid, version,
    machine)
VALUES (%(host)s, 1, now(), now() + make_interval(secs => %(ttl)s), now(), %(pid)s, %(version)s,
    %(machine)s)
ON CONFLICT (host_id) DO UPDATE SET epoch = d.epoch + 1, started_at = now(),
    lease_expires = EXCLUDED.lease_expires, renewed_at = now(), pid = EXCLUDED.pid,
    version = EXCLUDED.version, lost_at = NULL, machine = EXCLUDED.machine
WHERE d.lease_expires <= now() OR d.lost_at IS NOT NULL
RETURNING d.epoch
"""


def register(raw: psycopg.Connection[Any], host: str, ttl: float) -> int:
    """Register ``host`` with a new epoch (previous + 1) and a lease of ``ttl`` seconds; take
    over its live sessions (and those no daemon owns yet) with that epoch; mark ``raw`` as
    the writer of ``host``. Raises :class:`DatabaseLocked` while another daemon's lease for
    ``host`` is live."""
    args = {"host": host, "ttl": ttl, "pid": os.getpid(), "version": __version__,
            "machine": machine()}  # fmt: skip
    with raw.transaction():
        row = raw.execute(_REGISTER, args).fetchone()
        held = None if row is not None else raw.execute(
            "SELECT pid, lease_expires, machine FROM daemons WHERE host_id = %s", (host,)
        ).fetchone()  # fmt: skip
        if held is not None and _dead_here(held[0], held[2]):
            log.warning(
                "the previous positiond of host id %r (pid %s) is gone: taking its lease now",
                host, held[0],
            )  # fmt: skip
            raw.execute(
                "UPDATE daemons SET lease_expires = now() WHERE host_id = %s", (host,)
            )
            row = raw.execute(_REGISTER, args).fetchone()
        if row is None:
            pid, until = held[:2] if held else (None, None)
            raise DatabaseLocked(
                f"another positiond is already running as host id {host!r} (pid {pid} on its "
                f"host; its lease lives until {until}); give this one another --host-id"
            )
        epoch = int(row[0])
        raw.execute(
            f"UPDATE strategy_sessions SET host_id = %s, owner_epoch = %s "
            f"WHERE (host_id = %s OR host_id IS NULL) AND status IN {_LIVE}",
            (host, epoch, host),
        )
    raw.execute(
        "SELECT set_config('positiond.host_id', %s, false), "
        "set_config('positiond.epoch', %s, false)",
        (host, str(epoch)),
    )
    return epoch


def machine() -> str:
    """This machine and its boot: ``<hostname> <boot id>`` (a pid means something only there)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "?"
    return f"{socket.gethostname()} {boot}"


def _dead_here(pid: Any, where: Any) -> bool:
    """Is the daemon that registered as ``pid`` on ``where`` (:func:`machine`) surely gone?
    Only known on this machine: in an earlier boot, or no such process now."""
    if not isinstance(where, str) or pid is None:
        return False
    name, _, boot = where.rpartition(" ")
    here_name, _, here_boot = machine().rpartition(" ")
    if name != here_name or boot == "?" or here_boot == "?":
        return False
    if boot != here_boot:
        return True
    if int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # it exists, as another user
        return False
    return False


def release(raw: psycopg.Connection[Any], host: str, epoch: int) -> None:
    """A clean stop: end the lease now, so that a restart need not wait for it (the sessions
    stay this host's: the next daemon of ``host`` takes them over)."""
    raw.execute(
        "UPDATE daemons SET lease_expires = now() WHERE host_id = %s AND epoch = %s "
        "AND lost_at IS NULL",
        (host, epoch),
    )


def fence_check(host: str, epoch: int) -> Callable[[PgConnection], None]:
    """The first statement of each of the writer's batches: raises :class:`Fenced` unless
    ``host``'s row still has ``epoch`` and was not taken over, and holds it (``FOR SHARE``)
    until the commit: a takeover (``FOR UPDATE``) comes before the batch or after it."""

    def check(conn: PgConnection) -> None:
        row = conn.raw.execute(
            "SELECT epoch, lost_at FROM daemons WHERE host_id = %s FOR SHARE", (host,)
        ).fetchone()
        if row is None or int(row[0]) != epoch or row[1] is not None:
            state = "gone" if row is None else f"now epoch {row[0]}, lost at {row[1]}"
            raise Fenced(
                f"fenced: the lease of host id {host!r} epoch {epoch} is no longer this "
                f"daemon's ({state})"
            )

    return check


class Lease:
    """The lease's thread: renew every ``ttl / 3``, then look for other hosts' lost leases.

    ``connect`` makes its connection (autocommit). :attr:`fenced` is set (a reason) once the
    lease was found gone; the thread then stops renewing.
    """

    def __init__(
        self,
        connect: Callable[[], psycopg.Connection[Any]],
        host: str,
        epoch: int,
        ttl: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host, self.epoch, self.ttl = host, epoch, ttl
        self.fenced: str | None = None
        self.lost_hosts: list[tuple[str, int, float]] = []  # (host, sessions, detected at)
        self._connect = connect
        self._monotonic = monotonic
        self._seen = monotonic()
        # Since when the renewals succeed without a gap: other hosts are judged only after a
        # whole TTL of it (after an outage of the database every lease ran out; each daemon
        # gets a TTL to renew its own before anyone calls it lost).
        self._steady_since: float | None = monotonic()
        self._conn: psycopg.Connection[Any] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="positiond-lease", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def beat(self) -> None:
        """The daemon's event loop is alive (called from it at least every ``ttl / 6``)."""
        self._seen = self._monotonic()

    def alive(self) -> bool:
        """Renew only for a loop seen within two thirds of the TTL: a stuck daemon lets its
        lease run out, and its sessions are then declared lost by another daemon."""
        return self._monotonic() - self._seen < self.ttl * 2 / 3

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.ttl)
        if self._conn is not None:
            self._conn.close()

    def _run(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if self._conn is None or self._conn.closed or self._conn.broken:
                    self._conn = self._connect()
                if not self.alive():
                    log.error(
                        "the daemon's event loop has not run for %.1fs: not renewing the lease "
                        "of host id %r",
                        self._monotonic() - self._seen,
                        self.host,
                    )
                    self._steady_since = None
                    continue
                if self._steady_since is None:  # the first renewal after a gap
                    self._steady_since = self._monotonic()
                if not self.renew(self._conn):
                    self.fenced = (
                        f"the lease of host id {self.host!r} epoch {self.epoch} was lost "
                        "(it expired, or another daemon took it over)"
                    )
                    log.critical("%s: this daemon is fenced", self.fenced)
                    return
                if self._monotonic() - self._steady_since >= self.ttl:
                    self.sweep(self._conn)
            except (psycopg.Error, sqlite3.Error) as exc:
                log.warning("lease of host id %r: %s (retrying)", self.host, exc)
                self._steady_since = None
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None

    def renew(self, raw: psycopg.Connection[Any]) -> bool:
        """Extend the lease by ``ttl`` from the database's now; False if it is gone (another
        daemon took it over, or this host id registered again). A lease that ran out but that
        nobody took over is simply renewed: nobody decided anything in between."""
        row = raw.execute(
            "UPDATE daemons SET lease_expires = now() + make_interval(secs => %s), "
            "renewed_at = now() WHERE host_id = %s AND epoch = %s AND lost_at IS NULL "
            "RETURNING 1",
            (self.ttl, self.host, self.epoch),
        ).fetchone()
        return row is not None

    def sweep(self, raw: psycopg.Connection[Any]) -> int:
        """Crash the live sessions of every other host whose lease ran out; return how many."""
        lost = raw.execute(
            "SELECT d.host_id, d.epoch, d.renewed_at FROM daemons d WHERE d.host_id <> %s "
            "AND d.lease_expires < now() AND EXISTS (SELECT 1 FROM strategy_sessions s "
            f"WHERE s.host_id = d.host_id AND s.status IN {_LIVE})",
            (self.host,),
        ).fetchall()
        total = 0
        for host, epoch, renewed in lost:
            total += self._crash_host(raw, host, int(epoch), renewed)
        return total

    def _crash_host(self, raw: psycopg.Connection[Any], host: str, epoch: int, renewed: Any) -> int:
        keys = [r[0] for r in raw.execute(
            f"SELECT session_key FROM strategy_sessions WHERE host_id = %s AND status IN {_LIVE}",
            (host,),
        )]  # fmt: skip
        when = renewed.isoformat(timespec="milliseconds") if renewed is not None else "?"
        reason = f"host lost: positiond on {host} stopped renewing its lease at {when}"
        now = time.time()
        ops: list[Op] = [
            CrashOp(None, None, k, HOST, reason, now, payload={"host": host}) for k in keys
        ]

        def take(conn: PgConnection) -> None:
            try:  # a frozen daemon's open transaction holds the row: do not wait for it
                conn.raw.execute(
                    "SELECT 1 FROM daemons WHERE host_id = %s FOR UPDATE NOWAIT", (host,)
                )
            except psycopg.errors.LockNotAvailable:
                self._end_frozen(host)
                raise Fenced(f"host id {host!r} still has a transaction open") from None
            row = conn.raw.execute(
                "UPDATE daemons SET lost_at = now() WHERE host_id = %s "
                "AND epoch = %s AND lease_expires < now() AND lost_at IS NULL RETURNING 1",
                (host, epoch),
            ).fetchone()
            if row is None:  # another daemon took it over first, or it registered again
                raise Fenced(f"host id {host!r} taken over already or registered again")

        # Its writer may have frozen inside a transaction holding the one write lock
        # (pgconn.WRITE_LOCK) that this batch takes first: end such transactions now, as a
        # lost host's (nothing in them was acknowledged), rather than wait for them forever.
        self._end_frozen(host)
        conn = PgConnection(raw, on_begin=take)
        try:
            results = apply_batch(cast(sqlite3.Connection, conn), Batch(ops=ops, time=now))
        except Fenced:
            return 0
        crashed = sum(1 for r in results if r.ok and r.data.get("status") == "CRASHED")
        if crashed:
            log.warning("%s: %d session(s) marked CRASHED", reason, crashed)
            self.lost_hosts.append((host, crashed, self._monotonic()))
        return crashed

    def _end_frozen(self, host: str) -> None:
        """End the writer transactions of ``host`` still open after its lease ran out (a
        frozen or cut-off daemon): nothing they hold was acknowledged, and they block the
        takeover. Its writer's connection is named ``positiond:<host>``."""
        with self._connect() as other:
            ended = other.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = %s AND state LIKE 'idle in transaction%%'",
                (application_name(host),),
            ).fetchone()
        if ended and ended[0]:
            log.warning("ended %s open transaction(s) of host id %r", ended[0], host)


def application_name(host: str) -> str:
    """The writer connection's ``application_name``: ``positiond:<host>`` (63 bytes at most)."""
    return f"positiond:{host}".encode()[:63].decode(errors="ignore")
