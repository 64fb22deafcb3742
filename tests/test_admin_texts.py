"""Language choice, texts and the status lines of the admin page."""

from __future__ import annotations

import re

import pytest

from joeybot.admin.backend import ReplyProgress, ReplyState
from joeybot.admin.texts import TEXTS, language_from_header, text
from joeybot.admin.ui import (
    SessionSettings,
    chat_display,
    jobs_table,
    parse_chat_id,
    render_status,
    workers_table,
)

DONE_STATS = {
    "first_token_s": 0.123,
    "tokens_per_s": 41.26,
    "prompt_tokens": 30,
    "new_tokens": 12,
    "seconds": 0.4,
    "queue_s": 0.01,
    "first_piece_after_request_s": 0.15,
    "use_adapter": False,
    "has_adapter": True,
    "seed": 7,
    "worker": "w1",
    "hit_token_limit": True,
}


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, "en"),
        ("", "en"),
        ("ru-RU,ru;q=0.9,en-US;q=0.8,en;q=0.7", "ru"),
        ("en-US,en;q=0.9,ru;q=0.8", "en"),
        ("de-DE,de;q=0.9,ru;q=0.5", "ru"),
        ("fr, ru;q=0.4, en;q=0.6", "en"),
        ("ru;q=0, en;q=0.1", "en"),
        ("ru;q=oops", "en"),
        ("*", "en"),
        ("RU", "ru"),
    ],
)
def test_language_from_header(header: str | None, expected: str) -> None:
    assert language_from_header(header) == expected


def test_both_languages_have_same_keys() -> None:
    assert set(TEXTS["en"]) == set(TEXTS["ru"])


def test_placeholders_match_between_languages() -> None:
    for key, english in TEXTS["en"].items():
        russian = TEXTS["ru"][key]
        assert set(re.findall(r"\{(\w+)\}", english)) == set(re.findall(r"\{(\w+)\}", russian))


def test_text_falls_back_to_english() -> None:
    assert text("de", "send") == "Send"
    assert text("ru", "chat_found", chat_id=5, turns=2) == "Чат 5: реплик: 2."


def test_done_status_lists_stats() -> None:
    progress = ReplyProgress(ReplyState.DONE, "Hi!", DONE_STATS)

    status = render_status("en", progress)

    assert status.split(" · ") == [
        "first token 0.12 s",
        "41.3 tokens/s",
        "30 prompt + 12 new tokens",
        "0.40 s in total",
        "queue 0.01 s",
        "0.15 s from send to first text",
        "adapter off",
        "cut at max new tokens",
        "seed 7",
        "worker w1",
    ]


def test_stopped_status_in_russian() -> None:
    progress = ReplyProgress(ReplyState.STOPPED, "Hi", {"stopped": True, "seconds": 1.0})

    assert render_status("ru", progress) == "Остановлено. · всего 1.00 с"


@pytest.mark.parametrize(
    ("progress", "expected"),
    [
        (ReplyProgress(ReplyState.NO_WORKERS), "No worker is online"),
        (ReplyProgress(ReplyState.QUEUED), "Waiting for a worker…"),
        (ReplyProgress(ReplyState.QUEUED, jobs_ahead=3), "3 job(s) ahead"),
        (ReplyProgress(ReplyState.GENERATING, stats={"worker": "w9"}), "Generating on w9"),
        (ReplyProgress(ReplyState.TIMED_OUT), "Timed out"),
        (
            ReplyProgress(ReplyState.ERROR, error_code="invalid_options", error="top_p too big"),
            "Invalid generation settings: top_p too big",
        ),
        (ReplyProgress(ReplyState.ERROR, error_code="worker_lost"), "worker running this reply"),
        (ReplyProgress(ReplyState.ERROR, error_code="other", error="boom"), "Failed: boom"),
        (ReplyProgress(ReplyState.DONE, stats={"has_adapter": False}), "no adapter loaded"),
    ],
)
def test_status_lines(progress: ReplyProgress, expected: str) -> None:
    assert expected in render_status("en", progress)


def test_session_settings_off_sends_no_overrides() -> None:
    settings = SessionSettings(False, 0.3, 0.5, 10, 1.2, 64, 5, "  ")

    assert settings.options() == {}
    assert settings.system_prompt() is None


def test_session_settings_on_sends_all_values() -> None:
    settings = SessionSettings(True, 0.3, 0.5, 10.0, 1.2, 64.0, 5.0, " Be Joey. ")

    assert settings.options() == {
        "temperature": 0.3,
        "top_p": 0.5,
        "top_k": 10,
        "repetition_penalty": 1.2,
        "max_new_tokens": 64,
        "seed": 5,
    }
    assert settings.system_prompt() == "Be Joey."
    assert SessionSettings(True, 0.3, 0.5, 10, 1.2, 64, None, "").options()["seed"] is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [("123", 123), (" -1001234567890 ", -1001234567890), ("12a", None), ("", None), (None, None)],
)
def test_parse_chat_id(value: str | None, expected: int | None) -> None:
    assert parse_chat_id(value) == expected


def test_tables_translate_headers_and_format_values() -> None:
    workers = workers_table(
        "ru",
        [{"id": "w1", "host": "h", "pid": 1, "started": 0, "jobs_done": 3,
          "model": {"base": "tiny", "adapter": "lora"}}],
    )  # fmt: skip
    job = {"job_id": "j", "kind": "admin", "chat_id": None, "duration_s": 1.234}
    jobs = jobs_table("en", [job])

    assert workers["headers"][0] == "Воркер"
    assert workers["data"] == [["w1", "h", 1, "1970-01-01 00:00:00", 3, "tiny + lora"]]
    assert jobs["headers"][1] == "Job"
    assert jobs["data"] == [["", "j", "admin", "", "", 1.23, "", ""]]


def test_stopped_status_without_stats() -> None:
    assert render_status("en", ReplyProgress(ReplyState.STOPPED, "Hi")) == "Stopped."


def test_chat_display_shows_stats_under_replies() -> None:
    turns = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hey!", "stats": "first token 0.10 s"},
        {"role": "user", "content": "Pizza?"},
        {"role": "assistant", "content": "Always"},
    ]

    assert chat_display(turns) == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hey!\n\n⏱ first token 0.10 s"},
        {"role": "user", "content": "Pizza?"},
        {"role": "assistant", "content": "Always"},
    ]
