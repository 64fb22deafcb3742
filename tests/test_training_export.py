"""Exporting a trained adapter in half precision for shipping."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from joeybot.config import ModelSettings
from joeybot.inference.loading import load_model
from training.export_adapter import export_adapter


def test_export_halves_size_and_keeps_logits(
    tiny_llama_dir: Path, tiny_adapter_dir: Path, tmp_path: Path
) -> None:
    size = export_adapter(tiny_adapter_dir, tmp_path / "shipped")
    original = (tiny_adapter_dir / "adapter_model.safetensors").stat().st_size
    ids = torch.tensor([[1, 306, 763, 22691]])
    full = load_model(ModelSettings(base=str(tiny_llama_dir), adapter=str(tiny_adapter_dir)))
    half = load_model(ModelSettings(base=str(tiny_llama_dir), adapter=str(tmp_path / "shipped")))
    with torch.no_grad():
        expected = full.model(input_ids=ids).logits
        got = half.model(input_ids=ids).logits

    assert size < original * 0.6
    assert {
        t.dtype for t in load_file(tmp_path / "shipped" / "adapter_model.safetensors").values()
    } == {torch.float16}
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=1e-3)
