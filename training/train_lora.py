"""Train a LoRA adapter that makes the base model talk like Joey.

Examples come from ``training.prepare_data`` and are encoded by the inference core's
`PromptFormatter`, so training uses exactly the prompt layout that inference builds. The loss
covers only Joey's reply tokens and the end-of-turn tokens after them, so the model learns to
answer and to stop.

    python -m training.train_lora --output-dir runs/joey-lora --max-steps 200 --threads 2

The output folder receives the adapter (``adapter_model.safetensors`` and
``adapter_config.json``, loadable with MODEL_ADAPTER), ``training_config.json``,
``metrics.json``, ``loss.png`` and ``checkpoints/`` for ``--resume``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from joeybot.config import ModelSettings
from joeybot.inference.prompts import IGNORE_INDEX, PromptFormatter
from training.batches import (
    EncodedExample,
    collate,
    encode_records,
    make_batches,
    mean_reply_loss,
    reply_loss_sum,
)
from training.checkpoints import (
    CHECKPOINT_DIR,
    RunState,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from training.prepare_data import read_jsonl
from training.train_config import TrainConfig, base_label, target_modules, validate_config

logger = logging.getLogger(__name__)

CONFIG_FILE = "training_config.json"
METRICS_FILE = "metrics.json"
PLOT_FILE = "loss.png"


# --- options ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="python -m training.train_lora",
        description="Train a LoRA adapter on Joey's dialogue examples (from prepare_data).",
    )
    add = parser.add_argument

    # Files and model
    add("--train-file", default=defaults.train_file, help="Training JSONL (default: %(default)s).")
    add(
        "--valid-file", default=defaults.valid_file, help="Validation JSONL (default: %(default)s)."
    )
    add("--output-dir", default=defaults.output_dir, help="Run folder (default: %(default)s).")
    add(
        "--base",
        default=defaults.base,
        help="Base model: Hub id, folder or .gguf; empty means the embedded SmolLM2-135M-Instruct.",
    )
    add(
        "--system-prompt",
        default=defaults.system_prompt,
        help="Persona used in every example; keep it equal to GENERATION_SYSTEM_PROMPT at "
        "inference (default: the bot's default persona).",
    )

    # Data and optimization
    add(
        "--seq-len",
        type=int,
        default=defaults.seq_len,
        help="Maximum tokens per example, prompt plus reply (default: %(default)s).",
    )
    add(
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        help="Examples per micro-batch (default: %(default)s).",
    )
    add(
        "--grad-accum",
        type=int,
        default=defaults.grad_accum,
        help="Micro-batches per optimizer step (default: %(default)s).",
    )
    add("--lr", type=float, default=defaults.lr, help="Peak learning rate (default: %(default)s).")
    add(
        "--warmup-steps",
        type=int,
        default=defaults.warmup_steps,
        help="Steps of linear warm-up before the cosine decay (default: %(default)s).",
    )
    add(
        "--weight-decay",
        type=float,
        default=defaults.weight_decay,
        help="AdamW weight decay (default: %(default)s).",
    )
    add(
        "--max-grad-norm",
        type=float,
        default=defaults.max_grad_norm,
        help="Gradient clipping norm; 0 disables clipping (default: %(default)s).",
    )
    add(
        "--max-steps",
        type=int,
        default=None,
        help="Optimizer steps to run. Cannot be used with --epochs.",
    )
    add(
        "--epochs",
        type=float,
        default=None,
        help="Passes over the training data (default: 1). Cannot be used with --max-steps.",
    )

    # LoRA
    add(
        "--lora-rank",
        type=int,
        default=defaults.lora_rank,
        help="LoRA rank (default: %(default)s).",
    )
    add(
        "--lora-alpha",
        type=int,
        default=defaults.lora_alpha,
        help="LoRA alpha; the update is scaled by alpha / rank (default: %(default)s).",
    )
    add(
        "--lora-dropout",
        type=float,
        default=defaults.lora_dropout,
        help="Dropout on the LoRA input (default: %(default)s).",
    )
    add(
        "--target-modules",
        default=defaults.target_modules,
        help='Layers that get LoRA: "all-linear" or names such as "q_proj,v_proj" '
        "(default: %(default)s).",
    )

    # Evaluation, checkpoints and runtime
    add(
        "--eval-every",
        type=int,
        default=defaults.eval_every,
        help="Validation loss every N steps, and at the end; 0 only at the end "
        "(default: %(default)s).",
    )
    add(
        "--save-every",
        type=int,
        default=defaults.save_every,
        help="Checkpoint every N steps; 0 disables checkpoints (default: %(default)s).",
    )
    add(
        "--keep-checkpoints",
        type=int,
        default=defaults.keep_checkpoints,
        help="Number of most recent checkpoints kept (default: %(default)s).",
    )
    add(
        "--max-train-examples",
        type=int,
        default=defaults.max_train_examples,
        help="Use only the first N training examples; 0 uses all (default: %(default)s).",
    )
    add(
        "--max-valid-examples",
        type=int,
        default=defaults.max_valid_examples,
        help="Validation examples per evaluation; 0 uses all (default: %(default)s).",
    )
    add(
        "--threads",
        type=int,
        default=defaults.threads,
        help="torch CPU threads; 0 keeps torch's default (default: %(default)s).",
    )
    add(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default=defaults.device,
        help="auto uses CUDA when available (default: %(default)s).",
    )
    add("--seed", type=int, default=defaults.seed, help="Random seed (default: %(default)s).")
    add(
        "--resume",
        action="store_true",
        help="Continue the run in --output-dir from its latest checkpoint.",
    )
    add("--no-progress", action="store_true", help="Hide the progress bar.")
    return parser


def parse_config(argv: Sequence[str] | None = None) -> tuple[TrainConfig, bool]:
    """Parse and check the options; return the config and whether to resume."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_steps is not None and args.epochs is not None:
        parser.error("--max-steps and --epochs cannot be used together; choose one")
    values = {
        name: getattr(args, name)
        for name in TrainConfig.__dataclass_fields__
        if name not in {"max_steps", "epochs", "progress"}
    }
    config = TrainConfig(
        **values,
        max_steps=args.max_steps or 0,
        epochs=args.epochs if args.epochs is not None else 1.0,
        progress=not args.no_progress,
    )
    problems = validate_config(config)
    if args.max_steps is not None and args.max_steps < 1:
        problems.append(f"--max-steps must be at least 1, got {args.max_steps}")
    if problems:
        parser.error("; ".join(problems))
    return config, args.resume


def check_output_dir(config: TrainConfig, resume: bool) -> None:
    """Raise ValueError when the output folder contains another run and --resume is absent."""
    folder = Path(config.output_dir)
    used = (folder / CONFIG_FILE).exists() or (folder / CHECKPOINT_DIR).exists()
    if used and not resume:
        raise ValueError(
            f"{folder} already contains a run; pass --resume to continue it or choose another "
            "--output-dir"
        )
    if resume and latest_checkpoint(folder) is None:
        raise ValueError(f"--resume: no checkpoint found in {folder / CHECKPOINT_DIR}")


# --- model and data ---------------------------------------------------------------------------


def load_model_for_training(config: TrainConfig) -> tuple[Any, Any, int, torch.device]:
    """Load the base in float32 and wrap it with a fresh, trainable LoRA adapter."""
    from peft import LoraConfig, get_peft_model

    from joeybot.inference.loading import load_base_model

    # NOTE: training on CUDA (device "auto" with a GPU, or "cuda") has not been run yet.
    # Compare a short run with the CPU before a long one.
    settings = ModelSettings(base=config.base, threads=config.threads, device=config.device)
    model, tokenizer, max_positions = load_base_model(settings)
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=target_modules(config),
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    # peft records the folder the base was loaded from, which for a GGUF base is a cache
    # path on this machine. Saved adapters name the base as the user gave it instead.
    peft_model.peft_config["default"].base_model_name_or_path = base_label(config.base)
    peft_model.train()
    return peft_model, tokenizer, max_positions, next(peft_model.parameters()).device


def check_persona_fits(formatter: PromptFormatter, seq_len: int) -> None:
    """Raise ValueError when the persona and prompt frame take more than half of --seq-len.

    The formatter would cut the persona to fit, so the adapter would learn a persona that
    inference never sends.
    """
    frame = len(formatter.build([], "Hi", max_new_tokens=1).input_ids)
    if frame > seq_len // 2:
        raise ValueError(
            f"the persona and prompt frame take {frame} tokens, more than half of --seq-len "
            f"{seq_len}; raise --seq-len to at least {2 * frame} or shorten --system-prompt"
        )


def load_examples(
    path: str, formatter: PromptFormatter, seq_len: int, limit: int
) -> list[EncodedExample]:
    records = read_jsonl(Path(path))
    if limit:
        records = records[:limit]
    examples, skipped = encode_records(records, formatter, seq_len)
    for reason, count in skipped.items():
        logger.warning("%s: skipped %d records: %s", path, count, reason)
    return examples


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, total_steps)


def count_total_steps(config: TrainConfig, batches_per_epoch: int) -> int:
    if config.max_steps:
        return config.max_steps
    return max(1, math.ceil(batches_per_epoch * config.epochs / config.grad_accum))


# --- training loop ----------------------------------------------------------------------------


@dataclass
class Trainer:
    """The model, data and optimizer of one run, and the loop that advances it."""

    config: TrainConfig
    model: Any
    pad_token_id: int
    device: torch.device
    train: list[EncodedExample]
    valid: list[EncodedExample]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    total_steps: int
    state: RunState = field(default_factory=RunState)

    def run(self) -> None:
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        lengths = [len(example.input_ids) for example in self.train]
        window = {"loss": 0.0, "tokens": 0, "reply_tokens": 0, "seconds": 0.0}
        bar = tqdm(
            total=self.total_steps,
            initial=self.state.step,
            disable=not self.config.progress,
            unit="step",
            dynamic_ncols=True,
        )
        with logging_redirect_tqdm(), bar:
            if self.state.step == 0 and self.config.eval_every:
                self.evaluate(window)  # the base model's validation loss, for comparison
            while self.state.step < self.total_steps:
                batches = make_batches(
                    lengths, self.config.batch_size, self.config.seed, self.state.epoch
                )
                while (
                    self.state.batch_in_epoch < len(batches) and self.state.step < self.total_steps
                ):
                    start = self.state.batch_in_epoch
                    group = batches[start : start + self.config.grad_accum]
                    self.state.batch_in_epoch += len(group)
                    self._step(group, window)
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{self.state.train_history[-1]['loss']:.3f}",
                        tok_s=f"{self.state.train_history[-1]['tokens_per_s']:.0f}",
                    )
                    self._after_step(window)
                if self.state.batch_in_epoch >= len(batches):
                    self.state.epoch += 1
                    self.state.batch_in_epoch = 0

    def _step(self, group: list[list[int]], window: dict[str, float]) -> None:
        started = time.perf_counter()
        micro_batches = [
            collate([self.train[i] for i in indices], self.pad_token_id, self.device)
            for indices in group
        ]
        reply_tokens = sum(
            int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) for batch in micro_batches
        )
        tokens = sum(int(b["attention_mask"].sum()) for b in micro_batches)
        self.optimizer.zero_grad(set_to_none=True)
        loss_total = 0.0
        for batch in micro_batches:
            loss_sum, _ = reply_loss_sum(self.model, batch)
            # Dividing by the step's reply tokens makes the gradient the per-token mean
            # over all micro-batches, whatever their sizes.
            (loss_sum / reply_tokens).backward()
            loss_total += float(loss_sum.detach())
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.state.step += 1

        seconds = time.perf_counter() - started
        self.state.tokens_seen += tokens
        self.state.seconds += seconds
        window["loss"] += loss_total
        window["reply_tokens"] += reply_tokens
        window["tokens"] += tokens
        window["seconds"] += seconds
        self.state.train_history.append(
            {
                "step": self.state.step,
                "loss": loss_total / reply_tokens,
                "lr": self.scheduler.get_last_lr()[0],
                "tokens": tokens,
                "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
            }
        )

    def _after_step(self, window: dict[str, float]) -> None:
        step = self.state.step
        last = step == self.total_steps
        every = self.config.eval_every
        if last or (every and step % every == 0):
            self.evaluate(window)
            window.update(loss=0.0, tokens=0, reply_tokens=0, seconds=0.0)
        if self.config.save_every and (step % self.config.save_every == 0 or last):
            path = save_checkpoint(
                self.model, self.optimizer, self.scheduler, self.state, self.config
            )
            logger.info("step %d: checkpoint saved to %s", step, path)

    def evaluate(self, window: dict[str, float]) -> None:
        train_loss = (
            window["loss"] / window["reply_tokens"] if window["reply_tokens"] else float("nan")
        )
        tokens_per_s = window["tokens"] / window["seconds"] if window["seconds"] else 0.0
        if not self.valid:
            logger.info(
                "step %d/%d: train loss %.4f, %.0f tokens/s",
                self.state.step,
                self.total_steps,
                train_loss,
                tokens_per_s,
            )
            return
        started = time.perf_counter()
        valid_loss, _ = mean_reply_loss(
            self.model, self.valid, self.config.batch_size, self.pad_token_id, self.device
        )
        self.state.valid_history.append(
            {"step": self.state.step, "loss": valid_loss, "perplexity": math.exp(valid_loss)}
        )
        logger.info(
            "step %d/%d: train loss %.4f, valid loss %.4f (perplexity %.1f), lr %.2e, "
            "%.0f tokens/s, validation took %.1f s",
            self.state.step,
            self.total_steps,
            train_loss,
            valid_loss,
            math.exp(valid_loss),
            self.scheduler.get_last_lr()[0],
            tokens_per_s,
            time.perf_counter() - started,
        )

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


# --- outputs ----------------------------------------------------------------------------------


def write_outputs(trainer: Trainer, summary: dict[str, Any]) -> None:
    """Save the adapter, the configuration, the metrics and the loss plot."""
    folder = Path(trainer.config.output_dir)
    trainer.model.save_pretrained(folder, save_embedding_layers=False)
    (folder / CONFIG_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    state = trainer.state
    metrics = {
        "steps": state.step,
        "epochs_completed": state.epoch,
        "tokens_seen": state.tokens_seen,
        "train_seconds": round(state.seconds, 1),
        "tokens_per_s": round(state.tokens_seen / state.seconds, 1) if state.seconds else 0.0,
        "final_train_loss": _mean_recent_loss(state.train_history),
        "final_valid_loss": state.valid_history[-1]["loss"] if state.valid_history else None,
        "best_valid_loss": min((row["loss"] for row in state.valid_history), default=None),
        "train": state.train_history,
        "valid": state.valid_history,
    }
    (folder / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    plot_losses(state, folder / PLOT_FILE)


def _mean_recent_loss(history: list[dict[str, float]], window: int = 20) -> float | None:
    recent = history[-window:]
    return sum(row["loss"] for row in recent) / len(recent) if recent else None


def plot_losses(state: RunState, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    steps = [row["step"] for row in state.train_history]
    losses = [row["loss"] for row in state.train_history]
    axes.plot(steps, losses, color="tab:blue", alpha=0.35, label="train (per step)")
    if len(losses) >= 10:
        span = max(5, len(losses) // 20)
        smooth = [
            sum(losses[max(0, i - span + 1) : i + 1]) / len(losses[max(0, i - span + 1) : i + 1])
            for i in range(len(losses))
        ]
        axes.plot(steps, smooth, color="tab:blue", label=f"train (mean of {span} steps)")
    if state.valid_history:
        axes.plot(
            [row["step"] for row in state.valid_history],
            [row["loss"] for row in state.valid_history],
            "o-",
            color="tab:orange",
            label="validation",
        )
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss per reply token (nats)")
    axes.set_title("LoRA training loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run_summary(
    config: TrainConfig, trainer: Trainer, formatter: PromptFormatter, max_positions: int
) -> dict[str, Any]:
    import peft
    import transformers

    trainable = sum(p.numel() for p in trainer.trainable_parameters())
    total = sum(p.numel() for p in trainer.model.parameters())
    return {
        **asdict(config),
        "base_label": base_label(config.base),
        "total_steps": trainer.total_steps,
        "train_examples": len(trainer.train),
        "valid_examples": len(trainer.valid),
        "prompt_layout": "chat template" if formatter.uses_chat_template else "plain dialogue",
        "max_positions": max_positions,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "device": str(trainer.device),
        "torch_threads": torch.get_num_threads(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
    }


# --- command line -----------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def train(config: TrainConfig, resume: bool = False) -> Trainer:
    """Run (or resume) training and write every output; return the finished trainer."""
    seed_everything(config.seed)
    check_output_dir(config, resume)
    for path in (config.train_file, config.valid_file):
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"{path} not found; create it with `python -m training.prepare_data`"
            )

    # Model and formatter
    model, tokenizer, max_positions, device = load_model_for_training(config)
    if config.seq_len > max_positions:
        raise ValueError(
            f"--seq-len {config.seq_len} exceeds the model's {max_positions} positions; "
            f"use --seq-len {max_positions} or less"
        )
    formatter = PromptFormatter(tokenizer, config.system_prompt, max_positions)
    check_persona_fits(formatter, config.seq_len)

    # Data
    train_examples = load_examples(
        config.train_file, formatter, config.seq_len, config.max_train_examples
    )
    valid_examples = load_examples(
        config.valid_file, formatter, config.seq_len, config.max_valid_examples
    )
    if not train_examples:
        raise ValueError(f"{config.train_file} yields no usable training example")
    batches_per_epoch = math.ceil(len(train_examples) / config.batch_size)
    total_steps = count_total_steps(config, batches_per_epoch)
    if config.warmup_steps >= total_steps:
        raise ValueError(
            f"--warmup-steps {config.warmup_steps} leaves no step after warm-up in a run of "
            f"{total_steps} steps; lower it"
        )

    # Optimizer, and the checkpoint to resume from
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = make_scheduler(optimizer, config, total_steps)
    state = RunState()
    if resume:
        checkpoint = latest_checkpoint(Path(config.output_dir))
        assert checkpoint is not None  # check_output_dir has verified it
        state = load_checkpoint(checkpoint, model, optimizer, scheduler, config)
        logger.info("resuming from %s at step %d", checkpoint, state.step)

    trainer = Trainer(
        config=config,
        model=model,
        pad_token_id=tokenizer.pad_token_id,
        device=device,
        train=train_examples,
        valid=valid_examples,
        optimizer=optimizer,
        scheduler=scheduler,
        total_steps=total_steps,
        state=state,
    )
    summary = run_summary(config, trainer, formatter, max_positions)
    logger.info(
        "training %s on %d examples (%d validation) for %d steps on %s with %d threads; "
        "%d trainable parameters",
        summary["base_label"],
        len(train_examples),
        len(valid_examples),
        total_steps,
        device,
        torch.get_num_threads(),
        summary["trainable_parameters"],
    )

    # Loop, then outputs
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(config.output_dir) / CONFIG_FILE).write_text(
        json.dumps(summary, indent=2) + "\n", encoding="utf-8"
    )
    trainer.run()
    write_outputs(trainer, summary)
    logger.info(
        "done: %d steps, %.0f s, %.0f tokens/s; adapter saved to %s",
        trainer.state.step,
        trainer.state.seconds,
        trainer.state.tokens_seen / trainer.state.seconds if trainer.state.seconds else 0.0,
        config.output_dir,
    )
    return trainer


def main(argv: Sequence[str] | None = None) -> int:
    config, resume = parse_config(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        train(config, resume)
    except (FileNotFoundError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
