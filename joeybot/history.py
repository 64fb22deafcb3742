"""Per-chat conversation history in Redis.

A chat's history is a Redis list of JSON objects ``{"role": "user" | "assistant", "content":
text}``, oldest first, trimmed to HISTORY_MAX_TURNS messages and expiring HISTORY_TTL_S seconds
after the last write. Message text is stored as data: special-token strings such as
``<|im_end|>`` stay plain characters because the prompt builder tokenizes message text with
special tokens split.
"""

from __future__ import annotations

import json
import logging

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from joeybot import keys
from joeybot.config import HistorySettings
from joeybot.inference.prompts import Turn

logger = logging.getLogger(__name__)


class HistoryStore:
    """Load, extend and clear the turns of each chat."""

    def __init__(self, redis: Redis, settings: HistorySettings) -> None:
        self.redis = redis
        self.settings = settings

    async def load(self, chat_id: int) -> list[Turn]:
        """Return the chat's turns, oldest first; an empty list for an unknown chat."""
        raw = await self.redis.lrange(keys.history(chat_id), 0, -1)
        turns = []
        for item in raw:
            turn = _decode_turn(item)
            if turn is not None:
                turns.append(turn)
        if len(turns) < len(raw):
            logger.warning(
                "chat %s: skipped %d unreadable history entries", chat_id, len(raw) - len(turns)
            )
        return turns

    async def append(self, chat_id: int, user_text: str, reply_text: str) -> None:
        """Add a user message and Joey's reply, then trim and renew the expiry."""
        async with self.redis.pipeline(transaction=True) as pipe:
            self.queue_append(pipe, chat_id, user_text, reply_text)
            await pipe.execute()

    async def clear(self, chat_id: int) -> bool:
        """Forget the chat's history; return True when there was any."""
        return bool(await self.redis.delete(keys.history(chat_id)))

    def queue_append(self, pipe: Pipeline, chat_id: int, user_text: str, reply_text: str) -> None:
        """Add the commands of `append` to a pipeline, so a caller can make them part of a
        larger transaction."""
        key = keys.history(chat_id)
        if self.settings.max_turns == 0:
            pipe.delete(key)
            return
        pipe.rpush(key, _encode_turn("user", user_text), _encode_turn("assistant", reply_text))
        pipe.ltrim(key, -self.settings.max_turns, -1)
        if self.settings.ttl_s:
            pipe.expire(key, self.settings.ttl_s)
        else:
            pipe.persist(key)


def _encode_turn(role: str, content: str) -> str:
    return json.dumps({"role": role, "content": content}, ensure_ascii=False)


def _decode_turn(raw: bytes | str) -> Turn | None:
    try:
        data = json.loads(raw)
        role, content = data["role"], data["content"]
    except (ValueError, TypeError, KeyError):
        return None
    if role not in ("user", "assistant") or not isinstance(content, str):
        return None
    return Turn(role, content)
