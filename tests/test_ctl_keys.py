"""``posctl keys``: certificate files the daemon and the client read, with their modes from the
start, never overwriting anything. (That the keys admit a strategy and refuse a stranger through
a real daemon is tests/test_docs.py, which follows docs/REMOTE.md.)"""

from __future__ import annotations

import grp
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import zmq.auth

from positiond.curve import ServerCurve, load_public, load_secret
from tests.helpers import UNIT


def keys(*args: str, umask: int = 0o022) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "positiond.ctl", "keys", *args],
        capture_output=True,
        text=True,
        timeout=30 * UNIT,
        umask=umask,
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def made(out: subprocess.CompletedProcess[str]) -> Any:
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_keys_are_private_from_the_start_and_readable_by_daemon_and_client(
    workdir: Path,
) -> None:
    root = workdir / "curve"
    # umask 0: pyzmq alone would write world-readable secrets; these must still be 0600.
    data = made(keys("--json", str(root), "--client", "algo-1", "--client", "algo-2", umask=0))
    assert data["server"]["created"] is True
    assert data["curve_clients"] == str(root / "clients")
    assert [c["name"] for c in data["clients"]] == ["algo-1", "algo-2"]
    assert mode(root) == 0o700 and mode(root / "clients") == 0o700
    assert mode(root / "server.key_secret") == 0o600 and mode(root / "server.key") == 0o644
    for name in ("algo-1", "algo-2"):
        assert mode(root / name) == 0o700
        assert mode(root / name / f"{name}.key_secret") == 0o600
        assert mode(root / name / "server.key") == 0o644
        assert mode(root / "clients" / f"{name}.key") == 0o644
        # The client's pair: its public half is what the daemon admits.
        public, secret = zmq.auth.load_certificate(root / name / f"{name}.key_secret")
        assert secret is not None and public == load_public(root / "clients" / f"{name}.key")
        assert load_public(root / name / "server.key") == load_public(root / "server.key")
    assert sorted(p.name for p in root.iterdir()) == [
        "algo-1",
        "algo-2",
        "clients",
        "server.key",
        "server.key_secret",
    ]  # fmt: skip  (no temporary files left behind)
    assert load_secret(root / "server.key_secret")[0] == load_public(root / "server.key")
    ServerCurve(root / "server.key_secret", root / "clients")  # the daemon accepts the files


def test_the_server_key_is_kept_and_no_client_is_replaced(workdir: Path) -> None:
    root = workdir / "curve"
    made(keys("--json", str(root), "--client", "algo-1"))
    server = (root / "server.key_secret").read_bytes()
    first = (root / "clients" / "algo-1.key").read_bytes()
    again = keys(str(root), "--client", "algo-1")
    assert again.returncode == 5 and "client 'algo-1' exists" in again.stderr
    assert (root / "clients" / "algo-1.key").read_bytes() == first
    data = made(keys("--json", str(root), "--client", "algo-2"))
    assert data["server"]["created"] is False
    assert (root / "server.key_secret").read_bytes() == server  # every client keeps working
    assert load_public(root / "algo-2" / "server.key") == load_public(root / "server.key")
    human = keys(str(root), "--client", "algo-3")
    assert human.returncode == 0
    assert "daemon certificate kept (it exists)" in human.stdout
    assert f"copy {root / 'algo-3'}/ to host algo-3" in human.stdout


def test_group_lets_the_daemon_read_its_certificate(workdir: Path) -> None:
    group = grp.getgrgid(os.getgid()).gr_name
    root = workdir / "curve"
    made(keys("--json", str(root), "--group", group))
    assert mode(root / "server.key_secret") == 0o640 and mode(root / "clients") == 0o750
    assert (root / "server.key_secret").stat().st_gid == os.getgid()
    # An existing directory keeps what it allowed: DIR may be /etc/positiond itself.
    shared = workdir / "etc"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    made(keys("--json", str(shared), "--group", group))
    assert mode(shared) == 0o755


def test_bad_names_and_groups_are_usage_errors(workdir: Path) -> None:
    root = workdir / "curve"
    for bad in ("../x", "server", "clients", "", "a b", "x" * 65):
        out = keys(str(root), "--client", bad)
        assert out.returncode == 2 and "client name" in out.stderr, (bad, out.stderr)
    out = keys(str(root), "--client", "a", "--client", "a")
    assert out.returncode == 2 and "twice" in out.stderr
    out = keys(str(root), "--group", "no-such-group-here")
    assert out.returncode == 2 and "no group" in out.stderr
    assert not root.exists()  # refused before writing anything
    (workdir / "file").write_text("")
    out = keys(str(workdir / "file"))
    assert out.returncode == 2 and "cannot write the keys" in out.stderr
