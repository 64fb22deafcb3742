"""Build the dispatcher and run the bot: long polling, or a webhook when BOT_WEBHOOK_URL is set.

Polling handles updates one at a time (aiogram's handle_as_tasks=False), so Telegram counts an
update as received only after its handler finished, and a bot killed mid-update gets it again
after a restart. In webhook mode the handler runs before the HTTP response, to the same end.
While Redis is down a handler waits for it (see `joeybot.redis_client`) and later updates wait
at Telegram. If a handler still fails, the user gets a "try again" notice instead of silence.
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit

from aiogram import Bot, Dispatcher
from aiogram.exceptions import TelegramAPIError, TelegramUnauthorizedError
from aiogram.types import ErrorEvent, User
from aiogram.webhook.aiohttp_server import SimpleRequestHandler, setup_application
from aiohttp import web
from arq.connections import ArqRedis

from joeybot import texts
from joeybot.bot import commands, messages
from joeybot.bot.access import AccessMiddleware
from joeybot.config import Settings
from joeybot.delivery import (
    ChatBlocked,
    DeliveryPostponed,
    DeliveryRejected,
    RetryPolicy,
    call_with_retries,
)
from joeybot.history import HistoryStore
from joeybot.inbox import Inbox
from joeybot.process import stop_on_signals
from joeybot.redis_client import check_redis, create_redis, describe_url
from joeybot.telegram import create_bot

logger = logging.getLogger(__name__)

# getMe at start-up: retries over about 30 s before the bot gives up.
START_POLICY = RetryPolicy(retries=5)


class BotStartError(RuntimeError):
    """Raised when Telegram rejects the token or cannot be reached at start-up."""


def build_dispatcher(settings: Settings, redis: ArqRedis) -> Dispatcher:
    """Create the dispatcher with its routers; handlers get settings, redis, inbox, history."""
    history = HistoryStore(redis, settings.history)
    dispatcher = Dispatcher(
        settings=settings, redis=redis, history=history, inbox=Inbox(redis, history)
    )
    dispatcher.message.outer_middleware(AccessMiddleware(settings.bot))
    dispatcher.include_routers(commands.build_router(), messages.build_router())
    dispatcher.errors.register(on_error)
    return dispatcher


async def on_error(event: ErrorEvent) -> bool:
    """Log a failed update and tell its sender to try again, instead of staying silent."""
    update = event.update
    logger.error(
        "update %s failed: %s: %s",
        update.update_id,
        type(event.exception).__name__,
        event.exception,
        exc_info=event.exception,
    )
    message = update.message
    if message is not None and message.from_user is not None:
        try:
            await message.answer(texts.text("trouble", message.from_user.language_code))
        except TelegramAPIError as exc:
            logger.warning("could not tell chat %s about the failure: %s", message.chat.id, exc)
    return True


async def run_bot(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """Run the bot until SIGINT/SIGTERM or until `stop` is set."""
    bot = create_bot(settings)
    await check_redis(settings.redis)
    redis = create_redis(settings.redis)
    dispatcher = build_dispatcher(settings, redis)
    stop = stop or stop_on_signals()
    try:
        me = await _get_me(bot, settings)
        mode = f"webhook {settings.bot.webhook_url}" if settings.bot.webhook_url else "polling"
        logger.info(
            "bot @%s (id %d) started: %s, redis %s, Telegram API %s",
            me.username,
            me.id,
            mode,
            describe_url(settings.redis.url),
            settings.telegram.api_url,
        )
        if settings.bot.webhook_url:
            await _serve_webhook(bot, dispatcher, settings, stop)
        else:
            await _poll(bot, dispatcher, stop)
    finally:
        await bot.session.close()
        await redis.aclose()
        logger.info("bot stopped")


async def _get_me(bot: Bot, settings: Settings) -> User:
    api_url = settings.telegram.api_url
    try:
        return await call_with_retries(bot.me, "getMe", START_POLICY)
    except DeliveryRejected as exc:
        if isinstance(exc.__cause__, TelegramUnauthorizedError):
            raise BotStartError(
                f"the Bot API at {api_url} rejected BOT_TOKEN (401 Unauthorized); check the "
                "token from @BotFather"
            ) from exc
        raise BotStartError(f"the Bot API at {api_url} rejected getMe: {exc}") from exc
    except (DeliveryPostponed, ChatBlocked) as exc:
        raise BotStartError(
            f"cannot reach the Bot API at {api_url}: {exc}. Check the network or TELEGRAM_API_URL."
        ) from exc


async def _poll(bot: Bot, dispatcher: Dispatcher, stop: asyncio.Event) -> None:
    # getUpdates returns 409 while a webhook is set, so switch it off. Updates wait meanwhile.
    await bot.delete_webhook(drop_pending_updates=False)
    polling = asyncio.create_task(
        dispatcher.start_polling(
            bot, handle_signals=False, close_bot_session=False, handle_as_tasks=False
        )
    )
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({polling, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not polling.done():
        try:
            await dispatcher.stop_polling()
        except RuntimeError:  # stopped before polling began
            polling.cancel()
    await asyncio.gather(polling, return_exceptions=True)
    if polling.done() and not polling.cancelled() and polling.exception():
        raise polling.exception()


async def _serve_webhook(
    bot: Bot, dispatcher: Dispatcher, settings: Settings, stop: asyncio.Event
) -> None:
    config = settings.bot
    secret = config.webhook_secret.get_secret_value() or None
    app = web.Application()
    handler = SimpleRequestHandler(
        dispatcher=dispatcher, bot=bot, handle_in_background=False, secret_token=secret
    )
    handler.register(app, path=urlsplit(config.webhook_url).path or "/")
    setup_application(app, dispatcher, bot=bot)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, config.webhook_host, config.webhook_port).start()
        await bot.set_webhook(
            config.webhook_url,
            secret_token=secret,
            allowed_updates=dispatcher.resolve_used_update_types(),
        )
        logger.info("webhook server listening on %s:%d", config.webhook_host, config.webhook_port)
        await stop.wait()
    finally:
        await runner.cleanup()
