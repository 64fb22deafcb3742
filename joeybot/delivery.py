"""Send Joey's replies to Telegram: split to the message limit, retry what can be retried.

Replies go out as plain text (no parse_mode), so no markup error can make Telegram reject a
reply. A reply longer than Telegram's limit of 4096 UTF-16 code units is split at a paragraph,
line, sentence or word boundary and sent in order.

Bot API errors map to these outcomes:
- 429 Too Many Requests: wait at least the server's `retry_after`, then send the same part
  again; the reply is never generated again for it. A wait longer than `max_inline_wait_s`
  raises `DeliveryPostponed` so the job can be re-queued instead of holding a worker.
- network errors and 5xx: retry with exponential backoff, at most `retries` times, then
  `DeliveryPostponed`.
- 403 Forbidden (the user blocked the bot, or it left the group): `ChatBlocked`, no retry.
- other 4xx: `DeliveryRejected`, no retry.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from aiogram.exceptions import (
    TelegramAPIError,
    TelegramForbiddenError,
    TelegramNetworkError,
    TelegramRetryAfter,
    TelegramServerError,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

MAX_MESSAGE_UTF16 = 4096
# Extra wait on top of retry_after, so the retry lands after Telegram's window has closed.
RETRY_AFTER_MARGIN_S = 0.5
BACKOFF_MAX_S = 30.0

# Boundaries to split at, best first. Each pattern matches the whitespace after which a part
# may end: a blank line, a line break, the end of a sentence, any space.
_BOUNDARIES = (
    re.compile(r"\n[ \t]*\n\s*"),
    re.compile(r"\n\s*"),
    re.compile(r"(?<=[.!?…])[\"'»)\]]*\s+"),
    re.compile(r"\s+"),
)


class ChatBlocked(Exception):
    """Raised on 403: the user blocked the bot, or the bot is no longer in the group."""


class DeliveryRejected(Exception):
    """Raised when Telegram rejects a call for a reason that a retry cannot fix (4xx)."""


class DeliveryPostponed(Exception):
    """Raised when a call should be tried again later, after `retry_in_s` seconds."""

    def __init__(self, message: str, retry_in_s: float) -> None:
        super().__init__(message)
        self.retry_in_s = retry_in_s


@dataclass(frozen=True)
class RetryPolicy:
    """Retry limits of one Bot API call."""

    retries: int = 5
    max_inline_wait_s: float = 60.0
    first_backoff_s: float = 1.0
    """Wait before the first retry of a network or server error; it doubles each time."""


def utf16_length(text: str) -> int:
    """Return the length of `text` in UTF-16 code units, the unit Telegram counts in."""
    return len(text.encode("utf-16-le")) // 2


def split_message(text: str, limit: int = MAX_MESSAGE_UTF16) -> list[str]:
    """Split `text` into parts of at most `limit` UTF-16 units, at the best boundary.

    A part ends at the last blank line, line break, sentence end or space that leaves it at
    least half of `limit` long. Only a run without any of those is cut mid-word, and never
    inside a surrogate pair. Whitespace at the cuts is dropped, so the parts joined by single
    spaces read as the original.
    """
    parts = []
    rest = text.strip()
    while utf16_length(rest) > limit:
        window_end = _prefix_fitting(rest, limit)
        cut, resume = _best_cut(rest, window_end, min_length=window_end // 2)
        parts.append(rest[:cut].rstrip())
        rest = rest[resume:].lstrip()
    if rest:
        parts.append(rest)
    return parts


def _prefix_fitting(text: str, limit: int) -> int:
    """Return the largest n such that text[:n] takes at most `limit` UTF-16 units."""
    units = 0
    for index, char in enumerate(text):
        units += 2 if ord(char) > 0xFFFF else 1
        if units > limit:
            return index
    return len(text)


def _best_cut(text: str, window_end: int, min_length: int) -> tuple[int, int]:
    """Return (end of this part, start of the next) for a cut within text[:window_end]."""
    for pattern in _BOUNDARIES:
        last = None
        # A boundary may straddle the window's end: its whitespace is dropped anyway.
        for match in pattern.finditer(text, 0, min(len(text), window_end + 1)):
            if match.start() >= min_length:
                last = match
        if last is not None:
            return last.start(), last.end()
    return window_end, window_end


async def call_with_retries(
    call: Callable[[], Awaitable[T]], call_name: str, policy: RetryPolicy
) -> T:
    """Run one Bot API call; retry 429, network and server errors as the module docstring
    describes. `call_name` names the call in logs and errors."""
    failures = 0
    while True:
        try:
            return await call()
        except TelegramRetryAfter as exc:
            failures += 1
            wait_s = exc.retry_after + RETRY_AFTER_MARGIN_S
            _check_retry_budget(failures, policy, call_name, wait_s, f"429, retry after {exc}")
            logger.warning("%s: 429, waiting %.1f s (retry %d)", call_name, wait_s, failures)
        except (TelegramNetworkError, TelegramServerError) as exc:
            failures += 1
            wait_s = min(BACKOFF_MAX_S, policy.first_backoff_s * 2 ** (failures - 1))
            _check_retry_budget(failures, policy, call_name, wait_s, type(exc).__name__)
            logger.warning(
                "%s failed (%s), retry %d in %.1f s",
                call_name,
                type(exc).__name__,
                failures,
                wait_s,
            )
        except TelegramForbiddenError as exc:
            raise ChatBlocked(f"{call_name}: {exc.message}") from exc
        except TelegramAPIError as exc:
            raise DeliveryRejected(f"{call_name}: {type(exc).__name__}: {exc.message}") from exc
        await asyncio.sleep(wait_s)


def _check_retry_budget(
    failures: int, policy: RetryPolicy, call_name: str, wait_s: float, reason: str
) -> None:
    if failures > policy.retries:
        raise DeliveryPostponed(
            f"{call_name}: gave up after {policy.retries} retries ({reason})", wait_s
        )
    if wait_s > policy.max_inline_wait_s:
        raise DeliveryPostponed(f"{call_name}: {reason}; waiting {wait_s:.0f} s later", wait_s)
