"""Builders for the Bot API JSON objects that the fake Telegram server sends and returns.

Every builder returns a plain dict in the Bot API wire format, with only the fields that
aiogram's models require plus those a bot commonly reads.
"""

import itertools
import re
from typing import Any

# Telegram counts message lengths and entity offsets in UTF-16 code units.
MAX_MESSAGE_UTF16 = 4096
MAX_CAPTION_UTF16 = 1024

# The entities that Telegram's server detects in a user's text by itself.
_BOT_COMMAND_PATTERN = re.compile(r"(?<!\S)/[A-Za-z0-9_]{1,32}(?:@[A-Za-z0-9_]{5,32})?")
# The look-behind keeps the "@bot" part of "/start@bot" inside its bot_command entity.
_MENTION_PATTERN = re.compile(r"(?<![\w@/])@[A-Za-z0-9_]{5,32}\b")

_file_numbers = itertools.count(1)


def utf16_length(text: str) -> int:
    """Return the length of `text` in UTF-16 code units, the unit Telegram counts in."""
    return len(text.encode("utf-16-le")) // 2


def parse_entities(text: str) -> list[dict[str, Any]]:
    """Find the bot_command and mention entities that Telegram would attach to `text`."""
    entities = []
    for pattern, entity_type in (
        (_BOT_COMMAND_PATTERN, "bot_command"),
        (_MENTION_PATTERN, "mention"),
    ):
        for match in pattern.finditer(text):
            entities.append(
                {
                    "type": entity_type,
                    "offset": utf16_length(text[: match.start()]),
                    "length": utf16_length(match.group()),
                }
            )
    return sorted(entities, key=lambda entity: entity["offset"])


def chat_type_for(chat_id: int) -> str:
    """Return the chat type that Telegram's id ranges imply for `chat_id`.

    Users have positive ids, basic groups negative ids, and supergroups ids of the form -100….
    """
    if chat_id > 0:
        return "private"
    if str(chat_id).startswith("-100"):
        return "supergroup"
    return "group"


def build_user(user_id: int, language_code: str | None = "en") -> dict[str, Any]:
    user: dict[str, Any] = {
        "id": user_id,
        "is_bot": False,
        "first_name": f"User{user_id}",
        "username": f"user{user_id}",
    }
    if language_code is not None:
        user["language_code"] = language_code
    return user


def build_bot_user(bot_id: int, username: str, first_name: str) -> dict[str, Any]:
    """Build the User object that getMe returns and that the bot's messages carry in `from`."""
    return {
        "id": bot_id,
        "is_bot": True,
        "first_name": first_name,
        "username": username,
        "can_join_groups": True,
        "can_read_all_group_messages": False,
        "supports_inline_queries": False,
    }


def build_chat(chat_id: int, user: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build a Chat object named after `user` for a private chat, or titled for a group."""
    chat_type = chat_type_for(chat_id)
    if chat_type != "private":
        return {"id": chat_id, "type": chat_type, "title": f"Group {chat_id}"}

    chat: dict[str, Any] = {"id": chat_id, "type": "private"}
    if user is not None:
        chat["first_name"] = user["first_name"]
        chat["username"] = user["username"]
    return chat


def _new_file_ids(kind: str) -> dict[str, str]:
    number = next(_file_numbers)
    return {"file_id": f"fake-{kind}-{number}", "file_unique_id": f"u{kind}{number}"}


def build_sticker(emoji: str = "👍") -> dict[str, Any]:
    return {
        **_new_file_ids("sticker"),
        "type": "regular",
        "width": 512,
        "height": 512,
        "is_animated": False,
        "is_video": False,
        "emoji": emoji,
    }


def build_photo_sizes() -> list[dict[str, Any]]:
    """Build the two sizes, thumbnail first, that Telegram lists for a received photo."""
    return [
        {**_new_file_ids("photo"), "width": 90, "height": 67, "file_size": 1_200},
        {**_new_file_ids("photo"), "width": 800, "height": 600, "file_size": 52_000},
    ]


def build_voice(duration_s: int = 3) -> dict[str, Any]:
    return {
        **_new_file_ids("voice"),
        "duration": duration_s,
        "mime_type": "audio/ogg",
        "file_size": 4_000 * duration_s,
    }


def without_reply(message: dict[str, Any]) -> dict[str, Any]:
    """Copy `message` for nesting as `reply_to_message`, which Telegram nests one level deep."""
    return {key: value for key, value in message.items() if key != "reply_to_message"}
