"""Settings and defaults: paths shared by daemon and client, precedence, refusal of bad values."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from positiond.config import (
    CLIENT_HEARTBEAT_INTERVAL,
    MIN_HEARTBEAT_TIMEOUT,
    Config,
    ConfigError,
    format_config,
    from_args,
    load,
)
from positiond_client import PositionPersistenceManager
from positiond_client.channel import Channel
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
    config = from_args(["--db", "/flag.db", "--flush-interval", "0.25"], env, default_file=None)
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
        from_args(argv, {}, default_file=None)


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


def test_a_heartbeat_timeout_shorter_than_two_client_heartbeats_is_refused(workdir: Path) -> None:
    # 3.0 -> 0.4 used to be accepted, then every strategy flapped CRASHED / REVIVED.
    assert CLIENT_HEARTBEAT_INTERVAL == 0.5 and MIN_HEARTBEAT_TIMEOUT == 1.0
    assert from_args(["--heartbeat-timeout", "1"], {}, default_file=None).heartbeat_timeout == 1.0
    for bad in ("0.99", "0.4", "nan"):
        with pytest.raises(ConfigError, match=r"heartbeat_timeout: .* heartbeat every 0\.5s"):
            from_args(["--heartbeat-timeout", bad], {}, default_file=None)
    result = subprocess.run(
        [sys.executable, "-m", "positiond", "--db", str(workdir / "p.db"),
         "--endpoint", f"ipc://{workdir}/pd.sock", "--heartbeat-timeout", "0.4"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "heartbeat_timeout: 0.4 must be within [1, 3600]" in result.stderr
    assert not (workdir / "p.db").exists()


def test_the_minimum_timeout_follows_the_clients_default_heartbeat() -> None:
    for cls in (PositionPersistenceManager, Channel):
        default = inspect.signature(cls).parameters["heartbeat_interval"].default
        assert default == CLIENT_HEARTBEAT_INTERVAL, cls


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


# ---- the config file, and where every value came from -------------------------------------


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("POSITIOND_")}
    return subprocess.run(
        [sys.executable, "-m", "positiond", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=base | (env or {}),
    )


def test_file_is_beaten_by_environment_which_is_beaten_by_flags(workdir: Path) -> None:
    toml = workdir / "positiond.toml"
    toml.write_text(
        'db = "/file.db"\nheartbeat_timeout = 7\nflush_interval = 0.5\n'
        'log_level = "warning"\nsocket_mode = 0o660\nbusy_timeout = 30\n'
    )
    env = {"POSITIOND_HEARTBEAT_TIMEOUT": "5", "POSITIOND_CONFIG": str(toml)}
    loaded = load(["--flush-interval", "0.25"], env)
    cfg = loaded.config
    assert (cfg.db, cfg.heartbeat_timeout, cfg.flush_interval) == (Path("/file.db"), 5.0, 0.25)
    assert (cfg.log_level, cfg.socket_mode, cfg.busy_timeout) == ("WARNING", 0o660, 30.0)
    assert loaded.file == toml
    assert loaded.sources["db"] == f"file {toml}"
    assert loaded.sources["heartbeat_timeout"] == "env POSITIOND_HEARTBEAT_TIMEOUT"
    assert loaded.sources["flush_interval"] == "flag --flush-interval"
    assert loaded.sources["synchronous"] == "default"
    # --config beats $POSITIOND_CONFIG.
    other = workdir / "other.toml"
    other.write_text("heartbeat_timeout = 9\n")
    assert (
        load(["--config", str(other)], {"POSITIOND_CONFIG": str(toml)}).config.heartbeat_timeout
        == 9
    )


def test_the_default_file_is_read_only_when_it_exists(workdir: Path) -> None:
    default = workdir / "etc-positiond.toml"
    assert load([], {}, default_file=default).file is None
    default.write_text("status_interval = 2\n")
    loaded = load([], {}, default_file=default)
    assert loaded.config.status_interval == 2.0
    assert loaded.sources["status_interval"] == f"file {default}"


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        ("heartbeat_timeot = 3\n", "heartbeat_timeot", "unknown setting"),
        ('heartbeat_timeout = "soon"\n', "heartbeat_timeout", "not a valid value"),
        ("heartbeat_timeout = true\n", "heartbeat_timeout", "not a valid value"),
        ("flush_interval = -1\n", "flush_interval", "must be within"),
        ("socket_mode = 0o666\n", "socket_mode", "every local user"),
        ('log_level = "LOUD"\n', "log_level", "must be one of"),
        ("[daemon]\ndb = 'x'\n", "daemon", "unknown setting"),
        ("heartbeat_timeout = \n", "config", "Invalid value"),
    ],
)
def test_bad_file_values_are_refused_naming_the_field_and_the_file(
    workdir: Path, text: str, field: str, words: str
) -> None:
    toml = workdir / "bad.toml"
    toml.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(["--config", str(toml)], {})
    message = str(info.value)
    assert message.startswith(f"{field}: ") and words in message and str(toml) in message
    assert "\n" not in message


def test_missing_explicit_config_file_is_an_error(workdir: Path) -> None:
    with pytest.raises(ConfigError, match=r"^config: .*no such file"):
        load(["--config", str(workdir / "nope.toml")], {})
    with pytest.raises(ConfigError, match=r"^config: "):
        load([], {"POSITIOND_CONFIG": str(workdir / "nope.toml")})


@pytest.mark.parametrize("raw", ["0660", "660", "0o660"])
def test_socket_mode_is_octal_everywhere(raw: str) -> None:
    assert from_args(["--socket-mode", raw], {}, default_file=None).socket_mode == 0o660
    assert from_args([], {"POSITIOND_SOCKET_MODE": raw}, default_file=None).socket_mode == 0o660


def test_print_config_is_toml_with_a_source_per_value(workdir: Path) -> None:
    toml = workdir / "p.toml"
    toml.write_text("heartbeat_timeout = 4\nsocket_mode = 0o640\n")
    result = _run(
        "--config",
        str(toml),
        "--db",
        str(workdir / "p.db"),
        "--print-config",
        env={"POSITIOND_FLUSH_INTERVAL": "0.2"},
    )
    assert result.returncode == 0, result.stderr
    lines = {line.split(" = ")[0]: line for line in result.stdout.splitlines() if " = " in line}
    assert lines["heartbeat_timeout"].endswith(f"# file {toml}")
    assert lines["flush_interval"].endswith("# env POSITIOND_FLUSH_INTERVAL")
    assert lines["db"].endswith("# flag --db")
    assert lines["synchronous"].endswith("# default")
    # The output is itself a valid config file that reproduces the settings.
    again = workdir / "again.toml"
    again.write_text(result.stdout)
    assert tomllib.loads(result.stdout)["socket_mode"] == 0o640
    assert (
        load(["--config", str(again)], {}).config
        == load(
            ["--config", str(toml), "--db", str(workdir / "p.db")],
            {"POSITIOND_FLUSH_INTERVAL": "0.2"},
        ).config
    )
    assert not (workdir / "p.db").exists()  # printing opens nothing


def test_format_config_names_the_file() -> None:
    text = format_config(load([], {}, default_file=None))
    assert "# config file: none" in text


@pytest.mark.parametrize(
    ("how", "field"),
    [("file", "heartbeat_timeout"), ("env", "flush_interval"), ("unknown", "color")],
)
def test_bad_file_or_env_value_exits_2_before_binding(workdir: Path, how: str, field: str) -> None:
    toml = workdir / "p.toml"
    toml.write_text("heartbeat_timeout = -3\n" if how == "file" else "")
    if how == "unknown":
        toml.write_text('color = "blue"\n')
    env = {"POSITIOND_FLUSH_INTERVAL": "fast"} if how == "env" else {}
    sock = workdir / "p.sock"
    result = _run(
        "--config", str(toml), "--db", str(workdir / "p.db"), "--endpoint", f"ipc://{sock}", env=env
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"positiond: {field}: ")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (workdir / "p.db").exists() and not sock.exists()


def test_version_prints_one_line_and_exits_0_whatever_the_settings(workdir: Path) -> None:
    import positiond
    from positiond.store.schema import SCHEMA_VERSION

    bad = workdir / "bad.toml"
    bad.write_text("heartbeat_timeout = [\n")  # not TOML: any reading of settings would fail
    env = {**os.environ, "POSITIOND_CONFIG": str(bad), "POSITIOND_DB": str(workdir / "x/p.db")}
    for command in (
        [sys.executable, "-m", "positiond", "--version"],
        [str(Path(sys.executable).with_name("positiond")), "--log-level", "NOPE", "--version"],
    ):
        ran = subprocess.run(command, capture_output=True, text=True, env=env, timeout=30)
        assert ran.returncode == 0, ran.stderr
        assert ran.stderr == ""
        (line,) = ran.stdout.splitlines()
        assert line.startswith(
            f"positiond {positiond.__version__} (protocol 1, schema {SCHEMA_VERSION}; Python "
        ), line
        assert "libzmq " in line and "SQLite " in line
    assert not (workdir / "x").exists()  # nothing opened or created
    ran = subprocess.run(
        [sys.executable, "-m", "positiond", "--help"], capture_output=True, text=True, timeout=30
    )
    assert "--version" in ran.stdout
