"""Shared fixtures: tiny real models built offline, and the shared data folder."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import torch
from arq.connections import ArqRedis

from joeybot.config import RedisConnectionSettings
from joeybot.inference.generation import JoeyEngine
from joeybot.inference.loading import load_model
from joeybot.redis_client import create_redis
from joeybot.testing import FakeTelegram

from .service_support import RedisServer, make_settings

REPO_ROOT = Path(__file__).resolve().parents[1]

# tinyllama-15M (llama2.c "stories15M" in Hugging Face format): the seed deployment's base.
TINYLLAMA_SHAPE = dict(
    hidden_size=288,
    num_hidden_layers=6,
    num_attention_heads=6,
    num_key_value_heads=6,
    intermediate_size=768,
    vocab_size=32000,
    max_position_embeddings=256,
)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    # Tiny models run faster on one thread, and the test machine has two cores to share.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared folder beside the repository (JOEYBOT_SHARED_DIR overrides)."""
    path = Path(os.environ.get("JOEYBOT_SHARED_DIR", REPO_ROOT.parent / "shared"))
    if not path.is_dir():
        pytest.fail(f"shared folder not found at {path}; set JOEYBOT_SHARED_DIR")
    return path


@pytest.fixture(scope="session")
def llama2_tokenizer_dir(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a copy of the Llama 2 SentencePiece model, loadable by transformers."""
    source = shared_dir / "models" / "llama2-tokenizer" / "tokenizer.model"
    folder = tmp_path_factory.mktemp("llama2-tokenizer")
    shutil.copy(source, folder / "tokenizer.model")
    return folder


def build_tiny_llama(folder: Path, tokenizer_dir: Path, seed: int = 0, **shape: int) -> Path:
    """Save a random-weight LlamaForCausalLM with the Llama 2 tokenizer to `folder`."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    tokenizer = LlamaTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        **(TINYLLAMA_SHAPE | shape),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(llama2_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tinyllama-15M-shaped model folder: random weights, real tokenizer, no chat template."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), llama2_tokenizer_dir)


def build_lora_adapter(
    base_dir: Path,
    folder: Path,
    seed: int = 1,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
) -> Path:
    """Save a LoRA adapter for `base_dir` whose B matrices are random, so it changes logits.

    peft starts B at zero (an adapter that does nothing); a test adapter must have an effect.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=list(target_modules), task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_adapter_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter made with peft for the tiny model, with non-zero weights."""
    return build_lora_adapter(tiny_llama_dir, tmp_path_factory.mktemp("tiny-adapter"))


# ----- services for the bot, worker and admin tests --------------------------------------------


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private redis-server on a free port of 127.0.0.1, one per test module."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[ArqRedis]:
    """A client of `redis_server`, emptied before each test."""
    redis_server.flush()
    client = create_redis(RedisConnectionSettings(url=redis_server.url))
    yield client
    await client.aclose()


@pytest.fixture
async def fake() -> AsyncIterator[FakeTelegram]:
    """A fake Telegram Bot API server on 127.0.0.1."""
    async with FakeTelegram() as server:
        yield server


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path, tiny_adapter_dir: Path) -> JoeyEngine:
    """The tiny model with its adapter, as the service tests' workers run it."""
    settings = make_settings("redis://127.0.0.1/0", None, tiny_llama_dir, tiny_adapter_dir)
    return JoeyEngine(load_model(settings.model), settings.generation)
