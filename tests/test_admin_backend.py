"""The admin page's back end against a real Redis and an arq worker running the tiny model."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from arq.connections import ArqRedis
from pydantic import SecretStr

from joeybot.admin.backend import AdminBackend, ReplyProgress, ReplyState
from joeybot.admin.jobs import admin_generate
from joeybot.admin.protocol import (
    EntryType,
    ReplyRequest,
    cancel_key,
    decode_entry,
    job_id_for,
    lease_key,
    request_key,
    store_request,
    stream_key,
)
from joeybot.config import GenerationSettings, ModelSettings, Settings
from joeybot.history import HistoryStore
from joeybot.inference.generation import JoeyEngine
from joeybot.inference.loading import load_model
from joeybot.inference.prompts import Turn
from joeybot.redis_client import create_redis
from joeybot.workers import WorkerPresence, queue_depth, recent_jobs

from .admin_support import RedisServer, running_worker

# A short persona leaves room in the tiny model's 256 positions for long replies.
SHORT_PERSONA = "You are Joey."
GREEDY = {"temperature": 0.0, "repetition_penalty": 1.0}
WAIT_S = 30.0


@pytest.fixture
def settings(redis_server: RedisServer) -> Settings:
    redis_server.flush()
    return Settings(_env_file=None, redis={"url": redis_server.url})


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path, tiny_adapter_dir: Path) -> JoeyEngine:
    loaded = load_model(ModelSettings(base=str(tiny_llama_dir), adapter=str(tiny_adapter_dir)))
    return JoeyEngine(loaded, GenerationSettings())


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[ArqRedis]:
    client = create_redis(settings.redis)
    yield client
    await client.aclose()


@pytest.fixture
def backend(redis: ArqRedis, settings: Settings) -> AdminBackend:
    return AdminBackend(redis, HistoryStore(redis, settings.history))


@pytest.fixture
async def worker(settings: Settings, engine: JoeyEngine) -> AsyncIterator[None]:
    async with running_worker(settings, engine):
        yield


async def collect(progresses: AsyncIterator[ReplyProgress]) -> list[ReplyProgress]:
    return [progress async for progress in progresses]


async def wait_until(condition, timeout_s: float = WAIT_S) -> None:
    """Poll an async condition every 50 ms until it is true or `timeout_s` passes."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.05)


def generation_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "joeybot-generate"]


async def blocking_reply(engine: JoeyEngine, request: ReplyRequest) -> str:
    """Return the reply the engine gives directly, without Redis, for the same request."""
    reply = await asyncio.to_thread(
        engine.reply,
        [],
        request.user_text,
        use_adapter=request.use_adapter,
        system_prompt=request.system_prompt,
        **request.options,
    )
    return reply.text


# ----- streaming ------------------------------------------------------------------------------


@pytest.mark.usefixtures("worker")
async def test_reply_streams_growing_text(backend: AdminBackend, engine: JoeyEngine) -> None:
    request = ReplyRequest(
        [], "How you doin'?", GREEDY | {"max_new_tokens": 150}, system_prompt=SHORT_PERSONA
    )

    progresses = await collect(backend.stream_reply(request))

    final = progresses[-1]
    assert final.state is ReplyState.DONE
    assert final.text == await blocking_reply(engine, request)
    partial = {p.text for p in progresses if p.state is ReplyState.GENERATING and p.text}
    assert len(partial - {final.text}) >= 2
    assert all(final.text.startswith(text) for text in partial)
    assert all(p.state is not ReplyState.DONE for p in progresses[:-1])


@pytest.mark.usefixtures("worker")
async def test_reply_stats_cover_timing_and_tokens(backend: AdminBackend) -> None:
    request = ReplyRequest([], "Hey Joey", GREEDY | {"max_new_tokens": 40})

    final = (await collect(backend.stream_reply(request)))[-1]

    stats = final.stats
    assert final.state is ReplyState.DONE
    assert stats["new_tokens"] > 0
    assert stats["prompt_tokens"] > 0
    assert stats["first_token_s"] > 0
    assert stats["tokens_per_s"] > 0
    assert stats["seconds"] >= stats["first_token_s"]
    assert stats["queue_s"] >= 0
    assert stats["first_piece_after_request_s"] >= stats["queue_s"]
    assert stats["worker"] == "test-worker"
    assert stats["use_adapter"] is True
    assert stats["has_adapter"] is True


async def test_no_worker_online_answers_at_once(backend: AdminBackend, redis: ArqRedis) -> None:
    progresses = await collect(backend.stream_reply(ReplyRequest([], "Anybody there?")))

    assert [p.state for p in progresses] == [ReplyState.NO_WORKERS]
    assert await queue_depth(redis) == 0


@pytest.mark.usefixtures("worker")
async def test_invalid_options_reported(backend: AdminBackend) -> None:
    request = ReplyRequest([], "Hi", {"top_p": 5.0})

    final = (await collect(backend.stream_reply(request)))[-1]

    assert final.state is ReplyState.ERROR
    assert final.error_code == "invalid_options"
    assert "top_p" in final.error


@pytest.mark.usefixtures("worker")
async def test_persona_and_history_reach_worker(backend: AdminBackend, engine: JoeyEngine) -> None:
    history = [
        {"role": "user", "content": "I got a new job at the museum."},
        {"role": "assistant", "content": "Whoa, nice! Do they have dinosaurs?"},
    ]
    cases = [
        ReplyRequest([], "Hi", GREEDY | {"max_new_tokens": 4}),
        ReplyRequest([], "Hi", GREEDY | {"max_new_tokens": 4}, system_prompt=SHORT_PERSONA),
        ReplyRequest(history, "Hi", GREEDY | {"max_new_tokens": 4}, system_prompt=SHORT_PERSONA),
    ]

    for request in cases:
        final = (await collect(backend.stream_reply(request)))[-1]
        turns = [Turn(item["role"], item["content"]) for item in request.history]
        expected = engine.stream(
            turns, "Hi", system_prompt=request.system_prompt, max_new_tokens=4
        ).prompt
        assert final.stats["prompt_tokens"] == len(expected.input_ids), request


# ----- stopping -------------------------------------------------------------------------------


@pytest.mark.usefixtures("worker")
async def test_stop_ends_generation_in_worker(backend: AdminBackend, redis: ArqRedis) -> None:
    request = ReplyRequest(
        [], "Tell me a long story", GREEDY | {"max_new_tokens": 200}, system_prompt=SHORT_PERSONA
    )
    progresses = backend.stream_reply(request)
    async for progress in progresses:
        if progress.text:
            break
    await progresses.aclose()  # what Gradio does on Stop or a closed tab

    assert await redis.exists(cancel_key(progress.request_id))
    await wait_until(lambda: _has_recent_job(redis))
    record = (await recent_jobs(redis))[0]
    assert record["kind"] == "admin"
    assert record["outcome"] == "stopped"
    entries = await redis.xrange(stream_key(progress.request_id))
    last = decode_entry(*entries[-1])
    assert last.type is EntryType.DONE
    assert last.stats["stopped"] is True
    await wait_until(_no_generation_thread)


@pytest.mark.usefixtures("worker")
async def test_lost_lease_stops_generation(backend: AdminBackend, redis: ArqRedis) -> None:
    request = ReplyRequest(
        [], "Tell me a long story", GREEDY | {"max_new_tokens": 220}, system_prompt=SHORT_PERSONA
    )
    final = None
    lease_dropped = False
    async for progress in backend.stream_reply(request):
        if progress.text and not lease_dropped:
            # A page process that died stops renewing; deleting the key is the same, sooner.
            await redis.delete(lease_key(progress.request_id))
            lease_dropped = True
        final = progress

    assert final is not None
    assert final.state is ReplyState.STOPPED
    assert final.stats["stopped"] is True


@pytest.mark.usefixtures("worker")
async def test_job_without_lease_is_skipped(redis: ArqRedis) -> None:
    await store_request(redis, "orphan", ReplyRequest([], "Hi"))
    job = await redis.enqueue_job("admin_generate", "orphan", _job_id=job_id_for("orphan"))

    result = await job.result(timeout=WAIT_S, poll_delay=0.05)

    assert result == {"outcome": "cancelled"}
    assert await redis.xlen(stream_key("orphan")) == 0


async def test_retried_job_reports_lost_worker(redis: ArqRedis, engine: JoeyEngine) -> None:
    await redis.set(lease_key("retried"), "1", ex=30)
    ctx = {"redis": redis, "engine": engine, "job_id": "retried-job", "job_try": 2}

    result = await admin_generate(ctx, "retried")

    assert result == {"outcome": "worker_lost"}
    entries = await redis.xrange(stream_key("retried"))
    entry = decode_entry(*entries[-1])
    assert entry.type is EntryType.ERROR
    assert entry.stats["code"] == "worker_lost"


async def test_malformed_request_reported(redis: ArqRedis, engine: JoeyEngine) -> None:
    await redis.set(lease_key("broken"), "1", ex=30)
    await redis.set(request_key("broken"), '{"history": [{"role": "system"}]}')
    ctx = {"redis": redis, "engine": engine, "job_id": "broken-job", "job_try": 1}

    result = await admin_generate(ctx, "broken")

    assert result == {"outcome": "error"}
    entry = decode_entry(*(await redis.xrange(stream_key("broken")))[-1])
    assert entry.type is EntryType.ERROR
    assert entry.stats["code"] == "invalid_request"


@pytest.mark.usefixtures("worker")
async def test_message_text_stays_out_of_info_logs(
    backend: AdminBackend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    request = ReplyRequest(
        [{"role": "user", "content": "my earlier secret"}],
        "my private message",
        GREEDY | {"max_new_tokens": 4},
        system_prompt="my private persona",
    )

    final = (await collect(backend.stream_reply(request)))[-1]

    assert final.state is ReplyState.DONE
    assert any("admin_generate" in record.getMessage() for record in caplog.records)
    for record in caplog.records:
        if record.levelno >= logging.INFO:
            for private in ("my earlier secret", "my private message", "my private persona"):
                assert private not in record.getMessage(), record.name


async def test_unstarted_request_times_out(
    settings: Settings, redis: ArqRedis, engine: JoeyEngine
) -> None:
    # A presence record without a running worker: the job waits in the queue forever.
    presence = WorkerPresence(redis, "silent-worker", {})
    await presence.publish()
    backend = AdminBackend(redis, HistoryStore(redis, settings.history), start_timeout_s=1.0)

    progresses = await collect(backend.stream_reply(ReplyRequest([], "Hello?")))

    assert progresses[-1].state is ReplyState.TIMED_OUT
    assert any(p.jobs_ahead == 0 for p in progresses)
    assert await redis.exists(cancel_key(progresses[-1].request_id))


# ----- comparison -----------------------------------------------------------------------------


@pytest.mark.usefixtures("worker")
async def test_compare_answers_with_and_without_adapter(
    backend: AdminBackend, engine: JoeyEngine
) -> None:
    request = ReplyRequest(
        [], "Who is your best friend?", GREEDY | {"max_new_tokens": 30}, system_prompt=SHORT_PERSONA
    )

    pairs = [pair async for pair in backend.stream_comparison(request)]

    with_adapter, without_adapter = pairs[-1]
    assert with_adapter.state is ReplyState.DONE
    assert without_adapter.state is ReplyState.DONE
    assert with_adapter.stats["use_adapter"] is True
    assert without_adapter.stats["use_adapter"] is False
    assert with_adapter.stats["seed"] == without_adapter.stats["seed"] is not None
    on_request = ReplyRequest(request.history, request.user_text, GREEDY | {"max_new_tokens": 30},
                              use_adapter=True, system_prompt=SHORT_PERSONA)  # fmt: skip
    off_request = ReplyRequest(request.history, request.user_text, GREEDY | {"max_new_tokens": 30},
                               use_adapter=False, system_prompt=SHORT_PERSONA)  # fmt: skip
    assert with_adapter.text == await blocking_reply(engine, on_request)
    assert without_adapter.text == await blocking_reply(engine, off_request)
    assert with_adapter.text != without_adapter.text


@pytest.mark.usefixtures("worker")
async def test_compare_uses_one_random_seed(backend: AdminBackend) -> None:
    request = ReplyRequest([], "Pizza?", {"max_new_tokens": 8})

    with_adapter, without_adapter = [pair async for pair in backend.stream_comparison(request)][-1]

    assert isinstance(with_adapter.stats["seed"], int)
    assert with_adapter.stats["seed"] == without_adapter.stats["seed"]


async def test_joeybot_worker_runs_admin_jobs(settings: Settings, engine: JoeyEngine) -> None:
    """The service's own worker registers admin_generate and hands it the engine and its id."""
    from joeybot.worker import build_worker

    # Admin jobs never call Telegram, but the worker's start-up builds a Bot client.
    worker_settings = settings.model_copy(
        update={"bot": settings.bot.model_copy(update={"token": SecretStr("123:test-token")})}
    )
    worker = build_worker(worker_settings, {"engine": engine}, handle_signals=False)
    task = asyncio.create_task(worker.async_run())
    redis = create_redis(settings.redis)
    try:
        backend = AdminBackend(redis, HistoryStore(redis, settings.history))
        await wait_until(lambda: _has_worker(backend))
        request = ReplyRequest([], "Hi", GREEDY | {"max_new_tokens": 6})

        final = (await collect(backend.stream_reply(request)))[-1]

        workers = await backend.workers_online()
    finally:
        with contextlib.suppress(asyncio.CancelledError):
            await worker.close()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await redis.aclose()
    assert final.state is ReplyState.DONE
    assert final.text
    assert final.stats["worker"] == workers[0]["id"]


# ----- chats and queue ------------------------------------------------------------------------


async def test_chat_lookup_and_clear(backend: AdminBackend, settings: Settings) -> None:
    store = HistoryStore(backend.redis, settings.history)
    await store.append(42, "How you doin'?", "Pretty good!")
    await store.append(42, "Want pizza?", "Always.")

    turns = await backend.load_chat(42)
    removed = await backend.clear_chat(42)

    assert [(t.role, t.content) for t in turns] == [
        ("user", "How you doin'?"),
        ("assistant", "Pretty good!"),
        ("user", "Want pizza?"),
        ("assistant", "Always."),
    ]
    assert removed == 4
    assert await backend.load_chat(42) == []
    assert await backend.clear_chat(42) == 0


@pytest.mark.usefixtures("worker")
async def test_queue_overview_lists_worker_and_jobs(backend: AdminBackend, redis: ArqRedis) -> None:
    await collect(backend.stream_reply(ReplyRequest([], "Hi", GREEDY | {"max_new_tokens": 5})))
    await wait_until(lambda: _queue_empty(redis))

    overview = await backend.queue_overview()

    assert overview.depth == 0
    assert [worker["id"] for worker in overview.workers] == ["test-worker"]
    assert overview.workers[0]["model"]["adapter"]
    job = overview.recent_jobs[0]
    assert job["kind"] == "admin"
    assert job["outcome"] == "done"
    assert job["new_tokens"] > 0
    assert job["duration_s"] >= 0
    assert job["worker"] == "test-worker"


async def test_jobs_ahead_counts_waiting_jobs(backend: AdminBackend, redis: ArqRedis) -> None:
    for request_id in ("first", "second"):
        await redis.enqueue_job("admin_generate", request_id, _job_id=job_id_for(request_id))

    assert await backend.jobs_ahead("first") == 0
    assert await backend.jobs_ahead("second") == 1
    assert await backend.jobs_ahead("unknown") is None


async def _has_worker(backend: AdminBackend) -> bool:
    return bool(await backend.workers_online())


async def _has_recent_job(redis: ArqRedis) -> bool:
    return bool(await recent_jobs(redis, 1))


async def _queue_empty(redis: ArqRedis) -> bool:
    return await queue_depth(redis) == 0


async def _no_generation_thread() -> bool:
    return not generation_threads()


def test_job_entry_round_trip() -> None:
    fields = {b"type": b"piece", b"text": "Привет".encode(), b"stats": b'{"a": 1}'}

    entry = decode_entry(b"1-0", fields)

    assert entry.type is EntryType.PIECE
    assert entry.text == "Привет"
    assert entry.stats == {"a": 1}
    assert entry.entry_id == "1-0"


def test_unknown_entry_type_rejected() -> None:
    with pytest.raises(ValueError):
        decode_entry("1-0", {"type": "bogus", "text": "", "stats": "{}"})
