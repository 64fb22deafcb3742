"""`joeybot up`: the whole system on one machine, as child processes stopped together.

It starts N workers, the bot when BOT_TOKEN is set, and the admin page when `joeybot.admin`
is installed and ADMIN_PASSWORD is set. Ctrl-C or SIGTERM stops all of them. When one child
exits on its own, the others are stopped and `up` exits with status 1.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from joeybot.config import Settings
from joeybot.redis_client import check_redis
from joeybot.telegram import require_token

logger = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.2
STOP_TIMEOUT_S = 30.0


@dataclass
class Child:
    """A started child process and the name it is logged under."""

    name: str
    process: subprocess.Popen[bytes]


def child_commands(settings: Settings, workers: int, log_level: str) -> list[tuple[str, list[str]]]:
    """Return (name, argv) of every process `up` starts for these settings."""
    base = [sys.executable, "-m", "joeybot.cli", "--log-level", log_level]
    # Workers send the replies themselves, so neither they nor the bot can run without a token.
    require_token(settings)
    commands = [(f"worker-{index + 1}", [*base, "worker"]) for index in range(workers)]
    commands.append(("bot", [*base, "bot"]))
    if importlib.util.find_spec("joeybot.admin") is not None:
        if settings.admin.password.get_secret_value():
            commands.append(("admin", [*base, "admin"]))
        else:
            logger.info("ADMIN_PASSWORD is not set: the admin page stays off")
    return commands


def run_up(settings: Settings, workers: int, log_level: str) -> int:
    """Start the children, wait until a signal or a child's exit, stop all; return the status."""
    asyncio.run(check_redis(settings.redis))
    stop_requested: list[int] = []

    def request_stop(signum: int, frame: object) -> None:
        stop_requested.append(signum)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    children = [
        Child(name, subprocess.Popen(argv, env=os.environ.copy()))
        for name, argv in child_commands(settings, workers, log_level)
    ]
    for child in children:
        logger.info("started %s (pid %d)", child.name, child.process.pid)

    status = 0
    while not stop_requested:
        exited = next((child for child in children if child.process.poll() is not None), None)
        if exited is not None:
            logger.error(
                "%s exited with status %d; stopping the others",
                exited.name,
                exited.process.returncode,
            )
            status = 1
            break
        time.sleep(POLL_INTERVAL_S)
    else:
        logger.info("stopping on %s", signal.Signals(stop_requested[0]).name)

    stop_children(children)
    return status


def stop_children(children: list[Child], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Send SIGTERM to every running child, then SIGKILL to those still running after
    `timeout_s`."""
    for child in children:
        if child.process.poll() is None:
            child.process.terminate()
    deadline = time.monotonic() + timeout_s
    for child in children:
        try:
            child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop within %.0f s; killing it", child.name, timeout_s)
            child.process.kill()
            child.process.wait()
        code = child.process.returncode
        if code in (0, -signal.SIGTERM, -signal.SIGINT):
            logger.info("%s stopped", child.name)
        else:
            logger.warning("%s stopped with status %d", child.name, code)
