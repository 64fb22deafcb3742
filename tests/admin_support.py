"""Helpers for the admin page tests: a private redis-server, an in-process worker, a server.

Every server listens on 127.0.0.1 on a free port and is stopped by the helper that started it.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import redis
import uvicorn
from arq.worker import Worker, func

from joeybot import keys
from joeybot.admin.jobs import admin_generate
from joeybot.admin.protocol import JOB_FUNCTION
from joeybot.config import Settings
from joeybot.inference.generation import JoeyEngine
from joeybot.redis_client import create_redis
from joeybot.workers import WorkerPresence

REDIS_START_TIMEOUT_S = 10.0
SERVER_START_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RedisServer:
    """A redis-server process without persistence, in its own folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found; install it (apt install redis-server)")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError as exc:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from exc
                time.sleep(0.05)
            finally:
                client.close()

    def flush(self) -> None:
        client = redis.Redis(port=self.port)
        try:
            client.flushall()
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None


@contextlib.asynccontextmanager
async def running_worker(
    settings: Settings,
    engine: JoeyEngine,
    worker_id: str = "test-worker",
    **worker_options: Any,
) -> AsyncIterator[Worker]:
    """Run an arq worker with `admin_generate` in this event loop, with its presence record."""
    presence_redis = create_redis(settings.redis)
    presence = WorkerPresence(presence_redis, worker_id, dict(engine.loaded.info))
    await presence.start()
    worker = Worker(
        functions=[func(admin_generate, name=JOB_FUNCTION)],
        queue_name=keys.QUEUE_NAME,
        redis_pool=create_redis(settings.redis),
        ctx={"engine": engine, "worker_id": worker_id},
        handle_signals=False,
        poll_delay=0.01,
        # One job at a time, like `joeybot worker` by default (WORKER_MAX_JOBS=1).
        **({"max_jobs": 1, "job_timeout": 120} | worker_options),
    )
    task = asyncio.create_task(worker.async_run())
    try:
        yield worker
    finally:
        # arq's close re-raises the CancelledError of a job it had to cancel.
        with contextlib.suppress(asyncio.CancelledError):
            await worker.close()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await presence.stop()
        await presence_redis.aclose()


class WorkerThread:
    """`running_worker` on its own event loop in a thread, for synchronous tests."""

    def __init__(self, settings: Settings, engine: JoeyEngine) -> None:
        self.settings = settings
        self.engine = engine
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="admin-test-worker", daemon=True)

    def __enter__(self) -> WorkerThread:
        self._thread.start()
        if not self._ready.wait(SERVER_START_TIMEOUT_S):
            raise RuntimeError("the test worker did not start")
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with running_worker(self.settings, self.engine):
            self._ready.set()
            await self._stop.wait()


@contextlib.contextmanager
def serving(app: Any, port: int) -> Iterator[str]:
    """Serve an ASGI application with uvicorn in a thread; yield its base URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="admin-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the test server did not start on port {port}")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
