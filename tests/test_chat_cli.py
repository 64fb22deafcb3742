"""`joeybot chat` as a user runs it: a subprocess with settings from the environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_joeybot(
    args: list[str], env: dict[str, str], stdin: str = ""
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "joeybot.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=os.environ | {"OMP_NUM_THREADS": "1"} | env,
        timeout=300,
    )


def test_chat_message_prints_reply(tiny_llama_dir: Path, tiny_adapter_dir: Path) -> None:
    result = run_joeybot(
        ["chat", "--message", "How you doin'?", "--adapter", str(tiny_adapter_dir)],
        {"MODEL_BASE": str(tiny_llama_dir), "GENERATION_MAX_NEW_TOKENS": "8"},
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "model ready" in result.stderr


def test_chat_interactive_reset(tiny_llama_dir: Path) -> None:
    result = run_joeybot(
        ["chat", "--base", str(tiny_llama_dir), "--max-new-tokens", "4"],
        {},
        stdin="hello\n/reset\nagain\n/quit\n",
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.count("joey> ") == 2
    assert "(history cleared)" in result.stdout


def test_invalid_setting_named(tiny_llama_dir: Path) -> None:
    result = run_joeybot(
        ["chat", "--message", "hi"],
        {"MODEL_BASE": str(tiny_llama_dir), "GENERATION_TEMPERATURE": "hot"},
    )

    assert result.returncode == 2
    assert "GENERATION_TEMPERATURE='hot'" in result.stderr


def test_missing_base_named(tmp_path: Path) -> None:
    missing = tmp_path / "missing.gguf"
    result = run_joeybot(["chat", "--message", "hi"], {"MODEL_BASE": str(missing)})

    assert result.returncode == 1
    assert f"MODEL_BASE file not found: {missing}" in result.stderr
