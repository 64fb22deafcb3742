"""Splitting long replies and retrying Bot API calls, against the fake Bot API server."""

from __future__ import annotations

import pytest

from joeybot.delivery import (
    ChatBlocked,
    DeliveryPostponed,
    DeliveryRejected,
    RetryPolicy,
    call_with_retries,
    split_message,
    utf16_length,
)
from joeybot.testing import (
    DROPPED_CONNECTION,
    SERVER_ERROR,
    FakeTelegram,
    bad_request,
    too_many_requests,
)

SENTENCE = "Joey doesn't share food, and that is a rule everybody here should know."


def test_short_text_is_one_part() -> None:
    assert split_message("How you doin'?") == ["How you doin'?"]


def test_split_parts_fit_and_keep_order() -> None:
    text = " ".join(f"{SENTENCE} ({number})" for number in range(200))
    parts = split_message(text)
    assert len(parts) > 1
    assert all(utf16_length(part) <= 4096 for part in parts)
    assert " ".join(parts) == text


def test_split_prefers_sentence_end() -> None:
    text = " ".join([SENTENCE] * 100)
    parts = split_message(text)
    assert all(part.endswith("know.") for part in parts)


def test_split_prefers_paragraph_break() -> None:
    first = " ".join([SENTENCE] * 40)
    text = first + "\n\n" + " ".join([SENTENCE] * 40)
    parts = split_message(text)
    assert parts[0] == first


def test_split_counts_utf16_units() -> None:
    # Each emoji is two UTF-16 units: 3000 of them are 6000 units but 3000 characters.
    text = "😀" * 3000
    parts = split_message(text)
    assert [utf16_length(part) for part in parts] == [4096, 6000 - 4096]
    assert "".join(parts) == text


def test_split_without_spaces_cuts_at_limit() -> None:
    parts = split_message("a" * 10, limit=4)
    assert parts == ["aaaa", "aaaa", "aa"]


def test_split_at_words_when_no_sentence_ends() -> None:
    text = " ".join(["word"] * 3000)
    parts = split_message(text)
    assert all(not part.startswith(" ") and part.split(" ")[-1] == "word" for part in parts)
    assert " ".join(parts) == text


@pytest.fixture
async def fake() -> FakeTelegram:
    async with FakeTelegram() as server:
        yield server


async def send(fake: FakeTelegram, policy: RetryPolicy, text: str = "hi") -> object:
    bot = fake.create_bot()
    try:
        return await call_with_retries(lambda: bot.send_message(42, text), "test send", policy)
    finally:
        await bot.session.close()


async def test_retry_after_waits_then_sends(fake: FakeTelegram) -> None:
    fake.fail_next("sendMessage", too_many_requests(1))
    await send(fake, RetryPolicy(retries=3))
    failed, sent = fake.calls("sendMessage")
    assert failed.status == 429
    assert sent.ok
    assert sent.received_at - failed.received_at >= 1.0
    assert fake.sent_texts(42) == ["hi"]


async def test_long_retry_after_postpones(fake: FakeTelegram) -> None:
    fake.fail_next("sendMessage", too_many_requests(120))
    with pytest.raises(DeliveryPostponed) as caught:
        await send(fake, RetryPolicy(retries=3, max_inline_wait_s=60))
    assert caught.value.retry_in_s >= 120
    assert len(fake.calls("sendMessage")) == 1


async def test_network_errors_retry(fake: FakeTelegram) -> None:
    fake.fail_next("sendMessage", DROPPED_CONNECTION)
    fake.fail_next("sendMessage", SERVER_ERROR)
    await send(fake, RetryPolicy(retries=3, first_backoff_s=0.01))
    assert fake.sent_texts(42) == ["hi"]
    assert len(fake.calls("sendMessage")) == 3


async def test_network_retries_are_capped(fake: FakeTelegram) -> None:
    fake.fail_next("sendMessage", SERVER_ERROR, times=5)
    with pytest.raises(DeliveryPostponed):
        await send(fake, RetryPolicy(retries=1, first_backoff_s=0.01))
    assert len(fake.calls("sendMessage")) == 2
    assert fake.sent_texts(42) == []


async def test_forbidden_is_blocked_without_retry(fake: FakeTelegram) -> None:
    fake.block_bot(42)
    with pytest.raises(ChatBlocked):
        await send(fake, RetryPolicy(retries=3))
    assert len(fake.calls("sendMessage")) == 1


async def test_bad_request_is_rejected_without_retry(fake: FakeTelegram) -> None:
    fake.fail_next("sendMessage", bad_request("Bad Request: chat not found"))
    with pytest.raises(DeliveryRejected, match="chat not found"):
        await send(fake, RetryPolicy(retries=3))
    assert len(fake.calls("sendMessage")) == 1
