"""Settings: defaults, file < environment < CLI layering, one-line errors naming the field, secrets."""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from pydantic import BaseModel

from bot.logs import close_logging, configure_logging
from config.settings import DEFAULT_CONFIG_PATH, ConfigError, Settings, load_settings
from strategies.base import load_policy
from strategies.trend import TrendPolicy


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No VOLBOT_* variable of the machine may leak into these tests."""
    for key in list(os.environ):
        if key.upper().startswith("VOLBOT_"):
            monkeypatch.delenv(key)


@pytest.fixture
def write_toml(tmp_path: Path) -> Iterator[Any]:
    def write(text: str) -> Path:
        path = tmp_path / f"{uuid.uuid4().hex}.toml"
        path.write_text(text, encoding="utf-8")
        return path

    yield write


def test_defaults_load_without_any_key() -> None:
    settings = load_settings()
    assert settings == Settings()  # the shipped file states exactly the code defaults
    assert settings.run.initial_cash == 100_000.0 and settings.run.policy == "trend"
    assert settings.store.url == "sqlite+aiosqlite:///var/volbot.db"
    assert (
        settings.live.enabled is False and settings.live.api_key is None and settings.live.api_secret is None
    )


def test_default_toml_documents_every_field_of_every_section() -> None:
    text = DEFAULT_CONFIG_PATH.read_text(encoding="utf-8")
    blocks = re.split(r"^\[(\w+)\]\s*$", text, flags=re.MULTILINE)
    sections = dict(zip(blocks[1::2], blocks[2::2], strict=True))
    assert list(sections) == list(Settings.model_fields)
    for section, info in Settings.model_fields.items():
        model = info.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        for name in model.model_fields:
            if name in {"api_key", "api_secret"}:
                assert name in sections[section]  # mentioned, never set
                continue
            pattern = rf"^(# )?({name} =|\[\[{section}\.{name}\]\])"
            assert re.search(pattern, sections[section], flags=re.MULTILINE), f"{section}.{name} undocumented"


def test_file_values_override_defaults_and_keep_the_rest(write_toml: Any) -> None:
    path = write_toml('[run]\nseed = 5\npolicy = "ppo:var/models/a.zip"\n[venue]\nlatency_ms = 10.0\n')
    settings = load_settings(path)
    assert (settings.run.seed, settings.run.policy, settings.venue.latency_ms) == (
        5,
        "ppo:var/models/a.zip",
        10.0,
    )
    assert settings.run.initial_cash == 100_000.0 and settings.venue.latency_jitter_ms == 20.0


def test_policy_section_reaches_the_policy(write_toml: Any) -> None:
    settings = load_settings(write_toml("[trend]\nhorizons_s = [60, 600]\nvol_target = 0.3\n"))
    policy = load_policy("trend", settings=settings)
    assert isinstance(policy, TrendPolicy)
    assert (policy.config.horizons_s, policy.config.vol_target) == ([60, 600], 0.3)


def test_environment_overrides_file_and_cli_overrides_environment(
    write_toml: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_toml("[run]\nseed = 5\ninitial_cash = 5000.0\n[logging]\nlevel = 'WARNING'\n")
    monkeypatch.setenv("VOLBOT_RUN__SEED", "6")
    monkeypatch.setenv("VOLBOT_VENUE__LATENCY_MS", "1.5")
    monkeypatch.setenv("volbot_journal__gzip", "true")
    settings = load_settings(path)
    assert (settings.run.seed, settings.run.initial_cash) == (6, 5000.0)  # tables merge key by key
    assert (settings.venue.latency_ms, settings.journal.gzip, settings.logging.level) == (
        1.5,
        True,
        "WARNING",
    )

    settings = load_settings(path, overrides={"run": {"seed": 7}, "logging": {"level": "debug"}})
    assert (settings.run.seed, settings.run.initial_cash, settings.logging.level) == (7, 5000.0, "DEBUG")


@pytest.mark.parametrize(
    ("toml", "env", "overrides", "expected"),
    [
        (
            "[venue]\nspot_taker_fee = 1.5\n",
            {},
            {},
            "config error: venue.spot_taker_fee: Input should be less than 0.1 (got 1.5)",
        ),
        ("[venue]\nlatency_msec = 3\n", {}, {}, "config error: venue.latency_msec: unknown field (got 3)"),
        ("[rsik]\nmax_drawdown = 0.1\n", {}, {}, "config error: rsik: unknown field"),
        ('[run]\nseed = "x"\n', {}, {}, "config error: run.seed: Input should be a valid integer"),
        (
            "",
            {"VOLBOT_VENUE__LATENCY_MS": "fast"},
            {},
            "config error: venue.latency_ms: Input should be a valid",
        ),
        ("", {"VOLBOT_VENUE__LATENCY": "3"}, {}, "config error: venue.latency: unknown field (got '3')"),
        (
            "",
            {"VOLBOT_RSIK__MAX_DRAWDOWN": "0.1"},
            {},
            "config error: VOLBOT_RSIK__MAX_DRAWDOWN: unknown section",
        ),
        ("", {}, {"logging": {"level": "LOUD"}}, "config error: logging.level: Input should be 'DEBUG'"),
        (
            "[store]\nurl = 'mysql://u@h/db'\n",
            {},
            {},
            "config error: store.url: unsupported database 'mysql'",
        ),
        ("[store]\nurl = 'not a url'\n", {}, {}, "config error: store.url: not a database URL"),
        ("[live]\nenabled = true\n", {}, {}, "config error: live: enabled needs VOLBOT_LIVE__API_KEY"),
        ("[run]\nseed = -1\ninitial_cash = 0\n", {}, {}, "config error: run.seed: Input should be greater"),
        (
            "[run\nseed = 1\n",
            {},
            {},
            "invalid TOML: Expected ']' at the end of a table declaration (at line 1",
        ),
    ],
)
def test_bad_settings_give_one_line_naming_the_field(
    write_toml: Any,
    monkeypatch: pytest.MonkeyPatch,
    toml: str,
    env: dict[str, str],
    overrides: dict[str, Any],
    expected: str,
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as caught:
        load_settings(write_toml(toml), overrides=overrides)
    message = str(caught.value)
    assert expected in message
    assert message.startswith("config error: ") and "\n" not in message


def test_several_errors_are_counted_on_the_same_line(write_toml: Any) -> None:
    with pytest.raises(ConfigError, match=r"^config error: run\.seed: .* \(\+1 more\)$"):
        load_settings(write_toml("[run]\nseed = -1\ninitial_cash = 0\n"))


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(
        ConfigError, match=rf"^config error: {re.escape(str(missing))}: cannot read settings file"
    ):
        load_settings(missing)


def test_credentials_come_only_from_the_environment(write_toml: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    leaked = f"file-{uuid.uuid4().hex}"
    with pytest.raises(ConfigError) as from_file:
        load_settings(write_toml(f"[live]\napi_key = '{leaked}'\n"))
    assert "live.api_key: credentials are read only from the environment (VOLBOT_LIVE__API_KEY)" in str(
        from_file.value
    )
    assert leaked not in str(from_file.value)
    with pytest.raises(ConfigError, match=r"live\.api_secret: .* never from the command line"):
        load_settings(overrides={"live": {"api_secret": leaked}})

    key, secret = f"key-{uuid.uuid4().hex}", f"secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("VOLBOT_LIVE__API_KEY", key)
    monkeypatch.setenv("VOLBOT_LIVE__API_SECRET", secret)
    monkeypatch.setenv("VOLBOT_LIVE__ENABLED", "1")
    settings = load_settings()
    assert settings.live.enabled is True
    assert settings.live.api_key is not None and settings.live.api_key.get_secret_value() == key
    assert settings.live.api_secret is not None and settings.live.api_secret.get_secret_value() == secret
    redacted = json.dumps(settings.redacted_dict())
    assert key not in redacted and secret not in redacted and key not in repr(settings)


def test_loaded_credentials_never_reach_the_logs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = f"secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("VOLBOT_LIVE__API_SECRET", secret)
    settings = load_settings()
    path = configure_logging(tmp_path, "run-config", console=False)
    try:
        log = structlog.get_logger("test.config")
        log.info("settings_loaded", settings=settings, live=settings.live.model_dump())
        log.warning("exchange said", body=f'{{"error": "bad signature for {secret}"}}')
    finally:
        close_logging()
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) == 2 and secret not in text


def test_short_credentials_are_refused_without_echoing_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOLBOT_LIVE__API_KEY", "abc12")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "live.api_key: must have at least 8 characters" in str(caught.value)
    assert "abc12" not in str(caught.value)


def test_redacted_dict_is_json_and_hides_the_database_password() -> None:
    password = f"pw-{uuid.uuid4().hex}"
    settings = load_settings(
        overrides={"store": {"url": f"postgresql://bot:{password}@db.internal:5432/volbot"}}
    )
    redacted = settings.redacted_dict()
    assert redacted["store"]["url"] == "postgresql://bot:***@db.internal:5432/volbot"
    assert password not in json.dumps(redacted)
    assert redacted["run"]["var_dir"] == "var" and redacted["venue"]["latency_ms"] == 50.0
