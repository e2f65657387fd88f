"""The [alerts] section: typed sinks, clear errors naming the key, secrets never printed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from positiond import cli
from positiond.alerts.settings import KINDS, format_alerts, parse_alerts
from positiond.config import ConfigError, format_config, load

GOOD = """
[alerts]
retry_for = 600

[[alerts.sink]]
name = "ops-hook"
type = "webhook"
url = "http://127.0.0.1:8080/positiond"
events = ["crashed", "stalled", "needs_review"]
headers = {Authorization = "Bearer inline-secret"}
headers_file = "HEADERS"

[[alerts.sink]]
name = "pager"
type = "command"
command = ["/usr/local/bin/page-me", "--quiet"]
min_severity = "critical"
"""


def config_file(tmp_path: Path, text: str) -> Path:
    headers = tmp_path / "hook.headers"
    headers.write_text("# the hook's token\nX-Api-Key: file-secret\n")
    path = tmp_path / "positiond.toml"
    path.write_text(text.replace("HEADERS", str(headers)))
    return path


def loaded(tmp_path: Path, text: str) -> str:
    return format_config(load(["--config", str(config_file(tmp_path, text))], env={}))


def test_sinks_are_typed_with_their_filters(tmp_path: Path) -> None:
    path = config_file(tmp_path, GOOD)
    alerts = load(["--config", str(path)], env={}).config.alerts
    hook, pager = alerts.sinks
    assert alerts.retry_for == 600
    assert hook.headers == {"Authorization": "Bearer inline-secret", "X-Api-Key": "file-secret"}
    assert hook.kinds == ("crashed", "stalled", "needs_review")
    assert pager.command == ("/usr/local/bin/page-me", "--quiet")
    assert pager.kinds == (
        "crashed", "not_returned", "protect_failed", "protect_triggered", "unhealthy"
    )  # critical only
    assert set(KINDS) >= {"crashed", "stalled", "revived", "needs_review", "orphan", "fenced"}


def test_print_config_shows_sinks_without_secrets(tmp_path: Path) -> None:
    text = loaded(tmp_path, GOOD)
    assert 'name = "ops-hook"' in text and 'name = "pager"' in text
    assert "Authorization" in text and "X-Api-Key" in text  # names only
    assert "inline-secret" not in text and "file-secret" not in text
    assert "inline-secret" not in repr(load(["--config", str(tmp_path / "positiond.toml")], env={}))


@pytest.mark.parametrize(
    ("sink", "message"),
    [
        ('name = "t"\ntype = "telegram"\ntoken_file = "/nonexistent"', "chat_id.*required"),
        ('name = "t"\ntype = "telegram"\nchat_id = "1"', "token_file.*required"),
        ('name = "t"\ntype = "telegram"\nchat_id = "1"\ntoken_file = "/no/such"', "/no/such"),
        ('name = "t"\ntype = "openalgo"', "username.*required"),
        ('name = "t"\ntype = "openalgo"\nusername = "u"', "needs \\[openalgo\\] host"),
        ('name = "t"\ntype = "command"\ncommand = ["x"]\nchat_id = "1"', "telegram and openalgo"),
        ('name = "t"\ntype = "smoke"', "must be one of webhook, command, telegram, openalgo"),
        ('name = "t"\ntype = "command"\ncommand = []', "required"),
        ('name = "t"\ntype = "command"\ncommand = ["x"]\nevents = ["crash"]', "not an alert kind"),
        ('name = "t"\ntype = "command"\ncommand = ["x"]\ncolour = 1', "unknown key"),
        ('name = "t"\ntype = "webhook"\nurl = "ftp://x"', "http:// or https://"),
        ('name = "t"\ntype = "command"\ncommand = ["x"]\ntimeout = 0', "must be within"),
    ],
)
def test_invalid_sinks_are_refused_naming_the_key(tmp_path: Path, sink: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        loaded(tmp_path, f"[[alerts.sink]]\n{sink}\n")


def test_two_sinks_with_one_name_are_refused() -> None:
    sink = {"name": "a", "type": "command", "command": ["x"]}
    with pytest.raises(ValueError, match="two sinks are named 'a'"):
        parse_alerts({"sink": [sink, sink]})


def test_a_bad_headers_file_line_is_refused_without_showing_it(tmp_path: Path) -> None:
    headers = tmp_path / "h"
    headers.write_text("Bearer the-secret-token\n")
    sink = {"name": "a", "type": "webhook", "url": "http://x/", "headers_file": str(headers)}
    with pytest.raises(ValueError, match="line 1") as info:
        parse_alerts({"sink": [sink]})
    assert "the-secret-token" not in str(info.value)


def test_webhook_without_httpx_exits_2_before_starting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "httpx", None)  # as if not installed
    path = config_file(tmp_path, GOOD)
    db = tmp_path / "never.db"
    code = cli.main(["--config", str(path), "--db", str(db), "--endpoint", "ipc:///tmp/pd-x"])
    assert code == 2
    assert "httpx" in capsys.readouterr().err
    assert not db.exists()


def test_print_config_hides_a_password_or_query_in_the_url(tmp_path: Path) -> None:
    text = loaded(
        tmp_path,
        '[[alerts.sink]]\nname = "h"\ntype = "webhook"\n'
        'url = "https://bot:pw-secret@hooks.example/x?token=q-secret"\n',
    )
    assert 'url = "https://hooks.example/x?..."' in text
    assert "pw-secret" not in text and "q-secret" not in text


HUMAN = """
[openalgo]
host = "http://127.0.0.1:5000"

[[alerts.sink]]
name = "phone"
type = "telegram"
token_file = "TOKEN"
chat_id = "123456"
api_url = "https://api.telegram.org"

[[alerts.sink]]
name = "openalgo-bot"
type = "openalgo"
username = "my_openalgo_user"
group_window = 0
"""


def test_human_sinks_read_the_documented_keys_and_never_show_the_token(tmp_path: Path) -> None:
    token = tmp_path / "telegram.token"
    token.write_text("123:bot-secret-token\n")
    path = tmp_path / "positiond.toml"
    path.write_text(HUMAN.replace("TOKEN", str(token)))
    result = load(["--config", str(path)], env={})
    phone, bot = result.config.alerts.sinks
    assert (phone.token, phone.chat_id, phone.api_url) == (
        "123:bot-secret-token", "123456", "https://api.telegram.org",
    )  # fmt: skip
    assert phone.group_window == 0.5 and phone.human
    assert (bot.username, bot.group_window, bot.token) == ("my_openalgo_user", 0.0, "")
    text = format_config(result)
    assert 'chat_id = "123456"' in text and 'username = "my_openalgo_user"' in text
    assert f"token: hidden (from file {token})" in text
    assert "bot-secret-token" not in text and "bot-secret-token" not in repr(result)


def test_the_telegram_token_may_come_from_the_environment(tmp_path: Path) -> None:
    sink = {"name": "p", "type": "telegram", "chat_id": 42}
    alerts = parse_alerts({"sink": [sink]}, env={"POSITIOND_TELEGRAM_TOKEN": "env-secret"})
    assert alerts.sinks[0].token == "env-secret" and alerts.sinks[0].chat_id == "42"
    assert "env-secret" not in "\n".join(format_alerts(alerts))
