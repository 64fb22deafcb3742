"""The arq worker: loads the model once, then replies to chats from the Redis queue.

Start it with `joeybot worker`, or with `arq joeybot.worker.WorkerSettings`. Under
`joeybot worker` the process survives Redis outages of any length: when arq's loop fails on
a lost connection, a new arq Worker starts on a fresh connection and reuses the loaded model.
Under the arq command an outage longer than REDIS_RECONNECT_FOR_S ends the process.

Hooks for the admin page: `ctx["engine"]` holds the JoeyEngine and `ctx["settings"]` the
Settings; `joeybot.admin.jobs.admin_generate` is registered when that module is importable.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from typing import Any

from arq import Worker
from arq.connections import RedisSettings
from arq.worker import Function, func
from redis.exceptions import RedisError

from joeybot import keys
from joeybot.config import Settings, load_settings
from joeybot.history import HistoryStore
from joeybot.inbox import Inbox
from joeybot.redis_client import check_redis, create_redis, describe_url
from joeybot.replying import ReplyServices, reply
from joeybot.telegram import create_bot, require_token
from joeybot.workers import WorkerPresence, new_worker_id

logger = logging.getLogger(__name__)

# arq counts every run of a job as a try, including re-runs after a 429 or a Redis error. The
# real cap per message is WORKER_MAX_ATTEMPTS, which joeybot.replying counts.
REPLY_MAX_TRIES = 50
# Delays before restarting arq after consecutive failures, and the run time after which a
# failure counts as the first one again.
RESTART_DELAY_S = (1.0, 2.0, 5.0, 10.0)
STABLE_RUN_S = 60.0
ADMIN_JOBS_MODULE = "joeybot.admin.jobs"


def load_engine(settings: Settings) -> Any:
    """Load the model and return a JoeyEngine; logs what was loaded and how long it took."""
    from joeybot.inference.generation import JoeyEngine
    from joeybot.inference.loading import load_model

    loaded = load_model(settings.model)
    info = loaded.info
    logger.info(
        "model loaded: base=%s adapter=%s device=%s dtype=%s threads=%s context=%s in %.1f s",
        info["base"],
        info["adapter"],
        info["device"],
        info["dtype"],
        info["threads"],
        info["max_positions"],
        info["load_seconds"],
    )
    return JoeyEngine(loaded, settings.generation)


async def startup(ctx: dict[str, Any]) -> None:
    """arq on_startup: fill ctx with settings, engine, Telegram client and presence."""
    if "settings" not in ctx:
        ctx["settings"] = load_settings()
    settings: Settings = ctx["settings"]
    if "engine" not in ctx:
        ctx["engine"] = await asyncio.to_thread(load_engine, settings)
    engine = ctx["engine"]
    redis = ctx["redis"]
    worker_id = ctx.setdefault("worker_id", new_worker_id())
    presence = WorkerPresence(redis, worker_id, engine.loaded.info)
    await presence.start()
    history = HistoryStore(redis, settings.history)
    ctx["services"] = ReplyServices(
        settings=settings,
        engine=engine,
        bot=create_bot(settings),
        redis=redis,
        inbox=Inbox(redis, history),
        history=history,
        presence=presence,
    )
    info = engine.loaded.info
    logger.info(
        "worker %s started: model %s, adapter %s, %s, loaded in %.1f s; redis %s, queue %s, "
        "Telegram API %s",
        worker_id,
        info.get("base"),
        info.get("adapter"),
        info.get("device"),
        info.get("load_seconds", 0.0),
        describe_url(settings.redis.url),
        keys.QUEUE_NAME,
        settings.telegram.api_url,
    )


async def shutdown(ctx: dict[str, Any]) -> None:
    """arq on_shutdown: delete the presence record and close the Telegram session."""
    services: ReplyServices | None = ctx.pop("services", None)
    if services is None:
        return
    await services.presence.stop()
    await services.bot.session.close()
    logger.info(
        "worker %s stopped after %d replies",
        services.worker_id,
        services.presence.jobs_done,
    )


def worker_functions() -> list[Function]:
    """Return the jobs a worker runs: replies, and the admin page's generation if installed."""
    functions = [func(reply, name=keys.REPLY_FUNCTION, max_tries=REPLY_MAX_TRIES)]
    try:
        admin_jobs = importlib.import_module(ADMIN_JOBS_MODULE)
    except ImportError:
        logger.debug("%s not importable; admin jobs are not registered", ADMIN_JOBS_MODULE)
    else:
        functions.append(func(admin_jobs.admin_generate, name="admin_generate"))
    return functions


def worker_options(settings: Settings) -> dict[str, Any]:
    """arq Worker arguments for these settings (without the Redis connection)."""
    return {
        "functions": worker_functions(),
        "queue_name": keys.QUEUE_NAME,
        "on_startup": startup,
        "on_shutdown": shutdown,
        "max_jobs": settings.worker.max_jobs,
        "job_timeout": settings.worker.job_timeout_s,
        "poll_delay": settings.worker.poll_delay_s,
        # Deduplication uses joeybot's delivered markers, so arq keeps no results.
        "keep_result": 0,
        "max_tries": REPLY_MAX_TRIES,
        "health_check_interval": 60,
        "log_results": False,
    }


def build_worker(
    settings: Settings, ctx: dict[str, Any] | None = None, *, handle_signals: bool = True
) -> Worker:
    """Create an arq Worker on a new Redis connection; `ctx` may carry a loaded engine."""
    return Worker(
        **worker_options(settings),
        redis_pool=create_redis(settings.redis),
        ctx={"settings": settings} | (ctx or {}),
        handle_signals=handle_signals,
    )


async def serve(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """Run a worker until SIGINT/SIGTERM or `stop`, restarting arq after a Redis outage.

    Without `stop`, arq's own signal handlers stop the worker: they cancel the running jobs
    (arq queues them again) and log the signal.
    """
    require_token(settings)
    await check_redis(settings.redis)
    engine = await asyncio.to_thread(load_engine, settings)
    ctx: dict[str, Any] = {"engine": engine, "worker_id": new_worker_id()}
    handle_signals = stop is None
    stop = stop or asyncio.Event()
    failures = 0
    while not stop.is_set():
        worker = build_worker(settings, ctx, handle_signals=handle_signals)
        if handle_signals:
            # Only arq's signal handlers call on_stop then; without them close() calls it too.
            worker.on_stop = lambda signum: stop.set()
        started = time.monotonic()
        failure = await _run_until_stopped(worker, stop)
        if failure is None:
            break
        if time.monotonic() - started > STABLE_RUN_S:
            failures = 0  # a new outage starts again with the shortest delay
        delay_s = RESTART_DELAY_S[min(failures, len(RESTART_DELAY_S) - 1)]
        failures += 1
        logger.warning(
            "worker lost Redis at %s (%s: %s); restarting in %.0f s",
            describe_url(settings.redis.url),
            type(failure).__name__,
            failure,
            delay_s,
        )
        await _wait_or_stop(stop, delay_s)
    del ctx["engine"]


async def _run_until_stopped(worker: Worker, stop: asyncio.Event) -> BaseException | None:
    """Run `worker` until `stop` is set (returns None) or its loop fails on Redis (returns
    the error). Either way the worker is closed: arq cancels its running jobs, which stay in
    the queue for the next worker."""
    main = asyncio.create_task(worker.async_run())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({main, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    failure = main.exception() if main.done() and not main.cancelled() else None
    if failure is not None:
        for task in worker.tasks.values():
            task.cancel()  # arq queues a cancelled job again
    # With handle_signals=False, close() cancels the jobs and the polling loop itself.
    await _close_quietly(worker)
    await asyncio.gather(main, return_exceptions=True)
    if failure is not None and not isinstance(failure, RedisError | OSError):
        raise failure
    return failure


async def _close_quietly(worker: Worker) -> None:
    try:
        await worker.close()
    except (RedisError, OSError) as exc:
        # close() stopped before on_shutdown: stop the presence task and the Telegram session
        # here, so a restarted worker does not leave them running.
        logger.warning("worker closed without Redis: %s", exc)
        await shutdown(worker.ctx)
        await worker.pool.aclose()


async def _wait_or_stop(stop: asyncio.Event, delay_s: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), delay_s)
    except TimeoutError:
        pass


def __getattr__(name: str) -> Any:
    """Build `WorkerSettings` for the arq command on first use, from the environment."""
    if name != "WorkerSettings":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    settings = load_settings()
    options = worker_options(settings) | {
        "redis_pool": create_redis(settings.redis),
        # Unused by the worker, which has redis_pool; `arq --check` reads it to find Redis.
        "redis_settings": RedisSettings.from_dsn(settings.redis.url),
        "ctx": {"settings": settings},
    }
    return type("WorkerSettings", (), options)
