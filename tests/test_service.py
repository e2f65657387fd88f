"""positiond as a systemd service: socket activation, journal logging, SIGHUP, status.json,
socket mode, and the unit files themselves (parsed, and checked by systemd-analyze)."""

from __future__ import annotations

import configparser
import json
import os
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from positiond.logs import stderr_is_journal
from positiond.status import Progress, status_line
from positiond_client import PositionPersistenceManager
from positiond_client.protocol import encode
from tests.helpers import UNIT, DaemonProcess, rows, session_status, wait_for

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "systemd"


def _env(**more: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("POSITIOND_", "NOTIFY_SOCKET", "WATCHDOG_", "LISTEN_", "JOURNAL_"))
    }
    return env | more


class Proc:
    """A daemon subprocess with its output in a file; killed at teardown if still running."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str], **popen: object) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(args, env=env, stdout=out, stderr=out, **popen)  # type: ignore[call-overload]

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.output()}")
            return "positiond ready" in self.output()

        wait_for(ready, 10, "the daemon to be ready")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(10 * UNIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"daemon did not stop:\n{self.output()}") from None


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()


def _daemon_args(workdir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "positiond",
        "--db",
        str(workdir / "positiond.db"),
        "--endpoint",
        f"ipc://{workdir}/pd.sock",
        *extra,
    ]


def _ack(raw: bytes) -> int:
    reply = json.loads(raw)
    assert reply["type"] == "ack", reply
    seq: int = reply["seq"]
    return seq


# ---- socket activation -------------------------------------------------------------------


# What systemd does between fork and exec: the listening socket on fd 3, LISTEN_PID = own pid.
_EXEC_ACTIVATED = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="positiond.socket")
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


def activated(workdir: Path, listener: socket.socket, n: int, *extra: str) -> Proc:
    """Start the daemon socket-activated; exec keeps the pid, so LISTEN_PID is the daemon's."""
    fd = listener.fileno()
    args = [sys.executable, "-c", _EXEC_ACTIVATED, str(fd), *_daemon_args(workdir, *extra)[1:]]
    return Proc(args, workdir / f"daemon-{n}.log", _env(), pass_fds=(fd,))


def _pending_connection(listener: socket.socket) -> bool:
    """A listening socket is readable while a connection waits in its backlog."""
    readable, _, _ = select.select([listener], [], [], 0)
    return bool(readable)


def test_socket_activation_serves_clients_that_connected_before_it_started(
    workdir: Path, procs: list[Proc]
) -> None:
    path = workdir / "pd.sock"
    db = workdir / "positiond.db"
    # What positiond.socket does: systemd binds and listens long before the daemon runs.
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(64)
    path.chmod(0o660)
    pm = PositionPersistenceManager("expiry_blast", endpoint=f"ipc://{path}", ack_timeout=0.1)
    try:
        # The kernel took the strategy's connection into the backlog: no daemon exists yet.
        wait_for(lambda: _pending_connection(listener), 5, "the strategy to connect")
        assert pm.start_session() is None  # nobody to answer yet; kept in the outbox
        first_leg = pm.save_position_entry(
            symbol="NIFTY28NOV2524000CE", entry_price=100.0, stop_price=90.0, quantity=75
        )
        first = activated(workdir, listener, 1)
        procs.append(first)
        assert pm.sync(timeout=10 * UNIT), f"not stored:\n{first.output()}"
        assert "socket activation" in first.output()

        # A restart: while no daemon runs, the strategy reconnects into the kernel's queue and
        # what it sends waits there.
        assert first.stop() == 0
        assert path.exists(), "libzmq must not unlink a socket it was handed"
        wait_for(lambda: _pending_connection(listener), 5, "the strategy to reconnect")
        second_leg = pm.save_position_entry(
            symbol="NIFTY28NOV2524000PE", entry_price=80.0, stop_price=70.0, quantity=75
        )
        second = activated(workdir, listener, 2)
        procs.append(second)
        assert pm.sync(timeout=10 * UNIT), f"not stored after restart:\n{second.output()}"
        pm.end_session()
    finally:
        pm.close()
        listener.close()
    assert second.stop() == 0
    stored = rows(db, "SELECT position_key, status FROM strategy_positions")
    assert sorted(r["position_key"] for r in stored) == sorted([first_leg.key, second_leg.key])
    assert stat.S_IMODE(path.stat().st_mode) == 0o660  # the unit's SocketMode=, untouched


def test_socket_activation_refuses_a_socket_for_another_endpoint(
    workdir: Path, procs: list[Proc]
) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(workdir / "other.sock"))
    listener.listen(1)
    try:
        proc = activated(workdir, listener, 1)
        procs.append(proc)
        assert proc.proc.wait(10 * UNIT) == 2
    finally:
        listener.close()
    out = proc.output()
    assert "endpoint:" in out and "other.sock" in out
    assert not (workdir / "positiond.db").exists()  # refused before anything was opened


# ---- logging -----------------------------------------------------------------------------


def test_under_journald_lines_carry_priorities_and_no_timestamps(
    workdir: Path, procs: list[Proc]
) -> None:
    log = workdir / "journal"
    log.touch()
    info = log.stat()
    # journald's stream is our stderr: JOURNAL_STREAM names it by device:inode.
    env = _env(JOURNAL_STREAM=f"{info.st_dev}:{info.st_ino}")
    proc = Proc(_daemon_args(workdir, "--log-level", "DEBUG"), log, env)
    procs.append(proc)
    proc.wait_ready()
    assert proc.stop() == 0
    lines = proc.output().splitlines()
    assert lines, "nothing logged"
    assert all(re.match(r"<[0-7]>[\w.]+: ", line) for line in lines), lines
    assert any(line.startswith("<6>positiond.server: positiond ready") for line in lines)
    assert not any(re.search(r"\d\d:\d\d:\d\d", line.split(": ", 1)[0]) for line in lines)


def test_readable_log_when_journal_stream_is_not_our_stderr(workdir: Path) -> None:
    other = workdir / "elsewhere"
    other.touch()
    info = other.stat()
    with open(workdir / "stderr", "w") as stream:
        assert not stderr_is_journal({"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}, stream)
        mine = os.fstat(stream.fileno())
        assert stderr_is_journal({"JOURNAL_STREAM": f"{mine.st_dev}:{mine.st_ino}"}, stream)
        assert not stderr_is_journal({"JOURNAL_STREAM": "junk"}, stream)
        assert not stderr_is_journal({}, stream)


# ---- SIGHUP ------------------------------------------------------------------------------


def _write_config(path: Path, workdir: Path, **values: object) -> None:
    settings = {
        "db": str(workdir / "positiond.db"),
        "endpoint": f"ipc://{workdir}/pd.sock",
        "log_level": "INFO",
        "flush_interval": 0.05,
        **values,
    }
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()))


def test_sighup_applies_the_safe_settings_and_names_the_rest(
    workdir: Path, procs: list[Proc]
) -> None:
    config = workdir / "positiond.toml"
    _write_config(config, workdir, heartbeat_timeout=600)
    proc = Proc(
        [sys.executable, "-m", "positiond", "--config", str(config)], workdir / "log", _env()
    )
    procs.append(proc)
    proc.wait_ready()
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as client:
        client.setsockopt(zmq.LINGER, 0)
        client.connect(f"ipc://{workdir}/pd.sock")
        client.send(
            encode({"v": 1, "type": "start", "seq": 1, "session": "hup-1", "strategy": "s"})
        )
        assert client.poll(5000 * UNIT)
        sid = json.loads(client.recv())["session_id"]

        # A broken file is refused as a whole; the daemon keeps running on what it has.
        config.write_text("heartbeat_timeout = -1\n")
        proc.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "keeping the current settings" in proc.output(), 5, "the refusal")
        assert "heartbeat_timeout" in proc.output().rsplit("reload", 1)[1]

        _write_config(
            config, workdir, heartbeat_timeout=1.0, db=str(workdir / "moved.db"), log_level="DEBUG"
        )
        proc.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "not applied" in proc.output(), 5, "the reload")
        out = proc.output()
        assert "reload: heartbeat_timeout 600.0 -> 1.0" in out
        assert "reload: log_level INFO -> DEBUG" in out
        assert re.search(r"not applied .*: db \(running .*positiond\.db", out), out
        # The new heartbeat timeout is in force: this silent (but connected) session dies now,
        # not in ten minutes.
        wait_for(lambda: session_status(workdir / "positiond.db", sid) == "CRASHED", 5, "crash")
    assert proc.stop() == 0
    assert not (workdir / "moved.db").exists()


def test_sighup_refuses_a_heartbeat_timeout_the_clients_cannot_meet(
    workdir: Path, procs: list[Proc]
) -> None:
    config = workdir / "positiond.toml"
    _write_config(config, workdir, heartbeat_timeout=3.0)
    proc = Proc(
        [sys.executable, "-m", "positiond", "--config", str(config)], workdir / "log", _env()
    )
    procs.append(proc)
    proc.wait_ready()
    pm = PositionPersistenceManager("hb", endpoint=f"ipc://{workdir}/pd.sock", ack_timeout=5)
    try:
        sid = pm.start_session()  # heartbeats every 0.5 s
        _write_config(config, workdir, heartbeat_timeout=0.4)
        proc.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "keeping the current settings" in proc.output(), 5, "the refusal")
        refusal = proc.output().rsplit("reload", 1)[1]
        assert "heartbeat_timeout: 0.4 must be within [1, 3600]" in refusal
        assert "heartbeat every 0.5s" in refusal
        # Still 3 s: the session is not declared dead between two of its heartbeats.
        deadline = time.monotonic() + 2.0 * UNIT
        while time.monotonic() < deadline:
            assert pm.sync(1)
        assert session_status(workdir / "positiond.db", sid) == "RUNNING"
        assert "crashed" not in proc.output()
        assert pm.end_session()
    finally:
        pm.close()
    assert proc.stop() == 0


# ---- status.json, STATUS=, socket mode ----------------------------------------------------


def test_status_json_reports_health_next_to_the_socket(workdir: Path) -> None:
    daemon = DaemonProcess(workdir, "--flush-interval", "0.05", "--status-interval", "0.1")
    daemon.start()
    status = workdir / "status.json"
    try:
        # Written once before "ready", then every status interval.
        first = json.loads(wait_for(lambda: status.exists() and status.read_text(), 5, "status"))
        assert daemon.proc is not None and first["pid"] == daemon.proc.pid
        assert first["healthy"] is True and first["sessions"] == 0
        assert stat.S_IMODE(status.stat().st_mode) == 0o640
        pm = PositionPersistenceManager("expiry_blast", endpoint=daemon.endpoint, ack_timeout=5)
        try:
            pm.start_session()
            pm.save_position_entry(symbol="X", entry_price=10.0, quantity=1, stop_price=9.0)

            def counted() -> dict[str, object] | None:
                try:
                    health: dict[str, object] = json.loads(status.read_text())
                except (FileNotFoundError, json.JSONDecodeError):
                    raise AssertionError("status.json must be replaced atomically") from None
                return health if (health["sessions"], health["legs"]) == (1, 1) else None

            health = wait_for(counted, 5, "status.json to count the session and its leg")
            expected = {
                "uptime",
                "endpoint",
                "db",
                "db_size",
                "pending_ops",
                "pending_updates",
                "last_flush_age",
                "writer_stalled",
                "time",
                "status_interval",
                "version",
            }
            assert expected <= set(health)
            assert isinstance(health["db_size"], int) and health["db_size"] > 0
            assert health["last_flush_age"] is not None
            pm.end_session()
        finally:
            pm.close()
    finally:
        assert daemon.stop() == 0
    assert not status.exists(), "a stopped daemon must not leave a live-looking status.json"


def test_socket_mode_lets_a_group_in(workdir: Path) -> None:
    daemon = DaemonProcess(workdir, "--socket-mode", "0660").start()
    try:
        assert stat.S_IMODE(daemon.sock.stat().st_mode) == 0o660
    finally:
        assert daemon.stop() == 0


# ---- unit files --------------------------------------------------------------------------


def _unit(name: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    # systemd allows repeated keys (they add up); keep the last, check the text for the rest.
    parser.read_string(_without_duplicates((SYSTEMD / name).read_text()))
    return parser


def _without_duplicates(text: str) -> str:
    seen: set[tuple[str, str]] = set()
    section, out = "", []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            section = stripped
        elif "=" in stripped and not stripped.startswith("#"):
            key = (section, stripped.split("=", 1)[0])
            if key in seen:
                continue
            seen.add(key)
        out.append(line)
    return "\n".join(out)


def test_service_unit_has_the_required_settings() -> None:
    unit = _unit("positiond.service")
    service = unit["Service"]
    text = (SYSTEMD / "positiond.service").read_text()
    required = {
        "Type": "notify",
        "NotifyAccess": "main",
        "Restart": "on-failure",
        "RestartPreventExitStatus": "2 3",
        "User": "positiond",
        "Group": "positiond",
        "StateDirectory": "positiond",
        "StateDirectoryMode": "0700",
        "RuntimeDirectory": "positiond",
        "RuntimeDirectoryMode": "0750",
        "RuntimeDirectoryPreserve": "restart",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "",
        "UMask": "0077",
    }
    for key, value in required.items():
        assert service.get(key) == value, key
    assert "SystemCallFilter=@system-service" in text
    assert re.search(r"^RestrictAddressFamilies=AF_UNIX", text, re.M)
    assert "POSITIOND_SOCKET_MODE=0660" in service["Environment"]
    # Straight at the console script, no shell in between.
    assert re.fullmatch(r"/\S+/positiond", service["ExecStart"]), service["ExecStart"]
    assert "$MAINPID" in service["ExecReload"] and "HUP" in service["ExecReload"]
    watchdog = int(service["WatchdogSec"].rstrip("s"))
    stop = int(service["TimeoutStopSec"].rstrip("s"))
    # The final flush may retry for 10 s plus one busy timeout (5 s): the stop timeout fits it.
    assert stop >= 20 and watchdog >= 10
    assert {"positiond.socket"} <= set(unit["Unit"]["After"].split())
    # Every setting line is explained by a comment somewhere above it in its group.
    body = text.split("[Service]", 1)[1].split("[Install]", 1)[0]
    for group in re.split(r"\n\s*\n", body):
        if any(line and not line.startswith("#") for line in group.splitlines()):
            assert group.lstrip().startswith("#"), f"uncommented group:\n{group}"


def test_socket_unit_listens_in_the_runtime_directory() -> None:
    sock = _unit("positiond.socket")["Socket"]
    assert sock["ListenStream"] == "/run/positiond/positiond.sock"
    assert (sock["SocketUser"], sock["SocketGroup"], sock["SocketMode"]) == (
        "positiond",
        "positiond",
        "0660",
    )
    assert sock["RemoveOnStop"] == "yes"
    assert _unit("positiond.socket")["Install"]["WantedBy"] == "sockets.target"


def test_strategy_example_joins_the_group_and_orders_after_the_socket() -> None:
    unit = _unit("examples/strategy@.service")
    assert "positiond.socket" in unit["Unit"]["After"]
    assert "positiond.socket" in unit["Unit"]["Wants"]
    assert unit["Service"]["SupplementaryGroups"] == "positiond"
    assert (
        "POSITIOND_ENDPOINT=ipc:///run/positiond/positiond.sock" in unit["Service"]["Environment"]
    )


def test_sysusers_creates_the_user_and_group(workdir: Path) -> None:
    conf = SYSTEMD / "sysusers.d" / "positiond.conf"
    assert re.search(r"^u\s+positiond\s", conf.read_text(), re.M)
    tool = shutil.which("systemd-sysusers")
    if tool is None:
        pytest.skip("systemd-sysusers is not installed")
    (workdir / "etc").mkdir()
    result = subprocess.run(
        [tool, f"--root={workdir}", str(conf)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    passwd = (workdir / "etc/passwd").read_text()
    group = (workdir / "etc/group").read_text()
    assert re.search(r"^positiond:x:\d+:\d+:.*:/var/lib/positiond:/usr/sbin/nologin$", passwd, re.M)
    assert re.search(r"^positiond:x:\d+:", group, re.M)


def _installed_copy(workdir: Path) -> Path:
    """The units as an installer would place them, ExecStart pointing at a real console script."""
    units = workdir / "units"
    units.mkdir()
    script = Path(sys.executable).with_name("positiond")
    for src in (SYSTEMD / "positiond.service", SYSTEMD / "positiond.socket"):
        text = src.read_text()
        if src.suffix == ".service":
            text = re.sub(r"^ExecStart=\S+", f"ExecStart={script}", text, flags=re.M)
        (units / src.name).write_text(text)
    example = (SYSTEMD / "examples" / "strategy@.service").read_text()
    example = re.sub(r"^ExecStart=\S+", f"ExecStart={sys.executable}", example, flags=re.M)
    (units / "strategy@demo.service").write_text(example)
    return units


def test_systemd_analyze_verify_accepts_the_units(workdir: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (.ci/run installs it on Debian)")
    units = _installed_copy(workdir)
    result = subprocess.run(
        [tool, "verify", *(str(p) for p in sorted(units.iterdir()))],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=units,
    )
    # Only messages about our files count: the host's own units may be imperfect.
    ours = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if "positiond" in line or "strategy@" in line
    ]
    assert not ours, "\n".join(ours)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ci_installs_systemd_analyze_and_still_ends_with_pytest() -> None:
    run = (ROOT / ".ci" / "run").read_text()
    assert "command -v systemd-analyze" in run
    assert run.rstrip().splitlines()[-1] == "pytest"


# ---- the progress marker and the status line (no I/O) ------------------------------------


def test_progress_counts_commits_and_idleness_but_not_a_hung_or_failing_write() -> None:
    progress = Progress(now=100.0)
    progress.idle(101.0)
    assert progress.stalled_for(101.5) == 0.5
    progress.begin(102.0)
    progress.idle(103.0)  # a write is inside SQLite: being "idle" elsewhere does not count
    assert progress.stalled_for(110.0) == 9.0
    progress.end(110.0, committed=False)
    progress.idle(111.0)  # between retries of a failing batch: still no progress
    assert progress.stalled_for(112.0) == 11.0
    progress.begin(112.0)
    progress.end(112.5, committed=True)
    assert progress.stalled_for(113.0) == 0.5
    progress.idle(114.0)
    assert progress.stalled_for(114.0) == 0.0


def test_status_line_is_one_line_and_says_when_unhealthy() -> None:
    health = {
        "sessions": 2,
        "legs": 5,
        "pending_ops": 1,
        "pending_updates": 3,
        "last_flush_age": 0.42,
        "healthy": True,
        "writes_ok": True,
        "writer_stalled": 0.0,
    }
    assert status_line(health) == "2 session(s) live, 5 leg(s) open, 4 pending, last flush 0.4s ago"
    sick = status_line(
        health
        | {"healthy": False, "writes_ok": False, "writer_stalled": 31.0, "last_flush_age": None}
    )
    assert "last flush never" in sick and "UNHEALTHY" in sick and "writes failing" in sick
    assert "\n" not in sick
    lost = status_line(health | {"healthy": False, "storage_fault": "the database x was deleted"})
    assert lost.endswith("; UNHEALTHY: the database x was deleted") and "\n" not in lost
