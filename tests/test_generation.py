"""Loading and generation on a tinyllama-15M-shaped model with a real LoRA adapter."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from joeybot.config import GenerationSettings, ModelSettings
from joeybot.errors import ModelLoadError
from joeybot.inference.generation import FALLBACK_REPLY, JoeyEngine
from joeybot.inference.loading import LoadedModel, load_model
from joeybot.inference.prompts import Turn

from .conftest import build_lora_adapter, build_tiny_llama

GREEDY = GenerationSettings(temperature=0, max_new_tokens=24, repetition_penalty=1.0)


def model_settings(base: Path, adapter: Path | str = "", **extra) -> ModelSettings:
    return ModelSettings(base=str(base), adapter=str(adapter), **extra)


@pytest.fixture(scope="module")
def tiny_loaded(tiny_llama_dir: Path, tiny_adapter_dir: Path) -> LoadedModel:
    return load_model(model_settings(tiny_llama_dir, tiny_adapter_dir))


@pytest.fixture(scope="module")
def engine(tiny_loaded: LoadedModel) -> JoeyEngine:
    return JoeyEngine(tiny_loaded, GREEDY)


def logits_for(loaded: LoadedModel, text: str = "Joey: How you doin'?") -> torch.Tensor:
    ids = loaded.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return loaded.model(input_ids=ids).logits


def generation_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "joeybot-generate"]


# ----- loading --------------------------------------------------------------------------------


def test_adapter_changes_logits(tiny_llama_dir: Path, tiny_loaded: LoadedModel) -> None:
    base = load_model(model_settings(tiny_llama_dir))

    assert tiny_loaded.has_adapter
    assert not base.has_adapter
    assert not torch.allclose(logits_for(base), logits_for(tiny_loaded), atol=1e-4)


def test_merged_adapter_matches_unmerged(
    tiny_llama_dir: Path, tiny_adapter_dir: Path, tiny_loaded: LoadedModel
) -> None:
    merged = load_model(model_settings(tiny_llama_dir, tiny_adapter_dir, merge_adapter=True))

    assert merged.info["merged"]
    torch.testing.assert_close(logits_for(merged), logits_for(tiny_loaded), atol=1e-4, rtol=1e-4)


def test_disabled_adapter_gives_base_logits(tiny_llama_dir: Path, tiny_loaded: LoadedModel) -> None:
    base = load_model(model_settings(tiny_llama_dir))
    with tiny_loaded.model.disable_adapter():
        without = logits_for(tiny_loaded)

    torch.testing.assert_close(without, logits_for(base))


def test_adapter_of_other_shape_rejected(
    tiny_llama_dir: Path, llama2_tokenizer_dir: Path, tmp_path: Path
) -> None:
    other_base = build_tiny_llama(
        tmp_path / "small",
        llama2_tokenizer_dir,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_hidden_layers=2,
    )
    adapter = build_lora_adapter(other_base, tmp_path / "small-adapter")

    with pytest.raises(ModelLoadError) as caught:
        load_model(model_settings(tiny_llama_dir, adapter))
    message = str(caught.value)
    assert str(adapter) in message
    assert str(tiny_llama_dir) in message
    assert "288 inputs but lora_A has 64" in message


def test_adapter_for_missing_layers_rejected(
    tiny_llama_dir: Path, llama2_tokenizer_dir: Path, tmp_path: Path
) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2_dir = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=288, n_layer=2, n_head=6, vocab_size=32000)).save_pretrained(
        gpt2_dir
    )
    adapter = build_lora_adapter(gpt2_dir, tmp_path / "gpt2-adapter", target_modules=("c_attn",))

    with pytest.raises(ModelLoadError, match="does not exist in the base"):
        load_model(model_settings(tiny_llama_dir, adapter))


def test_missing_adapter_folder_rejected(tiny_llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(model_settings(tiny_llama_dir, tmp_path / "nope"))


def test_non_gguf_file_base_rejected(tmp_path: Path) -> None:
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\0" * 16)

    with pytest.raises(ModelLoadError, match="not a .gguf"):
        load_model(model_settings(weights))


def test_max_context_lowers_positions(tiny_llama_dir: Path) -> None:
    loaded = load_model(model_settings(tiny_llama_dir, max_context=128))

    assert loaded.max_positions == 128


# ----- generation -----------------------------------------------------------------------------


def test_reply_reports_counts(engine: JoeyEngine) -> None:
    reply = engine.reply([], "How you doin'?")

    assert reply.text
    assert reply.prompt_tokens > 0
    assert 0 < reply.new_tokens <= GREEDY.max_new_tokens
    assert reply.seconds > 0


def test_stream_equals_blocking_greedy(engine: JoeyEngine) -> None:
    history = [Turn("user", "Hey"), Turn("assistant", "Hey yourself")]
    blocking = engine.reply(history, "Want to get a sandwich?")
    stream = engine.stream(history, "Want to get a sandwich?")
    pieces = list(stream)

    assert len(pieces) >= 1
    assert "".join(pieces) == blocking.text
    assert stream.result.text == blocking.text
    assert stream.result.new_tokens == blocking.new_tokens


def test_history_longer_than_context(engine: JoeyEngine) -> None:
    history = [Turn("user" if i % 2 == 0 else "assistant", "pizza " * 50) for i in range(60)]
    reply = engine.reply(history, "Still hungry?", max_new_tokens=200)

    assert reply.text
    assert reply.prompt_tokens + reply.new_tokens <= 256


def test_per_call_overrides(engine: JoeyEngine) -> None:
    reply = engine.reply([], "Hi", max_new_tokens=3)

    assert reply.new_tokens <= 3
    with pytest.raises(TypeError, match="unknown generation options"):
        engine.reply([], "Hi", temprature=0.5)


def test_seeded_sampling_repeats(engine: JoeyEngine) -> None:
    first = engine.reply([], "Hi", temperature=1.0, seed=11)
    second = engine.reply([], "Hi", temperature=1.0, seed=11)

    assert first.text == second.text


def test_early_stop_ends_thread(tiny_loaded: LoadedModel) -> None:
    slow = JoeyEngine(tiny_loaded, GenerationSettings(temperature=1.0, max_new_tokens=120))
    stream = slow.stream([], "Tell me a long story")
    next(stream)
    stream.close()

    assert generation_threads() == []
    assert stream.result is None


def test_generation_error_ends_thread(tiny_loaded: LoadedModel, monkeypatch) -> None:
    calls = {"count": 0}
    inner = tiny_loaded.model.get_base_model()
    real_forward = inner.forward

    def failing_forward(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 3:
            raise RuntimeError("simulated device failure")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(inner, "forward", failing_forward)
    engine = JoeyEngine(tiny_loaded, GREEDY)

    with pytest.raises(RuntimeError, match="simulated device failure"):
        engine.reply([], "Hi")
    assert generation_threads() == []


def test_threads_get_their_own_replies(engine: JoeyEngine) -> None:
    prompts = [f"Question number {index}?" for index in range(4)]
    expected = {prompt: engine.reply([], prompt).text for prompt in prompts}
    results: dict[str, str] = {}

    def ask(prompt: str) -> None:
        results[prompt] = engine.reply([], prompt).text

    threads = [threading.Thread(target=ask, args=(prompt,)) for prompt in prompts * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert results == expected


def test_empty_reply_falls_back(tiny_llama_dir: Path, tmp_path: Path, caplog) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # A model that always ends its turn at once: the eos row of the output layer dominates.
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        model.lm_head.weight[model.config.eos_token_id] = model.model.norm.weight * 100
    model.save_pretrained(tmp_path / "mute")
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(tmp_path / "mute")
    engine = JoeyEngine(load_model(model_settings(tmp_path / "mute")), GREEDY)

    with caplog.at_level("WARNING"):
        stream = engine.stream([], "Say something")
        pieces = list(stream)

    assert stream.result.fallback
    assert stream.result.regenerated
    assert "".join(pieces) == FALLBACK_REPLY
    assert "empty reply twice" in caplog.text


# ----- scripted output: a real model whose next token is forced by a forward hook ------------


class ScriptedOutput:
    """Make the model emit `tokens` in order (then end of text), restarting on each new prompt."""

    def __init__(self, model: torch.nn.Module, tokens: list[int], eos_id: int) -> None:
        self.tokens = tokens
        self.eos_id = eos_id
        self.position = 0
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.handles = [
            inner.register_forward_pre_hook(self._restart_on_prompt, with_kwargs=True),
            inner.lm_head.register_forward_hook(self._force),
        ]

    def _restart_on_prompt(self, module, args, kwargs) -> None:
        input_ids = kwargs.get("input_ids")
        if input_ids is not None and input_ids.shape[1] > 1:
            self.position = 0

    def _force(self, module, inputs, output: torch.Tensor) -> torch.Tensor:
        token = self.tokens[self.position] if self.position < len(self.tokens) else self.eos_id
        self.position += 1
        forced = torch.full_like(output, -1e4)
        forced[:, -1, token] = 1e4
        return forced

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.fixture
def scripted(tiny_loaded: LoadedModel):
    hooks: list[ScriptedOutput] = []

    def script(pieces: list[str]) -> JoeyEngine:
        tokenizer = tiny_loaded.tokenizer
        tokens = tokenizer.convert_tokens_to_ids(pieces)
        hooks.append(ScriptedOutput(tiny_loaded.model, tokens, tokenizer.eos_token_id))
        return JoeyEngine(tiny_loaded, GREEDY)

    yield script
    for hook in hooks:
        hook.remove()


@pytest.mark.parametrize(
    "pieces",
    [
        ["▁Box", "▁Mr", "<0x57>", "<0xF0>"],
        ["▁Hi", "<0x4D>", "<0x98>", "▁day"],
        ["▁Jo", "ey", "<0x09>", ":", "▁hi", "▁there"],
        ["▁Hey", "<0x0A>", "▁Ross", ":", "▁no"],
    ],
)
def test_stream_matches_result_on_byte_tokens(scripted, pieces: list[str], caplog) -> None:
    engine = scripted(pieces)
    with caplog.at_level("WARNING"):
        stream = engine.stream([], "Hi")
        streamed = "".join(stream)

    assert streamed == stream.result.text
    assert "differ" not in caplog.text
    assert engine.reply([], "Hi").text == stream.result.text


def test_special_token_ends_turn(scripted) -> None:
    engine = scripted(["▁Hey", "!", "<s>", "▁User", ":", "▁hack"])
    reply = engine.reply([], "Hi")

    assert reply.text == "Hey!"
    assert reply.new_tokens == 3


def test_invisible_reply_falls_back(scripted) -> None:
    engine = scripted(["<0xE2>", "<0x80>", "<0x8B>"])  # U+200B ZERO WIDTH SPACE
    stream = engine.stream([], "Hi")
    streamed = "".join(stream)

    assert stream.result.fallback
    assert streamed == stream.result.text
    assert stream.result.text.endswith(FALLBACK_REPLY)


def test_lone_surrogate_input_answered(engine: JoeyEngine) -> None:
    reply = engine.reply([Turn("user", "caf\udce9"), Turn("assistant", "ok")], "more \ud800")

    assert reply.text


def test_abandoned_stream_stops_thread(tiny_loaded: LoadedModel) -> None:
    import gc

    slow = JoeyEngine(tiny_loaded, GenerationSettings(temperature=1.0, max_new_tokens=120))
    stream = slow.stream([], "Tell me a long story")
    next(stream)
    del stream
    gc.collect()

    assert generation_threads() == []


def test_cancel_from_other_thread(tiny_loaded: LoadedModel) -> None:
    slow = JoeyEngine(tiny_loaded, GenerationSettings(temperature=1.0, max_new_tokens=200))
    with slow.stream([], "Tell me a long story") as stream:
        next(stream)
        canceller = threading.Thread(target=stream.cancel)
        canceller.start()
        canceller.join()
        rest = list(stream)

    assert stream.result is not None
    assert stream.result.new_tokens < 200
    assert isinstance(rest, list)
    assert generation_threads() == []


# ----- load errors an operator can make -------------------------------------------------------


def test_folder_without_model_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(model_settings(tmp_path))


def test_missing_base_folder_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="MODEL_BASE folder not found"):
        load_model(model_settings(tmp_path / "absent"))


def test_corrupt_adapter_config_rejected(tiny_llama_dir: Path, tmp_path: Path) -> None:
    adapter = build_lora_adapter(tiny_llama_dir, tmp_path / "adapter")
    (adapter / "adapter_config.json").write_text("{not json", encoding="utf-8")

    with pytest.raises(ModelLoadError, match="cannot read adapter config"):
        load_model(model_settings(tiny_llama_dir, adapter))


def test_corrupt_adapter_weights_rejected(tiny_llama_dir: Path, tmp_path: Path) -> None:
    adapter = build_lora_adapter(tiny_llama_dir, tmp_path / "adapter")
    (adapter / "adapter_model.safetensors").write_bytes(b"\xff" * 64)

    with pytest.raises(ModelLoadError, match="cannot read adapter weights"):
        load_model(model_settings(tiny_llama_dir, adapter))


def test_unwritable_cache_rejected_before_conversion(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x", encoding="utf-8")

    with pytest.raises(ModelLoadError, match="MODEL_CACHE_DIR .* is not a writable folder"):
        load_model(ModelSettings(adapter="", cache_dir=not_a_folder / "sub"))


def test_auto_adapter_skipped_for_other_base(tiny_llama_dir: Path) -> None:
    loaded = load_model(ModelSettings(base=str(tiny_llama_dir), adapter="auto"))

    assert loaded.info["adapter"] is None
    assert not loaded.has_adapter
