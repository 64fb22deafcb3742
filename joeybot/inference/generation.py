"""Generate Joey's replies: blocking and streaming, thread-safe, never empty."""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
import unicodedata
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from joeybot.config import GenerationSettings
from joeybot.inference.loading import LoadedModel
from joeybot.inference.prompts import Prompt, PromptFormatter, Turn

logger = logging.getLogger(__name__)

MAX_SEED = 2**32 - 1
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>\Z")
# Letters that render as blank space (Hangul fillers, the blank Braille pattern).
_BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")
# Said when the model returns nothing usable twice in a row.
FALLBACK_REPLY = "Whoa, I totally blanked there. Say that again?"
_OVERRIDABLE = frozenset(GenerationSettings.model_fields) - {"system_prompt"}


@dataclass
class Reply:
    """Joey's reply and what it cost."""

    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float
    first_token_seconds: float | None = None
    hit_token_limit: bool = False
    fallback: bool = False
    regenerated: bool = False

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


class _StopWhen(StoppingCriteria):
    """Stop when the consumer leaves or the reply reaches another speaker's line."""

    def __init__(self, engine: JoeyEngine, prompt_length: int, cancel: threading.Event) -> None:
        self.engine = engine
        self.prompt_length = prompt_length
        self.cancel = cancel

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any):
        done = self.cancel.is_set()
        if not done:
            text = self.engine.decode(input_ids[0, self.prompt_length :].tolist())
            done = self.engine.formatter.reply_cut_position(text) < len(text)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class _QueueStreamer(BaseStreamer):
    """Hand each new token id from the generation thread to the consumer."""

    def __init__(self, sink: queue.Queue) -> None:
        self.sink = sink
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first passes the prompt itself
            self.prompt_seen = True
            return
        self.sink.put(("tokens", value.reshape(-1).tolist()))

    def end(self) -> None:
        self.sink.put(("end", None))


class JoeyEngine:
    """Generate replies with one loaded model; safe to call from several threads.

    A lock serializes generation on the model, because switching the adapter off for one call
    and the seeded global RNG are shared state. On a CPU the calls would compete for the same
    cores anyway; more throughput comes from more worker processes.
    """

    def __init__(self, loaded: LoadedModel, settings: GenerationSettings) -> None:
        self.loaded = loaded
        self.settings = settings
        self.formatter = PromptFormatter(
            loaded.tokenizer, settings.system_prompt, loaded.max_positions
        )
        self._lock = threading.Lock()
        self._device = next(loaded.model.parameters()).device
        self.byte_token_ids = byte_fallback_ids(loaded.tokenizer)

    # ----- public API -------------------------------------------------------------------------

    def reply(
        self,
        history: Sequence[Turn],
        user_text: str,
        *,
        use_adapter: bool = True,
        system_prompt: str | None = None,
        **overrides: Any,
    ) -> Reply:
        """Generate Joey's reply to `user_text` after `history` and wait for it."""
        pieces = self.stream(
            history, user_text, use_adapter=use_adapter, system_prompt=system_prompt, **overrides
        )
        for _ in pieces:
            pass
        return pieces.result

    def stream(
        self,
        history: Sequence[Turn],
        user_text: str,
        *,
        use_adapter: bool = True,
        system_prompt: str | None = None,
        **overrides: Any,
    ) -> ReplyStream:
        """Start generating and return an iterator of text pieces of the reply.

        The pieces concatenate to `ReplyStream.result.text`. Closing the iterator early (or
        leaving a `for` loop) stops the generation thread.
        """
        options = self.options(**overrides)
        formatter = self._formatter_for(system_prompt)
        prompt = formatter.build(history, user_text, options.max_new_tokens)
        return ReplyStream(self, formatter, prompt, options, use_adapter)

    def options(self, **overrides: Any) -> GenerationSettings:
        """Return the default sampling settings with per-call overrides applied and checked."""
        unknown = set(overrides) - _OVERRIDABLE
        if unknown:
            raise TypeError(f"unknown generation options: {sorted(unknown)}")
        present = {key: value for key, value in overrides.items() if value is not None}
        if not present:
            return self.settings
        return GenerationSettings.model_validate(self.settings.model_dump() | present)

    def decode(self, ids: Sequence[int]) -> str:
        return self.loaded.tokenizer.decode(ids, skip_special_tokens=True)

    # ----- internals --------------------------------------------------------------------------

    def _formatter_for(self, system_prompt: str | None) -> PromptFormatter:
        if system_prompt is None or system_prompt.strip() == self.formatter.system_prompt:
            return self.formatter
        return PromptFormatter(self.loaded.tokenizer, system_prompt, self.loaded.max_positions)

    def _generate(
        self,
        prompt: Prompt,
        options: GenerationSettings,
        use_adapter: bool,
        streamer: BaseStreamer,
        cancel: threading.Event,
        formatter: PromptFormatter,
    ) -> torch.Tensor:
        input_ids = torch.tensor([prompt.input_ids], device=self._device)
        kwargs = self._sampling_kwargs(options)
        stop = _StopWhen(self, len(prompt.input_ids), cancel)
        with self._lock, torch.inference_mode(), self._adapter_context(use_adapter):
            if options.seed is not None:
                torch.manual_seed(options.seed)
            return self.loaded.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=prompt.max_new_tokens,
                eos_token_id=formatter.stop_token_ids,
                pad_token_id=self.loaded.tokenizer.pad_token_id,
                stopping_criteria=StoppingCriteriaList([stop]),
                streamer=streamer,
                **kwargs,
            )

    def _adapter_context(self, use_adapter: bool):
        if use_adapter or not self.loaded.has_adapter:
            return nullcontext()
        return self.loaded.model.disable_adapter()

    @staticmethod
    def _sampling_kwargs(options: GenerationSettings) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"repetition_penalty": options.repetition_penalty}
        if options.temperature <= 0:
            kwargs["do_sample"] = False
            kwargs.update(temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(
                do_sample=True,
                temperature=options.temperature,
                top_p=options.top_p,
                top_k=options.top_k or None,
            )
        return kwargs


class ReplyStream:
    """Iterator of reply text pieces; `result` is the final Reply once it is exhausted.

    Stop early with `close()` from the consuming thread, `cancel()` from any thread, or by
    using the stream as a context manager. Merely leaving a `for` loop does not stop the
    generation thread while the stream object is still referenced.
    """

    def __init__(
        self,
        engine: JoeyEngine,
        formatter: PromptFormatter,
        prompt: Prompt,
        options: GenerationSettings,
        use_adapter: bool,
    ) -> None:
        self.engine = engine
        self.formatter = formatter
        self.prompt = prompt
        self.options = options
        self.use_adapter = use_adapter
        self.result: Reply | None = None
        self._cancel = threading.Event()
        self._pieces = self._run()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def __enter__(self) -> ReplyStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop generation early and wait for its thread; call from the consuming thread."""
        self._cancel.set()
        self._pieces.close()

    def cancel(self) -> None:
        """Ask generation to stop after its current token; safe from any thread."""
        self._cancel.set()

    def _run(self) -> Iterator[str]:
        started = time.perf_counter()
        text, ids, first_token = yield from self._attempt(self.options)
        regenerated = fallback = False
        if not has_visible_text(text) and not self._cancel.is_set():
            logger.warning("empty reply after %d new tokens; generating once more", len(ids))
            regenerated = True
            extra, ids, _ = yield from self._attempt(self._retry_options())
            text += extra
        if not has_visible_text(text) and not self._cancel.is_set():
            logger.warning("empty reply twice; sending the fallback line")
            fallback = True
            # Invisible characters already streamed stay in front; the reply text must be
            # exactly what the consumer received.
            yield FALLBACK_REPLY
            text += FALLBACK_REPLY
        self.result = Reply(
            text=text,
            prompt_tokens=len(self.prompt.input_ids),
            new_tokens=len(ids),
            seconds=time.perf_counter() - started,
            first_token_seconds=first_token,
            hit_token_limit=len(ids) >= self.prompt.max_new_tokens,
            fallback=fallback,
            regenerated=regenerated,
        )

    def _retry_options(self) -> GenerationSettings:
        values = self.options.model_dump()
        values["temperature"] = max(values["temperature"], 0.8)
        if values["seed"] is not None:
            values["seed"] = (values["seed"] + 1) % (MAX_SEED + 1)
        return GenerationSettings.model_validate(values)

    def _attempt(self, options: GenerationSettings):
        """Run one generation in a thread; yield stable text pieces; return (text, ids, ttft).

        The returned text is always the concatenation of the pieces yielded.
        """
        sink: queue.Queue = queue.Queue()
        cancel = self._cancel
        thread = threading.Thread(
            target=_generate_into,
            args=(self.engine, self.prompt, options, self.use_adapter, self.formatter, sink),
            kwargs={"cancel": cancel},
            name="joeybot-generate",
            daemon=True,
        )
        started = time.perf_counter()
        thread.start()
        ids: list[int] = []
        emitted = ""
        first_token: float | None = None
        failure: BaseException | None = None
        finished = False
        try:
            while True:
                kind, value = sink.get()
                if kind == "error":
                    failure = value
                    continue
                if kind == "end":
                    finished = True
                    break
                if first_token is None:
                    first_token = time.perf_counter() - started
                ids += value
                stable = self._stable_text(ids)
                if len(stable) > len(emitted) and stable.startswith(emitted):
                    yield stable[len(emitted) :]
                    emitted = stable
        finally:
            if not finished:  # the consumer left early or raised: stop generating
                cancel.set()
            thread.join()
        if failure is not None:
            raise failure
        text = self.formatter.clean_reply(self.engine.decode(ids))
        if not text.startswith(emitted):
            # The decoded text changed under text already streamed. Held-back byte tokens
            # should prevent that, but the reply must still equal what the consumer received.
            logger.warning("streamed text and final reply differ; keeping the streamed text")
            return emitted, ids, first_token
        if len(text) > len(emitted):
            yield text[len(emitted) :]
        return text, ids, first_token

    def _stable_text(self, ids: list[int]) -> str:
        """Stable reply prefix, ignoring trailing byte tokens whose character is unfinished."""
        end = len(ids)
        byte_ids = self.engine.byte_token_ids
        while end and ids[end - 1] in byte_ids:
            end -= 1
        return self.formatter.stable_reply_prefix(self.engine.decode(ids[:end]))


def _generate_into(
    engine: JoeyEngine,
    prompt: Prompt,
    options: GenerationSettings,
    use_adapter: bool,
    formatter: PromptFormatter,
    sink: queue.Queue,
    cancel: threading.Event,
) -> None:
    """Thread body: generate and pass token ids, then an error if one occurred, then the end.

    It holds no reference to the ReplyStream, so an abandoned stream can be collected, and
    collecting it closes the generator, which sets `cancel`.
    """
    try:
        engine._generate(prompt, options, use_adapter, _QueueStreamer(sink), cancel, formatter)
    except BaseException as exc:  # handed to the consumer, which re-raises it
        sink.put(("error", exc))
        sink.put(("end", None))


def byte_fallback_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of SentencePiece byte tokens (`<0x41>`): a character may need several of them."""
    vocabulary = tokenizer.get_vocab()
    return frozenset(token_id for token, token_id in vocabulary.items() if _BYTE_TOKEN.match(token))


def has_visible_text(text: str) -> bool:
    """True when `text` has a character that shows on screen (not only blanks or format marks)."""
    return any(
        unicodedata.category(char)[0] not in "CZ" and char not in _BLANK_LETTERS for char in text
    )
