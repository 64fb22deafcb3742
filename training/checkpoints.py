"""Checkpoints of a training run: save, find, prune and restore them for --resume."""

from __future__ import annotations

import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from training.train_config import TrainConfig

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.pt"
# Settings that a resumed run must share with the run it continues. The others may
# change. A new --max-steps or --epochs stretches the cosine schedule from the current step.
RESUME_MUST_MATCH = (
    "base",
    "train_file",
    "seq_len",
    "batch_size",
    "grad_accum",
    "lr",
    "warmup_steps",
    "weight_decay",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "system_prompt",
    "seed",
    "max_train_examples",
)


@dataclass
class RunState:
    """Progress of a run, stored in each checkpoint next to the adapter and optimizer."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    tokens_seen: int = 0
    seconds: float = 0.0
    train_history: list[dict[str, float]] = field(default_factory=list)
    valid_history: list[dict[str, float]] = field(default_factory=list)


def latest_checkpoint(folder: Path) -> Path | None:
    candidates = sorted((folder / CHECKPOINT_DIR).glob("step-*"))
    complete = [path for path in candidates if (path / STATE_FILE).is_file()]
    return complete[-1] if complete else None


def save_checkpoint(
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: RunState,
    config: TrainConfig,
) -> Path:
    """Write adapter, optimizer, scheduler, progress, RNG states and config for --resume."""
    folder = Path(config.output_dir) / CHECKPOINT_DIR / f"step-{state.step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    # The embeddings are never trained. Passing False also keeps peft from looking up the
    # base model's config on the Hub to compare vocabulary sizes.
    model.save_pretrained(folder, save_embedding_layers=False)
    payload = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "state": asdict(state),
        "config": asdict(config),
        "rng": {
            "python": random.getstate(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        },
    }
    # The state file is written last, under a temporary name, so a checkpoint with a
    # state file is complete even when the run was killed while saving.
    partial = folder / (STATE_FILE + ".tmp")
    torch.save(payload, partial)
    partial.replace(folder / STATE_FILE)
    prune_checkpoints(Path(config.output_dir), config.keep_checkpoints)
    return folder


def prune_checkpoints(folder: Path, keep: int) -> None:
    checkpoints = sorted((folder / CHECKPOINT_DIR).glob("step-*"))
    for old in checkpoints[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(
    folder: Path,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    config: TrainConfig,
) -> RunState:
    """Restore a checkpoint into the model, optimizer and scheduler; return the progress."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    payload = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
    saved = payload["config"]
    differences = [
        f"{name}: checkpoint {saved.get(name)!r}, now {getattr(config, name)!r}"
        for name in RESUME_MUST_MATCH
        if saved.get(name) != getattr(config, name)
    ]
    if differences:
        raise ValueError(
            "--resume: these settings differ from the run being resumed: "
            + "; ".join(differences)
            + ". Use the original values or start a new run in another --output-dir."
        )
    device = next(model.parameters()).device
    weights = load_file(str(folder / "adapter_model.safetensors"), device=str(device))
    set_peft_model_state_dict(model, weights)
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    random.setstate(payload["rng"]["python"])
    torch.set_rng_state(payload["rng"]["torch"])
    if payload["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["rng"]["cuda"])
    return RunState(**payload["state"])
