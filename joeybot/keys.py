"""Every Redis key and queue name that joeybot uses, in one place.

All keys start with ``joeybot:`` so that joeybot can share a Redis database with other
applications. arq adds its own keys (``arq:job:*``, ``arq:in-progress:*``, ``arq:retry:*``,
``arq:result:*``) for the jobs of `QUEUE_NAME`.
"""

from __future__ import annotations

PREFIX = "joeybot:"

# The arq queue (a sorted set of job ids) that the bot fills and the workers read.
QUEUE_NAME = PREFIX + "queue"
# The arq function that replies to a chat's waiting messages.
REPLY_FUNCTION = "reply"

WORKER_PREFIX = PREFIX + "worker:"
RECENT_JOBS = PREFIX + "jobs:recent"
RECENT_JOBS_MAX = 200


def reply_job_id(chat_id: int, message_id: int) -> str:
    """Return the arq job id for one Telegram message, so a duplicate update is not enqueued."""
    return f"reply:{chat_id}:{message_id}"


def worker(worker_id: str) -> str:
    """Return the key of one worker's presence: JSON with a short TTL that it renews."""
    return WORKER_PREFIX + worker_id


def history(chat_id: int) -> str:
    """Return the key of a chat's turns: a list of JSON {"role", "content"}, oldest first."""
    return f"{PREFIX}history:{chat_id}"


def pending(chat_id: int) -> str:
    """Return the key of a chat's messages waiting for a reply: message id -> JSON hash."""
    return f"{PREFIX}chat:{chat_id}:pending"


def chat_lock(chat_id: int) -> str:
    """Return the key of a chat's lock: the token of the job replying in it, with a TTL."""
    return f"{PREFIX}chat:{chat_id}:lock"


def rate(chat_id: int, minute: int) -> str:
    """Return the key that counts a chat's messages in one minute (Unix time // 60)."""
    return f"{PREFIX}chat:{chat_id}:rate:{minute}"


def draft(chat_id: int, message_id: int) -> str:
    """Return the key of a reply not yet fully sent: a hash of its text and parts sent."""
    return f"{PREFIX}draft:{chat_id}:{message_id}"


def attempts(chat_id: int, message_id: int) -> str:
    """Return the key that counts how often a worker started to reply to one message."""
    return f"{PREFIX}attempts:{chat_id}:{message_id}"


def delivered(chat_id: int, message_id: int) -> str:
    """Return the key that marks one message as replied to, so duplicates are ignored."""
    return f"{PREFIX}delivered:{chat_id}:{message_id}"
