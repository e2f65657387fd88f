"""Settings and defaults: paths shared by daemon and client, precedence, refusal of bad values."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from positiond.config import Config, ConfigError, from_args
from positiond_client.paths import default_db_path, default_endpoint, ensure_private_dir
from tests.helpers import DaemonProcess, wait_for


def test_default_paths_follow_systemd_then_xdg_then_home(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path)}
    uid = os.getuid()
    assert default_db_path(env) == tmp_path / ".local/state/positiond/positiond.db"
    assert default_endpoint(env) == f"ipc:///tmp/positiond-{uid}/positiond.sock"
    env |= {"XDG_STATE_HOME": "/x/state", "XDG_RUNTIME_DIR": "/run/user/7"}
    assert default_db_path(env) == Path("/x/state/positiond/positiond.db")
    assert default_endpoint(env) == "ipc:///run/user/7/positiond/positiond.sock"
    env |= {"STATE_DIRECTORY": "/var/lib/positiond:/other", "RUNTIME_DIRECTORY": "/run/positiond"}
    assert default_db_path(env) == Path("/var/lib/positiond/positiond.db")
    assert default_endpoint(env) == "ipc:///run/positiond/positiond.sock"
    env |= {"POSITIOND_DB": "/d.db", "POSITIOND_ENDPOINT": "tcp://127.0.0.1:5555"}
    assert (default_db_path(env), default_endpoint(env)) == (Path("/d.db"), "tcp://127.0.0.1:5555")


def test_flags_beat_environment_beat_defaults() -> None:
    env = {
        "POSITIOND_HEARTBEAT_TIMEOUT": "5",
        "POSITIOND_DB": "/env.db",
        "POSITIOND_ENDPOINT": "ipc:///tmp/env.sock",
    }
    config = from_args(["--db", "/flag.db", "--flush-interval", "0.25"], env)
    assert config == Config(
        db=Path("/flag.db"),
        endpoint="ipc:///tmp/env.sock",
        heartbeat_timeout=5.0,
        flush_interval=0.25,
    )


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--heartbeat-timeout", "0"], "heartbeat_timeout"),
        (["--flush-interval", "-1"], "flush_interval"),
        (["--endpoint", "udp://x"], "endpoint"),
        (["--endpoint", "ipc:///" + "x" * 200], "endpoint"),
    ],
)
def test_bad_values_are_refused_naming_the_field(argv: list[str], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        from_args(argv, {})


def test_bad_value_exits_2_before_binding(workdir: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "positiond",
            "--db",
            str(workdir / "p.db"),
            "--heartbeat-timeout",
            "-3",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "heartbeat_timeout" in result.stderr
    assert not (workdir / "p.db").exists()


def test_help_shows_every_flag_and_default() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "positiond", "--help"], capture_output=True, text=True, timeout=30
    )
    for words in (
        "--db",
        "--endpoint",
        "--heartbeat-timeout",
        "(default: 3)",
        "--flush-interval",
        "(default: 1)",
        "--log-level",
        "POSITIOND_ENDPOINT",
    ):
        assert words in result.stdout


def test_daemon_with_no_arguments_uses_the_users_dirs(workdir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "POSITIOND_"))}
    env |= {"XDG_STATE_HOME": str(workdir / "state"), "XDG_RUNTIME_DIR": str(workdir / "run")}
    (workdir / "run").mkdir(mode=0o700)
    log = workdir / "log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "positiond"], env=env, stderr=out)
    try:
        wait_for(lambda: "positiond ready" in log.read_text(), 10, "ready")
        text = log.read_text()
        db = workdir / "state/positiond/positiond.db"
        sock = workdir / "run/positiond/positiond.sock"
        assert f"database: {db}" in text and f"endpoint: ipc://{sock}" in text
        assert oct(db.stat().st_mode & 0o777) == "0o600"
        assert oct(sock.parent.stat().st_mode & 0o777) == "0o700"
        assert oct(sock.stat().st_mode & 0o777) == "0o600"
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def test_second_daemon_on_the_same_database_is_refused(daemon: DaemonProcess) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "positiond",
            "--db",
            str(daemon.db),
            "--endpoint",
            f"ipc://{daemon.workdir}/other.sock",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "already running" in result.stderr
    assert daemon.sock.exists()


def test_private_dir_refuses_a_world_writable_one(workdir: Path) -> None:
    planted = workdir / "planted"
    planted.mkdir()
    planted.chmod(0o777)
    with pytest.raises(PermissionError, match="writable by everyone"):
        ensure_private_dir(planted)
    fresh = workdir / "fresh"
    ensure_private_dir(fresh)
    assert oct(fresh.stat().st_mode & 0o777) == "0o700"
