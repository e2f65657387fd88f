"""The daemon's listening side: revoked CURVE keys, unsafe socket directories, a deleted socket
file, and more connections than file descriptors. Real daemon processes, real sockets."""

from __future__ import annotations

import signal
from pathlib import Path

import zmq
import zmq.auth

from positiond_client import PositionPersistenceManager
from tests.helpers import DaemonProcess, rows, session_status, wait_for


def _curve_daemon(workdir: Path) -> tuple[DaemonProcess, Path, Path, str]:
    keys, allowed = workdir / "keys", workdir / "allowed"
    keys.mkdir()
    allowed.mkdir()
    for name in ("server", "alice", "bob"):
        zmq.auth.create_certificates(keys, name)
        if name != "server":
            (allowed / f"{name}.key").write_bytes((keys / f"{name}.key").read_bytes())
    daemon = DaemonProcess(
        workdir,
        "--flush-interval",
        "0.05",
        "--curve-secret-key",
        str(keys / "server.key_secret"),
        "--curve-clients",
        str(allowed),
        heartbeat_timeout=1.0,
    )
    daemon.endpoint = "tcp://127.0.0.1:*"
    daemon.args[daemon.args.index("--endpoint") + 1] = daemon.endpoint
    daemon.start()
    line = next(x for x in daemon.output().splitlines() if "positiond ready" in x)
    return daemon, keys, allowed, line.rsplit("endpoint ", 1)[1].strip()


def _manager(
    name: str, endpoint: str, keys: Path, ack_timeout: float = 5
) -> PositionPersistenceManager:
    return PositionPersistenceManager(
        name,
        endpoint=endpoint,
        ack_timeout=ack_timeout,
        curve_server_key=keys / "server.key",
        curve_client_cert=keys / f"{name}.key_secret",
    )


def test_sighup_revokes_a_removed_curve_key_at_once(workdir: Path) -> None:
    daemon, keys, allowed, endpoint = _curve_daemon(workdir)
    alice = _manager("alice", endpoint, keys)
    managers = [alice]
    try:
        sid = alice.start_session()
        assert sid is not None
        assert alice.save_position_entry(symbol="X", entry_price=1.0, quantity=1) is not None

        (allowed / "alice.key").unlink()
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload: " in daemon.output(), 5, "the reload")
        # A new connection with her key is refused at the handshake...
        again = _manager("alice", endpoint, keys, ack_timeout=0.5)
        managers.append(again)
        assert again.start_session() is None
        # ...and her live connection is gone and cannot come back: the session goes silent and
        # is declared CRASHED (its leg stays recoverable).
        wait_for(lambda: session_status(daemon.db, sid) == "CRASHED", 10, "the crash verdict")
        assert "1 connection(s) of removed keys dropped" in daemon.output()
        # Another client's key still works.
        bob = _manager("bob", endpoint, keys)
        managers.append(bob)
        assert bob.start_session() is not None
        names = {r["strategy_name"] for r in rows(daemon.db, "SELECT * FROM strategy_sessions")}
        assert names == {"alice", "bob"}
        assert len(rows(daemon.db, "SELECT * FROM strategy_sessions")) == 2
    finally:
        for pm in managers:
            pm.close(0)
        daemon.stop()
