"""The aiogram Bot object that the bot and the workers use to call the Bot API."""

from __future__ import annotations

from aiogram import Bot
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer

from joeybot.config import Settings


class MissingTokenError(RuntimeError):
    """Raised when a process that talks to Telegram starts without BOT_TOKEN."""


def require_token(settings: Settings) -> str:
    """Return BOT_TOKEN, or raise MissingTokenError when it is not set."""
    token = settings.bot.token.get_secret_value()
    if not token:
        raise MissingTokenError(
            "BOT_TOKEN is not set; get a token from @BotFather and put it in the environment "
            "or in .env"
        )
    return token


def create_bot(settings: Settings) -> Bot:
    """Create a Bot for BOT_TOKEN that calls the Bot API at TELEGRAM_API_URL."""
    token = require_token(settings)
    session = AiohttpSession(
        api=TelegramAPIServer.from_base(settings.telegram.api_url),
        timeout=settings.telegram.request_timeout_s,
    )
    return Bot(token, session=session)
