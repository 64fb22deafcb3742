"""Measure the default model: first and cached load, time to first token, tokens/s, memory.

Each load runs in a fresh Python process, so the figures include what an operator waits for
when a worker starts: imports excluded, model loading included. Run:

    python benchmarks/inference.py [--runs 5] [--new-tokens 64] [--threads 0] [--json out.json]

The first load uses an empty cache folder (the GGUF is dequantized and saved); the cached
loads reuse that folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PROMPTS = [
    "How you doin'?",
    "Joey, do you want to share my fries?",
    "What's your favourite sandwich?",
    "Can you teach me to act?",
    "Where is Chandler?",
]


def child(cache_dir: str, new_tokens: int, runs: int, threads: int, adapter: str) -> dict:
    """Load the model and generate; return figures for this process."""
    import resource
    import time

    import torch

    from joeybot.config import GenerationSettings, ModelSettings
    from joeybot.inference.generation import JoeyEngine
    from joeybot.inference.loading import load_model

    started = time.perf_counter()
    loaded = load_model(ModelSettings(cache_dir=Path(cache_dir), threads=threads, adapter=adapter))
    load_seconds = time.perf_counter() - started
    engine = JoeyEngine(loaded, GenerationSettings(max_new_tokens=new_tokens))
    replies = []
    for index in range(runs):
        # Greedy decoding with min length fixed by max_new_tokens would need EOS suppressed;
        # sampled replies of natural length are what users get, so those are timed.
        stream = engine.stream([], PROMPTS[index % len(PROMPTS)], seed=index)
        for _ in stream:
            pass
        replies.append(stream.result)
    fixed_speed = time_fixed_length(engine, new_tokens)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "fixed_tokens_per_s": fixed_speed,
        "load_s": load_seconds,
        "threads": torch.get_num_threads(),
        "ttft_s": [reply.first_token_seconds for reply in replies],
        "tokens_per_s": [reply.tokens_per_second for reply in replies],
        "new_tokens": [reply.new_tokens for reply in replies],
        "prompt_tokens": [reply.prompt_tokens for reply in replies],
        "peak_rss_mib": peak_mib,
    }


def time_fixed_length(engine, new_tokens: int) -> float:
    """Tokens/s for exactly `new_tokens` greedy tokens, prompt included (as llama.cpp reports)."""
    import time

    import torch

    prompt = engine.formatter.build([], PROMPTS[0], new_tokens)
    ids = torch.tensor([prompt.input_ids])
    started = time.perf_counter()
    with torch.inference_mode():
        engine.loaded.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
        )
    return new_tokens / (time.perf_counter() - started)


def run_child(cache_dir: str, new_tokens: int, runs: int, threads: int, adapter: str) -> dict:
    command = [
        sys.executable, __file__, "--child", cache_dir,
        "--new-tokens", str(new_tokens), "--runs", str(runs), "--threads", str(threads),
        "--adapter", adapter,
    ]  # fmt: skip
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def describe_machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="replies generated per process")
    parser.add_argument("--new-tokens", type=int, default=64, help="max new tokens per reply")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = default")
    parser.add_argument(
        "--adapter", default="auto", help="MODEL_ADAPTER value: auto (shipped), '' or a folder"
    )
    parser.add_argument("--cached-loads", type=int, default=3, help="cached load repeats")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(child(args.child, args.new_tokens, args.runs, args.threads, args.adapter)))
        return

    with tempfile.TemporaryDirectory(prefix="joeybot-bench-") as cache_dir:
        options = (args.threads, args.adapter)
        first = run_child(cache_dir, args.new_tokens, args.runs, *options)
        cached = [run_child(cache_dir, args.new_tokens, 1, *options)
                  for _ in range(args.cached_loads)]  # fmt: skip

    ttft = first["ttft_s"]
    speed = first["tokens_per_s"]
    figures = {
        "machine": describe_machine(),
        "torch_threads": first["threads"],
        "adapter": args.adapter or "(none)",
        "first_load_s": round(first["load_s"], 2),
        "cached_load_s_median": round(statistics.median(c["load_s"] for c in cached), 2),
        "ttft_s_median": round(statistics.median(ttft), 3),
        "tokens_per_s_median": round(statistics.median(speed), 1),
        "fixed_length_tokens_per_s": round(first["fixed_tokens_per_s"], 1),
        "new_tokens_mean": round(statistics.mean(first["new_tokens"]), 1),
        "prompt_tokens_mean": round(statistics.mean(first["prompt_tokens"]), 1),
        "peak_rss_mib_first_load": round(first["peak_rss_mib"]),
        "peak_rss_mib_cached_load": round(max(c["peak_rss_mib"] for c in cached)),
    }
    for key, value in figures.items():
        print(f"{key:28} {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
