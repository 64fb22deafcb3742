"""The reply job against Bot API errors, long replies and resumed drafts (in-process worker)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from arq.connections import ArqRedis

from joeybot import keys, texts
from joeybot.config import Settings
from joeybot.delivery import split_message, utf16_length
from joeybot.history import HistoryStore
from joeybot.inbox import Draft, PendingMessage
from joeybot.inference.generation import JoeyEngine
from joeybot.inference.prompts import Turn
from joeybot.testing import DROPPED_CONNECTION, FakeTelegram, too_many_requests
from joeybot.workers import list_workers, queue_depth, recent_jobs

from .service_support import (
    RedisServer,
    make_settings,
    running_bot,
    running_worker,
    store_draft,
    wait_until,
)

CHAT = 701
JOB_TIMEOUT_S = 60.0
LONG_REPLY = " ".join(
    f"Paragraph {number}: Joey doesn't share food, and everybody should know that by now!"
    for number in range(150)
)


@pytest.fixture
def settings(
    redis_server: RedisServer, fake: FakeTelegram, tiny_llama_dir: Path, tiny_adapter_dir: Path
) -> Settings:
    return make_settings(redis_server.url, fake, tiny_llama_dir, tiny_adapter_dir)


async def finished_jobs(redis: ArqRedis, count: int = 1) -> list[dict]:
    """Wait for `count` job records and return them, oldest first."""

    async def enough() -> list[dict] | None:
        jobs = list(reversed(await recent_jobs(redis)))
        return jobs if len(jobs) >= count else None

    return await wait_until(enough, timeout_s=JOB_TIMEOUT_S, what=f"{count} job records")


async def queue_is_empty(redis: ArqRedis) -> bool:
    return await queue_depth(redis) == 0


def pending_message(message_id: int, text: str = "Tell me a long story") -> PendingMessage:
    return PendingMessage(CHAT, message_id, text, "en", None, time.time())


async def enqueue(redis: ArqRedis, message: PendingMessage) -> None:
    await redis.enqueue_job(
        keys.REPLY_FUNCTION,
        message.chat_id,
        message.message_id,
        _job_id=keys.reply_job_id(message.chat_id, message.message_id),
    )


async def test_retry_after_resends_without_generating(
    fake: FakeTelegram, redis: ArqRedis, settings: Settings, engine: JoeyEngine
) -> None:
    fake.fail_next("sendMessage", too_many_requests(1), chat_id=CHAT)
    async with running_worker(settings, engine), running_bot(settings, fake):
        fake.push_text(CHAT, "Are you there?")
        (job,) = await finished_jobs(redis)

    failed, sent = fake.calls("sendMessage", chat_id=CHAT)
    assert failed.status == 429
    assert sent.ok
    assert sent.received_at - failed.received_at >= 1.0
    assert job["outcome"] == "sent"
    assert job["attempt"] == 1  # the job went on with the same reply, it did not run again
    assert len(fake.sent_texts(CHAT)) == 1


async def test_network_errors_retry_then_send(
    fake: FakeTelegram, redis: ArqRedis, settings: Settings, engine: JoeyEngine
) -> None:
    fake.fail_next("sendMessage", DROPPED_CONNECTION, times=2, chat_id=CHAT)
    async with running_worker(settings, engine), running_bot(settings, fake):
        fake.push_text(CHAT, "Hello?")
        (job,) = await finished_jobs(redis)

    assert [call.ok for call in fake.calls("sendMessage", chat_id=CHAT)] == [False, False, True]
    assert job["outcome"] == "sent"
    assert len(fake.sent_texts(CHAT)) == 1


async def test_blocked_chat_ends_job_and_clears_history(
    fake: FakeTelegram, redis: ArqRedis, settings: Settings, engine: JoeyEngine
) -> None:
    history = HistoryStore(redis, settings.history)
    await history.append(CHAT, "earlier question", "earlier answer")
    async with running_worker(settings, engine), running_bot(settings, fake):
        fake.block_bot(CHAT)
        fake.push_text(CHAT, "Why don't you answer?")
        (job,) = await finished_jobs(redis)
        await wait_until(lambda: queue_is_empty(redis), what="an empty queue")

    assert job["outcome"] == "blocked"
    assert len(fake.calls("sendMessage", chat_id=CHAT)) == 1
    assert await history.load(CHAT) == []
    assert not await redis.exists(keys.pending(CHAT))


async def test_long_reply_is_split_in_order(
    fake: FakeTelegram, redis: ArqRedis, redis_server: RedisServer, settings: Settings, engine
) -> None:
    message = pending_message(5)
    store_draft(redis_server, message, Draft(LONG_REPLY, 0, 40, 500, 12.5))
    async with running_worker(settings, engine):
        await enqueue(redis, message)
        (job,) = await finished_jobs(redis)

    parts = fake.sent_texts(CHAT)
    assert len(parts) == 3
    assert all(utf16_length(part) <= 4096 for part in parts)
    assert parts == split_message(LONG_REPLY)
    assert " ".join(parts) == LONG_REPLY
    assert all("parse_mode" not in call.params for call in fake.calls("sendMessage"))
    assert job["parts"] == 3
    assert job["new_tokens"] == 500  # taken from the draft: nothing was generated
    history = await HistoryStore(redis, settings.history).load(CHAT)
    assert history == [Turn("user", message.text), Turn("assistant", LONG_REPLY)]


async def test_resumed_draft_skips_sent_parts(
    fake: FakeTelegram, redis: ArqRedis, redis_server: RedisServer, settings: Settings, engine
) -> None:
    message = pending_message(6)
    store_draft(redis_server, message, Draft(LONG_REPLY, 2, 40, 500, 12.5))
    async with running_worker(settings, engine):
        await enqueue(redis, message)
        await finished_jobs(redis)

    assert fake.sent_texts(CHAT) == split_message(LONG_REPLY)[2:]
    assert await redis.exists(keys.delivered(CHAT, 6))


async def test_apology_after_max_attempts(
    fake: FakeTelegram, redis: ArqRedis, redis_server: RedisServer, settings: Settings, engine
) -> None:
    message = pending_message(7, "a message that keeps crashing workers")
    store_draft(redis_server, message, Draft("never sent", 0, 10, 5, 1.0))
    await redis.set(keys.attempts(CHAT, 7), settings.worker.max_attempts)
    async with running_worker(settings, engine):
        await enqueue(redis, message)
        (job,) = await finished_jobs(redis)

    assert fake.sent_texts(CHAT) == [texts.text("gave_up", "en")]
    assert job["outcome"] == "gave_up"
    assert await HistoryStore(redis, settings.history).load(CHAT) == []
    assert not await redis.exists(keys.pending(CHAT))


async def test_worker_presence_while_running(
    fake: FakeTelegram, redis: ArqRedis, settings: Settings, engine: JoeyEngine
) -> None:
    async with running_worker(settings, engine):
        workers = await wait_until(lambda: list_workers(redis), what="worker presence")
    (worker,) = workers
    assert worker["model"]["base"] == settings.model.base
    assert worker["jobs_done"] == 0
    assert await list_workers(redis) == []  # deleted on a clean stop
