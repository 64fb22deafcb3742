"""Helpers for the bot and worker tests: private redis-servers, settings, running services.

Every server listens on 127.0.0.1 on a free port and is stopped by whoever started it. Bot and
workers run in the test's event loop where the test does not need to kill them, and as
`joeybot worker` subprocesses where it does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import redis
from pydantic import SecretStr

from joeybot import keys
from joeybot.bot.app import run_bot
from joeybot.config import Settings
from joeybot.inbox import Draft, PendingMessage
from joeybot.inference.generation import JoeyEngine
from joeybot.testing import FakeTelegram
from joeybot.worker import build_worker
from joeybot.workers import recent_jobs

REPO_ROOT = Path(__file__).resolve().parents[1]
REDIS_START_TIMEOUT_S = 10.0
WORKER_START_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RedisServer:
    """A redis-server process in its own folder; with `persistent` it keeps data (AOF) across
    a restart on the same port."""

    def __init__(self, folder: Path, *, persistent: bool = False) -> None:
        self.folder = folder
        self.persistent = persistent
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found; install it (apt install redis-server)")
        persistence = ["--appendonly", "yes", "--appendfsync", "always"]
        if not self.persistent:
            persistence = ["--appendonly", "no"]
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        argv += [*persistence, "--dir", str(self.folder)]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        while True:
            with contextlib.suppress(redis.ConnectionError):
                if self.client().ping():
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop with SIGTERM; a persistent server writes its data first."""
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_connect_timeout=1)

    def flush(self) -> None:
        with self.client() as client:
            client.flushall()


def make_settings(
    redis_url: str,
    fake: FakeTelegram | None,
    model_dir: Path,
    adapter_dir: Path | None = None,
    **sections: dict[str, Any],
) -> Settings:
    """Settings for a test: no .env file, the tiny model, fast polling and short leases."""
    values: dict[str, dict[str, Any]] = {
        "model": {"base": str(model_dir), "adapter": str(adapter_dir or "")},
        "generation": {"max_new_tokens": 24, "seed": 1},
        "redis": {"url": redis_url, "reconnect_for_s": 30},
        "worker": {"poll_delay_s": 0.01, "lease_s": 3},
        "bot": {},
        "telegram": {},
    }
    if fake is not None:
        values["bot"]["token"] = fake.token
        values["telegram"]["api_url"] = fake.api_url
    for name, section in sections.items():
        values[name] = values.get(name, {}) | section
    return Settings(_env_file=None, **values)


def env_for(settings: Settings) -> dict[str, str]:
    """Environment variables that give a subprocess the same settings."""
    env = {key: value for key, value in os.environ.items() if not _is_setting(key)}
    for section_name in Settings.model_fields:
        section = getattr(settings, section_name)
        for name in type(section).model_fields:
            value = getattr(section, name)
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            elif isinstance(value, list):
                value = ",".join(str(item) for item in value)
            elif value is None:
                value = ""
            env[f"{section_name}_{name}".upper()] = str(value)
    env["PYTHONPATH"] = str(REPO_ROOT)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _is_setting(name: str) -> bool:
    prefix = name.split("_", 1)[0].lower()
    return prefix in Settings.model_fields


@contextlib.asynccontextmanager
async def running_worker(settings: Settings, engine: JoeyEngine) -> AsyncIterator[Any]:
    """Run an arq worker with `engine` in this event loop; yield the arq Worker."""
    worker = build_worker(settings, {"engine": engine}, handle_signals=False)
    task = asyncio.create_task(worker.async_run())
    try:
        yield worker
    finally:
        await worker.close()
        await asyncio.gather(task, return_exceptions=True)


@contextlib.asynccontextmanager
async def running_bot(settings: Settings, fake: FakeTelegram) -> AsyncIterator[asyncio.Task]:
    """Run the bot in this event loop until the block ends; wait until it polls."""
    stop = asyncio.Event()
    task = asyncio.create_task(run_bot(settings, stop=stop))
    try:
        if not settings.bot.webhook_url:
            await fake.wait_for(
                lambda: bool(fake.calls("getUpdates")) or task.done(), what="the bot to poll"
            )
        if task.done():
            task.result()  # raises the start-up error
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


class WorkerProcess:
    """`joeybot worker` as a subprocess with the given settings."""

    def __init__(self, settings: Settings, log_path: Path, **env: str) -> None:
        self.log_path = log_path
        self.log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "joeybot.cli", "worker"],
            env=env_for(settings) | env,
            cwd=log_path.parent,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


async def wait_until(
    condition: Callable[[], Any], *, timeout_s: float = 30.0, what: str = "condition"
) -> Any:
    """Poll an async or plain `condition` every 50 ms until it returns a true value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.05)


async def jobs_with_outcome(redis_client: Any, outcome: str) -> list[dict[str, Any]]:
    return [job for job in await recent_jobs(redis_client) if job["outcome"] == outcome]


def store_draft(server: RedisServer, message: PendingMessage, draft: Draft) -> None:
    """Put a pending message with a finished draft into Redis, as a crashed worker leaves it."""
    with server.client() as client:
        client.hset(keys.pending(message.chat_id), str(message.message_id), message.to_json())
        client.hset(
            keys.draft(message.chat_id, message.message_id),
            mapping={name: str(value) for name, value in draft.__dict__.items()},
        )


def decode_json_list(values: list[bytes]) -> list[dict[str, Any]]:
    return [json.loads(value) for value in values]
