"""The admin page's back end: request replies from the workers, read chats and the queue.

Nothing here imports Gradio, so the tests drive these functions directly against Redis and
a worker.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from arq.connections import ArqRedis
from redis.exceptions import RedisError

from joeybot.admin.protocol import (
    JOB_FUNCTION,
    LEASE_REFRESH_S,
    LEASE_TTL_S,
    STREAM_TTL_S,
    EntryType,
    ReplyRequest,
    StreamEntry,
    cancel_key,
    decode_entry,
    job_id_for,
    lease_key,
    store_request,
    stream_key,
)
from joeybot.history import HistoryStore
from joeybot.inference.prompts import Turn
from joeybot.workers import list_workers, queue_depth, recent_jobs

logger = logging.getLogger(__name__)

# A request that no worker picks up within this time is dropped (arq's job expiry too).
START_TIMEOUT_S = 120.0
# A started reply with no new stream entry for this long is given up: its worker is gone.
IDLE_TIMEOUT_S = 60.0
# XREAD BLOCK time. Every wait this long ends in a yield, because the page notices a closed
# tab or a Stop press only between yields.
READ_BLOCK_MS = 500


class ReplyState(StrEnum):
    """State of a requested reply."""

    NO_WORKERS = "no_workers"
    QUEUED = "queued"
    GENERATING = "generating"
    DONE = "done"
    STOPPED = "stopped"
    ERROR = "error"
    TIMED_OUT = "timed_out"


FINAL_STATES = frozenset(
    {ReplyState.NO_WORKERS, ReplyState.DONE, ReplyState.STOPPED, ReplyState.ERROR,
     ReplyState.TIMED_OUT}
)  # fmt: skip


# States that follow the worker's final stream entry.
_WORKER_FINAL_STATES = frozenset({ReplyState.DONE, ReplyState.STOPPED, ReplyState.ERROR})


@dataclass(frozen=True)
class ReplyProgress:
    """A snapshot of one reply: the text so far, its state and its stats.

    `stats` merges the worker's numbers (see `joeybot.admin.jobs.reply_stats` and the `start`
    entry) with the page's own: `queue_s`, time from request to the worker's start, and
    `first_piece_after_request_s`, time from request to the first text on the page.
    """

    state: ReplyState
    text: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    error_code: str = ""
    error: str = ""
    jobs_ahead: int | None = None
    request_id: str = ""

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES


@dataclass(frozen=True)
class QueueOverview:
    """Queue depth, live workers' presence records and the newest job records."""

    depth: int
    workers: list[dict[str, Any]]
    recent_jobs: list[dict[str, Any]]


class AdminBackend:
    """The page's access to Redis: arq jobs, reply streams, chat history and queue state."""

    def __init__(
        self,
        redis: ArqRedis,
        history: HistoryStore,
        *,
        queue_name: str | None = None,
        start_timeout_s: float = START_TIMEOUT_S,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
    ) -> None:
        self.redis = redis
        self.history = history
        self.queue_name = queue_name or redis.default_queue_name
        self.start_timeout_s = start_timeout_s
        self.idle_timeout_s = idle_timeout_s

    # ----- replies ----------------------------------------------------------------------------

    async def stream_reply(self, request: ReplyRequest) -> AsyncIterator[ReplyProgress]:
        """Enqueue a reply job and yield progress until the reply is final.

        Yields at least every READ_BLOCK_MS. When the consumer closes the generator early
        (on Stop, Reset or a closed tab), it sets the cancel key, and the worker stops.
        """
        if not await self.workers_online():
            yield ReplyProgress(ReplyState.NO_WORKERS)
            return
        request_id = uuid.uuid4().hex
        reader = _StreamReader(self, request_id)
        worker_finished = False
        try:
            await reader.enqueue(request)
            async for progress in reader.follow():
                # A timed-out request is final for the page but not for the worker.
                worker_finished = progress.state in _WORKER_FINAL_STATES
                yield progress
        finally:
            await reader.close(cancel=not worker_finished)

    async def stream_comparison(
        self, request: ReplyRequest
    ) -> AsyncIterator[tuple[ReplyProgress, ReplyProgress]]:
        """Request replies with the adapter on and off; yield both progresses as they grow.

        Both requests use one seed (the request's, or a random one stored in
        `options["seed"]` of both), so with sampling on the adapter is the only difference.
        """
        options = dict(request.options)
        if options.get("seed") is None:
            options["seed"] = secrets.randbelow(2**31)
        requests = (
            replace(request, options=options, use_adapter=True),
            replace(request, options=options, use_adapter=False),
        )
        latest = [ReplyProgress(ReplyState.QUEUED), ReplyProgress(ReplyState.QUEUED)]
        updates: asyncio.Queue[tuple[int, ReplyProgress | None]] = asyncio.Queue()

        async def pump(index: int) -> None:
            try:
                async for progress in self.stream_reply(requests[index]):
                    await updates.put((index, progress))
            finally:
                await updates.put((index, None))

        tasks = [asyncio.create_task(pump(index)) for index in (0, 1)]
        try:
            running = len(tasks)
            while running:
                index, progress = await updates.get()
                if progress is None:
                    running -= 1
                    continue
                latest[index] = progress
                yield latest[0], latest[1]
            for task in tasks:
                task.result()  # re-raise a failure of either side
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # ----- chats ------------------------------------------------------------------------------

    async def load_chat(self, chat_id: int) -> list[Turn]:
        return await self.history.load(chat_id)

    async def clear_chat(self, chat_id: int) -> int:
        """Delete the chat's cached history; return how many turns it had."""
        turns = await self.history.load(chat_id)
        await self.history.clear(chat_id)
        return len(turns)

    # ----- queue and workers ------------------------------------------------------------------

    async def workers_online(self) -> list[dict[str, Any]]:
        return await list_workers(self.redis)

    async def queue_overview(self, jobs_limit: int = 50) -> QueueOverview:
        return QueueOverview(
            depth=await queue_depth(self.redis, self.queue_name),
            workers=await self.workers_online(),
            recent_jobs=await recent_jobs(self.redis, jobs_limit),
        )

    async def jobs_ahead(self, request_id: str) -> int | None:
        """Return how many jobs precede the request in the queue, running ones included."""
        rank = await self.redis.zrank(self.queue_name, job_id_for(request_id))
        return None if rank is None else int(rank)


class _StreamReader:
    """Enqueue one request and follow its stream; keeps the lease alive while it reads."""

    def __init__(self, backend: AdminBackend, request_id: str) -> None:
        self.backend = backend
        self.redis = backend.redis
        self.request_id = request_id
        self.requested_at = time.monotonic()
        self.lease_renewed_at = 0.0
        self.progress = ReplyProgress(ReplyState.QUEUED, request_id=request_id)
        self.last_entry_id = "0-0"
        self.last_entry_at = self.requested_at

    async def enqueue(self, request: ReplyRequest) -> None:
        await self._renew_lease()
        await store_request(self.redis, self.request_id, request)
        await self.redis.enqueue_job(
            JOB_FUNCTION,
            self.request_id,
            _job_id=job_id_for(self.request_id),
            _queue_name=self.backend.queue_name,
            _expires=self.backend.start_timeout_s,
        )
        logger.info(
            "admin request %s enqueued: adapter %s, %d history turns",
            self.request_id,
            "on" if request.use_adapter else "off",
            len(request.history),
        )

    async def follow(self) -> AsyncIterator[ReplyProgress]:
        key = stream_key(self.request_id)
        while not self.progress.finished:
            response = await self.redis.xread(
                {key: self.last_entry_id}, count=200, block=READ_BLOCK_MS
            )
            if time.monotonic() - self.lease_renewed_at >= LEASE_REFRESH_S:
                await self._renew_lease()
            entries = [
                decode_entry(entry_id, fields)
                for _, stream_entries in response or []
                for entry_id, fields in stream_entries
            ]
            if entries:
                self.last_entry_at = time.monotonic()
                for entry in entries:
                    self._apply(entry)
            else:
                await self._check_timeouts()
            yield self.progress

    async def close(self, *, cancel: bool) -> None:
        """Delete the lease; when the reply is not final, also tell the worker to stop.

        Without Redis the worker still stops once the lease expires (LEASE_TTL_S).
        """
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                if cancel:
                    pipe.set(cancel_key(self.request_id), "1", ex=STREAM_TTL_S)
                pipe.delete(lease_key(self.request_id))
                await pipe.execute()
        except RedisError as exc:
            logger.warning("admin request %s: cannot release its keys: %s", self.request_id, exc)
            return
        if cancel:
            logger.info("admin request %s cancelled by the page", self.request_id)

    async def _renew_lease(self) -> None:
        await self.redis.set(lease_key(self.request_id), "1", ex=LEASE_TTL_S)
        self.lease_renewed_at = time.monotonic()

    def _apply(self, entry: StreamEntry) -> None:
        self.last_entry_id = entry.entry_id
        progress = self.progress
        elapsed = round(time.monotonic() - self.requested_at, 3)
        if entry.type is EntryType.START:
            stats = progress.stats | entry.stats | {"queue_s": elapsed}
            self.progress = replace(progress, state=ReplyState.GENERATING, stats=stats)
        elif entry.type is EntryType.PIECE:
            stats = progress.stats
            if "first_piece_after_request_s" not in stats:
                stats = stats | {"first_piece_after_request_s": elapsed}
            self.progress = replace(progress, text=progress.text + entry.text, stats=stats)
        elif entry.type is EntryType.DONE:
            state = ReplyState.STOPPED if entry.stats.get("stopped") else ReplyState.DONE
            self.progress = replace(progress, state=state, stats=progress.stats | entry.stats)
        else:
            self.progress = replace(
                progress,
                state=ReplyState.ERROR,
                error_code=str(entry.stats.get("code", "")),
                error=entry.text,
            )

    async def _check_timeouts(self) -> None:
        now = time.monotonic()
        if self.progress.state is ReplyState.QUEUED:
            if now - self.requested_at > self.backend.start_timeout_s:
                logger.warning(
                    "admin request %s: no worker started it within %.0f s",
                    self.request_id,
                    self.backend.start_timeout_s,
                )
                self.progress = replace(self.progress, state=ReplyState.TIMED_OUT)
                return
            jobs_ahead = await self.backend.jobs_ahead(self.request_id)
            self.progress = replace(self.progress, jobs_ahead=jobs_ahead)
        elif now - self.last_entry_at > self.backend.idle_timeout_s:
            logger.warning(
                "admin request %s: no output from its worker for %.0f s",
                self.request_id,
                self.backend.idle_timeout_s,
            )
            self.progress = replace(self.progress, state=ReplyState.TIMED_OUT)
