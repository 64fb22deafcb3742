"""Service messages of the bot and the workers, in English and Russian.

Joey's own replies come from the model; everything else the bot sends is here. The language
follows the user's Telegram language (``from_user.language_code``): Russian for "ru", English
otherwise.
"""

from __future__ import annotations

from typing import Literal

Language = Literal["en", "ru"]

TEXTS: dict[str, dict[Language, str]] = {
    "start": {
        "en": (
            "How you doin'? I'm Joey Tribbiani. Well, a bot that talks like Joey from "
            "Friends, running on a small language model. Just write to me!\n"
            "/help lists the commands."
        ),
        "ru": (
            "Как дела? Я Джоуи Триббиани. Ну, бот, который говорит как Джоуи из «Друзей», "
            "на маленькой языковой модели. Просто напиши мне!\n"
            "/help покажет команды."
        ),
    },
    "help": {
        "en": (
            "Write me anything and I'll answer as Joey.\n"
            "/start - who I am\n"
            "/help - this list\n"
            "/reset - forget our conversation"
        ),
        "ru": (
            "Напиши что угодно, и я отвечу как Джоуи.\n"
            "/start - кто я\n"
            "/help - этот список\n"
            "/reset - забыть наш разговор"
        ),
    },
    "help_admin": {
        "en": "/stats - queue depth and workers online (admins)",
        "ru": "/stats - очередь и работающие воркеры (для админов)",
    },
    "reset": {
        "en": "Done, I forgot everything we talked about. Fresh start!",
        "ru": "Готово, я забыл всё, о чём мы говорили. Начнём заново!",
    },
    "non_text": {
        "en": "Nice! But I only read text messages. Write me something!",
        "ru": "Классно! Но я читаю только текст. Напиши мне что-нибудь!",
    },
    "too_long": {
        "en": "Whoa, that's a lot of words! Keep it under {limit} characters, OK?",
        "ru": "Ого, сколько слов! Уложись в {limit} символов, ладно?",
    },
    "slow_down": {
        "en": "Whoa, slow down! Give me a minute to catch up.",
        "ru": "Эй, помедленнее! Дай мне минутку.",
    },
    "still_answering": {
        "en": "Hold on, I'm still answering your earlier messages.",
        "ru": "Погоди, я ещё отвечаю на твои прошлые сообщения.",
    },
    "busy": {
        "en": "I'm swamped right now. Try again in a minute!",
        "ru": "Я сейчас завален работой. Попробуй через минуту!",
    },
    "not_allowed": {
        "en": "Sorry, this bot is private.",
        "ru": "Извини, это частный бот.",
    },
    "admin_only": {
        "en": "That command is for the bot's admins.",
        "ru": "Эта команда только для админов бота.",
    },
    "stats": {
        "en": "Queue: {depth} jobs\nWorkers online: {count}\n{workers}",
        "ru": "Очередь: {depth} задач\nВоркеров онлайн: {count}\n{workers}",
    },
    "trouble": {
        "en": "Something went wrong on my side. Try again in a minute.",
        "ru": "У меня что-то сломалось. Попробуй через минуту.",
    },
    "gave_up": {
        "en": "Sorry, I couldn't come up with an answer to that one. Ask me again?",
        "ru": "Извини, не смог придумать ответ. Спросишь ещё раз?",
    },
}


def language_for(language_code: str | None) -> Language:
    """Map a Telegram language code such as "ru" or "en-US" to a supported language."""
    if language_code and language_code.lower().split("-")[0] == "ru":
        return "ru"
    return "en"


def text(key: str, language_code: str | None, **values: object) -> str:
    """Return service message `key` in the user's language, formatted with `values`."""
    return TEXTS[key][language_for(language_code)].format(**values)
