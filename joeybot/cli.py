"""The `joeybot` command: one entry point for every process."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence

from pydantic import ValidationError

from joeybot.config import Settings, SettingsError, load_settings
from joeybot.errors import ModelLoadError
from joeybot.process import redact_secrets_in_logs

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="joeybot", description="Joey Tribbiani on a small local model."
    )
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default=default_log_level(),
        help="logging level: DEBUG, INFO, WARNING or ERROR (default: $LOG_LEVEL or INFO)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    chat = commands.add_parser("chat", help="chat with Joey in the terminal")
    chat.add_argument("--message", "-m", help="send one message, print the reply and exit")
    add_model_options(chat)
    chat.set_defaults(handler=run_chat)
    add_service_commands(commands)

    admin = commands.add_parser(
        "admin", help="serve the admin web page (needs ADMIN_PASSWORD and running workers)"
    )
    admin.add_argument("--host", help="address to listen on (sets ADMIN_HOST, default 127.0.0.1)")
    admin.add_argument("--port", type=int, help="port to listen on (sets ADMIN_PORT, default 7860)")
    admin.set_defaults(handler=run_admin)
    return parser


def add_service_commands(commands: argparse._SubParsersAction) -> None:
    """Add `bot`, `worker` and `up`: the processes of the Telegram service."""
    bot = commands.add_parser("bot", help="run the Telegram bot (polling, or a webhook)")
    bot.set_defaults(handler=run_bot_command)

    worker = commands.add_parser("worker", help="run a worker: load the model, reply to chats")
    add_model_options(worker)
    worker.set_defaults(handler=run_worker_command)

    up = commands.add_parser(
        "up", help="run workers, the bot and the admin page together until Ctrl-C"
    )
    up.add_argument(
        "--workers", type=int, default=1, help="number of worker processes (default: 1)"
    )
    up.set_defaults(handler=run_up_command)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Options that override the model and sampling settings for one run."""
    parser.add_argument("--base", help="base model: Hub id, folder or .gguf (sets MODEL_BASE)")
    parser.add_argument(
        "--adapter", help="LoRA adapter folder or Hub id; '' for none (sets MODEL_ADAPTER)"
    )
    parser.add_argument("--temperature", type=float, help="sampling temperature; 0 is greedy")
    parser.add_argument("--max-new-tokens", type=int, help="maximum reply length in tokens")
    parser.add_argument("--seed", type=int, help="sampling seed for repeatable replies")


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def default_log_level() -> str:
    """LOG_LEVEL from the environment or .env; INFO when unset or not a known level."""
    level = os.environ.get("LOG_LEVEL") or _dotenv_value("LOG_LEVEL") or "INFO"
    if level.upper() not in LOG_LEVELS:
        print(f"warning: LOG_LEVEL={level!r} is not one of {', '.join(LOG_LEVELS)}; using INFO",
              file=sys.stderr)  # fmt: skip
        return "INFO"
    return level.upper()


def _dotenv_value(name: str) -> str | None:
    from dotenv import dotenv_values

    try:
        return dotenv_values(".env").get(name)
    except (OSError, UnicodeDecodeError):
        return None  # load_settings reports an unreadable .env


def settings_from_args(args: argparse.Namespace) -> Settings:
    try:
        return _apply_overrides(load_settings(), args)
    except ValidationError as exc:
        lines = ["invalid options:"]
        for error in exc.errors():
            option = "--" + "-".join(str(part) for part in error["loc"]).replace("_", "-")
            lines.append(f"  {option}={error.get('input')!r}: {error['msg']}")
        raise SettingsError("\n".join(lines)) from exc


def _apply_overrides(settings: Settings, args: argparse.Namespace) -> Settings:
    model = {
        key: value
        for key, value in {"base": args.base, "adapter": args.adapter}.items()
        if value is not None
    }
    generation = {
        key: value
        for key, value in {
            "temperature": args.temperature,
            "max_new_tokens": args.max_new_tokens,
            "seed": args.seed,
        }.items()
        if value is not None
    }
    return settings.model_copy(
        update={
            "model": settings.model.model_validate(settings.model.model_dump() | model),
            "generation": settings.generation.model_validate(
                settings.generation.model_dump() | generation
            ),
        }
    )


def run_chat(args: argparse.Namespace) -> int:
    from joeybot.chat import answer_once, interactive
    from joeybot.inference.generation import JoeyEngine
    from joeybot.inference.loading import load_model

    if args.message is not None and not args.message.strip():
        print("error: --message is empty; give the text to send to Joey", file=sys.stderr)
        return 2

    settings = settings_from_args(args)
    loaded = load_model(settings.model)
    logger.info(
        "model ready: base=%s adapter=%s device=%s load=%.1f s",
        loaded.info["base"],
        loaded.info["adapter"],
        loaded.info["device"],
        loaded.info["load_seconds"],
    )
    engine = JoeyEngine(loaded, settings.generation)
    if args.message is not None:
        return answer_once(engine, args.message)
    return interactive(engine)


def run_admin(args: argparse.Namespace) -> int:
    from joeybot.admin.server import serve
    from joeybot.redis_client import RedisUnavailableError

    address = {"host": args.host, "port": args.port}
    settings = load_settings(admin={k: v for k, v in address.items() if v is not None})
    redact_secrets_in_logs(settings)
    try:
        serve(settings)
    except RedisUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def run_bot_command(args: argparse.Namespace) -> int:
    from joeybot.bot.app import run_bot

    settings = load_settings()
    redact_secrets_in_logs(settings)
    return _run_service(lambda: asyncio.run(run_bot(settings)))


def run_worker_command(args: argparse.Namespace) -> int:
    from joeybot.worker import serve

    settings = settings_from_args(args)
    redact_secrets_in_logs(settings)
    return _run_service(lambda: asyncio.run(serve(settings)))


def run_up_command(args: argparse.Namespace) -> int:
    from joeybot.launcher import run_up

    if args.workers < 1:
        print(f"error: --workers must be at least 1, got {args.workers}", file=sys.stderr)
        return 2
    settings = load_settings()
    redact_secrets_in_logs(settings)
    return _run_service(lambda: run_up(settings, args.workers, args.log_level))


def _run_service(run: Callable[[], int | None]) -> int:
    """Call `run` until the service stops; print a start-up failure as one error line."""
    from joeybot.bot.app import BotStartError
    from joeybot.redis_client import RedisUnavailableError
    from joeybot.telegram import MissingTokenError

    try:
        status = run()
    except (RedisUnavailableError, MissingTokenError, BotStartError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return status or 0


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Third-party progress bars and notices would bury our own lines.
    if logging.getLogger().level > logging.DEBUG:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        # Deprecation notices from inside transformers and peft are for their developers.
        warnings.filterwarnings("ignore", category=FutureWarning)
    for noisy in ("httpx", "huggingface_hub", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        return args.handler(args)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader of our output went away (`| head`); nothing more can be printed.
        sys.stderr.close()
        return 1


if __name__ == "__main__":
    sys.exit(main())
