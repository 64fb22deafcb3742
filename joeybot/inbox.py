"""Each chat's accepted messages, waiting in Redis for Joey's replies, and the chat's lock.

How each message gets exactly one reply, in order:

1. The bot accepts a message with `Inbox.accept`: one Lua script checks for a duplicate and
   the chat's limits, then adds the message to the chat's pending hash. The bot then enqueues
   an arq job whose id comes from chat id and message id.
2. A job takes the chat's lock (`try_lock`), a key with a lease that its worker renews. The
   holder answers the chat's pending messages one by one, lowest message id first, and
   releases the lock only when none is left (`unlock_if_idle`). A job that finds the lock
   taken returns at once: the holder will answer its message too.
3. A reply is first stored as a draft (`save_draft`); every part sent is counted
   (`mark_part_sent`). A job that takes over after a crash continues the draft instead of
   generating again, and skips the parts already sent.
4. `complete` writes the history, marks the message delivered and removes it from pending in
   one transaction, so history is written once and only after delivery.

A worker that dies holding the lock stops renewing it; the lock lapses after the lease and
arq runs the dead worker's job again (see `joeybot.replying`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from enum import StrEnum

from redis.asyncio import Redis
from redis.exceptions import WatchError

from joeybot import keys
from joeybot.history import HistoryStore

logger = logging.getLogger(__name__)

# Telegram may send an update again for up to a day; a delivered marker outlives that.
DELIVERED_TTL_S = 2 * 24 * 3600
# A pending message that no worker replies to within a day is dropped, as arq drops its job.
PENDING_TTL_S = 24 * 3600
DRAFT_TTL_S = 24 * 3600
RATE_WINDOW_TTL_S = 120

_ACCEPT_SCRIPT = """
local delivered, pending, rate, queue = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local message_id, payload = ARGV[1], ARGV[2]
local per_minute, max_pending, max_depth = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
if redis.call('EXISTS', delivered) == 1 then return 'duplicate' end
if redis.call('HEXISTS', pending, message_id) == 1 then return 'pending' end
local count = redis.call('INCR', rate)
if count == 1 then redis.call('EXPIRE', rate, ARGV[7]) end
if count == per_minute + 1 then return 'rate_limited' end
if count > per_minute then return 'rate_limited_again' end
if redis.call('HLEN', pending) >= max_pending then return 'too_many_pending' end
if redis.call('ZCARD', queue) >= max_depth then return 'busy' end
redis.call('HSET', pending, message_id, payload)
redis.call('EXPIRE', pending, ARGV[6])
return 'accepted'
"""

# Renew the lease when the lock is still ours; return 1, or 0 when it is lost.
_RENEW_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# Release the lock when no message is pending: 1 released, 0 work left, -1 lock lost.
_UNLOCK_IF_IDLE_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
if redis.call('HLEN', KEYS[2]) > 0 then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""

_UNLOCK_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Admission(StrEnum):
    """The decision of `Inbox.accept` about a message."""

    ACCEPTED = "accepted"
    PENDING = "pending"
    """Already accepted and waiting: enqueue its job again, which is harmless."""
    DUPLICATE = "duplicate"
    """Already replied to: ignore."""
    RATE_LIMITED = "rate_limited"
    """The first message over the chat's per-minute limit: send the notice."""
    RATE_LIMITED_AGAIN = "rate_limited_again"
    """Later messages over the limit in the same minute: dropped without another notice."""
    TOO_MANY_PENDING = "too_many_pending"
    BUSY = "busy"


@dataclass(frozen=True)
class PendingMessage:
    """An accepted message waiting for its reply."""

    chat_id: int
    message_id: int
    text: str
    language_code: str | None
    reply_to_message_id: int | None
    """In groups, the user's message that the reply answers; None in private chats."""
    accepted_at: float
    """Unix time when the bot accepted the message."""

    @property
    def job_id(self) -> str:
        return keys.reply_job_id(self.chat_id, self.message_id)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, raw: bytes | str) -> PendingMessage:
        return cls(**json.loads(raw))


@dataclass
class Draft:
    """A generated reply and how many of its parts Telegram has accepted."""

    text: str
    parts_sent: int
    prompt_tokens: int
    new_tokens: int
    seconds: float


class Inbox:
    """Pending messages, chat locks and drafts of all chats."""

    def __init__(self, redis: Redis, history: HistoryStore) -> None:
        self.redis = redis
        self.history = history
        self._accept = redis.register_script(_ACCEPT_SCRIPT)
        self._renew = redis.register_script(_RENEW_SCRIPT)
        self._unlock_if_idle = redis.register_script(_UNLOCK_IF_IDLE_SCRIPT)
        self._unlock = redis.register_script(_UNLOCK_SCRIPT)

    # ----- the bot's side -----------------------------------------------------------------

    async def accept(
        self,
        message: PendingMessage,
        *,
        per_minute: int,
        max_pending: int,
        max_queue_depth: int,
    ) -> Admission:
        """Add `message` to its chat's pending messages unless a duplicate or a limit stops it.

        The per-minute count uses calendar minutes of Unix time and counts every new message,
        also those then rejected for another limit.
        """
        chat_id, message_id = message.chat_id, message.message_id
        result = await self._accept(
            keys=[
                keys.delivered(chat_id, message_id),
                keys.pending(chat_id),
                keys.rate(chat_id, int(time.time() // 60)),
                keys.QUEUE_NAME,
            ],
            args=[
                message_id,
                message.to_json(),
                per_minute,
                max_pending,
                max_queue_depth,
                PENDING_TTL_S,
                RATE_WINDOW_TTL_S,
            ],
        )
        return Admission(result.decode() if isinstance(result, bytes) else result)

    # ----- the worker's side --------------------------------------------------------------

    async def is_delivered(self, chat_id: int, message_id: int) -> bool:
        return bool(await self.redis.exists(keys.delivered(chat_id, message_id)))

    async def first_pending(self, chat_id: int) -> PendingMessage | None:
        """Return the chat's pending message with the lowest message id.

        An unreadable entry is deleted with a warning, so it cannot block the chat.
        """
        entries = await self.redis.hgetall(keys.pending(chat_id))
        for field in sorted(entries, key=_message_id_order):
            try:
                return PendingMessage.from_json(entries[field])
            except (ValueError, TypeError):
                logger.warning("chat %s: dropped unreadable pending entry %r", chat_id, field)
                await self.redis.hdel(keys.pending(chat_id), field)
        return None

    async def try_lock(self, chat_id: int, token: str, lease_s: float) -> bool:
        return bool(
            await self.redis.set(keys.chat_lock(chat_id), token, nx=True, px=int(lease_s * 1000))
        )

    async def renew_lock(self, chat_id: int, token: str, lease_s: float) -> bool:
        """Extend the lock's lease; return False when another job holds it now."""
        return bool(
            await self._renew(keys=[keys.chat_lock(chat_id)], args=[token, int(lease_s * 1000)])
        )

    async def holds_lock(self, chat_id: int, token: str) -> bool:
        value = await self.redis.get(keys.chat_lock(chat_id))
        return value is not None and value.decode() == token

    async def unlock_if_idle(self, chat_id: int, token: str) -> int:
        """Release the lock if no message is pending: 1 released, 0 work left, -1 lost."""
        return int(
            await self._unlock_if_idle(
                keys=[keys.chat_lock(chat_id), keys.pending(chat_id)], args=[token]
            )
        )

    async def unlock(self, chat_id: int, token: str) -> None:
        await self._unlock(keys=[keys.chat_lock(chat_id)], args=[token])

    async def count_attempt(self, message: PendingMessage) -> int:
        """Count one more try at answering `message` and return the count."""
        key = keys.attempts(message.chat_id, message.message_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.expire(key, PENDING_TTL_S)
            count, _ = await pipe.execute()
        return int(count)

    async def load_draft(self, message: PendingMessage) -> Draft | None:
        raw = await self.redis.hgetall(keys.draft(message.chat_id, message.message_id))
        if not raw:
            return None
        fields = {key.decode(): value.decode() for key, value in raw.items()}
        return Draft(
            text=fields["text"],
            parts_sent=int(fields.get("parts_sent", 0)),
            prompt_tokens=int(fields.get("prompt_tokens", 0)),
            new_tokens=int(fields.get("new_tokens", 0)),
            seconds=float(fields.get("seconds", 0.0)),
        )

    async def save_draft(self, message: PendingMessage, draft: Draft) -> None:
        key = keys.draft(message.chat_id, message.message_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={name: str(value) for name, value in asdict(draft).items()})
            pipe.expire(key, DRAFT_TTL_S)
            await pipe.execute()

    async def mark_part_sent(self, message: PendingMessage, parts_sent: int) -> None:
        """Record that Telegram accepted the first `parts_sent` parts of the draft."""
        key = keys.draft(message.chat_id, message.message_id)
        await self.redis.hset(key, "parts_sent", parts_sent)

    async def complete(self, message: PendingMessage, reply_text: str | None) -> bool:
        """Finish `message`: add the exchange to the history (unless `reply_text` is None),
        mark it delivered and drop it from pending, all in one transaction.

        Returns False when another job completed it first; nothing is written then.
        """
        chat_id, message_id = message.chat_id, message.message_id
        marker = keys.delivered(chat_id, message_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            await pipe.watch(marker)
            if await pipe.exists(marker):
                await pipe.reset()
                return False
            pipe.multi()
            if reply_text is not None:
                self.history.queue_append(pipe, chat_id, message.text, reply_text)
            pipe.set(marker, int(time.time()), ex=DELIVERED_TTL_S)
            pipe.hdel(keys.pending(chat_id), str(message_id))
            pipe.delete(keys.draft(chat_id, message_id), keys.attempts(chat_id, message_id))
            try:
                await pipe.execute()
            except WatchError:
                return False
        return True

    async def drop_chat(self, chat_id: int) -> list[PendingMessage]:
        """Forget the chat's history and pending messages (after a 403); return the dropped
        messages, now marked delivered so their jobs end at once."""
        entries = await self.redis.hgetall(keys.pending(chat_id))
        dropped = [PendingMessage.from_json(raw) for raw in entries.values()]
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.pending(chat_id), keys.history(chat_id))
            for message in dropped:
                pipe.set(
                    keys.delivered(chat_id, message.message_id),
                    int(time.time()),
                    ex=DELIVERED_TTL_S,
                )
                pipe.delete(
                    keys.draft(chat_id, message.message_id),
                    keys.attempts(chat_id, message.message_id),
                )
            await pipe.execute()
        return dropped


def _message_id_order(field: bytes) -> tuple[int, bytes]:
    """Sort key of a pending field: numeric message ids in order, anything else last."""
    return (int(field), b"") if field.isdigit() else (2**63, field)
