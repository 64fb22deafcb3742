"""The bot and an in-process worker end to end: fake Bot API, real Redis, the tiny model."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from arq.connections import ArqRedis

from joeybot import keys, texts
from joeybot.config import Settings
from joeybot.history import HistoryStore
from joeybot.inference.generation import JoeyEngine
from joeybot.testing import FakeTelegram
from joeybot.workers import queue_depth, recent_jobs

from .service_support import (
    RedisServer,
    free_port,
    make_settings,
    running_bot,
    running_worker,
    wait_until,
)

PRIVATE = 501
OTHER = 502
GROUP = -100777
MEMBER = 601
# A chat whose /help replies show that the bot has handled every earlier update.
SENTINEL = 999
REPLY_TIMEOUT_S = 60.0


@pytest.fixture
def settings_for(
    redis_server: RedisServer, fake: FakeTelegram, tiny_llama_dir: Path, tiny_adapter_dir: Path
):
    def build(**sections: dict) -> Settings:
        return make_settings(redis_server.url, fake, tiny_llama_dir, tiny_adapter_dir, **sections)

    return build


async def settle(fake: FakeTelegram) -> None:
    """Wait until the bot has handled every update pushed so far.

    The bot handles updates one at a time, so once a /help pushed last gets its reply, every
    earlier update has been handled too.
    """
    answered = len(fake.sent_texts(SENTINEL))
    fake.push_command(SENTINEL, "help")
    await fake.wait_for_messages(SENTINEL, count=answered + 1, timeout_s=REPLY_TIMEOUT_S)


async def history_texts(redis: ArqRedis, chat_id: int) -> list[str]:
    turns = await HistoryStore(redis, make_settings("redis://x/0", None, Path()).history).load(
        chat_id
    )
    return [turn.content for turn in turns]


async def reply_jobs(redis: ArqRedis, chat_id: int) -> list[dict]:
    jobs = [job for job in await recent_jobs(redis) if job["chat_id"] == chat_id]
    return list(reversed(jobs))  # oldest first


async def wait_answered(redis: ArqRedis, chat_id: int, count: int = 1) -> list[dict]:
    """Wait until `count` messages of the chat have replies and job records (the record is
    written after the history), and return the records, oldest first."""

    async def enough() -> list[dict] | None:
        jobs = await reply_jobs(redis, chat_id)
        return jobs if len(jobs) >= count else None

    return await wait_until(enough, timeout_s=REPLY_TIMEOUT_S, what=f"{count} answers")


# ----- replies ---------------------------------------------------------------------------------


async def test_text_gets_one_reply(
    fake: FakeTelegram, redis: ArqRedis, settings_for, engine: JoeyEngine
) -> None:
    settings = settings_for()
    async with running_worker(settings, engine), running_bot(settings, fake):
        fake.push_text(PRIVATE, "Hey Joey, how you doin'?")
        await wait_answered(redis, PRIVATE)
        await settle(fake)
        sent = fake.sent_messages(PRIVATE)

    assert len(sent) == 1
    assert sent[0]["text"].strip()
    assert "typing" in fake.chat_actions(PRIVATE)
    assert await history_texts(redis, PRIVATE) == ["Hey Joey, how you doin'?", sent[0]["text"]]
    jobs = await reply_jobs(redis, PRIVATE)
    assert [job["outcome"] for job in jobs] == ["sent"]
    assert jobs[0]["job_id"] == keys.reply_job_id(PRIVATE, 1)
    assert jobs[0]["new_tokens"] > 0
    assert await queue_depth(redis) == 0
    assert not await redis.exists(keys.pending(PRIVATE))


async def test_history_across_turns_and_reset(
    fake: FakeTelegram, redis: ArqRedis, settings_for, engine: JoeyEngine
) -> None:
    settings = settings_for()
    async with running_worker(settings, engine), running_bot(settings, fake):
        fake.push_text(PRIVATE, "Do you like pizza?")
        await wait_answered(redis, PRIVATE, 1)
        fake.push_text(PRIVATE, "What kind of pizza?")
        await wait_answered(redis, PRIVATE, 2)
        turns_before_reset = await history_texts(redis, PRIVATE)
        fake.push_command(PRIVATE, "reset")
        await fake.wait_for_messages(PRIVATE, count=3, timeout_s=REPLY_TIMEOUT_S)
        turns_after_reset = await history_texts(redis, PRIVATE)
        fake.push_text(PRIVATE, "Do you like pizza?")
        await wait_answered(redis, PRIVATE, 3)

    sent = fake.sent_texts(PRIVATE)
    assert turns_before_reset == ["Do you like pizza?", sent[0], "What kind of pizza?", sent[1]]
    assert sent[2] == texts.text("reset", "en")
    assert turns_after_reset == []
    first, second, third = (job["prompt_tokens"] for job in await reply_jobs(redis, PRIVATE))
    assert second > first  # the second prompt carried the first exchange
    assert third == first  # after /reset the same message has the same prompt again


async def test_messages_answered_in_order(
    fake: FakeTelegram, redis: ArqRedis, settings_for, engine: JoeyEngine
) -> None:
    settings = settings_for()
    questions = ["First question?", "Second question?", "Third question?"]
    async with running_bot(settings, fake):
        for question in questions:
            fake.push_text(PRIVATE, question)
        await settle(fake)
        async with running_worker(settings, engine):
            await wait_answered(redis, PRIVATE, 3)

    replies = fake.sent_texts(PRIVATE)
    assert len(replies) == 3
    history = await history_texts(redis, PRIVATE)
    assert history == [
        questions[0],
        replies[0],
        questions[1],
        replies[1],
        questions[2],
        replies[2],
    ]
    jobs = await reply_jobs(redis, PRIVATE)
    assert [job["job_id"] for job in jobs] == [keys.reply_job_id(PRIVATE, n) for n in (1, 2, 3)]
    prompt_tokens = [job["prompt_tokens"] for job in jobs]
    assert prompt_tokens == sorted(prompt_tokens)
    assert prompt_tokens[0] < prompt_tokens[2]


async def test_duplicate_updates_answered_once(
    fake: FakeTelegram, redis: ArqRedis, settings_for, engine: JoeyEngine
) -> None:
    settings = settings_for()
    async with running_bot(settings, fake):
        update = fake.push_text(PRIVATE, "Only once, please.")
        fake.push_duplicate(update["update_id"])
        await settle(fake)
        assert await queue_depth(redis) == 1
        async with running_worker(settings, engine):
            await wait_answered(redis, PRIVATE)
            fake.push_duplicate(update["update_id"], new_update_id=True)
            await settle(fake)
            await asyncio.sleep(0.5)  # room for a second job, if one were queued

    assert len(fake.sent_texts(PRIVATE)) == 1
    assert len(await reply_jobs(redis, PRIVATE)) == 1


# ----- commands --------------------------------------------------------------------------------


async def test_start_and_help(fake: FakeTelegram, redis: ArqRedis, settings_for) -> None:
    async with running_bot(settings_for(), fake):
        fake.push_command(PRIVATE, "start")
        fake.push_command(PRIVATE, "help")
        fake.push_command(OTHER, "start", language_code="ru")
        await fake.wait_for_messages(PRIVATE, count=2)
        await fake.wait_for_messages(OTHER, count=1)

    start, help_text = fake.sent_texts(PRIVATE)
    assert start == texts.text("start", "en")
    assert "/reset" in help_text
    assert "/stats" not in help_text
    assert fake.sent_texts(OTHER) == [texts.text("start", "ru")]
    assert await queue_depth(redis) == 0


async def test_allowlist_and_admin_stats(
    fake: FakeTelegram, redis: ArqRedis, settings_for, engine: JoeyEngine
) -> None:
    allowed, admin, stranger = 10, 20, 30
    settings = settings_for(bot={"allowed_user_ids": [allowed], "admin_user_ids": [admin]})
    async with running_worker(settings, engine), running_bot(settings, fake):
        fake.push_text(stranger, "hello?")
        fake.push_command(allowed, "stats")
        fake.push_command(admin, "stats")
        fake.push_command(admin, "help")
        for chat_id, count in ((stranger, 1), (allowed, 1), (admin, 2)):
            await fake.wait_for_messages(chat_id, count=count)

    assert fake.sent_texts(stranger) == [texts.text("not_allowed", "en")]
    assert fake.sent_texts(allowed) == [texts.text("admin_only", "en")]
    stats, help_text = fake.sent_texts(admin)
    assert "Queue: 0 jobs" in stats
    assert "Workers online: 1" in stats
    assert "/stats" in help_text
    assert not await redis.exists(keys.pending(stranger))


# ----- input the bot does not queue ------------------------------------------------------------


async def test_non_text_gets_friendly_notice(
    fake: FakeTelegram, redis: ArqRedis, settings_for
) -> None:
    async with running_bot(settings_for(), fake):
        fake.push_sticker(PRIVATE)
        fake.push_photo(PRIVATE, caption="look at this")
        fake.push_voice(PRIVATE)
        await fake.wait_for_messages(PRIVATE, count=3)
        await settle(fake)

    assert fake.sent_texts(PRIVATE) == [texts.text("non_text", "en")] * 3
    assert await queue_depth(redis) == 0
    assert not await redis.exists(keys.pending(PRIVATE))


async def test_over_long_text_is_rejected(
    fake: FakeTelegram, redis: ArqRedis, settings_for
) -> None:
    async with running_bot(settings_for(bot={"max_message_chars": 50}), fake):
        fake.push_text(PRIVATE, "x" * 51)
        fake.push_text(PRIVATE, "y" * 51, language_code="ru")
        await fake.wait_for_messages(PRIVATE, count=2)

    english, russian = fake.sent_texts(PRIVATE)
    assert english == texts.text("too_long", "en", limit=50)
    assert "50" in english
    assert russian == texts.text("too_long", "ru", limit=50)
    assert await queue_depth(redis) == 0


# ----- groups ----------------------------------------------------------------------------------


async def test_group_answers_only_when_addressed(
    fake: FakeTelegram, redis: ArqRedis, settings_for, engine: JoeyEngine
) -> None:
    settings = settings_for()
    async with running_worker(settings, engine), running_bot(settings, fake):
        fake.push_text(GROUP, "Joey is not called here", user_id=MEMBER)
        fake.push_sticker(GROUP, user_id=MEMBER)
        await settle(fake)
        assert fake.sent_texts(GROUP) == []

        mention = fake.push_mention(GROUP, "what's up?", user_id=MEMBER)
        await wait_answered(redis, GROUP, 1)
        reply = fake.push_reply_to_bot(GROUP, "tell me more", user_id=MEMBER)
        await wait_answered(redis, GROUP, 2)
        first, second = fake.sent_messages(GROUP)

    assert first["reply_to_message"]["message_id"] == mention["message"]["message_id"]
    assert second["reply_to_message"]["message_id"] == reply["message"]["message_id"]
    history = await history_texts(redis, GROUP)
    assert history[0] == "what's up?"  # the @mention is not part of the prompt
    assert history[2] == "tell me more"
    assert len(fake.sent_messages(GROUP)) == 2


# ----- flood control and backpressure ----------------------------------------------------------


def skip_end_of_minute(margin_s: float = 8.0) -> None:
    """Sleep past the end of the current minute when it ends within `margin_s`, so a
    per-minute count does not reset in the middle of a test."""
    left = 60 - time.time() % 60
    if left < margin_s:
        time.sleep(left + 0.1)


async def test_rate_limit_sends_one_notice(
    fake: FakeTelegram, redis: ArqRedis, settings_for
) -> None:
    skip_end_of_minute()
    settings = settings_for(bot={"messages_per_minute": 2, "max_pending_per_chat": 10})
    async with running_bot(settings, fake):
        for number in range(5):
            fake.push_text(PRIVATE, f"message {number}")
        await settle(fake)

    assert fake.sent_texts(PRIVATE) == [texts.text("slow_down", "en")]
    assert await redis.hlen(keys.pending(PRIVATE)) == 2
    assert await queue_depth(redis) == 2


async def test_pending_limit_sends_notice(
    fake: FakeTelegram, redis: ArqRedis, settings_for
) -> None:
    skip_end_of_minute()
    settings = settings_for(bot={"max_pending_per_chat": 2})
    async with running_bot(settings, fake):
        for number in range(3):
            fake.push_text(PRIVATE, f"message {number}")
        await settle(fake)

    assert fake.sent_texts(PRIVATE) == [texts.text("still_answering", "en")]
    assert await redis.hlen(keys.pending(PRIVATE)) == 2


async def test_full_queue_sends_busy_notice(
    fake: FakeTelegram, redis: ArqRedis, settings_for
) -> None:
    settings = settings_for(bot={"max_queue_depth": 1})
    async with running_bot(settings, fake):
        fake.push_text(PRIVATE, "first in line")
        fake.push_text(OTHER, "second in line", language_code="ru")
        await settle(fake)

    assert fake.sent_texts(PRIVATE) == []
    assert fake.sent_texts(OTHER) == [texts.text("busy", "ru")]
    assert await queue_depth(redis) == 1


# ----- webhook mode ----------------------------------------------------------------------------


async def test_webhook_mode_replies(
    fake: FakeTelegram, redis: ArqRedis, settings_for, engine: JoeyEngine
) -> None:
    port = free_port()
    settings = settings_for(
        bot={
            "webhook_url": f"http://127.0.0.1:{port}/telegram",
            "webhook_port": port,
            "webhook_secret": "s3cret-token",
        }
    )
    async with running_worker(settings, engine), running_bot(settings, fake):
        await fake.wait_for(lambda: bool(fake.webhook_info()["url"]), what="setWebhook")
        fake.push_text(PRIVATE, "Webhook hello")
        statuses = await fake.deliver_webhook_updates()
        sent = await fake.wait_for_messages(PRIVATE, timeout_s=REPLY_TIMEOUT_S)
        rejected = await fake.post_to_webhook({"update_id": 1}, secret_token="wrong")

    assert fake.webhook_info()["url"] == f"http://127.0.0.1:{port}/telegram"
    assert statuses == [200]
    assert len(sent) == 1
    assert rejected == 401
    assert not fake.calls("getUpdates")


async def test_fast_chat_does_not_starve_others(
    fake: FakeTelegram, redis: ArqRedis, settings_for, engine: JoeyEngine
) -> None:
    settings = settings_for()
    other = PRIVATE + 7
    async with running_bot(settings, fake):
        fake.push_text(PRIVATE, "One")
        await settle(fake)
        fake.push_text(other, "Me too!")
        await settle(fake)
        fake.push_text(PRIVATE, "Two")
        fake.push_text(PRIVATE, "Three")
        await settle(fake)
        async with running_worker(settings, engine):
            await wait_answered(redis, PRIVATE, 3)
            await wait_answered(redis, other, 1)

    order = [
        (job["chat_id"], job["finished_at"])
        for job in await recent_jobs(redis)
        if job["chat_id"] in (PRIVATE, other)
    ]
    chats_in_order = [chat for chat, _ in sorted(order, key=lambda item: item[1])]
    # The first job answers "One" and "Two" of the fast chat, then lets the other chat go first.
    assert chats_in_order == [PRIVATE, PRIVATE, other, PRIVATE]
