"""Load benchmark: concurrent fake users through the bot, Redis and 1, then 2 workers.

Everything runs on this machine. A fake Telegram Bot API server (joeybot.testing.FakeTelegram)
runs in this process; a private redis-server on a free port of 127.0.0.1, one `joeybot bot` and
the `joeybot worker` processes run as subprocesses. All of them are stopped at the end, also
after an error, Ctrl-C or SIGTERM.

Each fake user sends a message, waits for Joey's reply and then sends the next, so N users keep
up to N messages in the system at once. A user pauses --think-s seconds before each next
message, as a person reads and types. Without a pause the next message arrives while the job
that answered the previous one still has the chat's lock, and that job answers it too (see
joeybot.inbox), which lets one quick user keep a worker to itself.

    python benchmarks/load.py --model tiny [--users 8] [--messages 3] [--json out.json]
    python benchmarks/load.py --model default --users 4 --messages 2 --max-new-tokens 48

`--model tiny` builds a random-weight model of the tinyllama-15M shape with the Llama 2
tokenizer from ../shared/models/llama2-tokenizer (JOEYBOT_SHARED_DIR overrides the shared
folder). `--model default` runs the model that MODEL_BASE, MODEL_ADAPTER and the other model
settings in the environment and `.env` configure: unset, the embedded SmolLM2-135M-Instruct.

Figures per worker count (a warm-up reply per worker comes first and is not counted):
- throughput: replies / seconds from the first message to the last reply;
- time to reply: update pushed to the fake -> the reply's sendMessage received by the fake;
- queue wait: from the workers' recent-jobs records (accepted by the bot -> job started), and
  from update delivered to the bot by getUpdates -> job started;
- idle latency, with the first worker count only: messages sent one at a time to an idle
  worker, update delivered to the bot -> job started (target: median under 10 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import SecretStr
from redis.exceptions import RedisError

from joeybot import keys
from joeybot.config import RedisConnectionSettings, Settings, SettingsError, load_settings
from joeybot.redis_client import create_redis
from joeybot.testing import FakeTelegram, PushedUpdate
from joeybot.workers import list_workers, recent_jobs

logger = logging.getLogger("benchmarks.load")

REPO_ROOT = Path(__file__).resolve().parents[1]
IDLE_TARGET_S = 0.010
WORKER_START_TIMEOUT_S = 180.0
BOT_START_TIMEOUT_S = 60.0
REDIS_START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 30.0
# After a reply the worker still completes the job (history, records, unlock) before it
# polls the queue again, so an idle-latency message sent sooner would wait for that.
IDLE_PAUSE_S = 0.3
WARM_UP_ROUNDS = 5
LOG_TAIL_LINES = 20

# Chat ids: each group of messages gets its own chats, so histories never carry over.
WARM_UP_CHAT_BASE = 800_000
IDLE_CHAT_BASE = 900_000
LOAD_CHAT_BASE = 1_000_000

# tinyllama-15M (llama2.c "stories15M" in Hugging Face format), as in tests/conftest.py.
TINY_SHAPE = {
    "hidden_size": 288,
    "num_hidden_layers": 6,
    "num_attention_heads": 6,
    "num_key_value_heads": 6,
    "intermediate_size": 768,
    "vocab_size": 32000,
    "max_position_embeddings": 256,
}

PROMPTS = [
    "How you doin'?",
    "Joey, do you want to share my fries?",
    "What's your favourite sandwich?",
    "Can you teach me to act?",
    "Where is Chandler?",
    "Did you get the part in the play?",
    "Why can't you share food?",
    "What do you think of Ross's new girlfriend?",
]

T = TypeVar("T")


class BenchmarkError(RuntimeError):
    """Raised when a service fails to start or exits during the run."""


class Interrupted(Exception):
    """Raised at the next check after SIGINT or SIGTERM asked the benchmark to stop."""


@dataclass
class StopRequest:
    """The signal that asked the benchmark to stop, or None while it runs."""

    signum: int | None = None

    def check(self) -> None:
        if self.signum is not None:
            raise Interrupted(f"stopped by {signal.Signals(self.signum).name}")


# ----- options -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        choices=("tiny", "default"),
        default="tiny",
        help="tiny: a random tinyllama-15M-shaped model; default: the model that the MODEL_* "
        "settings configure (default tiny)",
    )
    parser.add_argument("--users", type=int, default=8, help="concurrent fake users (default 8)")
    parser.add_argument(
        "--messages", type=int, default=3, help="messages each user sends (default 3)"
    )
    parser.add_argument(
        "--think-s",
        type=float,
        default=1.0,
        help="pause of each user between a reply and its next message, in seconds (default 1)",
    )
    parser.add_argument(
        "--workers",
        default="1,2",
        help="comma-separated worker counts to measure, ascending (default 1,2)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        help="GENERATION_MAX_NEW_TOKENS for the workers (default: the configured value, 96 "
        "when unset)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads per worker, MODEL_THREADS (default 1, and 0 keeps torch's default)",
    )
    parser.add_argument(
        "--idle-samples",
        type=int,
        default=10,
        help="messages sent one at a time to one idle worker; 0 skips that figure (default 10)",
    )
    parser.add_argument(
        "--reply-timeout-s",
        type=float,
        default=120.0,
        help="maximum wait for one reply, in seconds (default 120)",
    )
    parser.add_argument(
        "--time-limit-s",
        type=float,
        default=900.0,
        help="maximum run time of the whole benchmark, in seconds (default 900)",
    )
    parser.add_argument(
        "--tokenizer-dir",
        type=Path,
        help="folder with the Llama 2 tokenizer.model for --model tiny "
        "(default: $JOEYBOT_SHARED_DIR/models/llama2-tokenizer, JOEYBOT_SHARED_DIR "
        "defaulting to ../shared)",
    )
    parser.add_argument(
        "--log-dir",
        type=Path,
        help="keep the bot, worker and redis-server logs in this folder (default: deleted)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    return parser


def parse_worker_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise ValueError(
            f"--workers must be comma-separated integers such as 1,2, got {text!r}"
        ) from exc
    if not counts or counts != sorted(set(counts)) or counts[0] < 1 or counts[-1] > 8:
        raise ValueError(f"--workers must be distinct ascending counts from 1 to 8, got {text!r}")
    return counts


def check_options(args: argparse.Namespace) -> list[str]:
    """Return one message per invalid option, or an empty list when all are valid."""
    problems = []
    if not 1 <= args.users <= 100:
        problems.append(f"--users must be 1 to 100, got {args.users}")
    if not 1 <= args.messages <= 50:
        problems.append(f"--messages must be 1 to 50, got {args.messages}")
    # Figures come from the recent-jobs list, which keeps only the newest RECENT_JOBS_MAX.
    if args.users * args.messages > keys.RECENT_JOBS_MAX:
        problems.append(
            f"--users x --messages must be at most {keys.RECENT_JOBS_MAX}, "
            f"got {args.users * args.messages}"
        )
    if not 0 <= args.idle_samples <= keys.RECENT_JOBS_MAX:
        problems.append(
            f"--idle-samples must be 0 to {keys.RECENT_JOBS_MAX}, got {args.idle_samples}"
        )
    if args.max_new_tokens is not None and not 1 <= args.max_new_tokens <= 4096:
        problems.append(f"--max-new-tokens must be 1 to 4096, got {args.max_new_tokens}")
    if not 0 <= args.think_s <= 60:
        problems.append(f"--think-s must be 0 to 60 seconds, got {args.think_s}")
    if args.threads < 0:
        problems.append(f"--threads must be 0 or more, got {args.threads}")
    if args.reply_timeout_s <= 0 or args.time_limit_s <= 0:
        problems.append("--reply-timeout-s and --time-limit-s must be positive")
    return problems


def default_tokenizer_dir() -> Path:
    shared = Path(os.environ.get("JOEYBOT_SHARED_DIR", REPO_ROOT.parent / "shared"))
    return shared / "models" / "llama2-tokenizer"


# ----- machine -----------------------------------------------------------------------------


def describe_machine() -> dict[str, Any]:
    """Return CPU, memory, OS and the versions of the programs that the figures depend on."""
    cpu = platform.processor() or platform.machine()
    memory_gib = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = round(int(line.split()[1]) / 1024**2, 1)
                break
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "memory_gib": memory_gib,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": _package_version("torch"),
        "aiogram": _package_version("aiogram"),
        "arq": _package_version("arq"),
        "redis_server": _redis_server_version(),
    }


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _redis_server_version() -> str | None:
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    output = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    # "Redis server v=7.0.15 sha=... malloc=... bits=64 build=..."
    return next((part[2:] for part in output.split() if part.startswith("v=")), output.strip())


def load_average() -> list[float]:
    """Return the 1, 5 and 15 minute load averages."""
    return [round(value, 2) for value in os.getloadavg()]


# ----- the tiny model ----------------------------------------------------------------------


def build_tiny_model(folder: Path, tokenizer_dir: Path) -> Path:
    """Save a random-weight LlamaForCausalLM of the tinyllama-15M shape to `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    vocab_file = tokenizer_dir / "tokenizer.model"
    if not vocab_file.is_file():
        raise BenchmarkError(
            f"{vocab_file} not found; pass --tokenizer-dir or set JOEYBOT_SHARED_DIR"
        )
    tokenizer = LlamaTokenizer(vocab_file=str(vocab_file))
    config = LlamaConfig(
        **TINY_SHAPE,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.set_num_threads(1)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ----- settings ----------------------------------------------------------------------------


def benchmark_settings(
    args: argparse.Namespace, redis_url: str, fake: FakeTelegram, model_dir: Path | None
) -> Settings:
    """Return the configured settings, pointed at this benchmark's services.

    The bot's per-chat and queue limits are raised so that no message gets a notice instead
    of a reply, and polling replaces any configured webhook.
    """
    settings = load_settings()
    model: dict[str, Any] = {"threads": args.threads}
    if model_dir is not None:
        model |= {"base": str(model_dir), "adapter": ""}
    generation: dict[str, Any] = {}
    if args.max_new_tokens is not None:
        generation["max_new_tokens"] = args.max_new_tokens
    changes = {
        "model": model,
        "generation": generation,
        "redis": {"url": redis_url},
        "telegram": {"api_url": fake.api_url},
        "bot": {
            "token": SecretStr(fake.token),
            "webhook_url": "",
            "allowed_user_ids": [],
            "messages_per_minute": 10_000,
            "max_pending_per_chat": 100,
            "max_queue_depth": 10_000,
        },
    }
    update = {}
    for name, values in changes.items():
        section = getattr(settings, name)
        update[name] = section.model_validate(section.model_dump() | values)
    return settings.model_copy(update=update)


def settings_environment(settings: Settings, threads: int) -> dict[str, str]:
    """Return this process's environment with every joeybot setting replaced by `settings`."""
    sections = set(Settings.model_fields)
    env = {
        name: value
        for name, value in os.environ.items()
        if name.split("_", 1)[0].lower() not in sections
    }
    for section_name in sections:
        section = getattr(settings, section_name)
        for field_name in type(section).model_fields:
            value = getattr(section, field_name)
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            elif isinstance(value, list):
                value = ",".join(str(item) for item in value)
            elif value is None:
                value = ""
            env[f"{section_name}_{field_name}".upper()] = str(value)
    env["PYTHONPATH"] = str(REPO_ROOT)
    env["LOG_LEVEL"] = "INFO"
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


# ----- services ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


class ServiceProcesses:
    """redis-server, the bot and the workers as subprocesses, each logging to its own file."""

    def __init__(self, folder: Path, log_dir: Path, stop_request: StopRequest) -> None:
        self.folder = folder
        self.log_dir = log_dir
        self.stop_request = stop_request
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}

    @property
    def worker_count(self) -> int:
        return sum(name.startswith("worker-") for name in self.processes)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("wb") as log:
            # A new session keeps Ctrl-C in the terminal away from the children, so they
            # stop in order when this script stops them.
            self.processes[name] = subprocess.Popen(
                argv,
                env=env,
                cwd=self.folder,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.logs[name] = log_path
        logger.info("started %s (pid %d), log %s", name, self.processes[name].pid, log_path)

    def start_joeybot(self, name: str, command: str, env: dict[str, str]) -> None:
        self.start(name, [sys.executable, "-m", "joeybot.cli", command], env)

    def check_running(self) -> None:
        """Raise Interrupted after a stop signal, or BenchmarkError naming the first process
        that has exited."""
        self.stop_request.check()
        for name, process in self.processes.items():
            status = process.poll()
            if status is not None:
                raise BenchmarkError(
                    f"{name} exited with status {status}; its log ends with:\n"
                    f"{log_tail(self.logs[name])}"
                )

    def log_tails(self) -> None:
        """Print the end of every process's log to stderr, to explain a failure."""
        for name, path in self.logs.items():
            print(f"--- {name} log, last lines ---\n{log_tail(path)}", file=sys.stderr)

    async def run_watched(self, work: Awaitable[T]) -> T:
        """Await `work`, but raise as `check_running` does within 0.2 s of an exit or a stop
        signal."""
        work_task = asyncio.ensure_future(work)
        watch_task = asyncio.create_task(self._watch())
        try:
            await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
            if watch_task.done():
                watch_task.result()  # raises BenchmarkError
            return work_task.result()
        finally:
            for task in (work_task, watch_task):
                task.cancel()
            await asyncio.gather(work_task, watch_task, return_exceptions=True)

    async def _watch(self) -> None:
        while True:
            self.check_running()
            await asyncio.sleep(0.2)

    async def stop_all(self) -> None:
        """Stop the bot and workers together, then redis-server: SIGTERM, then SIGKILL."""
        clients = [name for name in self.processes if name != "redis-server"]
        await asyncio.gather(
            *(asyncio.to_thread(self._stop, name, self.processes[name]) for name in clients)
        )
        if "redis-server" in self.processes:
            await asyncio.to_thread(self._stop, "redis-server", self.processes["redis-server"])
        self.processes.clear()

    def _stop(self, name: str, process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop within %.0f s; killing it", name, STOP_TIMEOUT_S)
                process.kill()
                process.wait()
        logger.info("stopped %s (status %s)", name, process.returncode)


async def start_redis(services: ServiceProcesses) -> str:
    """Start a private redis-server without persistence; return its URL once PING works."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchmarkError("redis-server not found; install it (apt-get install redis-server)")
    port = free_port()
    data_dir = services.folder / "redis"
    data_dir.mkdir()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    argv += ["--appendonly", "no", "--dir", str(data_dir)]
    services.start("redis-server", argv)
    url = f"redis://127.0.0.1:{port}/0"
    client = create_redis(RedisConnectionSettings(url=url, reconnect_for_s=0))
    try:
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        while True:
            with contextlib.suppress(RedisError, OSError):
                if await client.ping():
                    return url
            services.check_running()
            if time.monotonic() > deadline:
                raise BenchmarkError(
                    f"redis-server on port {port} did not reply to PING within "
                    f"{REDIS_START_TIMEOUT_S:.0f} s"
                )
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()


async def wait_for_workers(
    redis: Any, count: int, services: ServiceProcesses
) -> list[dict[str, Any]]:
    """Wait until `count` workers publish their presence; return their presence records."""
    deadline = time.monotonic() + WORKER_START_TIMEOUT_S
    while True:
        workers = await list_workers(redis)
        if len(workers) >= count:
            return workers
        services.check_running()
        if time.monotonic() > deadline:
            raise BenchmarkError(
                f"only {len(workers)} of {count} workers started within "
                f"{WORKER_START_TIMEOUT_S:.0f} s"
            )
        await asyncio.sleep(0.2)


# ----- users -------------------------------------------------------------------------------


@dataclass
class Sample:
    """One message and its timestamps, all in time.monotonic() seconds."""

    chat_id: int
    message_id: int
    update: PushedUpdate
    replied_at: float | None = None

    @property
    def job_id(self) -> str:
        return keys.reply_job_id(self.chat_id, self.message_id)

    @property
    def pushed_at(self) -> float:
        return self.update.pushed_at

    @property
    def delivered_at(self) -> float | None:
        """When getUpdates handed the update to the bot, the first time."""
        return self.update.delivered_at[0] if self.update.delivered_at else None


def send_message(fake: FakeTelegram, chat_id: int, text: str) -> Sample:
    update = fake.push_text(chat_id, text)
    pushed = fake.updates[-1]  # push_text appends it synchronously
    return Sample(chat_id, update["message"]["message_id"], pushed)


async def converse(
    fake: FakeTelegram,
    chat_id: int,
    messages: int,
    timeout_s: float,
    *,
    first_prompt: int = 0,
    think_s: float = 0.0,
) -> list[Sample]:
    """Act as one user: send a message, wait for the reply, pause `think_s`, send the next."""
    samples = []
    for index in range(messages):
        if index:
            await asyncio.sleep(think_s)
        text = PROMPTS[(first_prompt + index) % len(PROMPTS)]
        samples.append(send_message(fake, chat_id, text))
        await fake.wait_for_messages(chat_id, count=index + 1, timeout_s=timeout_s)
    return samples


def fill_reply_times(fake: FakeTelegram, samples: list[Sample]) -> None:
    """Set each sample's replied_at: its chat's n-th successful sendMessage for its n-th message.

    Each user waits for a reply before sending again, so the n-th message sent to a chat is the
    n-th reply, unless a reply was split into several messages (checked in `summarise_phase`).
    """
    by_chat: dict[int, list[Sample]] = {}
    for sample in samples:
        by_chat.setdefault(sample.chat_id, []).append(sample)
    for chat_id, chat_samples in by_chat.items():
        calls = fake.calls("sendMessage", ok=True, chat_id=chat_id)
        for sample, call in zip(chat_samples, calls, strict=False):
            sample.replied_at = call.received_at


# ----- figures -----------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """Return the q-th percentile with linear interpolation between ranks; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def wall_to_monotonic_offset() -> float:
    """Return time.time() - time.monotonic(), to convert the workers' time.time() records."""
    return time.time() - time.monotonic()


async def records_for(redis: Any, samples: list[Sample]) -> dict[str, dict[str, Any]]:
    wanted = {sample.job_id for sample in samples}
    return {
        record["job_id"]: record
        for record in await recent_jobs(redis)
        if record["job_id"] in wanted
    }


def queue_figures(
    samples: list[Sample], records: dict[str, dict[str, Any]]
) -> dict[str, list[float]]:
    """Return per-message delays in seconds: bot handling, queue wait and delivered -> started."""
    offset = wall_to_monotonic_offset()
    figures: dict[str, list[float]] = {"queue_wait": [], "delivered_to_started": [], "bot": []}
    for sample in samples:
        record = records.get(sample.job_id)
        if record is None or sample.delivered_at is None:
            continue
        started = record["started_at"] - offset
        accepted = record["enqueued_at"] - offset
        figures["queue_wait"].append(record["queue_wait_s"])
        figures["delivered_to_started"].append(started - sample.delivered_at)
        figures["bot"].append(accepted - sample.delivered_at)
    return figures


def summarise_phase(
    workers: int, samples: list[Sample], records: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    replied = [sample for sample in samples if sample.replied_at is not None]
    if not replied:
        raise BenchmarkError(f"no reply was recorded with {workers} worker(s)")
    times_to_reply = [sample.replied_at - sample.pushed_at for sample in replied]
    wall_s = max(s.replied_at for s in replied) - min(s.pushed_at for s in samples)
    queue = queue_figures(samples, records)
    sent = [record for record in records.values() if record["outcome"] == "sent"]
    outcomes = Counter(record["outcome"] for record in records.values())
    multipart = sum(record.get("parts", 1) > 1 for record in sent)
    if multipart:
        logger.warning(
            "%d replies were split into several messages; their time to reply is unreliable",
            multipart,
        )
    return {
        "workers": workers,
        "messages": len(samples),
        "replies": len(replied),
        "outcomes": dict(outcomes),
        "split_replies": multipart,
        "wall_s": round(wall_s, 3),
        "replies_per_s": round(len(replied) / wall_s, 3) if wall_s > 0 else None,
        "time_to_reply_s": {f"p{q}": rounded(percentile(times_to_reply, q)) for q in (50, 90, 99)},
        "queue_wait_s": {f"p{q}": rounded(percentile(queue["queue_wait"], q)) for q in (50, 90)},
        "delivered_to_started_s": {
            f"p{q}": rounded(percentile(queue["delivered_to_started"], q)) for q in (50, 90)
        },
        "new_tokens_mean": _mean([record["new_tokens"] for record in sent]),
        "job_duration_s_mean": _mean([record["duration_s"] for record in sent]),
        "replies_per_worker": sorted(Counter(record["worker_id"] for record in sent).values()),
    }


def summarise_idle(samples: list[Sample], records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    queue = queue_figures(samples, records)
    median = percentile(queue["delivered_to_started"], 50)
    return {
        "samples": len(queue["delivered_to_started"]),
        "delivered_to_started_ms": {
            "p50": _ms(median),
            "p90": _ms(percentile(queue["delivered_to_started"], 90)),
        },
        "delivered_to_accepted_ms_p50": _ms(percentile(queue["bot"], 50)),
        "accepted_to_started_ms_p50": _ms(percentile(queue["queue_wait"], 50)),
        "target_ms": IDLE_TARGET_S * 1000,
        "target_met": None if median is None else median < IDLE_TARGET_S,
    }


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 3) if values else None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


# ----- phases ------------------------------------------------------------------------------


async def warm_up(
    fake: FakeTelegram, redis: Any, worker_ids: list[str], phase: int, timeout_s: float
) -> bool:
    """Send messages until every worker has replied once; return False if one never did.

    A worker's first reply pays one-off costs (lazy initialisation in torch), which would
    otherwise land in the measured replies.
    """
    for round_index in range(WARM_UP_ROUNDS):
        done = {record["worker_id"] for record in await recent_jobs(redis)}
        if done.issuperset(worker_ids):
            return True
        base = WARM_UP_CHAT_BASE + (phase * WARM_UP_ROUNDS + round_index) * 10
        chats = [base + index for index in range(len(worker_ids))]
        await asyncio.gather(*(converse(fake, chat, 1, timeout_s) for chat in chats))
        await asyncio.sleep(IDLE_PAUSE_S)  # the records are written after the replies
    done = {record["worker_id"] for record in await recent_jobs(redis)}
    return done.issuperset(worker_ids)


async def measure_idle(
    fake: FakeTelegram, redis: Any, samples: int, timeout_s: float
) -> dict[str, Any]:
    """Send `samples` messages one at a time, each after the worker went idle again."""
    sent = []
    for index in range(samples):
        await asyncio.sleep(IDLE_PAUSE_S)
        sent += await converse(fake, IDLE_CHAT_BASE + index, 1, timeout_s, first_prompt=index)
    await asyncio.sleep(IDLE_PAUSE_S)
    return summarise_idle(sent, await records_for(redis, sent))


async def measure_load(
    fake: FakeTelegram, redis: Any, args: argparse.Namespace, workers: int
) -> dict[str, Any]:
    base = LOAD_CHAT_BASE * workers
    conversations = [
        converse(
            fake,
            base + user,
            args.messages,
            args.reply_timeout_s,
            first_prompt=user,
            think_s=args.think_s,
        )
        for user in range(args.users)
    ]
    samples = [sample for chat in await asyncio.gather(*conversations) for sample in chat]
    await asyncio.sleep(IDLE_PAUSE_S)
    fill_reply_times(fake, samples)
    return summarise_phase(workers, samples, await records_for(redis, samples))


# ----- the run -----------------------------------------------------------------------------


async def run_benchmark(
    args: argparse.Namespace, worker_counts: list[int], stop_request: StopRequest
) -> dict[str, Any]:
    report: dict[str, Any] = {
        "machine": describe_machine(),
        "load_average_start": load_average(),
    }
    async with contextlib.AsyncExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="joeybot-load-")))
        log_dir = args.log_dir or folder
        log_dir.mkdir(parents=True, exist_ok=True)
        fake = await stack.enter_async_context(FakeTelegram())
        services = ServiceProcesses(folder, log_dir, stop_request)
        # Entered after the fake, so the bot and workers stop while it still serves them.
        stack.push_async_callback(services.stop_all)
        try:
            await run_phases(args, worker_counts, fake, services, stack, report)
        except Exception as exc:
            if not isinstance(exc, BenchmarkError | Interrupted):
                services.log_tails()
            raise
    report["load_average_end"] = load_average()
    return report


async def run_phases(
    args: argparse.Namespace,
    worker_counts: list[int],
    fake: FakeTelegram,
    services: ServiceProcesses,
    stack: contextlib.AsyncExitStack,
    report: dict[str, Any],
) -> None:
    """Start redis-server, the bot and the workers, then measure each worker count."""
    model_dir = None
    if args.model == "tiny":
        tokenizer_dir = args.tokenizer_dir or default_tokenizer_dir()
        model_dir = await asyncio.to_thread(
            build_tiny_model, services.folder / "tiny-model", tokenizer_dir
        )
    redis_url = await start_redis(services)
    settings = benchmark_settings(args, redis_url, fake, model_dir)
    report["settings"] = describe_settings(args, settings)
    env = settings_environment(settings, args.threads)
    redis = create_redis(settings.redis)
    stack.push_async_callback(redis.aclose)

    services.start_joeybot("bot", "bot", env)
    await services.run_watched(fake.wait_for_calls("getUpdates", timeout_s=BOT_START_TIMEOUT_S))

    report["phases"] = []
    for phase, count in enumerate(worker_counts):
        while services.worker_count < count:
            services.start_joeybot(f"worker-{services.worker_count + 1}", "worker", env)
        workers = await wait_for_workers(redis, count, services)
        worker_ids = [worker["id"] for worker in workers]
        report.setdefault("loaded_model", describe_loaded_model(workers[0]["model"]))
        logger.info("%d worker(s) ready; warming up", count)
        warm = await services.run_watched(
            warm_up(fake, redis, worker_ids, phase, args.reply_timeout_s)
        )
        if not warm:
            logger.warning("not every worker replied during the warm-up")
        if phase == 0 and args.idle_samples:
            logger.info("measuring idle latency with %d message(s)", args.idle_samples)
            report["idle"] = await services.run_watched(
                measure_idle(fake, redis, args.idle_samples, args.reply_timeout_s)
            )
            report["idle"]["workers"] = count
        logger.info("%d users x %d messages with %d worker(s)", args.users, args.messages, count)
        figures = await services.run_watched(measure_load(fake, redis, args, count))
        figures["warmed_up"] = warm
        report["phases"].append(figures)


def describe_loaded_model(info: dict[str, Any]) -> dict[str, Any]:
    """Return what a worker reports it loaded: base, adapter, device, dtype, threads."""
    names = ("base", "adapter", "device", "dtype", "threads", "max_positions", "load_seconds")
    return {name: info.get(name) for name in names}


def describe_settings(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    return {
        "model": args.model,
        "base": "random tinyllama-15M shape"
        if args.model == "tiny"
        else settings.model.base or "embedded SmolLM2-135M-Instruct",
        "adapter": settings.model.adapter or None,
        "users": args.users,
        "messages_per_user": args.messages,
        "think_s": args.think_s,
        "max_new_tokens": settings.generation.max_new_tokens,
        "torch_threads_per_worker": args.threads or "torch default",
        "poll_delay_s": settings.worker.poll_delay_s,
        "max_jobs_per_worker": settings.worker.max_jobs,
    }


# ----- output ------------------------------------------------------------------------------


def print_report(report: dict[str, Any]) -> None:
    print_conditions(report)
    print()
    print_phases(report["phases"])
    if report.get("idle"):
        print()
        print_idle(report["idle"])


def print_conditions(report: dict[str, Any]) -> None:
    """Print the model, the load, the machine and its load average."""
    settings, machine = report["settings"], report["machine"]
    loaded = report["loaded_model"]
    base = settings["base"] if settings["model"] == "tiny" else loaded["base"]
    print(
        f"joeybot load benchmark: model {settings['model']} ({base}, adapter "
        f"{loaded['adapter'] or 'none'}, {loaded['device']} {loaded['dtype']}), "
        f"{settings['users']} users x {settings['messages_per_user']} messages "
        f"{settings['think_s']} s apart, "
        f"at most {settings['max_new_tokens']} new tokens, "
        f"{settings['torch_threads_per_worker']} torch thread(s) per worker"
    )
    print(
        f"machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, "
        f"{machine['memory_gib']} GiB, {machine['os']}, Python {machine['python']}, "
        f"torch {machine['torch']}, redis-server {machine['redis_server']}"
    )
    print(
        "load average (1, 5, 15 min): at start "
        + " ".join(map(str, report["load_average_start"]))
        + ", at end "
        + " ".join(map(str, report["load_average_end"]))
    )


def print_phases(phases: list[dict[str, Any]]) -> None:
    header = (
        f"{'workers':>7} {'replies':>7} {'wall s':>7} {'replies/s':>9} "
        f"{'reply p50':>9} {'p90':>6} {'p99 s':>6} {'wait p50':>8} {'p90 ms':>7} "
        f"{'deliv p50':>9} {'p90 ms':>7} {'tokens':>6} {'job s':>6}"
    )
    print(header)
    for phase in phases:
        reply, wait = phase["time_to_reply_s"], phase["queue_wait_s"]
        delivered = phase["delivered_to_started_s"]
        print(
            f"{phase['workers']:>7} {phase['replies']:>7} {phase['wall_s']:>7.2f} "
            f"{_fmt(phase['replies_per_s'], 9, 2)} {_fmt(reply['p50'], 9, 2)} "
            f"{_fmt(reply['p90'], 6, 2)} {_fmt(reply['p99'], 6, 2)} "
            f"{_fmt(_ms(wait['p50']), 8, 1)} {_fmt(_ms(wait['p90']), 7, 1)} "
            f"{_fmt(_ms(delivered['p50']), 9, 1)} {_fmt(_ms(delivered['p90']), 7, 1)} "
            f"{_fmt(phase['new_tokens_mean'], 6, 1)} {_fmt(phase['job_duration_s_mean'], 6, 2)}"
        )
    print(
        "reply: update pushed -> reply received by the fake Bot API; wait: accepted by the bot "
        "-> job started (worker records); deliv: update delivered to the bot -> job started; "
        "tokens and job s: means per reply"
    )


def print_idle(idle: dict[str, Any]) -> None:
    verdict = {True: "met", False: "missed", None: "no data"}[idle["target_met"]]
    print(
        f"idle worker, {idle['samples']} messages one at a time: update delivered to the bot "
        f"-> job started median {idle['delivered_to_started_ms']['p50']} ms "
        f"(p90 {idle['delivered_to_started_ms']['p90']} ms). Of that the bot took "
        f"{idle['delivered_to_accepted_ms_p50']} ms and the queue "
        f"{idle['accepted_to_started_ms_p50']} ms (medians). Target under "
        f"{idle['target_ms']:.0f} ms: {verdict}"
    )


def _fmt(value: float | None, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


# ----- entry point -------------------------------------------------------------------------


@contextlib.contextmanager
def handle_stop_signals(request: StopRequest, task: asyncio.Task[Any]) -> Iterator[None]:
    """Record SIGINT or SIGTERM in `request`, which the run checks every 0.2 s; a second
    signal cancels `task` at once. Either way the run stops everything it started."""
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if request.signum is None:
            logger.warning("%s received; stopping", signal.Signals(signum).name)
            request.signum = signum
        else:
            task.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        yield
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


async def main_async(args: argparse.Namespace, worker_counts: list[int]) -> dict[str, Any]:
    task = asyncio.current_task()
    assert task is not None
    request = StopRequest()
    with handle_stop_signals(request, task):
        async with asyncio.timeout(args.time_limit_s):
            return await run_benchmark(args, worker_counts, request)


def main() -> int:
    args = build_parser().parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    problems = check_options(args)
    try:
        worker_counts = parse_worker_counts(args.workers)
    except ValueError as exc:
        problems.append(str(exc))
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2

    try:
        report = asyncio.run(main_async(args, worker_counts))
    except Interrupted as exc:
        print(f"{exc}; every process it started was stopped", file=sys.stderr)
        return 130
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; every process it started was stopped", file=sys.stderr)
        return 130
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (BenchmarkError, TimeoutError) as exc:
        message = str(exc) or f"the benchmark ran past --time-limit-s ({args.time_limit_s:.0f} s)"
        print(f"error: {message}", file=sys.stderr)
        return 1

    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
