"""What the workers are doing, as the admin page and /stats see it through Redis.

- Presence: each worker process keeps ``joeybot:worker:{id}`` (JSON) alive with a TTL of
  PRESENCE_TTL_S, renewed every PRESENCE_REFRESH_S and deleted on a clean stop. A worker that
  dies disappears from `list_workers` within PRESENCE_TTL_S.
- Recent jobs: every message replied to appends one JSON record to ``joeybot:jobs:recent``,
  newest first, trimmed to the last 200.
- Queue depth: jobs waiting or running in joeybot's arq queue.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
import uuid
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from joeybot import keys

logger = logging.getLogger(__name__)

PRESENCE_TTL_S = 30
PRESENCE_REFRESH_S = 10
_SCAN_BATCH = 100


def new_worker_id() -> str:
    """Return an id unique to this process: host name, process id and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"


async def list_workers(redis: Redis) -> list[dict[str, Any]]:
    """Return the presence record of every live worker, sorted by start time.

    Each record has id, host, pid, started (Unix time), model (what the worker loaded) and
    jobs_done (messages it replied to).
    """
    names = [name async for name in redis.scan_iter(keys.WORKER_PREFIX + "*", count=_SCAN_BATCH)]
    if not names:
        return []
    workers = []
    for raw in await redis.mget(names):
        if raw is None:  # expired between SCAN and MGET
            continue
        try:
            workers.append(json.loads(raw))
        except ValueError:
            logger.warning("skipped an unreadable worker presence record")
    return sorted(workers, key=lambda worker: worker.get("started", 0))


async def record_job(redis: Redis, record: dict[str, Any]) -> None:
    """Append one finished job's record to the recent-jobs list, keeping the newest 200.

    The record's fields: job_id, chat_id, kind, enqueued_at, started_at, finished_at (Unix
    times), queue_wait_s, duration_s, new_tokens, outcome, and the worker's id.
    """
    async with redis.pipeline(transaction=True) as pipe:
        pipe.lpush(keys.RECENT_JOBS, json.dumps(record, ensure_ascii=False))
        pipe.ltrim(keys.RECENT_JOBS, 0, keys.RECENT_JOBS_MAX - 1)
        await pipe.execute()


async def recent_jobs(redis: Redis, limit: int = keys.RECENT_JOBS_MAX) -> list[dict[str, Any]]:
    """Return up to `limit` job records, newest first."""
    records = []
    for raw in await redis.lrange(keys.RECENT_JOBS, 0, limit - 1):
        try:
            records.append(json.loads(raw))
        except ValueError:
            logger.warning("skipped an unreadable job record")
    return records


async def queue_depth(redis: Redis, queue_name: str = keys.QUEUE_NAME) -> int:
    """Return the number of jobs in the queue, waiting or running."""
    return int(await redis.zcard(queue_name))


class WorkerPresence:
    """Publish this worker's presence record until `stop` is called."""

    def __init__(self, redis: Redis, worker_id: str, model_info: dict[str, Any]) -> None:
        self.redis = redis
        self.worker_id = worker_id
        self.jobs_done = 0
        self._record = {
            "id": worker_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.time(),
            "model": model_info,
        }
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.publish()
        self._task = asyncio.create_task(self._refresh_forever(), name="joeybot-presence")

    async def publish(self) -> None:
        record = self._record | {"jobs_done": self.jobs_done}
        await self.redis.set(
            keys.worker(self.worker_id), json.dumps(record, default=str), ex=PRESENCE_TTL_S
        )

    async def stop(self) -> None:
        """Stop renewing and delete the record."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            await self.redis.delete(keys.worker(self.worker_id))
        except RedisError as exc:
            logger.warning("could not delete presence of worker %s: %s", self.worker_id, exc)

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(PRESENCE_REFRESH_S)
            try:
                await self.publish()
            except RedisError as exc:
                # The next round tries again; the record lapses only after PRESENCE_TTL_S.
                logger.warning("could not renew presence of worker %s: %s", self.worker_id, exc)
