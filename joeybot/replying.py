"""The worker's job: reply to a chat's waiting messages, in order, exactly once each.

The arq job `reply(chat_id, message_id)` is enqueued once per accepted message. The job that
takes the chat's lock replies to every pending message of the chat, lowest message id first,
so each reply sees all earlier turns. The jobs of the other messages find the lock taken and
end at once (see `joeybot.inbox` for the whole protocol).

While a job runs it renews two leases every WORKER_LEASE_S / 3 seconds: the chat's lock
(WORKER_LEASE_S) and arq's in-progress key of the job (WORKER_LEASE_S + 1 s). arq sets that key
once, to the job timeout plus 10 s, and runs a job again only when the key has expired;
shortening it means that a worker killed mid-job has its job picked up by another worker within
WORKER_LEASE_S + 1 s plus one queue poll, not after the whole job timeout. The lock lapses
first, so the job that runs again does not find the dead job's lock still in place.

A job that ends without finishing the chat (arq's timeout, a shutdown) enqueues a fresh job
for the chat's remaining messages; the jobs of those messages may already have ended as
"handed over".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from aiogram import Bot
from aiogram.exceptions import TelegramAPIError
from aiogram.types import ReplyParameters
from arq.constants import in_progress_key_prefix
from arq.worker import Retry
from redis.asyncio import Redis
from redis.exceptions import RedisError

from joeybot import keys, texts
from joeybot.config import Settings
from joeybot.delivery import (
    ChatBlocked,
    DeliveryPostponed,
    DeliveryRejected,
    RetryPolicy,
    call_with_retries,
    split_message,
)
from joeybot.history import HistoryStore
from joeybot.inbox import Draft, Inbox, PendingMessage
from joeybot.inference.generation import JoeyEngine, Reply
from joeybot.inference.prompts import Turn
from joeybot.workers import WorkerPresence, record_job

logger = logging.getLogger(__name__)

# Retry delays for arq when Redis fails mid-job, generation raises, or the job fails otherwise.
REDIS_RETRY_DEFER_S = 5.0
GENERATION_RETRY_DEFER_S = 2.0
FAILURE_RETRY_DEFER_S = 5.0
# arq's in-progress key outlives the chat lock by this much (see the module docstring).
IN_PROGRESS_MARGIN_S = 1.0
# Delay of the job that takes over a chat which a cancelled job left unfinished.
CONTINUATION_DEFER_S = 1.0
# A job stops taking new messages after this share of the job timeout and hands the rest on
# to a fresh job, so arq's timeout does not cut a reply in half.
JOB_TIME_SHARE = 0.7
# A job hands its chat back to the queue after this many replies, so that one user who
# writes as fast as Joey answers cannot keep a worker from every other chat.
MAX_REPLIES_PER_JOB = 2


@dataclass
class ReplyServices:
    """Services that the reply jobs of one worker share, built at worker start-up."""

    settings: Settings
    engine: JoeyEngine
    bot: Bot
    redis: Redis
    inbox: Inbox
    history: HistoryStore
    presence: WorkerPresence

    @property
    def worker_id(self) -> str:
        return self.presence.worker_id


class LockLost(Exception):
    """Raised when another job took over the chat while this one was replying in it."""


async def reply(ctx: dict[str, Any], chat_id: int, message_id: int) -> str:
    """arq job: make sure message `message_id` of chat `chat_id` gets its one reply.

    Returns what the job did: "already answered", "handed over" (another job has the chat's
    lock), "lost the chat", or "answered N" (messages).
    """
    services: ReplyServices = ctx["services"]
    if await services.inbox.is_delivered(chat_id, message_id):
        logger.debug("job %s: message already answered", ctx["job_id"])
        return "already answered"
    token = f"{services.worker_id}/{ctx['job_id']}/{ctx['job_try']}"
    if not await services.inbox.try_lock(chat_id, token, services.settings.worker.lease_s):
        logger.debug("job %s: chat %s is locked by another job", ctx["job_id"], chat_id)
        return "handed over"
    job = ChatJob(services, ctx, chat_id, token)
    try:
        return await job.run()
    except Retry:
        raise
    except RedisError as exc:
        logger.warning("job %s: Redis failed (%s); retrying the job", ctx["job_id"], exc)
        raise Retry(defer=REDIS_RETRY_DEFER_S) from exc
    except Exception as exc:
        # An unexpected failure: arq runs the job again, up to REPLY_MAX_TRIES times.
        logger.exception("job %s failed; retrying it", ctx["job_id"])
        raise Retry(defer=FAILURE_RETRY_DEFER_S) from exc


class ChatJob:
    """A job that has a chat's lock and replies to the chat's pending messages."""

    def __init__(
        self, services: ReplyServices, ctx: dict[str, Any], chat_id: int, token: str
    ) -> None:
        self.services = services
        self.settings = services.settings
        self.inbox = services.inbox
        self.job_id: str = ctx["job_id"]
        self.job_try: int = ctx["job_try"]
        self.redis: Redis = ctx["redis"]
        self.chat_id = chat_id
        self.token = token
        self.started = time.monotonic()
        self.policy = RetryPolicy(retries=self.settings.worker.send_retries)

    async def run(self) -> str:
        """Reply to the chat's pending messages until none is left; return what was done."""
        lease = asyncio.create_task(self._renew_leases(asyncio.current_task()))
        cancelled = False
        try:
            return f"answered {await self._drain()}"
        except LockLost:
            logger.warning("job %s: another job took over chat %s", self.job_id, self.chat_id)
            return "lost the chat"
        except asyncio.CancelledError:
            cancelled = True  # arq's job timeout, a shutdown, or the lock was lost
            raise
        finally:
            lease.cancel()
            await asyncio.gather(lease, return_exceptions=True)
            await self._unlock_quietly()
            if cancelled:
                await self._continue_later("the job was cancelled")

    async def _drain(self) -> int:
        answered = 0
        while True:
            message = await self.inbox.first_pending(self.chat_id)
            if message is None:
                if await self.inbox.unlock_if_idle(self.chat_id, self.token) != 0:
                    return answered  # released, or another job holds the chat now
                continue
            reason = self._reason_to_yield(answered)
            if reason:
                await self._unlock_quietly()
                await self._continue_later(reason)
                return answered
            await self.answer(message)
            answered += 1

    # ----- one message ---------------------------------------------------------------------

    async def answer(self, message: PendingMessage) -> None:
        """Generate (or resume) the reply to `message`, send it, and record the outcome."""
        attempt = await self.inbox.count_attempt(message)
        started_at = time.time()
        queue_wait_s = max(0.0, started_at - message.accepted_at)
        logger.info(
            "job %s chat %s message %s: try %d, started %.3f s after it was accepted",
            self.job_id,
            message.chat_id,
            message.message_id,
            attempt,
            queue_wait_s,
        )
        record = _JobRecord(message, self.services.worker_id, started_at, attempt)
        if attempt > self.settings.worker.max_attempts:
            await self._give_up(message, record)
            return
        try:
            async with self._typing(message.chat_id):
                draft = await self.inbox.load_draft(message)
                if draft is None:
                    draft = await self._generate(message)
                elif draft.parts_sent:
                    logger.info(
                        "job %s: resuming a reply after %d sent part(s)",
                        self.job_id,
                        draft.parts_sent,
                    )
                record.prompt_tokens = draft.prompt_tokens
                record.new_tokens, record.generation_s = draft.new_tokens, draft.seconds
                record.parts = await self._send(message, draft)
        except ChatBlocked as exc:
            await self._forget_blocked_chat(message, record, exc)
            return
        except DeliveryRejected as exc:
            logger.error("job %s: Telegram rejected the reply: %s", self.job_id, exc)
            await self.inbox.complete(message, None)
            await self._record(record, "rejected")
            return
        except DeliveryPostponed as exc:
            logger.warning(
                "job %s: %s; retrying the job in %.0f s", self.job_id, exc, exc.retry_in_s
            )
            raise Retry(defer=exc.retry_in_s) from exc
        if await self.inbox.complete(message, draft.text):
            self.services.presence.jobs_done += 1
        await self._record(record, "sent")

    async def _generate(self, message: PendingMessage) -> Draft:
        history = await self.services.history.load(message.chat_id)
        try:
            result = await generate_reply(self.services.engine, history, message.text)
        except Exception as exc:
            # Any failure inside the model (out of memory, a bad input): the attempt counter
            # caps how often a message is tried before the chat gets an apology.
            logger.exception("job %s: generation failed", self.job_id)
            raise Retry(defer=GENERATION_RETRY_DEFER_S) from exc
        draft = Draft(
            text=result.text,
            parts_sent=0,
            prompt_tokens=result.prompt_tokens,
            new_tokens=result.new_tokens,
            seconds=round(result.seconds, 3),
        )
        await self.inbox.save_draft(message, draft)
        return draft

    async def _send(self, message: PendingMessage, draft: Draft) -> int:
        """Send the draft's remaining parts in order; return how many parts the reply has."""
        parts = split_message(draft.text)
        for index in range(draft.parts_sent, len(parts)):
            if not await self.inbox.holds_lock(message.chat_id, self.token):
                raise LockLost
            reply_to = None
            if index == 0 and message.reply_to_message_id is not None:
                reply_to = ReplyParameters(
                    message_id=message.reply_to_message_id, allow_sending_without_reply=True
                )
            await call_with_retries(
                lambda text=parts[index], reply_to=reply_to: self.services.bot.send_message(
                    message.chat_id, text, reply_parameters=reply_to
                ),
                f"job {self.job_id} sendMessage part {index + 1}/{len(parts)}",
                self.policy,
            )
            await self.inbox.mark_part_sent(message, index + 1)
        return len(parts)

    async def _give_up(self, message: PendingMessage, record: _JobRecord) -> None:
        logger.error(
            "job %s: message %s failed %d times; sending an apology instead of a reply",
            self.job_id,
            message.message_id,
            self.settings.worker.max_attempts,
        )
        with contextlib.suppress(ChatBlocked, DeliveryRejected, DeliveryPostponed):
            await call_with_retries(
                lambda: self.services.bot.send_message(
                    message.chat_id, texts.text("gave_up", message.language_code)
                ),
                f"job {self.job_id} sendMessage apology",
                self.policy,
            )
        await self.inbox.complete(message, None)
        await self._record(record, "gave_up")

    async def _forget_blocked_chat(
        self, message: PendingMessage, record: _JobRecord, exc: ChatBlocked
    ) -> None:
        dropped = await self.inbox.drop_chat(message.chat_id)
        logger.warning(
            "job %s: %s; cleared chat %s history and %d waiting message(s)",
            self.job_id,
            exc,
            message.chat_id,
            len(dropped),
        )
        await self._record(record, "blocked")

    async def _record(self, record: _JobRecord, outcome: str) -> None:
        data = record.finish(outcome)
        if outcome == "sent":
            logger.info(
                "job %s chat %s: sent %d part(s) in %.2f s; %d tokens in %.2f s (%.1f tokens/s)",
                self.job_id,
                self.chat_id,
                record.parts,
                data["duration_s"],
                record.new_tokens,
                record.generation_s,
                record.new_tokens / record.generation_s if record.generation_s else 0.0,
            )
        try:
            await record_job(self.redis, data)
        except RedisError as exc:
            logger.warning("job %s: could not record the job: %s", self.job_id, exc)

    # ----- leases and hand-over ------------------------------------------------------------

    async def _renew_leases(self, job_task: asyncio.Task[Any] | None) -> None:
        """Renew the chat lock and arq's in-progress key; cancel the job if the lock is lost."""
        lease_s = self.settings.worker.lease_s
        in_progress = in_progress_key_prefix + self.job_id
        in_progress_ms = int((lease_s + IN_PROGRESS_MARGIN_S) * 1000)
        while True:
            try:
                await self.redis.pexpire(in_progress, in_progress_ms)
                if not await self.inbox.renew_lock(self.chat_id, self.token, lease_s):
                    logger.warning("job %s: lost the lock of chat %s", self.job_id, self.chat_id)
                    if job_task is not None:
                        job_task.cancel()
                    return
            except RedisError as exc:
                # The next round tries again; a lease outlives two missed renewals.
                logger.warning("job %s: could not renew leases: %s", self.job_id, exc)
            await asyncio.sleep(lease_s / 3)

    def _reason_to_yield(self, answered: int) -> str:
        """Return why the job should hand the chat back to the queue now, or ""."""
        if self._out_of_time():
            return "the job is running out of time"
        if answered >= MAX_REPLIES_PER_JOB:
            return f"{answered} replies sent, so other chats go first"
        return ""

    def _out_of_time(self) -> bool:
        limit = self.settings.worker.job_timeout_s * JOB_TIME_SHARE
        return time.monotonic() - self.started > limit

    async def _continue_later(self, reason: str) -> None:
        """Enqueue a fresh job for the chat if messages are still pending (after unlocking)."""
        try:
            message = await self.inbox.first_pending(self.chat_id)
            if message is None:
                return
            job_id = f"{message.job_id}:{uuid.uuid4().hex[:8]}"
            await self.redis.enqueue_job(
                keys.REPLY_FUNCTION,
                message.chat_id,
                message.message_id,
                _job_id=job_id,
                _defer_by=CONTINUATION_DEFER_S,
            )
        except RedisError as exc:
            logger.error(
                "job %s: %s and chat %s could not be handed on: %s",
                self.job_id,
                reason,
                self.chat_id,
                exc,
            )
            return
        logger.info(
            "job %s: %s; chat %s continues in job %s", self.job_id, reason, self.chat_id, job_id
        )

    async def _unlock_quietly(self) -> None:
        try:
            await self.inbox.unlock(self.chat_id, self.token)
        except RedisError as exc:
            # The lock lapses by itself after the lease.
            logger.warning("job %s: could not release chat %s: %s", self.job_id, self.chat_id, exc)

    @contextlib.asynccontextmanager
    async def _typing(self, chat_id: int) -> AsyncIterator[None]:
        task = asyncio.create_task(
            keep_typing(self.services.bot, chat_id, self.settings.worker.typing_interval_s)
        )
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class _JobRecord:
    """The fields of one recent-jobs record, filled in while a message is answered."""

    def __init__(
        self, message: PendingMessage, worker_id: str, started_at: float, attempt: int
    ) -> None:
        self.message = message
        self.worker_id = worker_id
        self.started_at = started_at
        self.attempt = attempt
        self.prompt_tokens = 0
        self.new_tokens = 0
        self.generation_s = 0.0
        self.parts = 0

    def finish(self, outcome: str) -> dict[str, Any]:
        finished_at = time.time()
        return {
            "job_id": self.message.job_id,
            "chat_id": self.message.chat_id,
            "kind": "reply",
            "enqueued_at": self.message.accepted_at,
            "started_at": self.started_at,
            "finished_at": finished_at,
            "queue_wait_s": round(max(0.0, self.started_at - self.message.accepted_at), 4),
            "duration_s": round(finished_at - self.started_at, 4),
            "new_tokens": self.new_tokens,
            "prompt_tokens": self.prompt_tokens,
            "outcome": outcome,
            "worker_id": self.worker_id,
            "attempt": self.attempt,
            "parts": self.parts,
        }


async def keep_typing(bot: Bot, chat_id: int, interval_s: float) -> None:
    """Send "typing" to the chat every `interval_s` seconds until cancelled.

    Telegram shows the action for 5 s or until the next message. Failures are only logged:
    the indicator is a courtesy and must not hold up the reply.
    """
    while True:
        try:
            await bot.send_chat_action(chat_id, "typing")
        except TelegramAPIError as exc:
            logger.debug("typing for chat %s failed: %s", chat_id, type(exc).__name__)
        await asyncio.sleep(interval_s)


async def generate_reply(engine: JoeyEngine, history: Sequence[Turn], text: str) -> Reply:
    """Generate in a thread so the event loop (leases, other jobs) keeps running.

    Cancelling the await stops the generation thread after its current text piece.
    """
    stop = threading.Event()
    try:
        return await asyncio.to_thread(_generate_until_stopped, engine, history, text, stop)
    except asyncio.CancelledError:
        stop.set()
        raise


def _generate_until_stopped(
    engine: JoeyEngine, history: Sequence[Turn], text: str, stop: threading.Event
) -> Reply:
    pieces = engine.stream(history, text)
    try:
        for _ in pieces:
            if stop.is_set():
                break
    finally:
        pieces.close()
    if pieces.result is None:
        raise asyncio.CancelledError
    return pieces.result
