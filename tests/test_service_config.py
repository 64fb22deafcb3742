"""Settings of the Telegram service: variable names, validation messages, .env.example."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from joeybot.config import Settings, SettingsError, load_settings, secret_variables

from .service_support import REPO_ROOT

ENV_EXAMPLE = REPO_ROOT / ".env.example"
# `KEY=value`, or `# KEY=` for a setting documented but left at a default that has no
# portable spelling (a home folder, a multi-line persona).
_ACTIVE = re.compile(r"^([A-Z][A-Z0-9_]*)=")
_COMMENTED = re.compile(r"^# ([A-Z][A-Z0-9_]*)=$")


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.split("_", 1)[0].lower() in Settings.model_fields:
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no .env of the developer's


def all_variables() -> set[str]:
    return {
        f"{section}_{field}".upper()
        for section, info in Settings.model_fields.items()
        for field in info.annotation.model_fields
    }


def documented_variables() -> tuple[set[str], set[str]]:
    active, commented = set(), set()
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        if match := _ACTIVE.match(line):
            active.add(match.group(1))
        elif match := _COMMENTED.match(line):
            commented.add(match.group(1))
    return active, commented


def test_env_example_documents_every_setting() -> None:
    active, commented = documented_variables()
    assert active.isdisjoint(commented)
    assert active | commented == all_variables()


def test_env_example_lines_have_comments() -> None:
    lines = ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
    for index, line in enumerate(lines):
        if _ACTIVE.match(line):
            previous = lines[index - 1]
            assert previous.startswith("#"), f"no comment above {line!r}"


def test_env_example_values_are_defaults() -> None:
    assert Settings(_env_file=ENV_EXAMPLE) == Settings(_env_file=None)


@pytest.mark.parametrize(
    ("variable", "value", "section", "field", "expected"),
    [
        ("BOT_TOKEN", "123:abc-_X", "bot", "token", "123:abc-_X"),
        ("REDIS_URL", "redis://:pw@redis:6380/2", "redis", "url", "redis://:pw@redis:6380/2"),
        (
            "TELEGRAM_API_URL",
            "http://127.0.0.1:8081/",
            "telegram",
            "api_url",
            "http://127.0.0.1:8081",
        ),
        ("HISTORY_MAX_TURNS", "6", "history", "max_turns", 6),
        ("WORKER_LEASE_S", "2.5", "worker", "lease_s", 2.5),
        ("BOT_ADMIN_USER_IDS", "1, 2 3", "bot", "admin_user_ids", [1, 2, 3]),
        ("BOT_ALLOWED_USER_IDS", "[7,8]", "bot", "allowed_user_ids", [7, 8]),
        ("ADMIN_PASSWORD", "s3cret", "admin", "password", "s3cret"),
    ],
)
def test_variable_sets_nested_field(
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    value: str,
    section: str,
    field: str,
    expected: object,
) -> None:
    monkeypatch.setenv(variable, value)
    actual = getattr(getattr(load_settings(), section), field)
    if hasattr(actual, "get_secret_value"):
        actual = actual.get_secret_value()
    assert actual == expected


def test_secrets_are_secret_fields() -> None:
    assert {"BOT_TOKEN", "BOT_WEBHOOK_SECRET", "ADMIN_PASSWORD"} <= secret_variables()


def test_invalid_token_error_hides_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOT_TOKEN", "not a token sEcReT")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert "BOT_TOKEN" in message
    assert "sEcReT" not in message
    assert "123456789:" in message  # the expected form


def test_invalid_redis_url_error_hides_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "http://user:hunter2@redis:6379/0")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert "REDIS_URL" in message
    assert "hunter2" not in message
    assert "redis://host:port/db" in message


def test_misspelt_variable_error_hides_value(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("BOT_TOKN=123:sEcReT\n", encoding="utf-8")
    with pytest.raises(SettingsError) as caught:
        load_settings(_env_file=env_file)
    message = str(caught.value)
    assert "BOT_TOKN" in message
    assert "sEcReT" not in message


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("WORKER_LEASE_S", "soon"),
        ("BOT_MAX_QUEUE_DEPTH", "0"),
        ("TELEGRAM_API_URL", "api.telegram.org"),
        ("BOT_WEBHOOK_SECRET", "has spaces"),
        ("BOT_ADMIN_USER_IDS", "1,two"),
    ],
)
def test_invalid_value_names_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=variable):
        load_settings()


def test_foreign_environment_variables_ignored(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    # Kubernetes sets these for a service named redis; they must not stop joeybot.
    monkeypatch.setenv("REDIS_PORT", "tcp://10.0.0.5:6379")
    monkeypatch.setenv("REDIS_SERVICE_HOST", "10.0.0.5")

    assert load_settings().redis.url == Settings(_env_file=None).redis.url


def test_unknown_model_variable_in_env_file_rejected(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("MODEL_BASSE=/models/x\n", encoding="utf-8")

    with pytest.raises(SettingsError, match="unknown variables: MODEL_BASSE"):
        load_settings(_env_file=env_file)


def test_env_file_not_utf8_rejected(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_bytes(b"MODEL_BASE=caf\xe9\n")

    with pytest.raises(SettingsError, match="not valid UTF-8"):
        load_settings(_env_file=env_file)
