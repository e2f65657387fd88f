"""positiond.openalgo against the fake OpenAlgo server (tests/fake_openalgo.py): positionbook
replies in their string, number and analyzer variants, every way a call can fail (never "flat"),
the Telegram notify call, where the API key comes from and that it shows nowhere; the
``[openalgo]`` config section.
"""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from positiond.config import ConfigError, format_config, load
from positiond.openalgo import (
    API_KEY_ENV,
    AsyncOpenAlgo,
    OpenAlgo,
    OpenAlgoError,
    OpenAlgoTimeout,
    OpenAlgoUnavailable,
    Settings,
    api_key,
    positionbook_request,
    settings_of,
)
from positiond_client.recovery import parse_positionbook
from tests.fake_openalgo import FakeOpenAlgo, Reply, book
from tests.helpers import UNIT

KEY = "oa-secret-4f9c2e71d0"
CE = "NIFTY28NOV2524000CE"
PE = "NIFTY28NOV2524000PE"


@pytest.fixture
def fake() -> Iterator[FakeOpenAlgo]:
    with FakeOpenAlgo(api_key=KEY) as server:
        yield server


def client(fake: FakeOpenAlgo, timeout: float = 5.0) -> OpenAlgo:
    return OpenAlgo(Settings(fake.url, timeout=timeout * UNIT), KEY)


def string_row(symbol: str, quantity: str) -> dict[str, str]:
    return {"symbol": symbol, "exchange": "NFO", "product": "MIS", "quantity": quantity,
            "average_price": "100.50", "ltp": "101.25", "pnl": "56.25"}  # fmt: skip


# ---- positionbook ---------------------------------------------------------------------------


def test_positionbook_posts_the_key_and_parses_string_quantities(fake: FakeOpenAlgo) -> None:
    fake.reply("positionbook", Reply(book(string_row(CE, "75"), string_row(PE, "-50"))))
    with client(fake) as oa:
        reply = oa.positionbook()
    assert fake.received("positionbook") == [{"apikey": KEY}]
    assert fake.requests[0].headers["Content-Type"] == "application/json"
    net = parse_positionbook(reply)
    assert {inst[0]: qty for inst, (qty, _) in net.items()} == {CE: 75, PE: -50}


def test_positionbook_parses_number_quantities_and_analyzer_extras(fake: FakeOpenAlgo) -> None:
    numbers = {"symbol": CE, "exchange": "NFO", "product": "NRML", "quantity": -150,
               "average_price": 100.5, "ltp": 99.0, "pnl": 225.0,
               "average_price_basis": "net"}  # fmt: skip
    analyzer = {**string_row(PE, "25"), "unrealized_pnl": "12.5", "lot_size": 25}
    fake.reply("positionbook", Reply(book(numbers, analyzer, mode="analyze",
                                          total_pnl=237.5)))  # fmt: skip
    with client(fake) as oa:
        reply = oa.positionbook()
    assert reply["mode"] == "analyze"
    net = parse_positionbook(reply)
    assert net[(CE, "NFO", "NRML")][0] == -150 and net[(PE, "NFO", "MIS")][0] == 25


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        (Reply({"status": "error", "message": "Session expired, login again"}), "Session expired"),
        (Reply({"status": "error", "error_type": "broker"}), "status 'error'"),
        (Reply({"data": []}), "status None"),  # no status at all is no success either
        (Reply([1, 2]), "not a JSON object"),
        (Reply(b"<html>Bad Gateway</html>", 502), "HTTP 502: <html>Bad Gateway"),
        (Reply({"status": "error", "message": "rate limited"}, 429), "HTTP 429: rate limited"),
        (Reply(b"not json", 200), "not JSON"),
    ],
    ids=["error-status", "no-message", "no-status", "list", "502-html", "429-json", "garbage"],
)
def test_every_failure_is_a_refusal_with_the_brokers_message(
    fake: FakeOpenAlgo, answer: Reply, said: str
) -> None:
    fake.reply("positionbook", answer)
    with client(fake) as oa, pytest.raises(OpenAlgoError) as caught:
        oa.positionbook()
    assert said in caught.value.message and "positionbook" in caught.value.message
    assert KEY not in caught.value.message


def test_a_wrong_key_is_refused_with_openalgos_message(fake: FakeOpenAlgo) -> None:
    with OpenAlgo(Settings(fake.url), "wrong-key") as oa, pytest.raises(OpenAlgoError) as caught:
        oa.positionbook()
    assert "HTTP 403: Invalid openalgo apikey" in caught.value.message


def test_a_slow_answer_is_a_timeout_not_a_wait(fake: FakeOpenAlgo) -> None:
    timeout = 0.3 * UNIT
    fake.reply("positionbook", Reply(book(string_row(CE, "75")), delay=20 * timeout))
    start = time.monotonic()
    with client(fake, timeout=0.3) as oa, pytest.raises(OpenAlgoTimeout) as caught:
        oa.positionbook()
    assert time.monotonic() - start < 10 * timeout
    assert "no answer" in caught.value.message


def test_nobody_listening_is_a_refusal() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago and has no listener
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    oa = OpenAlgo(Settings(f"http://127.0.0.1:{port}"), KEY)
    with oa, pytest.raises(OpenAlgoError) as caught:
        oa.positionbook()
    assert "cannot reach" in caught.value.message and not isinstance(
        caught.value, OpenAlgoTimeout
    )


async def test_the_async_client_shares_requests_and_judgement(fake: FakeOpenAlgo) -> None:
    fake.reply("positionbook", Reply(book(string_row(CE, "75"))))
    settings = Settings(fake.url, timeout=0.3 * UNIT)
    async with AsyncOpenAlgo(settings, KEY) as oa:
        reply = await oa.positionbook()
        assert parse_positionbook(reply)[(CE, "NFO", "MIS")][0] == 75
        fake.reply("positionbook", Reply({"status": "error", "message": "broker down"}))
        with pytest.raises(OpenAlgoError, match="broker down"):
            await oa.positionbook()
        fake.reply("positionbook", Reply(book(), delay=20 * settings.timeout))
        with pytest.raises(OpenAlgoTimeout):
            await oa.positionbook()
        assert await oa.telegram_notify("trader1", "ce-1 CRASHED") == {
            "status": "success", "message": "sent"
        }  # fmt: skip
    assert fake.received("positionbook")[0] == {"apikey": KEY}
    assert fake.received("telegram/notify") == [
        {"apikey": KEY, "username": "trader1", "message": "ce-1 CRASHED"}
    ]


def test_telegram_notify_is_recorded_by_the_fake(fake: FakeOpenAlgo) -> None:
    with client(fake) as oa:
        oa.telegram_notify("desk", "2 legs CRASHED")
    assert fake.received("telegram/notify") == [
        {"apikey": KEY, "username": "desk", "message": "2 legs CRASHED"}
    ]


# ---- the API key ----------------------------------------------------------------------------


def test_the_key_comes_from_the_environment_before_the_file(tmp_path: Path) -> None:
    key_file = tmp_path / "openalgo.key"
    key_file.write_text(f"  {KEY}\n")
    settings = Settings("http://127.0.0.1:5000", key_file)
    assert api_key(settings, {}) == KEY
    assert api_key(settings, {API_KEY_ENV: "from-env"}) == "from-env"
    with pytest.raises(OpenAlgoUnavailable, match="no OpenAlgo API key"):
        api_key(Settings("http://h"), {})
    with pytest.raises(OpenAlgoUnavailable, match="cannot read"):
        api_key(Settings("http://h", tmp_path / "missing"), {})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(OpenAlgoUnavailable, match="is empty"):
        api_key(Settings("http://h", tmp_path / "empty"), {})


async def test_a_broker_echoing_the_key_does_not_put_it_in_the_error(fake: FakeOpenAlgo) -> None:
    echo = Reply({"status": "error", "message": f"apikey {KEY} is not valid"}, 401)
    fake.reply("positionbook", echo)
    with client(fake) as oa, pytest.raises(OpenAlgoError) as caught:
        oa.positionbook()
    assert KEY not in str(caught.value) and "apikey <api key> is not valid" in str(caught.value)
    async with AsyncOpenAlgo(Settings(fake.url), KEY) as aoa:
        with pytest.raises(OpenAlgoError) as caught:
            await aoa.positionbook()
    assert KEY not in str(caught.value) and caught.value.__cause__ is None


def test_the_key_shows_in_no_repr(fake: FakeOpenAlgo) -> None:
    request = positionbook_request(KEY)
    assert request.body == {"apikey": KEY} and KEY not in repr(request)
    with client(fake) as oa:
        assert KEY not in repr(oa)


def test_without_httpx_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "httpx", None)  # import httpx raises ImportError
    with pytest.raises(OpenAlgoUnavailable, match=r"positiond\[openalgo\]"):
        OpenAlgo(Settings("http://127.0.0.1:5000"), KEY)


# ---- the [openalgo] config section ----------------------------------------------------------


def test_the_openalgo_section_is_read_from_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "positiond.toml"
    config.write_text(
        'log_level = "DEBUG"\n[openalgo]\nhost = "http://127.0.0.1:5000"\n'
        'api_key_file = "/etc/positiond/openalgo.key"\ntimeout = 3\n'
    )
    loaded = load(["--config", str(config)], {}, None)
    assert settings_of(loaded.config) == Settings(
        "http://127.0.0.1:5000", Path("/etc/positiond/openalgo.key"), 3.0
    )
    assert loaded.sources["openalgo_host"] == f"file {config}"
    assert settings_of(load([], {}, None).config) is None  # no host: no OpenAlgo
    env = {"POSITIOND_OPENALGO_TIMEOUT": "7"}
    assert load(["--config", str(config)], env, None).config.openalgo_timeout == 7.0


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ('[openalgo]\nhost = "127.0.0.1:5000"\n', "openalgo_host"),
        ('[openalgo]\nhost = "http://h"\napikey = "x"\n', "openalgo.apikey"),
        ('[openalgo]\nhost = "http://h"\ntimeout = 0\n', "openalgo_timeout"),
        ('openalgo = "http://h"\n', "openalgo"),
    ],
    ids=["no-scheme", "unknown-key", "zero-timeout", "not-a-table"],
)
def test_a_bad_openalgo_section_is_refused_by_name(tmp_path: Path, text: str, name: str) -> None:
    config = tmp_path / "positiond.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load(["--config", str(config)], {}, None)
    assert caught.value.name == name


def test_print_config_shows_the_key_file_never_the_key(tmp_path: Path) -> None:
    key_file = tmp_path / "openalgo.key"
    key_file.write_text(KEY)
    config = tmp_path / "positiond.toml"
    config.write_text(f'[openalgo]\nhost = "http://127.0.0.1:5000"\napi_key_file = "{key_file}"\n')
    text = format_config(load(["--config", str(config)], {API_KEY_ENV: KEY}, None))
    assert str(key_file) in text and 'openalgo_host = "http://127.0.0.1:5000"' in text
    assert KEY not in text
