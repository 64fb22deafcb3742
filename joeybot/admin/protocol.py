"""Redis keys and stream entries shared by the admin page and the workers.

The page stores each request (history, message, options) under its own key and enqueues
`admin_generate` with the request id alone. arq logs job arguments at INFO, and message text
must stay out of INFO logs.

For each reply the page requests, the worker appends entries to one Redis stream: `start`
when it picks up the job, `piece` with the text generated since the previous entry, and a
final `done` or `error`. The page reads the stream with XREAD BLOCK.

While it reads, the page keeps a lease key alive, and it sets a cancel key when the operator
presses Stop or the tab goes away. The worker stops generating when the cancel key exists or
the lease has expired, so a page process that dies without saying so stops the generation too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from redis.asyncio import Redis

from joeybot import keys

KEY_PREFIX = keys.PREFIX + "admin"
JOB_FUNCTION = "admin_generate"

# A stream and its request expire this long after the last write, read or not.
STREAM_TTL_S = 600
# The page refreshes the lease at least every LEASE_REFRESH_S while it waits for entries.
LEASE_TTL_S = 15
LEASE_REFRESH_S = 3


class EntryType(StrEnum):
    """Kind of a stream entry."""

    START = "start"
    PIECE = "piece"
    DONE = "done"
    ERROR = "error"


class ErrorCode(StrEnum):
    """Reason carried in the `code` stat of an `error` entry."""

    INVALID_OPTIONS = "invalid_options"
    INVALID_REQUEST = "invalid_request"
    NO_ENGINE = "no_engine"
    WORKER_LOST = "worker_lost"
    GENERATION_FAILED = "generation_failed"


@dataclass(frozen=True)
class ReplyRequest:
    """A reply request from the page to a worker.

    `history` is a list of {"role": "user" | "assistant", "content": str}; `options` contains
    generation overrides (temperature, top_p, top_k, repetition_penalty, max_new_tokens,
    seed); `system_prompt` None keeps the worker's persona.
    """

    history: Sequence[dict[str, str]]
    user_text: str
    options: dict[str, Any] = field(default_factory=dict)
    use_adapter: bool = True
    system_prompt: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self) | {"history": list(self.history)}, ensure_ascii=False)

    @classmethod
    def from_json(cls, raw: bytes | str) -> ReplyRequest:
        """Decode a stored request; raise ValueError when it is not one."""
        try:
            data = json.loads(raw)
            request = cls(
                history=[{"role": t["role"], "content": t["content"]} for t in data["history"]],
                user_text=data["user_text"],
                options=dict(data["options"]),
                use_adapter=bool(data["use_adapter"]),
                system_prompt=data["system_prompt"],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed admin request: {exc!r}") from exc
        roles = {turn["role"] for turn in request.history}
        if not roles <= {"user", "assistant"}:
            raise ValueError(f"malformed admin request: unknown roles {sorted(roles)}")
        return request


@dataclass(frozen=True)
class StreamEntry:
    """One decoded stream entry."""

    entry_id: str
    type: EntryType
    text: str = ""
    stats: dict[str, Any] = field(default_factory=dict)


def stream_key(request_id: str) -> str:
    return f"{KEY_PREFIX}:stream:{request_id}"


def request_key(request_id: str) -> str:
    return f"{KEY_PREFIX}:request:{request_id}"


def cancel_key(request_id: str) -> str:
    return f"{KEY_PREFIX}:cancel:{request_id}"


def lease_key(request_id: str) -> str:
    return f"{KEY_PREFIX}:lease:{request_id}"


def job_id_for(request_id: str) -> str:
    """Return the arq job id of a request, so a request is never enqueued twice."""
    return f"{KEY_PREFIX}:job:{request_id}"


def encode_entry(
    entry_type: EntryType, text: str = "", stats: dict[str, Any] | None = None
) -> dict[str, str]:
    return {"type": entry_type.value, "text": text, "stats": json.dumps(stats or {})}


def decode_entry(entry_id: bytes | str, fields: dict[bytes | str, bytes | str]) -> StreamEntry:
    """Decode the fields XREAD returns; raise ValueError on an unknown entry type."""
    values = {_text(key): _text(value) for key, value in fields.items()}
    return StreamEntry(
        entry_id=_text(entry_id),
        type=EntryType(values.get("type", "")),
        text=values.get("text", ""),
        stats=json.loads(values.get("stats") or "{}"),
    )


async def append_entry(
    redis: Redis,
    request_id: str,
    entry_type: EntryType,
    text: str = "",
    stats: dict[str, Any] | None = None,
) -> None:
    """Append one entry to the request's stream and push its expiry forward."""
    key = stream_key(request_id)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.xadd(key, encode_entry(entry_type, text, stats))
        pipe.expire(key, STREAM_TTL_S)
        await pipe.execute()


async def store_request(redis: Redis, request_id: str, request: ReplyRequest) -> None:
    """Store the request for the worker; it expires with the stream (STREAM_TTL_S)."""
    await redis.set(request_key(request_id), request.to_json(), ex=STREAM_TTL_S)


async def load_request(redis: Redis, request_id: str) -> ReplyRequest | None:
    """Return the stored request, or None when it expired or never existed."""
    raw = await redis.get(request_key(request_id))
    return None if raw is None else ReplyRequest.from_json(raw)


async def should_stop(redis: Redis, request_id: str) -> bool:
    """Return True when the page cancelled the request or stopped renewing its lease."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.exists(cancel_key(request_id))
        pipe.exists(lease_key(request_id))
        cancelled, leased = await pipe.execute()
    return bool(cancelled) or not leased


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
