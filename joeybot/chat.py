"""Terminal chat with Joey: the quickest way to meet him and to check a model."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from joeybot.inference.generation import JoeyEngine
from joeybot.inference.prompts import Turn

logger = logging.getLogger(__name__)

BANNER = "Chatting with Joey. /reset forgets the conversation, /quit or Ctrl-D leaves."


def answer_once(engine: JoeyEngine, message: str, out: TextIO = sys.stdout) -> int:
    """Print Joey's reply to one message; return the process exit code."""
    if not message.strip():
        print("error: --message is empty; give the text to send to Joey", file=sys.stderr)
        return 2
    reply = engine.reply([], message)
    print(reply.text, file=out)
    logger.info(
        "replied with %d new tokens in %.2f s (%.1f tokens/s)",
        reply.new_tokens,
        reply.seconds,
        reply.tokens_per_second,
    )
    return 0


def interactive(engine: JoeyEngine, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> int:
    """Run a read-reply loop, streaming each reply; history lives for the session."""
    history: list[Turn] = []
    print(BANNER, file=out)
    while True:
        print("you> ", end="", file=out, flush=True)
        line = stdin.readline()
        if not line:
            print(file=out)
            return 0
        message = line.strip()
        if not message:
            continue
        if message in {"/quit", "/exit"}:
            return 0
        if message == "/reset":
            history.clear()
            print("(history cleared)", file=out)
            continue
        print("joey> ", end="", file=out, flush=True)
        pieces = engine.stream(history, message)
        for piece in pieces:
            print(piece, end="", file=out, flush=True)
        print(file=out)
        history += [Turn("user", message), Turn("assistant", pieces.result.text)]
