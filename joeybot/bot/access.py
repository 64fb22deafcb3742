"""Access rules: the allowlist, admins, and which group messages are for the bot."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiogram import BaseMiddleware, Bot
from aiogram.enums import ChatType
from aiogram.filters import Filter
from aiogram.types import Message, TelegramObject

from joeybot import texts
from joeybot.config import BotSettings

logger = logging.getLogger(__name__)

Handler = Callable[[TelegramObject, dict[str, Any]], Awaitable[Any]]


class AccessMiddleware(BaseMiddleware):
    """Drop messages from users outside BOT_ALLOWED_USER_IDS; mark admins.

    Handlers receive `is_admin` and `language_code` (the sender's Telegram language). A user
    who is not allowed gets a notice in a private chat and is ignored in groups.
    """

    def __init__(self, settings: BotSettings) -> None:
        self.allowed = set(settings.allowed_user_ids)
        self.admins = set(settings.admin_user_ids)

    async def __call__(self, handler: Handler, event: TelegramObject, data: dict[str, Any]) -> Any:
        if not isinstance(event, Message) or event.from_user is None:
            return None  # channel posts and anonymous group admins: nobody to reply to
        user = event.from_user
        if self.allowed and user.id not in self.allowed and user.id not in self.admins:
            logger.info("ignored user %s in chat %s: not in the allowlist", user.id, event.chat.id)
            if event.chat.type == ChatType.PRIVATE:
                await event.answer(texts.text("not_allowed", user.language_code))
            return None
        data["is_admin"] = user.id in self.admins
        data["language_code"] = user.language_code
        return await handler(event, data)


class AddressedToBot(Filter):
    """Pass private messages, and group messages that mention the bot or reply to it.

    Hands the handler `prompt`: the message text (or caption) without the bot's @username.
    """

    async def __call__(self, message: Message, bot: Bot) -> bool | dict[str, Any]:
        me = await bot.me()
        text = message.text or message.caption or ""
        if message.chat.type == ChatType.PRIVATE:
            return {"prompt": text.strip()}
        if not (replies_to_bot(message, me.id) or mentions_bot(message, me.username, me.id)):
            return False
        return {"prompt": strip_mention(text, me.username)}


def replies_to_bot(message: Message, bot_id: int) -> bool:
    original = message.reply_to_message
    return bool(original and original.from_user and original.from_user.id == bot_id)


def mentions_bot(message: Message, username: str | None, bot_id: int) -> bool:
    """True when an entity of the text or caption is @username or a mention of the bot."""
    text = message.text or message.caption or ""
    for entity in message.entities or message.caption_entities or []:
        if entity.type == "text_mention" and entity.user and entity.user.id == bot_id:
            return True
        if entity.type == "mention" and username:
            if entity.extract_from(text).lower() == f"@{username.lower()}":
                return True
    return False


def strip_mention(text: str, username: str | None) -> str:
    if not username:
        return text.strip()
    pattern = rf"[ \t]*@{re.escape(username)}\b[ \t]*"
    return re.sub(pattern, " ", text, flags=re.IGNORECASE).strip()
