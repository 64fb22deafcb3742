"""Process helpers shared by the long-running commands."""

from __future__ import annotations

import asyncio
import logging
import signal
from urllib.parse import unquote, urlsplit

from joeybot.config import Settings


def stop_on_signals() -> asyncio.Event:
    """Return an event that SIGINT or SIGTERM sets, for a clean stop of the running loop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    return stop


class RedactingFilter(logging.Filter):
    """Replace secrets in log records with ***, as a last line of defence.

    joeybot never logs a secret on purpose, but third-party messages can quote one: an
    aiohttp error may contain a request URL, and the Bot API puts the token into every URL.
    """

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        # Longest first, so a token is replaced whole before any part of it.
        self.secrets = sorted({secret for secret in secrets if len(secret) >= 4}, key=len)[::-1]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(secret in message for secret in self.secrets):
            record.msg, record.args = self._redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._redact(record.exc_text)
        return True

    def _redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text


def secrets_of(settings: Settings) -> list[str]:
    """Return every secret value in `settings`: tokens, passwords, the Redis URL password."""
    values = [
        settings.bot.token.get_secret_value(),
        settings.bot.webhook_secret.get_secret_value(),
        settings.admin.password.get_secret_value(),
    ]
    password = urlsplit(settings.redis.url).password
    if password:
        values += [password, unquote(password)]
    return values


def redact_secrets_in_logs(settings: Settings) -> None:
    """Add a RedactingFilter for the settings' secrets to every root log handler."""
    redactor = RedactingFilter(secrets_of(settings))
    for handler in logging.getLogger().handlers:
        handler.addFilter(redactor)
