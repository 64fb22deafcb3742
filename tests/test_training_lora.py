"""LoRA training and evaluation on the tiny tinyllama-shaped model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from joeybot.inference.prompts import IGNORE_INDEX, PromptFormatter
from training import evaluate, train_lora
from training.batches import collate, encode_records, make_batches, reply_loss_sum
from training.train_lora import TrainConfig, parse_config, train

PERSONA = "You are Joey Tribbiani."
RECORDS = [
    {
        "id": "0101-s1-l2",
        "episode": "0101",
        "scene": 1,
        "context": [{"speaker": "Monica", "text": "Joey, what do you want to eat?"}],
        "reply": "Pizza! Always pizza.",
    },
    {
        "id": "0101-s1-l4",
        "episode": "0101",
        "scene": 1,
        "context": [
            {"speaker": "Ross", "text": "How was the audition?"},
            {"speaker": "Joey", "text": "Okay."},
            {"speaker": "Chandler", "text": "Just okay?"},
        ],
        "reply": "They said I was too Italian. How can you be too Italian?",
    },
    {
        "id": "0102-s2-l7",
        "episode": "0102",
        "scene": 2,
        "context": [{"speaker": "Rachel", "text": "Do you want to share my fries?"}],
        "reply": "Joey doesn't share food!",
    },
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def data_files(tmp_path: Path) -> tuple[Path, Path]:
    train_file = write_jsonl(tmp_path / "train.jsonl", RECORDS * 4)
    valid_file = write_jsonl(tmp_path / "valid.jsonl", RECORDS)
    return train_file, valid_file


def tiny_config(tiny_llama_dir: Path, data_files, output_dir: Path, **overrides) -> TrainConfig:
    train_file, valid_file = data_files
    values = dict(
        base=str(tiny_llama_dir),
        train_file=str(train_file),
        valid_file=str(valid_file),
        output_dir=str(output_dir),
        system_prompt=PERSONA,
        seq_len=64,
        batch_size=4,
        lr=5e-3,
        warmup_steps=1,
        max_steps=12,
        lora_rank=8,
        lora_alpha=16,
        lora_dropout=0.0,
        eval_every=6,
        save_every=0,
        threads=1,
        progress=False,
    )
    return TrainConfig(**(values | overrides))


# --- labels -----------------------------------------------------------------------------------


def test_labels_cover_only_reply(tiny_llama_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    formatter = PromptFormatter(tokenizer, PERSONA, 256)
    examples, skipped = encode_records(RECORDS, formatter, max_length=256)

    assert not skipped
    for example, record in zip(examples, RECORDS, strict=True):
        labelled = [label for label in example.labels if label != IGNORE_INDEX]
        first = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
        assert all(label == IGNORE_INDEX for label in example.labels[:first])
        assert example.labels[first:] == example.input_ids[first:]
        assert tokenizer.decode(labelled, skip_special_tokens=True).strip() == record["reply"]
        assert labelled[-1] == tokenizer.eos_token_id
        prompt = tokenizer.decode(example.input_ids[:first])
        assert record["context"][-1]["text"] in prompt
        assert record["reply"] not in prompt


@pytest.mark.slow
def test_labels_cover_only_reply_in_chat_template():
    from joeybot.config import ModelSettings
    from joeybot.inference.loading import load_base_model

    _, tokenizer, positions = load_base_model(ModelSettings(threads=1))
    formatter = PromptFormatter(tokenizer, PERSONA, positions)
    (example,), _ = encode_records(RECORDS[1:2], formatter, max_length=256)
    labelled = [label for label in example.labels if label != IGNORE_INDEX]

    assert tokenizer.decode(labelled) == RECORDS[1]["reply"] + "<|im_end|>\n"
    assert "<|im_start|>assistant\n" in tokenizer.decode(example.input_ids)


def test_sliced_logits_match_full_logits(tiny_llama_dir: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    formatter = PromptFormatter(tokenizer, PERSONA, 256)
    examples, _ = encode_records(RECORDS, formatter, max_length=256)
    batch = collate(examples, pad_token_id=0)

    with torch.no_grad():
        sliced, sliced_count = reply_loss_sum(model, batch)
        full, full_count = reply_loss_sum(model, batch, slice_logits=False)
    assert sliced_count == full_count == sum(example.reply_tokens for example in examples)
    assert torch.allclose(sliced, full, rtol=1e-5)


def test_batches_cover_each_example_once():
    lengths = [5, 9, 3, 7, 7, 2, 8]
    batches = make_batches(lengths, batch_size=3, seed=1, epoch=0)
    assert sorted(i for batch in batches for i in batch) == list(range(7))
    assert batches == make_batches(lengths, batch_size=3, seed=1, epoch=0)
    assert batches != make_batches(lengths, batch_size=3, seed=1, epoch=1)


# --- training ---------------------------------------------------------------------------------


def test_training_lowers_loss(tiny_llama_dir: Path, data_files, tmp_path: Path):
    output = tmp_path / "run"
    trainer = train(tiny_config(tiny_llama_dir, data_files, output))

    history = trainer.state.train_history
    assert len(history) == 12
    # A random model starts near ln(32000) = 10.4 nats; a few LoRA steps lower that by
    # about one nat on this repeated data.
    first = sum(row["loss"] for row in history[:3]) / 3
    last = sum(row["loss"] for row in history[-3:]) / 3
    assert last < first - 0.5
    valid = trainer.state.valid_history
    assert [row["step"] for row in valid] == [0, 6, 12]
    assert valid[-1]["loss"] < valid[0]["loss"]

    for name in ("adapter_model.safetensors", "adapter_config.json", "loss.png"):
        assert (output / name).is_file(), name
    config = json.loads((output / "training_config.json").read_text(encoding="utf-8"))
    assert config["seq_len"] == 64
    assert config["prompt_layout"] == "plain dialogue"
    metrics = json.loads((output / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["steps"] == 12
    assert metrics["best_valid_loss"] == min(row["loss"] for row in valid)
    adapter_config = json.loads((output / "adapter_config.json").read_text(encoding="utf-8"))
    assert adapter_config["base_model_name_or_path"] == tiny_llama_dir.name


def test_resume_matches_uninterrupted_run(tiny_llama_dir, data_files, tmp_path: Path, caplog):
    full = tmp_path / "full"
    settings = dict(max_steps=6, save_every=3, eval_every=0, lora_dropout=0.1)
    train(tiny_config(tiny_llama_dir, data_files, full, **settings))

    # A copy of the run as if it had been killed right after the step 3 checkpoint.
    interrupted = tmp_path / "interrupted"
    (interrupted / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        full / "checkpoints" / "step-000003", interrupted / "checkpoints" / "step-000003"
    )
    shutil.copy(full / "training_config.json", interrupted)
    caplog.set_level("INFO", logger="training.train_lora")
    resumed = train(tiny_config(tiny_llama_dir, data_files, interrupted, **settings), resume=True)

    # Dropout, optimizer moments and the schedule all continue, so the weights match.
    assert "step-000003 at step 3" in caplog.text
    assert resumed.state.step == 6
    assert len(resumed.state.train_history) == 6
    expected = load_file(full / "adapter_model.safetensors")
    actual = load_file(interrupted / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.allclose(expected[name], actual[name], atol=1e-6), name


def test_resume_rejects_changed_settings(tiny_llama_dir: Path, data_files, tmp_path: Path):
    output = tmp_path / "run"
    train(tiny_config(tiny_llama_dir, data_files, output, max_steps=2, save_every=2, eval_every=0))

    changed = tiny_config(tiny_llama_dir, data_files, output, max_steps=4, seq_len=80)
    with pytest.raises(ValueError, match="seq_len: checkpoint 64, now 80"):
        train(changed, resume=True)


def test_used_output_dir_needs_resume(tiny_llama_dir: Path, data_files, tmp_path: Path):
    output = tmp_path / "run"
    train(tiny_config(tiny_llama_dir, data_files, output, max_steps=2, eval_every=0))

    with pytest.raises(ValueError, match="already contains a run; pass --resume"):
        train(tiny_config(tiny_llama_dir, data_files, output, max_steps=2))
    with pytest.raises(ValueError, match="no checkpoint found"):
        train(tiny_config(tiny_llama_dir, data_files, output, max_steps=2), resume=True)


def test_sequence_longer_than_model_rejected(tiny_llama_dir: Path, data_files, tmp_path: Path):
    config = tiny_config(tiny_llama_dir, data_files, tmp_path / "run", seq_len=512)
    with pytest.raises(ValueError, match="exceeds the model's 256 positions"):
        train(config)


def test_persona_too_long_for_sequence_rejected(tiny_llama_dir, data_files, tmp_path):
    config = tiny_config(tiny_llama_dir, data_files, tmp_path / "run", system_prompt="Joey. " * 40)
    with pytest.raises(ValueError, match="more than half of --seq-len 64"):
        train(config)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--max-steps", "5", "--epochs", "1"], "cannot be used together"),
        (["--max-steps", "5", "--warmup-steps", "5"], "must be below --max-steps"),
        (["--lora-dropout", "1.5"], "--lora-dropout must be in [0, 1)"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--target-modules", " , "], "--target-modules is empty"),
    ],
)
def test_conflicting_options_rejected(arguments, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(arguments)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_epochs_default_when_no_steps():
    config, resume = parse_config(["--target-modules", "q_proj, v_proj"])
    assert (config.max_steps, config.epochs, resume) == (0, 1.0, False)
    assert train_lora.target_modules(config) == ["q_proj", "v_proj"]


# --- evaluation -------------------------------------------------------------------------------


def test_evaluate_end_to_end(tiny_llama_dir: Path, data_files, tmp_path: Path):
    adapter = tmp_path / "run"
    train(tiny_config(tiny_llama_dir, data_files, adapter, max_steps=6, eval_every=0))
    _, valid_file = data_files

    code = evaluate.main(
        [
            "--adapter", str(adapter),
            "--valid-file", str(valid_file),
            "--generate", "2",
            "--max-new-tokens", "6",
            "--threads", "1",
        ]
    )  # fmt: skip

    assert code == 0
    report = json.loads((adapter / "eval" / "report.json").read_text(encoding="utf-8"))
    base, tuned = report["models"]["base"], report["models"]["adapter"]
    assert report["config"]["seq_len"] == 64  # read from the adapter's training config
    assert report["config"]["system_prompt"] == PERSONA
    assert tuned["perplexity"] < base["perplexity"]
    assert report["perplexity_change"] < 0
    assert len(base["validation_samples"]) == 2
    assert len(tuned["fan_samples"]) == len(evaluate.FAN_PROMPTS)
    assert 0 <= tuned["stopped_before_limit"] <= 1
    markdown = (adapter / "eval" / "report.md").read_text(encoding="utf-8")
    assert "| Perplexity of Joey's real replies |" in markdown
    assert "Are you a real person or a chatbot?" in markdown


def test_evaluate_base_alone(tiny_llama_dir: Path, data_files, tmp_path: Path):
    _, valid_file = data_files
    output = tmp_path / "eval"
    arguments = ["--base", str(tiny_llama_dir), "--valid-file", str(valid_file)]
    arguments += ["--output-dir", str(output), "--generate", "1", "--max-new-tokens", "4"]
    arguments += ["--system-prompt", PERSONA, "--seq-len", "64", "--threads", "1"]

    assert evaluate.main(arguments) == 0
    report = json.loads((output / "report.json").read_text(encoding="utf-8"))
    assert list(report["models"]) == ["base"]
    assert "perplexity_change" not in report


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("As an AI language model, I can't eat.", True),
        ("I’m an AI, so no sandwiches.", True),
        ("I am a virtual friend.", True),
        ("I am not a real human being, I'm programmed to respond.", True),
        ("Math is all about numbers! I'm here to assist you.", True),
        ("How you doin'? Wanna grab a sandwich?", False),
        ("Joey doesn't share food!", False),
    ],
)
def test_out_of_character_detected(text, expected):
    assert evaluate.breaks_character(text) is expected


def test_distinct_2_counts_unique_bigrams():
    assert evaluate.distinct_2(["a b a b"]) == pytest.approx(2 / 3)
    assert evaluate.distinct_2(["a b", "a b"]) == pytest.approx(1 / 2)
    assert evaluate.distinct_2([]) == 0.0
