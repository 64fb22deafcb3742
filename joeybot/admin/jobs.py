"""The worker side of the admin page: generate a reply and publish it piece by piece.

Workers register `admin_generate` next to their own job functions. It uses the engine the
worker loaded at start-up (`ctx["engine"]`), so the page shows the replies of the model and
the settings that Telegram users get. The stream protocol is described in `joeybot.admin.protocol`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from datetime import datetime
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from joeybot.admin.protocol import (
    EntryType,
    ErrorCode,
    ReplyRequest,
    append_entry,
    load_request,
    should_stop,
)
from joeybot.inference.generation import JoeyEngine, Reply
from joeybot.inference.prompts import Turn
from joeybot.workers import record_job

logger = logging.getLogger(__name__)

# How often the job checks the cancel and lease keys while it generates.
STOP_POLL_S = 0.25


async def admin_generate(ctx: dict[str, Any], request_id: str) -> dict[str, Any]:
    """Generate the reply to a stored admin request and publish it to the request's stream.

    The page stores the request under `request_key(request_id)` (see `ReplyRequest`), so no
    message text passes through arq's job arguments and its logs. Returns the stats with an
    `outcome` (done, stopped, cancelled, error or worker_lost) as the job result. The same
    outcome goes to the recent-jobs list with kind "admin".
    """
    job_id = ctx.get("job_id", request_id)
    started_at = time.time()
    queue_wait_s = _queue_wait_s(ctx.get("enqueue_time"), started_at)
    logger.info(
        "admin job %s started: request %s, try %d, queued %.2f s",
        job_id,
        request_id,
        ctx.get("job_try", 1),
        queue_wait_s,
    )
    stats = await _run(ctx, request_id, queue_wait_s)
    logger.info(
        "admin job %s finished: %s, %s new tokens in %.2f s (%.1f tokens/s)",
        job_id,
        stats["outcome"],
        stats.get("new_tokens", "?"),
        stats.get("seconds", 0.0),
        stats.get("tokens_per_s", 0.0),
    )
    await _record(ctx, job_id, started_at, queue_wait_s, stats)
    return stats


def worker_name(ctx: dict[str, Any]) -> str:
    """Return the worker id from ctx, or host:pid when the worker set none."""
    return str(ctx.get("worker_id") or f"{socket.gethostname()}:{os.getpid()}")


async def _run(ctx: dict[str, Any], request_id: str, queue_wait_s: float) -> dict[str, Any]:
    redis: Redis = ctx["redis"]
    if ctx.get("job_try", 1) > 1:
        # A retry means the worker that ran this request died. The page has given up on that
        # attempt or soon will, so a second generation would only waste the worker's time.
        logger.warning("admin request %s: job retried; reporting the lost worker", request_id)
        await _publish_error(
            redis,
            request_id,
            ErrorCode.WORKER_LOST,
            "the worker running this reply stopped; send the message again",
        )
        return {"outcome": "worker_lost"}
    if await should_stop(redis, request_id):
        logger.info("admin request %s: skipped, the page cancelled it", request_id)
        return {"outcome": "cancelled"}
    try:
        request = await load_request(redis, request_id)
    except ValueError as exc:
        logger.error("admin request %s: %s", request_id, exc)
        await _publish_error(redis, request_id, ErrorCode.INVALID_REQUEST, str(exc))
        return {"outcome": "error"}
    if request is None:
        logger.warning("admin request %s: skipped, the request expired", request_id)
        return {"outcome": "cancelled"}
    engine: JoeyEngine | None = ctx.get("engine")
    if engine is None:
        await _publish_error(redis, request_id, ErrorCode.NO_ENGINE, "this worker has no model")
        return {"outcome": "error"}

    await append_entry(
        redis,
        request_id,
        EntryType.START,
        stats={
            "worker": worker_name(ctx),
            "queue_wait_s": round(queue_wait_s, 3),
            "use_adapter": request.use_adapter,
            "has_adapter": engine.loaded.has_adapter,
            "seed": request.options.get("seed"),
        },
    )
    generation = _StreamedGeneration(engine, request)
    return await generation.publish(redis, request_id)


async def _record(
    ctx: dict[str, Any],
    job_id: str,
    started_at: float,
    queue_wait_s: float,
    stats: dict[str, Any],
) -> None:
    """Append the job to the recent-jobs list; a Redis failure here only costs the record."""
    finished_at = time.time()
    record = {
        "job_id": job_id,
        "chat_id": None,
        "kind": "admin",
        "enqueued_at": round(started_at - queue_wait_s, 3),
        "started_at": round(started_at, 3),
        "finished_at": round(finished_at, 3),
        "queue_wait_s": round(queue_wait_s, 3),
        "duration_s": round(finished_at - started_at, 3),
        "new_tokens": stats.get("new_tokens"),
        "outcome": stats["outcome"],
        "worker": worker_name(ctx),
    }
    try:
        await record_job(ctx["redis"], record)
    except RedisError as exc:
        logger.warning("admin job %s: could not record it in the recent jobs: %s", job_id, exc)


class _StreamedGeneration:
    """Run one `engine.stream` in a thread and publish its pieces from the event loop.

    The thread hands events to the loop through an asyncio queue. The loop batches the
    pieces that arrived since the previous XADD, and checks the cancel and lease keys every
    STOP_POLL_S. The generation thread checks for a stop request after each piece.
    """

    def __init__(self, engine: JoeyEngine, request: ReplyRequest) -> None:
        self.engine = engine
        self.request = request
        self.stop = threading.Event()
        self._events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def publish(self, redis: Redis, request_id: str) -> dict[str, Any]:
        """Generate, append the pieces and the final entry, and return the stats."""
        self._loop = asyncio.get_running_loop()
        started = time.perf_counter()
        first_piece_s: float | None = None
        last_stop_check = started
        thread = self._loop.run_in_executor(None, self._produce)
        thread.add_done_callback(_log_thread_failure)
        try:
            while True:
                pieces, final = await self._next_events()
                if pieces:
                    if first_piece_s is None:
                        first_piece_s = time.perf_counter() - started
                    await append_entry(redis, request_id, EntryType.PIECE, "".join(pieces))
                if final is not None:
                    return await self._finish(redis, request_id, final, started, first_piece_s)
                if time.perf_counter() - last_stop_check >= STOP_POLL_S:
                    last_stop_check = time.perf_counter()
                    if await should_stop(redis, request_id):
                        logger.info("admin request %s stopped by the page", request_id)
                        return await self._finish(
                            redis, request_id, ("stopped", None), started, first_piece_s
                        )
        finally:
            # Also reached on arq's job timeout or a worker shutdown. The thread then ends
            # after its next piece instead of generating up to max_new_tokens unread.
            self.stop.set()

    async def _next_events(self) -> tuple[list[str], tuple[str, Any] | None]:
        """Wait up to STOP_POLL_S for events; return the pieces and the final event, if any."""
        try:
            first = await asyncio.wait_for(self._events.get(), timeout=STOP_POLL_S)
        except TimeoutError:
            return [], None
        pieces: list[str] = []
        event: tuple[str, Any] | None = first
        while event is not None:
            kind, value = event
            if kind != "piece":
                return pieces, event
            pieces.append(value)
            event = None if self._events.empty() else self._events.get_nowait()
        return pieces, None

    async def _finish(
        self,
        redis: Redis,
        request_id: str,
        final: tuple[str, Any],
        started: float,
        first_piece_s: float | None,
    ) -> dict[str, Any]:
        kind, value = final
        seconds = time.perf_counter() - started
        if kind == "done":
            stats = reply_stats(value)
            await append_entry(redis, request_id, EntryType.DONE, stats=stats)
            return {"outcome": "done"} | stats
        if kind == "stopped":
            stats = {"stopped": True, "seconds": round(seconds, 3)}
            if first_piece_s is not None:
                stats["first_token_s"] = round(first_piece_s, 3)
            await append_entry(redis, request_id, EntryType.DONE, stats=stats)
            return {"outcome": "stopped"} | stats
        code, message = value
        await _publish_error(redis, request_id, code, message)
        return {"outcome": "error", "seconds": round(seconds, 3)}

    def _emit(self, kind: str, value: Any) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._events.put_nowait, (kind, value))

    def _produce(self) -> None:
        """Run in the executor thread: iterate the engine's stream and emit events."""
        try:
            request = self.request
            pieces = self.engine.stream(
                [Turn(turn["role"], turn["content"]) for turn in request.history],
                request.user_text,
                use_adapter=request.use_adapter,
                system_prompt=request.system_prompt or None,
                **request.options,
            )
        except (TypeError, ValueError) as exc:  # unknown option names, or values out of range
            self._emit("error", (ErrorCode.INVALID_OPTIONS, f"invalid generation options: {exc}"))
            return
        try:
            for piece in pieces:
                self._emit("piece", piece)
                if self.stop.is_set():
                    self._emit("stopped", None)
                    return
            self._emit("done", pieces.result)
        except Exception as exc:
            logger.exception("admin generation failed")
            self._emit("error", (ErrorCode.GENERATION_FAILED, f"generation failed: {exc}"))
        finally:
            pieces.close()


def reply_stats(reply: Reply) -> dict[str, Any]:
    """Return the numbers the page shows under a finished reply.

    NOTE: `first_token_s` and `seconds` start when the engine's generation thread starts,
    so on a worker that runs several jobs at once they include waiting for the engine lock.
    """
    return {
        "stopped": False,
        "prompt_tokens": reply.prompt_tokens,
        "new_tokens": reply.new_tokens,
        "seconds": round(reply.seconds, 3),
        "first_token_s": None
        if reply.first_token_seconds is None
        else round(reply.first_token_seconds, 3),
        "tokens_per_s": round(reply.tokens_per_second, 2),
        "hit_token_limit": reply.hit_token_limit,
        "fallback": reply.fallback,
        "regenerated": reply.regenerated,
    }


async def _publish_error(redis: Redis, request_id: str, code: ErrorCode, message: str) -> None:
    await append_entry(redis, request_id, EntryType.ERROR, message, {"code": code.value})


def _queue_wait_s(enqueue_time: datetime | None, started_at: float) -> float:
    if enqueue_time is None:
        return 0.0
    return max(0.0, started_at - enqueue_time.timestamp())


def _log_thread_failure(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.error("admin generation thread failed", exc_info=future.exception())
