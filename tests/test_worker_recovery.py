"""Faults across processes: a worker killed mid-reply, a Redis restart, several workers, `up`."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from arq.connections import ArqRedis

from joeybot import keys
from joeybot.config import RedisConnectionSettings, Settings
from joeybot.history import HistoryStore
from joeybot.inference.generation import JoeyEngine
from joeybot.inference.loading import load_model
from joeybot.redis_client import create_redis
from joeybot.testing import FakeTelegram
from joeybot.worker import serve
from joeybot.workers import list_workers, recent_jobs

from .conftest import build_tiny_llama
from .service_support import (
    REPO_ROOT,
    WORKER_START_TIMEOUT_S,
    RedisServer,
    WorkerProcess,
    env_for,
    free_port,
    make_settings,
    running_bot,
    running_worker,
    wait_until,
)

CHAT = 801
REPLY_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def slow_model_dir(llama2_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with 4096 positions, so one reply can run for thousands of tokens."""
    folder = tmp_path_factory.mktemp("tiny-llama-4k")
    return build_tiny_llama(folder, llama2_tokenizer_dir, max_position_embeddings=4096)


async def answered_jobs(redis: ArqRedis, count: int) -> list[dict]:
    async def enough() -> list[dict] | None:
        jobs = [job for job in await recent_jobs(redis) if job["outcome"] == "sent"]
        return list(reversed(jobs)) if len(jobs) >= count else None

    return await wait_until(enough, timeout_s=REPLY_TIMEOUT_S, what=f"{count} answered jobs")


async def test_killed_worker_job_is_answered_once(
    fake: FakeTelegram,
    redis: ArqRedis,
    redis_server: RedisServer,
    engine: JoeyEngine,
    tiny_llama_dir: Path,
    tiny_adapter_dir: Path,
    slow_model_dir: Path,
    tmp_path: Path,
) -> None:
    settings = make_settings(redis_server.url, fake, tiny_llama_dir, tiny_adapter_dir)
    # The worker to be killed generates up to 2048 tokens: tens of seconds on the tiny model.
    doomed_settings = make_settings(
        redis_server.url,
        fake,
        slow_model_dir,
        generation={"max_new_tokens": 2048},
        worker={"lease_s": 2},
    )
    doomed = WorkerProcess(doomed_settings, tmp_path / "doomed-worker.log")
    try:
        await wait_until(
            lambda: list_workers(redis), timeout_s=WORKER_START_TIMEOUT_S, what="worker start"
        )
        async with running_bot(settings, fake):
            fake.push_text(CHAT, "Tell me everything about the Days of Our Lives.")
            # The doomed worker counts its try right before it starts generating.
            await wait_until(lambda: redis.get(keys.attempts(CHAT, 1)), what="the job's start")
            lock_holder = await redis.get(keys.chat_lock(CHAT))
            await asyncio.sleep(0.5)  # well inside the generation
            doomed.kill()
            assert fake.sent_texts(CHAT) == []

            async with running_worker(settings, engine):
                (job,) = await answered_jobs(redis, 1)
                await asyncio.sleep(1.0)  # room for a second reply, if one were coming
    finally:
        doomed.stop()

    assert lock_holder is not None
    assert len(fake.sent_texts(CHAT)) == 1
    assert job["attempt"] == 2
    assert job["worker_id"] not in lock_holder.decode()
    assert doomed.process.returncode == -signal.SIGKILL


async def test_redis_restart_mid_conversation(
    fake: FakeTelegram,
    engine: JoeyEngine,
    tiny_llama_dir: Path,
    tiny_adapter_dir: Path,
    tmp_path: Path,
) -> None:
    server = RedisServer(tmp_path, persistent=True)
    server.start()
    settings = make_settings(server.url, fake, tiny_llama_dir, tiny_adapter_dir)
    redis = create_redis(RedisConnectionSettings(url=server.url))
    try:
        async with running_worker(settings, engine) as worker, running_bot(settings, fake) as bot:
            fake.push_text(CHAT, "Before the restart")
            await answered_jobs(redis, 1)

            server.stop()
            fake.push_text(CHAT, "During the restart")
            await asyncio.sleep(1.0)  # the bot and the worker both run into the outage
            server.start()

            first, second = await answered_jobs(redis, 2)
            assert not bot.done()
            assert worker.main_task is not None and not worker.main_task.done()
        history = await HistoryStore(redis, settings.history).load(CHAT)
    finally:
        await redis.aclose()
        server.stop()

    assert len(fake.sent_texts(CHAT)) == 2
    assert [turn.content for turn in history][::2] == ["Before the restart", "During the restart"]
    assert second["prompt_tokens"] > first["prompt_tokens"]


async def test_worker_outlives_long_redis_outage(
    fake: FakeTelegram, tiny_llama_dir: Path, tiny_adapter_dir: Path, tmp_path: Path
) -> None:
    server = RedisServer(tmp_path, persistent=True)
    server.start()
    bot_settings = make_settings(server.url, fake, tiny_llama_dir, tiny_adapter_dir)
    # Commands give up after about half a second, so arq's loop fails during the outage and
    # `serve` has to start a new arq worker.
    worker_settings = make_settings(
        server.url, fake, tiny_llama_dir, tiny_adapter_dir, redis={"reconnect_for_s": 0.5}
    )
    redis = create_redis(RedisConnectionSettings(url=server.url))
    stop = asyncio.Event()
    serving = asyncio.create_task(serve(worker_settings, stop=stop))
    try:
        await wait_until(lambda: list_workers(redis), timeout_s=WORKER_START_TIMEOUT_S)
        server.stop()
        await asyncio.sleep(3.0)
        server.start()
        async with running_bot(bot_settings, fake):
            fake.push_text(CHAT, "Still there?")
            await answered_jobs(redis, 1)
        assert not serving.done()
    finally:
        stop.set()
        await asyncio.wait_for(serving, 30)
        await redis.aclose()
        server.stop()

    assert len(fake.sent_texts(CHAT)) == 1


async def test_two_workers_share_the_load(
    fake: FakeTelegram,
    redis: ArqRedis,
    redis_server: RedisServer,
    engine: JoeyEngine,
    tiny_llama_dir: Path,
    tiny_adapter_dir: Path,
) -> None:
    settings = make_settings(redis_server.url, fake, tiny_llama_dir, tiny_adapter_dir)
    second_engine = JoeyEngine(load_model(settings.model), settings.generation)
    chats = [CHAT + number for number in range(6)]
    async with (
        running_worker(settings, engine),
        running_worker(settings, second_engine),
        running_bot(settings, fake),
    ):
        await wait_until(lambda: _count_workers(redis, 2), what="two workers")
        for chat_id in chats:
            fake.push_text(chat_id, "Who wants to share a pizza?")
        jobs = await answered_jobs(redis, len(chats))

    assert sorted(job["chat_id"] for job in jobs) == chats
    assert len({job["worker_id"] for job in jobs}) == 2
    assert all(len(fake.sent_texts(chat_id)) == 1 for chat_id in chats)


async def _count_workers(redis: ArqRedis, count: int) -> bool:
    return len(await list_workers(redis)) >= count


# ----- processes ---------------------------------------------------------------------------


def start_up(settings: Settings, log_path: Path) -> tuple[subprocess.Popen[bytes], object]:
    log = log_path.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "joeybot.cli", "up", "--workers", "1"],
        env=env_for(settings),
        cwd=log_path.parent,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return process, log


async def wait_for_exit(process: subprocess.Popen[bytes], timeout_s: float = 60.0) -> int:
    await wait_until(lambda: process.poll() is not None, timeout_s=timeout_s, what="exit")
    return process.returncode


@pytest.mark.parametrize("fault", ["sigterm", "child_killed"])
async def test_up_stops_everything_together(
    fake: FakeTelegram,
    redis: ArqRedis,
    redis_server: RedisServer,
    tiny_llama_dir: Path,
    tmp_path: Path,
    fault: str,
) -> None:
    settings = make_settings(redis_server.url, fake, tiny_llama_dir)
    process, log = start_up(settings, tmp_path / "up.log")
    try:
        workers = await wait_until(
            lambda: list_workers(redis), timeout_s=WORKER_START_TIMEOUT_S, what="worker start"
        )
        await fake.wait_for(lambda: bool(fake.calls("getMe")), timeout_s=30, what="bot start")
        if fault == "sigterm":
            process.send_signal(signal.SIGTERM)
        else:
            os.kill(workers[0]["pid"], signal.SIGKILL)
        status = await wait_for_exit(process)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()

    output = (tmp_path / "up.log").read_text(errors="replace")
    if fault == "sigterm":
        assert status == 0
        assert "stopping on SIGTERM" in output
        assert await list_workers(redis) == []  # the worker stopped cleanly
        assert "worker-1 stopped\n" in output
    else:
        assert status == 1
        assert "worker-1 exited with status -9; stopping the others" in output
        assert "worker-1 stopped with status -9" in output
    assert "bot stopped\n" in output


# ----- start-up errors -------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["bot", "worker"])
def test_unreachable_redis_is_one_clear_error(command: str, tmp_path: Path) -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    env = env_for(make_settings(url, None, tmp_path)) | {"BOT_TOKEN": "123:abc"}
    result = subprocess.run(
        [sys.executable, "-m", "joeybot.cli", command],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1
    assert f"cannot reach Redis at redis://:***@127.0.0.1:{url.rsplit(':', 1)[1]}" in error_lines[0]
    assert "redis-server" in error_lines[0]
    assert "hunter2" not in result.stderr


def test_bot_process_does_not_import_torch() -> None:
    probe = "import sys, joeybot.bot.app, joeybot.cli; sys.exit('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, timeout=60
    )
    assert result.returncode == 0
