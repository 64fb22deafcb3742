"""Send a few fan messages through the whole path and print Joey's replies as Markdown.

The path is the production one: a Telegram update goes to the bot (polling), through Redis to
an arq worker with the configured model (MODEL_BASE, MODEL_ADAPTER and the GENERATION_
settings from the environment or .env), and back as sendMessage. Only Telegram is replaced,
by the fake Bot API server, and Redis is a private redis-server on a free port.

    .venv/bin/python scripts/demo_exchange.py            # the default lines, one chat
    .venv/bin/python scripts/demo_exchange.py "Hi Joey"  # your own lines
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydantic import SecretStr

from joeybot.bot.app import run_bot
from joeybot.config import load_settings
from joeybot.testing import FakeTelegram
from joeybot.worker import build_worker, load_engine

# Lines that Joey's friends say to him in Friends, season 1, as a fan might send them.
DEFAULT_LINES = [
    "Hey, Joey. What's going on?",
    "C'mon, seriously, Joey, what's the part?",
    "Joey, what are you gonna do when you have a baby?",
    "Joey, get out of the fridge.",
]
CHAT_ID = 1001
REPLY_TIMEOUT_S = 300.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_redis(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("error: redis-server not found; install it (Debian/Ubuntu: redis-server)")
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(folder)]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    time.sleep(0.3)
    return process, f"redis://127.0.0.1:{port}/0"


async def exchange(lines: list[str], redis_url: str) -> list[tuple[str, str]]:
    async with FakeTelegram() as fake:
        base = load_settings()
        settings = base.model_copy(
            update={
                "redis": base.redis.model_copy(update={"url": redis_url}),
                "telegram": base.telegram.model_copy(update={"api_url": fake.api_url}),
                "bot": base.bot.model_copy(update={"token": SecretStr(fake.token)}),
            }
        )
        engine = await asyncio.to_thread(load_engine, settings)
        worker = build_worker(settings, {"engine": engine}, handle_signals=False)
        worker_task = asyncio.create_task(worker.async_run())
        stop = asyncio.Event()
        bot_task = asyncio.create_task(run_bot(settings, stop=stop))
        try:
            pairs = []
            for line in lines:
                fake.push_text(CHAT_ID, line)
                sent = await fake.wait_for_messages(
                    CHAT_ID, count=len(pairs) + 1, timeout_s=REPLY_TIMEOUT_S
                )
                pairs.append((line, sent[-1]["text"]))
            return pairs
        finally:
            stop.set()
            await bot_task
            await worker.close()
            await asyncio.gather(worker_task, return_exceptions=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("lines", nargs="*", help="messages to send (default: lines from Friends)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    with tempfile.TemporaryDirectory(prefix="joeybot-demo-") as folder:
        redis_process, redis_url = start_redis(Path(folder))
        try:
            pairs = asyncio.run(exchange(args.lines or DEFAULT_LINES, redis_url))
        finally:
            redis_process.terminate()
            redis_process.wait()
    for line, reply in pairs:
        print(f"> **You:** {line}\n>\n> **Joey:** {reply}\n")


if __name__ == "__main__":
    main()
