"""Compare the base model with the base plus a LoRA adapter on held-out Joey dialogue.

Measures, for each model:

* perplexity of Joey's real replies in the validation file, with the loss on the reply and
  end-of-turn tokens exactly as in training;
* on generated replies to validation contexts: mean length, distinct-2, the share that stop
  before the token limit, and the share that break character (talk as an AI or assistant);
* sample replies to a fixed list of messages a fan might send.

Writes ``report.md`` and ``report.json`` to the output folder.

    python -m training.evaluate --adapter runs/joey-lora --output-dir runs/joey-lora/eval
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from joeybot.config import DEFAULT_PERSONA, GenerationSettings, ModelSettings
from joeybot.errors import ModelLoadError
from training.batches import encode_records, mean_reply_loss
from training.examples import record_to_turns, unusable_reason
from training.prepare_data import read_jsonl
from training.train_config import TrainConfig, base_label
from training.train_lora import CONFIG_FILE

logger = logging.getLogger(__name__)

FAN_PROMPTS = (
    "Hey Joey, how you doin'?",
    "What's your favorite food?",
    "Can you help me with my math homework?",
    "Are you a real person or a chatbot?",
    "Tell me about your acting career.",
    "What do you think about Chandler?",
    "Can I have a bite of your sandwich?",
    "My girlfriend just dumped me. Any advice?",
    "What's the best pick-up line you know?",
    "Who is Dr. Drake Ramoray?",
)
# Phrases that show a reply stepped out of Joey's character. Matched case-insensitively
# after curly apostrophes become straight ones.
OUT_OF_CHARACTER = re.compile(
    r"\bas an ai\b|\blanguage model\b|\bassistant\b|\bi'?m an ai\b|\bi am an ai\b|\bvirtual\b"
    r"|\bartificial intelligence\b|\bchat ?bot\b|\bi'?m (?:just )?a (?:computer )?program\b"
    r"|\bopenai\b|\bhugging ?face\b|\bi don'?t have (?:personal )?(?:feelings|emotions|a body)\b"
    r"|\bas a large\b|\bi'?m not able to\b|\bi cannot assist\b|\bhere to (?:help|assist)\b"
    r"|\bprogrammed\b|\bnot a real (?:human|person)\b",
    re.IGNORECASE,
)
_WORD = re.compile(r"\w+(?:'\w+)?|[^\w\s]")


@dataclass
class Generated:
    """One generated reply and how it ended."""

    prompt: str
    text: str
    new_tokens: int
    hit_token_limit: bool
    seconds: float
    reference: str = ""


@dataclass
class ModelReport:
    """Every figure for one model (the base, or the base with the adapter)."""

    name: str
    perplexity: float | None = None
    mean_loss: float | None = None
    reply_tokens: int = 0
    generation: dict[str, float] = field(default_factory=dict)
    validation_samples: list[Generated] = field(default_factory=list)
    fan_samples: list[Generated] = field(default_factory=list)


# --- metrics ----------------------------------------------------------------------------------


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower().replace("\u2019", "'"))


def distinct_2(texts: Sequence[str]) -> float:
    """Return unique word bigrams divided by all word bigrams, over all texts together."""
    bigrams = []
    for text in texts:
        tokens = words(text)
        bigrams += list(zip(tokens, tokens[1:], strict=False))
    return len(set(bigrams)) / len(bigrams) if bigrams else 0.0


def breaks_character(text: str) -> bool:
    return bool(OUT_OF_CHARACTER.search(text.replace("\u2019", "'")))


def generation_metrics(replies: Sequence[Generated]) -> dict[str, float]:
    """Return mean length, distinct-2, stop share and out-of-character share of replies."""
    if not replies:
        return {}
    count = len(replies)
    return {
        "replies": count,
        "mean_words": sum(len(words(reply.text)) for reply in replies) / count,
        "mean_new_tokens": sum(reply.new_tokens for reply in replies) / count,
        "distinct_2": distinct_2([reply.text for reply in replies]),
        "stopped_before_limit": sum(not reply.hit_token_limit for reply in replies) / count,
        "out_of_character": sum(breaks_character(reply.text) for reply in replies) / count,
        "mean_seconds": sum(reply.seconds for reply in replies) / count,
    }


def reference_metrics(references: Sequence[str]) -> dict[str, float]:
    """Return the length and distinct-2 of Joey's real replies, for scale."""
    if not references:
        return {}
    return {
        "replies": len(references),
        "mean_words": sum(len(words(text)) for text in references) / len(references),
        "distinct_2": distinct_2(references),
    }


# --- running the models -----------------------------------------------------------------------


def adapter_switch(loaded: Any, use_adapter: bool):
    """Return a context that runs the base alone when ``use_adapter`` is False."""
    if use_adapter or not loaded.has_adapter:
        return nullcontext()
    return loaded.model.disable_adapter()


def measure_perplexity(
    loaded: Any, examples: Sequence[Any], use_adapter: bool, batch_size: int
) -> tuple[float, int]:
    device = next(loaded.model.parameters()).device
    with adapter_switch(loaded, use_adapter):
        loss, tokens = mean_reply_loss(
            loaded.model, examples, batch_size, loaded.tokenizer.pad_token_id, device
        )
    return loss, tokens


def generate_replies(
    engine: Any,
    conversations: Sequence[tuple[list[Any], str, str]],
    use_adapter: bool,
    seed: int,
) -> list[Generated]:
    """Generate one reply per ``(history, user_text, reference)``, seeded per conversation."""
    replies = []
    for index, (history, user_text, reference) in enumerate(conversations):
        reply = engine.reply(history, user_text, use_adapter=use_adapter, seed=seed + index)
        replies.append(
            Generated(
                prompt=user_text,
                text=reply.text,
                new_tokens=reply.new_tokens,
                hit_token_limit=reply.hit_token_limit,
                seconds=reply.seconds,
                reference=reference,
            )
        )
    return replies


def pick_evenly(items: Sequence[Any], count: int) -> list[Any]:
    """Return up to ``count`` items spread evenly over ``items``, in order."""
    if count >= len(items):
        return list(items)
    if count <= 0:
        return []
    step = len(items) / count
    return [items[int(index * step)] for index in range(count)]


def validation_conversations(records: Sequence[dict[str, Any]], count: int) -> list[Any]:
    usable = [record for record in records if unusable_reason(record) is None]
    conversations = []
    for record in pick_evenly(usable, count):
        turns, reply = record_to_turns(record)
        conversations.append((turns[:-1], turns[-1].content, reply))
    return conversations


# --- options ----------------------------------------------------------------------------------


@dataclass
class EvalConfig:
    """Settings of one evaluation, saved in report.json."""

    adapter: str
    base: str
    valid_file: str
    output_dir: str
    system_prompt: str
    seq_len: int
    max_examples: int
    generate: int
    max_new_tokens: int
    temperature: float
    batch_size: int
    threads: int
    device: str
    seed: int


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.evaluate",
        description="Compare the base model with base plus LoRA adapter on held-out dialogue.",
    )
    add = parser.add_argument
    add(
        "--adapter",
        default="",
        help="LoRA adapter folder; empty evaluates the base alone (default: empty).",
    )
    add(
        "--base",
        default=None,
        help="Base model: Hub id, folder or .gguf (default: the adapter's training base, "
        "else the embedded SmolLM2-135M-Instruct).",
    )
    add("--valid-file", default="data/valid.jsonl", help="Validation JSONL (default: %(default)s).")
    add(
        "--output-dir",
        default=None,
        help="Folder for report.md and report.json (default: ADAPTER/eval, or runs/eval-base).",
    )

    add(
        "--system-prompt",
        default=None,
        help="Persona (default: the one in the adapter's training_config.json, else the bot's).",
    )
    add(
        "--seq-len",
        type=int,
        default=None,
        help="Maximum tokens per perplexity example (default: the adapter's training value, "
        f"else {TrainConfig().seq_len}).",
    )

    add(
        "--max-examples",
        type=int,
        default=200,
        help="Validation examples for perplexity; 0 uses all (default: %(default)s).",
    )
    add(
        "--generate",
        type=int,
        default=20,
        help="Validation contexts to generate replies for (default: %(default)s).",
    )
    add(
        "--max-new-tokens",
        type=int,
        default=64,
        help="Token limit per generated reply (default: %(default)s).",
    )
    add(
        "--temperature",
        type=float,
        default=0.7,
        help="Sampling temperature; 0 is greedy (default: %(default)s).",
    )

    add(
        "--batch-size",
        type=int,
        default=8,
        help="Examples per batch for perplexity (default: %(default)s).",
    )
    add(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads; 0 keeps torch's default (default: %(default)s).",
    )
    add(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto uses CUDA when available (default: %(default)s).",
    )
    add("--seed", type=int, default=0, help="Sampling seed (default: %(default)s).")
    return parser


def parse_config(argv: Sequence[str] | None = None) -> EvalConfig:
    """Parse the options, filling defaults from the adapter's training_config.json."""
    parser = build_parser()
    args = parser.parse_args(argv)
    trained = read_training_config(args.adapter) if args.adapter else {}
    problems = []
    for name in ("max_examples", "generate", "threads"):
        if getattr(args, name) < 0:
            problems.append(f"--{name.replace('_', '-')} must be 0 or more")
    for name in ("max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be at least 1")
    if args.seq_len is not None and args.seq_len < 16:
        problems.append(f"--seq-len must be at least 16, got {args.seq_len}")
    if args.temperature < 0:
        problems.append(f"--temperature must be 0 or more, got {args.temperature}")
    if problems:
        parser.error("; ".join(problems))
    default_output = str(Path(args.adapter) / "eval") if args.adapter else "runs/eval-base"
    return EvalConfig(
        adapter=args.adapter,
        base=args.base if args.base is not None else trained.get("base", ""),
        valid_file=args.valid_file,
        output_dir=args.output_dir or default_output,
        system_prompt=args.system_prompt or trained.get("system_prompt", DEFAULT_PERSONA),
        seq_len=args.seq_len or trained.get("seq_len", TrainConfig().seq_len),
        max_examples=args.max_examples,
        generate=args.generate,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        batch_size=args.batch_size,
        threads=args.threads,
        device=args.device,
        seed=args.seed,
    )


def read_training_config(adapter: str) -> dict[str, Any]:
    path = Path(adapter) / CONFIG_FILE
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


# --- the evaluation ---------------------------------------------------------------------------


def evaluate(config: EvalConfig) -> dict[str, Any]:
    """Run the evaluation, write report.md and report.json, and return the report."""
    from joeybot.inference.generation import JoeyEngine
    from joeybot.inference.loading import load_model
    from joeybot.inference.prompts import PromptFormatter

    records = read_jsonl(Path(config.valid_file))
    settings = ModelSettings(
        base=config.base, adapter=config.adapter, threads=config.threads, device=config.device
    )
    loaded = load_model(settings)
    formatter = PromptFormatter(loaded.tokenizer, config.system_prompt, loaded.max_positions)
    limited = records[: config.max_examples] if config.max_examples else records
    examples, skipped = encode_records(
        limited, formatter, min(config.seq_len, loaded.max_positions)
    )
    generation = GenerationSettings(
        system_prompt=config.system_prompt,
        temperature=config.temperature,
        max_new_tokens=config.max_new_tokens,
        seed=config.seed,
    )
    engine = JoeyEngine(loaded, generation)
    conversations = validation_conversations(records, config.generate)

    variants = [("base", False)] + ([("adapter", True)] if loaded.has_adapter else [])
    reports = []
    for name, use_adapter in variants:
        logger.info("evaluating %s", name)
        reports.append(
            evaluate_variant(loaded, engine, name, use_adapter, examples, conversations, config)
        )
    report = build_report(config, loaded, reports, conversations, len(examples), skipped)
    write_report(report, Path(config.output_dir))
    return report


def evaluate_variant(
    loaded: Any,
    engine: Any,
    name: str,
    use_adapter: bool,
    examples: Sequence[Any],
    conversations: Sequence[Any],
    config: EvalConfig,
) -> ModelReport:
    report = ModelReport(name=name)
    if examples:
        started = time.perf_counter()
        loss, tokens = measure_perplexity(loaded, examples, use_adapter, config.batch_size)
        report.mean_loss, report.reply_tokens = loss, tokens
        report.perplexity = math.exp(loss)
        logger.info(
            "%s: perplexity %.2f over %d reply tokens (%.1f s)",
            name,
            report.perplexity,
            tokens,
            time.perf_counter() - started,
        )
    report.validation_samples = generate_replies(engine, conversations, use_adapter, config.seed)
    fan = [([], prompt, "") for prompt in FAN_PROMPTS]
    report.fan_samples = generate_replies(engine, fan, use_adapter, config.seed)
    report.generation = generation_metrics(report.validation_samples + report.fan_samples)
    return report


def build_report(
    config: EvalConfig,
    loaded: Any,
    reports: Sequence[ModelReport],
    conversations: Sequence[Any],
    perplexity_examples: int,
    skipped: dict[str, int],
) -> dict[str, Any]:
    by_name = {report.name: report for report in reports}
    summary: dict[str, Any] = {
        "config": {
            **config.__dict__,
            "base_label": base_label(config.base),
            "adapter": Path(config.adapter).name if config.adapter else "",
        },
        "device": loaded.info.get("device"),
        "perplexity_examples": perplexity_examples,
        "perplexity_skipped": dict(skipped),
        "reference": reference_metrics([reference for _, _, reference in conversations]),
        "models": {
            report.name: {
                "perplexity": report.perplexity,
                "mean_loss": report.mean_loss,
                "reply_tokens": report.reply_tokens,
                **report.generation,
                "validation_samples": [sample.__dict__ for sample in report.validation_samples],
                "fan_samples": [sample.__dict__ for sample in report.fan_samples],
            }
            for report in reports
        },
    }
    base, adapter = by_name.get("base"), by_name.get("adapter")
    if base and adapter and base.perplexity and adapter.perplexity:
        summary["perplexity_change"] = adapter.perplexity / base.perplexity - 1
    return summary


# --- the report -------------------------------------------------------------------------------

_TABLE_ROWS = (
    ("perplexity", "Perplexity of Joey's real replies", "{:.2f}"),
    ("mean_words", "Mean reply length (words)", "{:.1f}"),
    ("mean_new_tokens", "Mean reply length (tokens)", "{:.1f}"),
    ("distinct_2", "Distinct-2", "{:.3f}"),
    ("stopped_before_limit", "Share stopping before the token limit", "{:.0%}"),
    ("out_of_character", "Share breaking character", "{:.0%}"),
    ("mean_seconds", "Mean seconds per reply", "{:.2f}"),
)


def render_markdown(report: dict[str, Any]) -> str:
    config = report["config"]
    models = report["models"]
    names = list(models)
    lines = [
        "# Joey adapter evaluation",
        "",
        f"- Base: {config['base_label']}",
        f"- Adapter: {config['adapter'] or 'none'}",
        f"- Perplexity over {report['perplexity_examples']} validation examples "
        f"(sequence length {config['seq_len']}); generation on {config['generate']} "
        f"validation contexts and {len(FAN_PROMPTS)} fan messages, temperature "
        f"{config['temperature']}, at most {config['max_new_tokens']} new tokens, "
        f"seed {config['seed']}, device {report['device']}.",
    ]
    if "perplexity_change" in report:
        lines.append(f"- Perplexity change with the adapter: {report['perplexity_change']:+.1%}")
    lines += [
        "",
        "| Metric | " + " | ".join(names) + " | Real replies |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    reference = report["reference"]
    for key, label, form in _TABLE_ROWS:
        cells = [_cell(models[name].get(key), form) for name in names]
        lines.append(
            f"| {label} | " + " | ".join(cells) + f" | {_cell(reference.get(key), form)} |"
        )
    lines += ["", "## Replies to fan messages", ""]
    for index, prompt in enumerate(FAN_PROMPTS):
        lines.append(f"**{prompt}**")
        lines.append("")
        for name in names:
            sample = models[name]["fan_samples"][index]
            lines.append(f"- {name}: {_quote(sample['text'])}")
        lines.append("")
    lines += ["## Replies to validation contexts (first 5)", ""]
    for index in range(min(5, len(models[names[0]]["validation_samples"]))):
        first = models[names[0]]["validation_samples"][index]
        lines.append(f"**Context ends with:** {_quote(first['prompt'])}")
        lines.append("")
        lines.append(f"- Joey in the show: {_quote(first['reference'])}")
        for name in names:
            lines.append(f"- {name}: {_quote(models[name]['validation_samples'][index]['text'])}")
        lines.append("")
    return "\n".join(lines)


def _cell(value: Any, form: str) -> str:
    return "–" if value is None else form.format(value)


def _quote(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|") or "(empty)"


def write_report(report: dict[str, Any], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(
        json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (folder / "report.md").write_text(render_markdown(report) + "\n", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    torch.manual_seed(config.seed)
    try:
        report = evaluate(config)
    except (FileNotFoundError, ValueError, ModelLoadError) as exc:
        logger.error("%s", exc)
        return 2
    for name, figures in report["models"].items():
        logger.info(
            "%s: perplexity %s, stopped before limit %.0f%%, out of character %.0f%%",
            name,
            "n/a" if figures["perplexity"] is None else f"{figures['perplexity']:.2f}",
            100 * figures.get("stopped_before_limit", 0.0),
            100 * figures.get("out_of_character", 0.0),
        )
    logger.info("report written to %s", Path(config.output_dir) / "report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
