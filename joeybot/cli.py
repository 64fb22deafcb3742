"""The `joeybot` command: one entry point for every process."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from joeybot.config import Settings, SettingsError, load_settings
from joeybot.errors import ModelLoadError

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="joeybot", description="Joey Tribbiani on a small local model."
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("LOG_LEVEL", "INFO"),
        help="logging level: DEBUG, INFO, WARNING or ERROR (default: $LOG_LEVEL or INFO)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    chat = commands.add_parser("chat", help="chat with Joey in the terminal")
    chat.add_argument("--message", "-m", help="send one message, print the reply and exit")
    add_model_options(chat)
    chat.set_defaults(handler=run_chat)
    return parser


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Options that override the model and sampling settings for one run."""
    parser.add_argument("--base", help="base model: Hub id, folder or .gguf (sets MODEL_BASE)")
    parser.add_argument(
        "--adapter", help="LoRA adapter folder or Hub id; '' for none (sets MODEL_ADAPTER)"
    )
    parser.add_argument("--temperature", type=float, help="sampling temperature; 0 is greedy")
    parser.add_argument("--max-new-tokens", type=int, help="maximum reply length in tokens")
    parser.add_argument("--seed", type=int, help="sampling seed for repeatable replies")


def settings_from_args(args: argparse.Namespace) -> Settings:
    settings = load_settings()
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


if __name__ == "__main__":
    sys.exit(main())
