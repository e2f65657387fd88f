"""``posctl verify`` fetching the positionbook from OpenAlgo (tests/fake_openalgo.py's fake).

posctl finds ``[openalgo]``, the database and the endpoint in the daemon's own config file; the
fetch is the default then. A refusal (error status, HTTP error, timeout) judges nothing and
changes nothing; the API key appears in no output; without httpx the error says what to install;
the runnable example serves a saved positionbook.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from positiond.openalgo import API_KEY_ENV
from tests.fake_openalgo import FakeOpenAlgo, Reply
from tests.helpers import UNIT, DaemonProcess
from tests.test_ctl import CE, FIN, PE, ZONE, kill_a_strategy, leg_row, positionbook
from tests.test_daemon import Strategy

KEY = "oa-secret-77b1c3e5aa"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake() -> Iterator[FakeOpenAlgo]:
    with FakeOpenAlgo(api_key=KEY) as server:
        yield server


def write_config(daemon: DaemonProcess, workdir: Path, host: str | None, timeout: float) -> Path:
    """The daemon's config file as a deployment would have it: db, endpoint, [openalgo]."""
    key_file = workdir / "openalgo.key"
    key_file.write_text(KEY + "\n")
    text = f'db = "{daemon.db}"\nendpoint = "{daemon.endpoint}"\n'
    if host is not None:
        text += (
            f'[openalgo]\nhost = "{host}"\napi_key_file = "{key_file}"\n'
            f"timeout = {timeout * UNIT}\n"
        )
    path = workdir / "positiond.toml"
    path.write_text(text)
    return path


def posctl(
    config: Path, *args: str, preamble: str = "", stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """posctl with only --config: everything else comes from the file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSITIOND_")}
    env.update(TZ=ZONE, COLUMNS="200", POSITIOND_CONFIG=str(config))
    code = f"{preamble}import sys; from positiond.ctl import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=60 * UNIT,
    )


def crashed_legs(daemon: DaemonProcess, strategies: list[Strategy]) -> None:
    kill_a_strategy(daemon, strategies)  # ce-1 CE 75, pe-1 PE 75 CRASHED


def book_reply(*rows: tuple[str, str]) -> Reply:
    return Reply(json.loads(positionbook(*rows)))


def test_verify_fetches_the_positionbook_from_openalgo_by_default(
    daemon: DaemonProcess,
    strategies: list[Strategy],
    workdir: Path,
    fake: FakeOpenAlgo,
) -> None:
    crashed_legs(daemon, strategies)
    config = write_config(daemon, workdir, fake.url, 5.0)
    # numbers, as about half the broker adapters send them, and analyzer mode's extras
    numbers = [
        {"symbol": CE, "exchange": "NFO", "product": "MIS", "quantity": 75, "ltp": 101.5,
         "unrealized_pnl": 10.0},
        {"symbol": PE, "exchange": "NFO", "product": "MIS", "quantity": 0},
        {"symbol": FIN, "exchange": "NFO", "product": "MIS", "quantity": -40},
    ]  # fmt: skip
    fake.reply("positionbook", Reply({"status": "success", "mode": "analyze", "data": numbers}))

    run = posctl(config, "--json", "verify")
    assert run.returncode == 1, run.stderr  # the orphan needs a human
    data = json.loads(run.stdout)
    verdicts = {v["leg"]["position_key"]: v["verdict"] for v in data["verdicts"]}
    assert verdicts == {"ce-1": "RESUME", "pe-1": "CLOSED_AT_BROKER"}
    assert [(o["symbol"], o["broker_quantity"]) for o in data["orphans"]] == [(FIN, -40)]
    assert fake.received("positionbook") == [{"apikey": KEY}]

    human = posctl(config, "verify", "--openalgo", "--apply")
    assert human.returncode == 1, human.stderr
    assert f"positionbook: OpenAlgo {fake.url} ([openalgo] in {config})" in human.stdout
    assert f"database: {daemon.db}" in human.stdout
    assert leg_row(daemon, "pe-1")["status"] == "CLOSED"
    for each in (run, human):
        assert KEY not in each.stdout + each.stderr


@pytest.mark.parametrize(
    ("answer", "code", "said"),
    [
        (Reply({"status": "error", "message": "Session expired"}), 3, "Session expired"),
        (Reply(b"Internal Server Error", 500), 3, "HTTP 500: Internal Server Error"),
        (Reply({"status": "success", "data": []}, delay=60.0), 4, "no answer from"),
    ],
    ids=["error-status", "http-500", "timeout"],
)
def test_a_refusal_judges_nothing_and_changes_nothing(
    daemon: DaemonProcess,
    strategies: list[Strategy],
    workdir: Path,
    fake: FakeOpenAlgo,
    answer: Reply,
    code: int,
    said: str,
) -> None:
    crashed_legs(daemon, strategies)
    config = write_config(daemon, workdir, fake.url, 0.5)
    fake.reply("positionbook", answer)
    run = posctl(config, "verify", "--apply")
    assert run.returncode == code and said in run.stderr, run.stderr
    assert "CLOSED_AT_BROKER" not in run.stdout
    assert leg_row(daemon, "pe-1")["status"] == leg_row(daemon, "ce-1")["status"] == "CRASHED"
    assert KEY not in run.stdout + run.stderr
    run = posctl(config, "--json", "verify")
    assert run.returncode == code and json.loads(run.stdout)["error"]["exit_code"] == code


def test_a_wrong_key_is_refused_and_the_env_key_wins(
    daemon: DaemonProcess, strategies: list[Strategy], workdir: Path, fake: FakeOpenAlgo
) -> None:
    crashed_legs(daemon, strategies)
    config = write_config(daemon, workdir, fake.url, 5.0)
    env_key = f"import os; os.environ[{API_KEY_ENV!r}] = 'wrong-key'; "
    run = posctl(config, "verify", preamble=env_key)
    assert run.returncode == 3 and "Invalid openalgo apikey" in run.stderr, run.stderr
    assert fake.received("positionbook") == [{"apikey": "wrong-key"}]
    assert "wrong-key" not in run.stdout + run.stderr


def test_a_saved_positionbook_still_works_and_nothing_configured_is_a_usage_error(
    daemon: DaemonProcess, strategies: list[Strategy], workdir: Path, fake: FakeOpenAlgo
) -> None:
    crashed_legs(daemon, strategies)
    config = write_config(daemon, workdir, fake.url, 5.0)
    saved = positionbook((CE, "75"), (PE, "0"))
    run = posctl(config, "--json", "verify", "--positionbook", "-", stdin=saved)
    assert run.returncode == 0, run.stderr
    assert fake.requests == []  # the file, not OpenAlgo
    bare = write_config(daemon, workdir, None, 5.0)
    for args in (("verify",), ("verify", "--openalgo")):
        run = posctl(bare, *args)
        assert run.returncode == 2 and "[openalgo]" in run.stderr, run.stderr
    run = posctl(config, "verify", "--openalgo", "--positionbook", "x.json")
    assert run.returncode == 2 and "not allowed with" in run.stderr


def test_without_httpx_verify_says_to_install_the_extra(
    daemon: DaemonProcess, strategies: list[Strategy], workdir: Path, fake: FakeOpenAlgo
) -> None:
    config = write_config(daemon, workdir, fake.url, 5.0)
    no_httpx = "import sys; sys.modules['httpx'] = None; "  # import httpx -> ImportError
    run = posctl(config, "verify", preamble=no_httpx)
    assert run.returncode == 2 and "positiond[openalgo]" in run.stderr, run.stderr
    # everything else in posctl works without it
    assert posctl(config, "crashed", preamble=no_httpx).returncode == 0


def test_the_example_fake_serves_a_saved_positionbook(
    daemon: DaemonProcess, strategies: list[Strategy], workdir: Path
) -> None:
    crashed_legs(daemon, strategies)
    saved = workdir / "book.json"
    saved.write_text(positionbook((CE, "75"), (PE, "0")))
    example = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "fake_openalgo.py"), "--port", "0",
         "--api-key", KEY, "--positionbook", str(saved)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert example.stdout is not None
        line = example.stdout.readline()  # blocks until it listens (or dies: "")
        assert line.startswith("fake OpenAlgo listening on http://127.0.0.1:"), line
        config = write_config(daemon, workdir, line.split()[-1], 5.0)
        run = posctl(config, "--json", "verify")
        assert run.returncode == 0, run.stderr
        data: Any = json.loads(run.stdout)
        assert {v["leg"]["position_key"]: v["verdict"] for v in data["verdicts"]} == {
            "ce-1": "RESUME", "pe-1": "CLOSED_AT_BROKER"
        }  # fmt: skip
    finally:
        example.terminate()
        example.wait(timeout=10 * UNIT)
        if example.stdout is not None:
            example.stdout.close()


def test_the_key_is_in_no_log_status_or_printed_config(
    workdir: Path, fake: FakeOpenAlgo, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(API_KEY_ENV, KEY)  # the daemon inherits it, as under systemd
    daemon = DaemonProcess(workdir)
    config = write_config(daemon, workdir, fake.url, 5.0)
    daemon.args += ["--config", str(config)]
    daemon.start()
    try:
        with_key = f"import os; os.environ[{API_KEY_ENV!r}] = {KEY!r}; "
        commands = (("status",), ("--json", "status"), ("verify",), ("--json", "verify"))
        outputs = [posctl(config, *args, preamble=with_key) for args in commands]
        assert [run.returncode for run in outputs] == [0, 0, 0, 0], outputs
        assert fake.received("positionbook") == [{"apikey": KEY}] * 2
        printed = subprocess.run(
            [sys.executable, "-m", "positiond", "--config", str(config), "--print-config"],
            capture_output=True, text=True, timeout=60 * UNIT,
        )  # fmt: skip
        assert printed.returncode == 0 and "openalgo_api_key_file" in printed.stdout
        texts = [run.stdout + run.stderr for run in (*outputs, printed)]
    finally:
        assert daemon.stop() == 0
    texts.append(daemon.log.read_text())
    texts += [p.read_text() for p in workdir.rglob("status.json")]
    assert all(KEY not in text for text in texts)
