"""The daemon's listening side: revoked CURVE keys, unsafe socket directories, a deleted socket
file (the connection limit: test_connections.py). Real daemon processes, real sockets."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import zmq
import zmq.auth
from hypothesis import given, settings
from hypothesis import strategies as st

from positiond_client import PositionPersistenceManager
from positiond_client.paths import socket_owner_warning, unsafe_socket_directory
from tests.helpers import UNIT, DaemonProcess, rows, session_status, wait_for
from tests.test_service import activated


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


# ---- the socket's directory ---------------------------------------------------------------


def _run_daemon(workdir: Path, endpoint: str) -> subprocess.CompletedProcess[str]:
    """Start a daemon on ``endpoint``; a refused one exits at once, an accepted one is stopped."""
    proc = DaemonProcess(workdir)
    proc.args[proc.args.index("--endpoint") + 1] = endpoint
    out = open(workdir / "run.log", "wb")  # noqa: SIM115 -- owned by the child
    child = subprocess.Popen(proc.args, stdout=out, stderr=out)
    out.close()

    def outcome() -> bool:
        text = (workdir / "run.log").read_text()
        return child.poll() is not None or "positiond ready" in text

    wait_for(outcome, 10, "the daemon to refuse or start")
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
    child.wait(10 * UNIT)
    return subprocess.CompletedProcess(
        proc.args, child.returncode, (workdir / "run.log").read_text()
    )


@pytest.mark.parametrize(
    ("layout", "socket_in"),
    [
        ({"open": 0o1777}, "open"),  # like /tmp itself: sticky, but the name is free to take
        ({"open": 0o0777}, "open"),
        ({"shared": 0o0770}, "shared"),
        ({"open": 0o0777, "open/mine": 0o0700}, "open/mine"),  # anyone can rename "mine"
    ],
)
def test_daemon_refuses_a_socket_other_users_could_take_over(
    workdir: Path, layout: dict[str, int], socket_in: str
) -> None:
    for name, mode in layout.items():
        (workdir / name).mkdir()
        (workdir / name).chmod(mode)
    result = _run_daemon(workdir, f"ipc://{workdir / socket_in}/pd.sock")
    assert result.returncode == 2, result.stdout
    assert "writable by other users" in result.stdout
    assert not (workdir / socket_in / "pd.sock").exists()


def test_daemon_accepts_a_private_directory_below_a_sticky_one(workdir: Path) -> None:
    (workdir / "tmp").mkdir()
    (workdir / "tmp").chmod(0o1777)
    (workdir / "tmp" / "mine").mkdir(mode=0o700)
    result = _run_daemon(workdir, f"ipc://{workdir}/tmp/mine/pd.sock")
    assert result.returncode == 0, result.stdout
    assert "positiond ready" in result.stdout


def test_unsafe_socket_directory_applies_the_ssh_rule(workdir: Path) -> None:
    (workdir / "a").mkdir(mode=0o700)
    assert unsafe_socket_directory(workdir / "a" / "x.sock") is None
    (workdir / "a").chmod(0o1733)
    assert "writable by other users" in str(unsafe_socket_directory(workdir / "a" / "x.sock"))
    (workdir / "a" / "b").mkdir(mode=0o755)
    assert unsafe_socket_directory(workdir / "a" / "b" / "x.sock") is None  # sticky parent
    (workdir / "a").chmod(0o733)
    assert "writable" in str(unsafe_socket_directory(workdir / "a" / "b" / "x.sock"))
    # A foreign owner anywhere on the way is refused.
    if os.geteuid() == 0:
        (workdir / "c").mkdir(mode=0o755)
        os.chown(workdir / "c", 4242, 4242)
        assert "belongs to uid 4242" in str(unsafe_socket_directory(workdir / "c" / "x.sock"))
    else:
        other = os.getuid() + 4242
        assert "belongs to uid" in str(unsafe_socket_directory(workdir / "x.sock", other))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a socket of another user")
def test_client_warns_about_a_socket_of_another_user(
    workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The attack of the issue: another user binds the name while the daemon is stopped."""
    workdir.chmod(0o755)  # let the other user reach the open directory
    (workdir / "open").mkdir()
    (workdir / "open").chmod(0o1777)
    path = workdir / "open" / "pd.sock"
    nobody = 65534
    code = (
        f"import os, socket, sys; os.setgid({nobody}); os.setuid({nobody}); "
        "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(); "
        "print('bound', flush=True); sys.stdin.read()"
    )
    thief = subprocess.Popen(
        [sys.executable, "-c", code, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert thief.stdout is not None and thief.stdout.readline().strip() == "bound"
        with caplog.at_level(logging.WARNING, logger="positiond_client"):
            pm = PositionPersistenceManager("victim", endpoint=f"ipc://{path}", ack_timeout=0.2)
            pm.close(0)
        warned = [
            r.getMessage() for r in caplog.records if "belongs to uid 65534" in r.getMessage()
        ]
        assert warned, caplog.text
        assert socket_owner_warning(f"ipc://{path}", {"POSITIOND_DAEMON_USER": "65534"}) is not None
        (workdir / "open").chmod(0o755)  # a safe directory, and the daemon user named: quiet
        assert socket_owner_warning(f"ipc://{path}", {"POSITIOND_DAEMON_USER": "65534"}) is None
    finally:
        thief.kill()
        thief.communicate()


# ---- the socket file deleted while running ------------------------------------------------


def acked_session(endpoint: str, name: str) -> PositionPersistenceManager:
    pm = PositionPersistenceManager(name, endpoint=endpoint, ack_timeout=2 * UNIT)
    assert pm.start_session() is not None, f"{name} was not acked"
    return pm


def test_a_deleted_or_replaced_socket_file_is_bound_again(daemon: DaemonProcess) -> None:
    first = acked_session(daemon.endpoint, "first")
    managers = [first]
    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    events = raw.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
    raw.connect(daemon.endpoint)
    try:
        assert events.poll(5000 * UNIT) and events.recv_multipart()  # connected
        daemon.sock.unlink()
        # Back within the check interval: a new strategy can connect again.
        wait_for(lambda: daemon.sock.is_socket(), 5, "the socket file to be bound again")
        managers.append(acked_session(daemon.endpoint, "second"))
        # The connections in place were kept all along (never dropped and re-made).
        assert first.save_position_entry(symbol="X", entry_price=1.0, quantity=1) is not None
        assert not events.poll(0), "a connection in place was dropped"
        assert stat.S_IMODE(daemon.sock.stat().st_mode) == 0o600

        # Someone puts another file at the name: it is not ours, the daemon takes the name back.
        daemon.sock.unlink()
        daemon.sock.write_text("not a socket")
        wait_for(lambda: daemon.sock.is_socket(), 5, "the name to be taken back")
        managers.append(acked_session(daemon.endpoint, "third"))
        out = daemon.output()
        assert "was deleted while running; bound it again" in out
        assert "was replaced by another file while running; bound it again" in out
        assert not events.poll(0), "a connection in place was dropped"
    finally:
        for pm in managers:
            pm.close(0)
        raw.disable_monitor()
        events.close(0)
        raw.close(0)
        ctx.term()
    assert daemon.stop() == 0
    assert not daemon.sock.exists()


def test_a_deleted_directory_is_made_again_with_its_endpoint_lock(workdir: Path) -> None:
    run = workdir / "run"
    run.mkdir(mode=0o700)
    daemon = DaemonProcess(workdir, "--flush-interval", "0.05")
    daemon.sock = run / "pd.sock"
    daemon.endpoint = f"ipc://{daemon.sock}"
    daemon.args[daemon.args.index("--endpoint") + 1] = daemon.endpoint
    daemon.start()
    try:
        shutil.rmtree(run)
        wait_for(lambda: daemon.sock.is_socket(), 5, "the socket to be bound again")
        pm = acked_session(daemon.endpoint, "after")
        pm.close(0)
        # The endpoint lock was taken again: a second daemon is still refused.
        second = subprocess.run(daemon.args, capture_output=True, text=True, timeout=30 * UNIT)
        assert second.returncode == 1 and "already running" in second.stderr, second.stderr
        assert daemon.sock.is_socket()
    finally:
        assert daemon.stop() == 0


def test_under_socket_activation_a_deleted_socket_file_is_unhealthy(workdir: Path) -> None:
    path = workdir / "pd.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    status = workdir / "status.json"
    proc = activated(workdir, listener, 1, "--status-interval", "0.1")
    try:
        proc.wait_ready()

        def health() -> dict[str, object]:
            try:
                value: dict[str, object] = json.loads(status.read_text())
            except (OSError, ValueError):
                return {}
            return value

        wait_for(lambda: health().get("healthy") is True, 5, "a healthy status")
        path.unlink()  # systemd's file: the daemon cannot make another, it must say so
        wait_for(lambda: health().get("healthy") is False, 5, "an unhealthy status")
        assert health()["listening"] is False
        assert "restart positiond.socket" in proc.output()
    finally:
        proc.stop()
        listener.close()


_MODES = [0o700, 0o750, 0o755, 0o720, 0o770, 0o777, 0o1777, 0o1733, 0o1770]


@settings(max_examples=60, deadline=None)
@given(chain=st.lists(st.sampled_from(_MODES), min_size=1, max_size=4))
def test_the_directory_rule_refuses_exactly_what_another_user_could_take(
    chain: list[int],
) -> None:
    """Our own directories nested with these modes: only writable-by-others ones matter, and a
    sticky one only when it is the socket's own."""
    base = Path(tempfile.mkdtemp(prefix="pd-", dir="/tmp"))  # 0700, in the sticky /tmp
    try:
        directory = base
        for mode in chain:
            directory = directory / "d"
            directory.mkdir()
            directory.chmod(mode)
        verdict = unsafe_socket_directory(directory / "pd.sock")
        *above, own = chain
        takeable = own & 0o022 or any(m & 0o022 and not m & 0o1000 for m in above)
        assert (verdict is not None) == bool(takeable), (chain, verdict)
    finally:
        for sub in [base, *base.rglob("*")]:
            sub.chmod(0o700)
        shutil.rmtree(base)
