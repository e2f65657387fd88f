"""``[protect]``: off by default, refuses what it cannot do, and a session only narrows it."""

from __future__ import annotations

from pathlib import Path

import pytest

from positiond.config import ConfigError, format_config, from_args, load
from positiond.protect.settings import ProtectConfig, ProtectConfigError, parse_protect

OPENALGO = '[openalgo]\nhost = "http://127.0.0.1:5000"\n'


def config_file(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "positiond.toml"
    path.write_text(text)
    return ["--config", str(path)]


def test_off_by_default(tmp_path: Path) -> None:
    cfg = from_args(config_file(tmp_path, OPENALGO), env={})
    assert cfg.protect == ProtectConfig()
    assert not cfg.protect.enabled
    assert not cfg.protect.protects("expiry_blast", True)  # a session cannot turn it on


def test_a_session_narrows_what_the_config_allows() -> None:
    named = parse_protect({"mode": "on", "strategies": ["expiry_blast"]})
    assert named.protects("expiry_blast", None) and named.protects("expiry_blast", True)
    assert not named.protects("expiry_blast", False)
    assert not named.protects("other", True) and not named.protects("other", None)
    every = parse_protect({"mode": "dry-run", "strategies": ["*"]})
    assert every.protects("anything", None) and not every.protects("anything", False)


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"mode": "yes", "strategies": ["*"]}, "protect.mode"),
        ({"mode": "on"}, "protect.strategies"),
        ({"mode": "on", "strategies": "*"}, "protect.strategies"),
        ({"mode": "on", "strategies": ["*"], "trading_window": "9-5"}, "protect.trading_window"),
        ({"mode": "on", "strategies": ["*"], "timezone": "Mars/Olympus"}, "protect.timezone"),
        ({"mode": "on", "strategies": ["*"], "pricetype": "MARKET"}, "protect.pricetype"),
        ({"mode": "on", "strategies": ["*"], "pricetype": "SL"}, "protect.limit_offset"),
        ({"mode": "on", "strategies": ["*"], "rate": 50}, "protect.rate"),
        ({"mode": "on", "strategies": ["*"], "closeposition": True}, "protect.closeposition"),
    ],
)
def test_bad_keys_are_named(table: dict[str, object], key: str) -> None:
    with pytest.raises(ProtectConfigError) as caught:
        parse_protect(table)
    assert caught.value.name == key


def test_protection_needs_an_openalgo_account(tmp_path: Path) -> None:
    argv = config_file(tmp_path, '[protect]\nmode = "on"\nstrategies = ["*"]\n')
    with pytest.raises(ConfigError) as caught:
        from_args(argv, env={})
    assert caught.value.name == "protect.mode"


def test_print_config_shows_the_section(tmp_path: Path) -> None:
    text = OPENALGO + '[protect]\nmode = "dry-run"\nstrategies = ["a", "b"]\n'
    text += 'trading_window = "09:15-15:30"\n'
    loaded = load(config_file(tmp_path, text), env={})
    printed = format_config(loaded)
    assert '[protect]\nmode = "dry-run"\nstrategies = ["a", "b"]' in printed
    assert 'trading_window = "09:15-15:30"' in printed
