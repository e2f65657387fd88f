"""The guides do what they say: docs/REMOTE.md followed block by block against a real daemon,
and docs/INTEGRATION.md's account of ``recover=`` checked against the managers themselves.

REMOTE.md marks each block a reader runs with ``<!-- guide: NAME -->``. The test runs them as
written, with only the machine swapped: ``/etc/positiond`` is a temporary directory, the daemon's
group is the test's own, ``10.0.0.5:5555`` is 127.0.0.1 on a port the daemon picks (``*``), and
the strategy host is a temporary ``$HOME``. The one step it cannot run is ``scp`` to another host:
it copies the directory instead.
"""

from __future__ import annotations

import asyncio
import grp
import inspect
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from positiond.curve import load_public
from positiond_client import (
    AsyncPositionPersistenceManager,
    PositionPersistenceManager,
    VerificationReport,
)
from tests.helpers import UNIT, DaemonProcess, rows, wait_for

DOCS = Path(__file__).parent.parent / "docs"
BLOCK = re.compile(r"<!-- guide: (?P<name>[\w-]+) -->\n```(?P<lang>\w+)\n(?P<body>.*?)\n```", re.S)
ADDRESS = "10.0.0.5:5555"


def guide_blocks(path: Path) -> dict[str, str]:
    return {m["name"]: m["body"] for m in BLOCK.finditer(path.read_text())}


def sh(script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    ran = subprocess.run(
        ["bash", "-euc", script], capture_output=True, text=True, env=env, timeout=60 * UNIT
    )
    assert ran.returncode == 0, (script, ran.stdout, ran.stderr)
    return ran


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def remote(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[DaemonProcess]:
    """Steps 1 and 2 of the guide: the keys, the config file, the daemon started from it."""
    blocks = guide_blocks(DOCS / "REMOTE.md")
    etc = workdir / "etc" / "positiond"  # the daemon host's /etc/positiond
    group = grp.getgrgid(os.getgid()).gr_name

    def here(text: str) -> str:
        return text.replace("/etc/positiond", str(etc)).replace(
            "--group positiond", f"--group {group}"
        )

    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    sh(here(blocks["keys"]), dict(os.environ))
    curve = etc / "curve"
    assert mode(curve / "server.key_secret") == 0o640 and mode(curve / "clients") == 0o750
    assert (curve / "server.key_secret").stat().st_gid == os.getgid()
    config = here(blocks["daemon-config"]).replace(f"tcp://{ADDRESS}", "tcp://127.0.0.1:*")
    assert "127.0.0.1:*" in config and str(curve) in config
    (etc / "positiond.toml").write_text(config + "\n")

    daemon = DaemonProcess(workdir)
    # The guide leaves the database to the defaults (systemd's StateDirectory): here, a tmp file.
    monkeypatch.setenv("POSITIOND_DB", str(daemon.db))
    daemon.args = ["bash", "-c", "exec " + here(blocks["daemon-run"])]
    daemon.start()
    try:
        ready = next(x for x in daemon.output().splitlines() if "positiond ready" in x)
        daemon.endpoint = ready.rsplit("endpoint ", 1)[1].strip()
        assert re.fullmatch(r"tcp://127\.0\.0\.1:\d+", daemon.endpoint), daemon.endpoint
        assert "CURVE on: 1 allowed client key(s)" in daemon.output()
        yield daemon
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop()


def _strategy_host(
    home: Path, bundle: Path, blocks: dict[str, str], endpoint: str
) -> dict[str, str]:
    """Step 3 on a strategy host (``$HOME`` = ``home``): returns its environment."""
    home.mkdir()
    shutil.copytree(bundle, home / bundle.name)  # scp -r (modes kept)
    env = {**os.environ, "HOME": str(home)}
    sh(blocks["strategy-install"], env)
    keys = home / ".config" / "positiond"
    assert not (home / bundle.name).exists()
    assert mode(keys) == 0o700 and mode(keys / "algo-1.key_secret") == 0o600
    assert mode(keys / "server.key") == 0o644
    return env


def _run_python(
    code: str, env: dict[str, str], workdir: Path, prelude: str = ""
) -> subprocess.CompletedProcess[str]:
    script = workdir / "strategy.py"
    script.write_text(code)
    ran = subprocess.run(
        ["bash", "-euc", f"{prelude}\nexec {sys.executable} {script}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60 * UNIT,
    )
    assert ran.returncode == 0, (ran.stdout, ran.stderr)
    return ran


def test_the_remote_guide_works_as_written(remote: DaemonProcess, workdir: Path) -> None:
    blocks = guide_blocks(DOCS / "REMOTE.md")
    assert set(blocks) == {
        "keys", "daemon-config", "daemon-run", "strategy-install", "strategy-env",
        "strategy-env-python", "strategy-args-python",
    }  # fmt: skip
    endpoint = remote.endpoint
    curve = workdir / "etc" / "positiond" / "curve"
    env = _strategy_host(workdir / "algo-1", curve / "algo-1", blocks, endpoint)
    shutil.rmtree(curve / "algo-1")  # the guide's "rm -r" on the daemon host

    # Step 4, the environment way, then the arguments way: both entries acked.
    prelude = blocks["strategy-env"].replace(f"tcp://{ADDRESS}", endpoint)
    ran = _run_python(blocks["strategy-env-python"], env, workdir, prelude)
    assert "entry stored as position 1" in ran.stdout, ran.stderr
    code = blocks["strategy-args-python"].replace(f"tcp://{ADDRESS}", endpoint)
    ran = _run_python(code, env, workdir)
    assert "entry stored as position 2" in ran.stdout, ran.stderr
    sessions = rows(remote.db, "SELECT strategy_name, status FROM strategy_sessions")
    assert [(r["strategy_name"], r["status"]) for r in sessions] == [
        ("expiry_blast", "COMPLETED")
    ] * 2
    legs = rows(remote.db, "SELECT symbol, status, exit_reason FROM strategy_positions")
    assert [(r["status"], r["exit_reason"]) for r in legs] == [("CLOSED", "TARGET")] * 2

    # Step 5: a host whose key the daemon never admitted — same guide, same daemon public key
    # (it is public), its own certificate from another `posctl keys`: refused, nothing stored.
    other = workdir / "other"
    sh(f"posctl keys {other} --client algo-1", env)
    stranger = _strategy_host(workdir / "stranger", other / "algo-1", blocks, endpoint)
    shutil.copyfile(curve / "server.key", workdir / "stranger/.config/positiond/server.key")
    ran = _run_python(code, stranger, workdir)
    assert "entry stored as position None" in ran.stdout, (ran.stdout, ran.stderr)
    assert "not acknowledged by positiond" in ran.stderr
    refused = load_public(other / "clients" / "algo-1.key").decode()
    logged = f"CURVE: refused a client whose public key {refused} is not in {curve / 'clients'}"
    wait_for(lambda: logged in remote.output(), 5, "the refused key in the log")
    line = next(x for x in remote.output().splitlines() if logged in x)
    assert "WARNING" in line and remote.output().count(logged) == 1  # once, not per retry
    assert len(rows(remote.db, "SELECT id FROM strategy_sessions")) == 2

    # And no keys at all: the client refuses a tcp:// endpoint by itself.
    with pytest.raises(ValueError, match="CURVE"):
        PositionPersistenceManager("no_keys", endpoint=endpoint)


def test_the_deploy_guide_sends_tcp_to_the_remote_guide() -> None:
    deploy = (DOCS / "DEPLOY.md").read_text()
    section = deploy.split("## 10.", 1)[1].split("\n## ", 1)[0]
    assert "REMOTE.md" in section and "curve_secret_key" in section
    assert "anyone who can reach the port" not in deploy  # it was never true
    assert "(REMOTE.md)" in deploy or "docs/REMOTE.md" in deploy
    assert "docs/REMOTE.md" in (DOCS.parent / "README.md").read_text()


# ---- INTEGRATION.md: recover= on session() and the async start_session() -------------------


def test_the_integration_guide_tells_the_truth_about_recover() -> None:
    text = " ".join((DOCS / "INTEGRATION.md").read_text().split())
    takes_recover = {
        "pm.session(recover=True": PositionPersistenceManager.session,
        "await pm.start_session(recover=True": AsyncPositionPersistenceManager.start_session,
        "async with pm.session(recover=True": AsyncPositionPersistenceManager.session,
    }
    for written, method in takes_recover.items():
        assert "recover" in inspect.signature(method).parameters
        assert written in text, written
    assert "no `recover=`" not in text


def test_session_and_async_start_session_recover_as_the_guide_says(
    daemon: DaemonProcess,
) -> None:
    def crash(key: str) -> None:
        pm = PositionPersistenceManager("recovering", endpoint=daemon.endpoint, ack_timeout=5)
        pm.start_session()
        pm.save_position_entry(symbol=key, entry_price=10.0, quantity=1, position_key=key)
        assert pm.handle_crash("gone")
        pm.close()

    def book(*symbols: str) -> list[dict[str, str]]:
        return [
            {"symbol": s, "exchange": "NFO", "product": "MIS", "quantity": "1"} for s in symbols
        ]

    crash("A")
    pm = PositionPersistenceManager("recovering", endpoint=daemon.endpoint, ack_timeout=5)
    with pm.session(recover=True, positionbook=book("A")):
        assert pm.recovery is not None and list(pm.recovery.adopted) == ["A"]
    pm.close()

    crash("B")

    async def run() -> None:
        apm = AsyncPositionPersistenceManager("recovering", endpoint=daemon.endpoint, ack_timeout=5)
        try:
            report = await apm.start_session(recover=True, positionbook=book("A", "B"))
            # B crashed; A was left open when the first session ended: both are taken back.
            assert isinstance(report, VerificationReport) and sorted(report.adopted) == ["A", "B"]
            await apm.end_session()
        finally:
            apm.close()

    asyncio.run(run())
    legs = rows(daemon.db, "SELECT position_key, status FROM strategy_positions ORDER BY 1")
    assert [(r["position_key"], r["status"]) for r in legs] == [("A", "ACTIVE"), ("B", "ACTIVE")]
