"""Commands: /start, /help, /reset, and /stats for admins."""

from __future__ import annotations

import logging

from aiogram import Router
from aiogram.filters import Command, CommandStart
from aiogram.types import Message
from redis.asyncio import Redis

from joeybot import texts
from joeybot.history import HistoryStore
from joeybot.workers import list_workers, queue_depth

logger = logging.getLogger(__name__)


def build_router() -> Router:
    """Create the commands router; a new one per dispatcher, as aiogram requires."""
    router = Router(name="commands")
    router.message.register(start, CommandStart())
    router.message.register(show_help, Command("help"))
    router.message.register(reset, Command("reset"))
    router.message.register(stats, Command("stats"))
    return router


async def start(message: Message, language_code: str | None) -> None:
    await message.answer(texts.text("start", language_code))


async def show_help(message: Message, language_code: str | None, is_admin: bool) -> None:
    lines = [texts.text("help", language_code)]
    if is_admin:
        lines.append(texts.text("help_admin", language_code))
    await message.answer("\n".join(lines))


async def reset(message: Message, language_code: str | None, history: HistoryStore) -> None:
    had_history = await history.clear(message.chat.id)
    logger.info("chat %s: history reset (had history: %s)", message.chat.id, had_history)
    await message.answer(texts.text("reset", language_code))


async def stats(message: Message, language_code: str | None, is_admin: bool, redis: Redis) -> None:
    if not is_admin:
        await message.answer(texts.text("admin_only", language_code))
        return
    depth = await queue_depth(redis)
    workers = await list_workers(redis)
    lines = [
        f"- {worker.get('id')}: {worker.get('jobs_done', 0)} replies, "
        f"{worker.get('model', {}).get('device', '?')}"
        for worker in workers
    ]
    await message.answer(
        texts.text(
            "stats", language_code, depth=depth, count=len(workers), workers="\n".join(lines)
        ).strip()
    )
