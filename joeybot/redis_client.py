"""Redis connections for the bot, the workers and the admin page.

Every client retries a command while Redis is unreachable (a restart, a dropped connection)
for about `REDIS_RECONNECT_FOR_S` seconds before the error reaches the caller, so a short
outage only delays work. The URL's password never leaves this module: log `describe_url(url)`.
"""

from __future__ import annotations

import logging

from arq.connections import ArqRedis
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from joeybot import keys
from joeybot.config import RedisConnectionSettings, redact_url

logger = logging.getLogger(__name__)

RETRY_BASE_S = 0.05
RETRY_CAP_S = 2.0
START_REDIS_HINT = (
    "Start one with `redis-server` (Debian/Ubuntu: `sudo apt install redis-server`), or set "
    "REDIS_URL to a running server."
)


class RedisUnavailableError(RuntimeError):
    """Raised at start-up when Redis cannot be reached or rejects the login."""


def describe_url(url: str) -> str:
    """Return the URL with any password replaced by ***, safe for logs and messages."""
    return redact_url(url)


def retry_count(seconds: float, base_s: float = RETRY_BASE_S, cap_s: float = RETRY_CAP_S) -> int:
    """Return how many retries of an exponential backoff (base_s, doubling, cap_s) span
    `seconds` of sleeping."""
    backoff = ExponentialBackoff(cap=cap_s, base=base_s)
    slept, failures = 0.0, 0
    while slept < seconds:
        failures += 1
        slept += backoff.compute(failures)
    return failures


def create_redis(settings: RedisConnectionSettings) -> ArqRedis:
    """Create an arq Redis client for `settings.url` whose default queue is joeybot's."""
    retry = Retry(
        ExponentialBackoff(cap=RETRY_CAP_S, base=RETRY_BASE_S),
        retry_count(settings.reconnect_for_s),
    )
    client = ArqRedis.from_url(
        settings.url,
        socket_connect_timeout=settings.connect_timeout_s,
        socket_keepalive=True,
        retry=retry,
        retry_on_error=[RedisConnectionError, RedisTimeoutError, OSError],
        health_check_interval=30,
    )
    client.default_queue_name = keys.QUEUE_NAME
    return client


async def check_redis(settings: RedisConnectionSettings) -> None:
    """Ping Redis once, without retries; raise RedisUnavailableError with a fix when it fails."""
    safe_url = describe_url(settings.url)
    client = Redis.from_url(settings.url, socket_connect_timeout=settings.connect_timeout_s)
    try:
        await client.ping()
    except AuthenticationError as exc:
        raise RedisUnavailableError(
            f"Redis at {safe_url} rejected the login ({exc}). Check the user and password in "
            "REDIS_URL."
        ) from exc
    except (RedisError, OSError) as exc:
        raise RedisUnavailableError(
            f"cannot reach Redis at {safe_url}: {redact_url(str(exc)).rstrip('.')}. "
            f"{START_REDIS_HINT}"
        ) from exc
    finally:
        await client.aclose()
