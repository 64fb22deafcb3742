"""Encode records with the prompt formatter, batch them, and compute the loss on reply tokens."""

from __future__ import annotations

import inspect
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from joeybot.inference.prompts import IGNORE_INDEX, PromptFormatter
from training.examples import UnusableRecordError, record_to_turns

# Examples are sorted by length inside windows of this many batches, so a batch contains
# examples of similar length (little padding) while the order across windows stays random.
SORT_WINDOW_BATCHES = 50


@dataclass(frozen=True)
class EncodedExample:
    """Token ids and labels of one record; labels are IGNORE_INDEX outside the reply."""

    record_id: str
    input_ids: list[int]
    labels: list[int]

    @property
    def reply_tokens(self) -> int:
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


def encode_records(
    records: Iterable[Mapping[str, Any]], formatter: PromptFormatter, max_length: int
) -> tuple[list[EncodedExample], Counter[str]]:
    """Encode records with `PromptFormatter.build_training_example`.

    Returns the examples and the count of skipped records by reason. A record is skipped
    when its context cannot become turns, when its reply is so long that the formatter
    would cut the persona, or when no reply token fits in ``max_length``.
    """
    examples: list[EncodedExample] = []
    skipped: Counter[str] = Counter()
    for record in records:
        try:
            context, reply = record_to_turns(record)
        except UnusableRecordError:
            skipped["context not usable"] += 1
            continue
        built = formatter.build_training_example(context, reply, max_length)
        if built.prompt.system_truncated:
            # The formatter keeps a long reply by cutting the persona, which inference never
            # does, so such an example would teach a prompt that the bot never sends.
            skipped["reply too long for the sequence length (persona would be cut)"] += 1
            continue
        example = EncodedExample(str(record.get("id", "")), built.input_ids, built.labels)
        if example.reply_tokens == 0:
            skipped["no reply token fits"] += 1
            continue
        examples.append(example)
    return examples, skipped


def make_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Return the batches of one epoch as lists of example indices.

    The order depends only on ``seed`` and ``epoch``, so a resumed run gets the same
    batches as the run it continues.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * SORT_WINDOW_BATCHES
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda index: lengths[index])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(
    examples: Sequence[EncodedExample], pad_token_id: int, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Pad a batch on the right to its longest example: input_ids, attention_mask, labels."""
    width = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids)
        attention_mask[row, :length] = 1
        labels[row, :length] = torch.tensor(example.labels)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "labels": labels.to(device),
    }


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def reply_loss_sum(
    model: torch.nn.Module, batch: Mapping[str, torch.Tensor], *, slice_logits: bool = True
) -> tuple[torch.Tensor, int]:
    """Return the summed cross-entropy over the batch's reply tokens and their count.

    Position t predicts token t + 1, so the loss covers every position whose next label is
    set. With ``slice_logits`` the model projects only those positions onto the vocabulary
    (transformers' boolean ``logits_to_keep``), which skips most of the output layer's work.
    Models whose forward lacks that argument get full logits, then the same selection.
    """
    labels = batch["labels"]
    predicts = torch.zeros_like(labels, dtype=torch.bool)
    predicts[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    targets = labels[:, 1:][predicts[:, :-1]]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if slice_logits and _accepts_logits_to_keep(model):
        logits = model(**inputs, logits_to_keep=predicts).logits
    else:
        logits = model(**inputs).logits[predicts]
    loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    return loss, int(targets.numel())


@torch.no_grad()
def mean_reply_loss(
    model: torch.nn.Module,
    examples: Sequence[EncodedExample],
    batch_size: int,
    pad_token_id: int,
    device: torch.device | str,
) -> tuple[float, int]:
    """Return the mean loss per reply token over `examples` and the number of tokens."""
    was_training = model.training
    model.eval()
    total = 0.0
    count = 0
    order = sorted(range(len(examples)), key=lambda index: len(examples[index].input_ids))
    for start in range(0, len(order), batch_size):
        batch = collate(
            [examples[i] for i in order[start : start + batch_size]], pad_token_id, device
        )
        loss, tokens = reply_loss_sum(model, batch)
        total += float(loss)
        count += tokens
    if was_training:
        model.train()
    return (total / count if count else float("nan")), count
