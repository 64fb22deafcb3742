"""Messages for Joey: text is queued for the workers, anything else gets a friendly notice."""

from __future__ import annotations

import asyncio
import logging
import time

from aiogram import Bot, F, Router
from aiogram.enums import ChatType
from aiogram.exceptions import TelegramAPIError
from aiogram.types import Message, ReplyParameters
from arq.connections import ArqRedis

from joeybot import keys, texts
from joeybot.bot.access import AddressedToBot
from joeybot.config import Settings
from joeybot.inbox import Admission, Inbox, PendingMessage

logger = logging.getLogger(__name__)


# Admissions that get a notice instead of a reply, and the notice's text key.
_NOTICES = {
    Admission.RATE_LIMITED: "slow_down",
    Admission.TOO_MANY_PENDING: "still_answering",
    Admission.BUSY: "busy",
}
# References to fire-and-forget "typing" calls, so they are not garbage-collected early.
_background: set[asyncio.Task[None]] = set()


def build_router() -> Router:
    """Create the messages router; a new one per dispatcher, as aiogram requires."""
    router = Router(name="messages")
    router.message.register(on_text, F.text, AddressedToBot())
    router.message.register(on_other, AddressedToBot())
    return router


async def on_text(
    message: Message,
    prompt: str,
    language_code: str | None,
    settings: Settings,
    inbox: Inbox,
    redis: ArqRedis,
    bot: Bot,
) -> None:
    """Queue the message for a worker unless a limit rejects it."""
    chat_id, message_id = message.chat.id, message.message_id
    if not prompt:
        await answer(message, texts.text("start", language_code))
        return
    limit = settings.bot.max_message_chars
    if len(prompt) > limit:
        logger.info("chat %s message %s: rejected, %d characters", chat_id, message_id, len(prompt))
        await answer(message, texts.text("too_long", language_code, limit=limit))
        return

    pending = PendingMessage(
        chat_id=chat_id,
        message_id=message_id,
        text=prompt,
        language_code=language_code,
        reply_to_message_id=None if message.chat.type == ChatType.PRIVATE else message_id,
        accepted_at=time.time(),
    )
    admission = await inbox.accept(
        pending,
        per_minute=settings.bot.messages_per_minute,
        max_pending=settings.bot.max_pending_per_chat,
        max_queue_depth=settings.bot.max_queue_depth,
    )
    logger.info("chat %s message %s: %s", chat_id, message_id, admission.value)

    if admission in (Admission.ACCEPTED, Admission.PENDING):
        await redis.enqueue_job(
            keys.REPLY_FUNCTION,
            chat_id,
            message_id,
            _job_id=keys.reply_job_id(chat_id, message_id),
        )
        show_typing(bot, chat_id)
    elif admission in _NOTICES:
        await answer(message, texts.text(_NOTICES[admission], language_code))


async def on_other(message: Message, language_code: str | None) -> None:
    """Reply to stickers, photos, voice and the like with a notice; nothing is queued."""
    logger.info(
        "chat %s message %s: not text (%s)",
        message.chat.id,
        message.message_id,
        message.content_type,
    )
    await answer(message, texts.text("non_text", language_code))


async def answer(message: Message, text: str) -> None:
    """Send a service message: in groups as a reply to the user's message."""
    if message.chat.type == ChatType.PRIVATE:
        await message.answer(text)
        return
    reply_to = ReplyParameters(message_id=message.message_id, allow_sending_without_reply=True)
    await message.answer(text, reply_parameters=reply_to)


def show_typing(bot: Bot, chat_id: int) -> None:
    """Start "typing" in the chat at once, without waiting for the Bot API's answer."""
    task = asyncio.create_task(_send_typing(bot, chat_id))
    _background.add(task)
    task.add_done_callback(_background.discard)


async def _send_typing(bot: Bot, chat_id: int) -> None:
    try:
        await bot.send_chat_action(chat_id, "typing")
    except TelegramAPIError as exc:
        logger.debug("typing for chat %s failed: %s", chat_id, type(exc).__name__)
