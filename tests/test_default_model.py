"""The embedded SmolLM2-135M-Instruct: GGUF conversion cache and a real reply."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from joeybot.config import GenerationSettings, ModelSettings
from joeybot.inference.generation import JoeyEngine
from joeybot.inference.loading import (
    SHIPPED_ADAPTER,
    LoadedModel,
    converted_gguf_dir,
    default_gguf_path,
    file_sha256,
    load_model,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="module")
def first_load(cache_dir: Path) -> tuple[LoadedModel, str]:
    """Load the default model into an empty cache, capturing the loader's log."""
    handler = _ListHandler()
    logger = logging.getLogger("joeybot.inference.loading")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        loaded = load_model(ModelSettings(cache_dir=cache_dir))
    finally:
        logger.removeHandler(handler)
    return loaded, "\n".join(handler.lines)


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_first_load_converts_gguf(first_load, cache_dir: Path) -> None:
    loaded, log = first_load
    copies = list((cache_dir / "gguf").iterdir())

    assert "converting SmolLM2-135M-Instruct.Q4_1.gguf" in log
    assert len(copies) == 1
    assert (copies[0] / "model.safetensors").is_file()
    assert loaded.max_positions == 8192
    assert loaded.tokenizer.chat_template


def test_second_load_uses_cache(first_load, cache_dir: Path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="joeybot.inference.loading"):
        load_model(ModelSettings(cache_dir=cache_dir))

    assert "converting" not in caplog.text
    assert len(list((cache_dir / "gguf").iterdir())) == 1


def test_cache_key_follows_file_content(tmp_path: Path) -> None:
    original = default_gguf_path()
    copy = tmp_path / original.name
    shutil.copy(original, copy)
    same = converted_gguf_dir(copy, file_sha256(copy), tmp_path)
    with copy.open("r+b") as handle:
        handle.seek(-1, 2)
        last = handle.read(1)
        handle.seek(-1, 2)
        handle.write(bytes([last[0] ^ 1]))
    changed = converted_gguf_dir(copy, file_sha256(copy), tmp_path)

    assert same == converted_gguf_dir(original, file_sha256(original), tmp_path)
    assert changed != same


def test_default_model_answers_joey_line(first_load) -> None:
    loaded, _ = first_load
    engine = JoeyEngine(loaded, GenerationSettings(max_new_tokens=48, seed=5))
    reply = engine.reply([], "How you doin'?")

    assert reply.text.strip()
    assert reply.new_tokens > 0
    assert not reply.fallback


def test_broken_cached_copy_converted_again(first_load, cache_dir: Path, caplog) -> None:
    copy = next((cache_dir / "gguf").iterdir())
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])

    with caplog.at_level(logging.WARNING, logger="joeybot.inference.loading"):
        loaded = load_model(ModelSettings(cache_dir=cache_dir))

    assert "unreadable" in caplog.text
    assert weights.stat().st_size > 1_000_000
    assert loaded.max_positions == 8192


def test_shipped_adapter_attached_by_default(first_load) -> None:
    loaded, _ = first_load

    assert loaded.info["adapter"] == str(SHIPPED_ADAPTER)
    assert loaded.has_adapter
