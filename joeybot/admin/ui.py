"""The Gradio page: chat, side-by-side comparison, chat histories and the queue.

The handlers only translate between Gradio values and `AdminBackend`, which does the work.
Each browser tab keeps its own conversation and generation settings (Gradio state and
component values), so operators do not see each other's experiments.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import gradio as gr
from redis.exceptions import RedisError

from joeybot.admin.backend import AdminBackend, ReplyProgress, ReplyState
from joeybot.admin.protocol import ReplyRequest
from joeybot.admin.texts import TEXTS, language_from_header, text
from joeybot.config import GenerationSettings

logger = logging.getLogger(__name__)

# Each event may run this many times at once for the whole page. The handlers only wait on
# Redis, because the workers do the computing.
STREAM_CONCURRENCY = 16
QUEUE_REFRESH_S = 5.0
PENDING_REPLY = "…"
# Kinds of the requests that the Stop and Reset buttons record for a browser session.
CHAT_STOP = "chat-stop"
CHAT_RESET = "chat-reset"
COMPARE_STOP = "compare-stop"
# Starts the stats line that the chatbot shows under each finished reply.
STATS_MARK = "⏱"

CSS = """
#chat-status, #left-status, #right-status { min-height: 2.5em; }
"""


@dataclass
class SessionSettings:
    """The generation settings and persona of one browser tab."""

    custom: bool
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    max_new_tokens: int
    seed: float | None
    persona: str

    def options(self) -> dict[str, Any]:
        """Return the overrides to send: none when the tab uses the workers' settings."""
        if not self.custom:
            return {}
        return {
            "temperature": float(self.temperature),
            "top_p": float(self.top_p),
            "top_k": int(self.top_k),
            "repetition_penalty": float(self.repetition_penalty),
            "max_new_tokens": int(self.max_new_tokens),
            "seed": None if self.seed is None else int(self.seed),
        }

    def system_prompt(self) -> str | None:
        return self.persona.strip() or None


def build_i18n() -> gr.I18n:
    return gr.I18n(**TEXTS)


def language_of(request: gr.Request | None) -> str:
    headers = getattr(request, "headers", None) or {}
    return language_from_header(headers.get("accept-language"))


class AdminPage:
    """Event handlers of the page; `backend()` returns the AdminBackend of the running app.

    Stop and Reset do not use Gradio's `cancels`: a cancelled handler cannot send a last
    update, and an update already on its way could overwrite the result. They record a
    request for the browser session instead. The streaming handler checks for one after each
    update, closes the reply stream (which cancels the generation in the worker) and sends
    the final update itself. A closed tab still closes the handler through Gradio.
    """

    def __init__(self, backend: Callable[[], AdminBackend]) -> None:
        self.backend = backend
        # (Gradio session hash, CHAT_STOP | CHAT_RESET | COMPARE_STOP)
        self._requests: set[tuple[str, str]] = set()

    # ----- chat -------------------------------------------------------------------------------

    async def send(
        self,
        message: str,
        turns: list[dict[str, str]],
        use_adapter: bool,
        custom: bool,
        temperature: float,
        top_p: float,
        top_k: int,
        repetition_penalty: float,
        max_new_tokens: int,
        seed: float | None,
        persona: str,
        request: gr.Request,
    ) -> AsyncIterator[tuple[list[dict[str, str]], list[dict[str, str]], str, str]]:
        """Stream Joey's reply to `message`; yield (chatbot, turns state, textbox, status).

        The turns state contains {"role", "content"} dicts; a finished reply also has "stats",
        its status line, which the chatbot shows under the reply. Gradio passes a
        `gr.Request` only to a parameter it can see in the signature, so the settings are
        spelled out here instead of packed into *args.
        """
        language = language_of(request)
        turns = list(turns or [])
        if not message.strip():
            yield chat_display(turns), turns, message, text(language, "empty_message")
            return
        settings = SessionSettings(
            custom, temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed, persona
        )
        with_message = turns + [{"role": "user", "content": message}]
        reply_request = ReplyRequest(
            history=[{"role": turn["role"], "content": turn["content"]} for turn in turns],
            user_text=message,
            options=settings.options(),
            use_adapter=use_adapter,
            system_prompt=settings.system_prompt(),
        )
        pending = chat_display(with_message) + [_assistant(PENDING_REPLY)]
        yield pending, turns, "", text(language, "queued")
        session = request.session_hash or ""
        self._drop_requests(session, CHAT_STOP, CHAT_RESET)
        stopping = (session, CHAT_STOP, CHAT_RESET)
        async for progress in self._stream(reply_request, stopping):
            status = render_status(language, progress)
            if self._take_request(session, CHAT_RESET):
                yield self.reset_outputs()
            elif progress.state in (ReplyState.DONE, ReplyState.STOPPED):
                new_turns = with_message + [_assistant(progress.text) | {"stats": status}]
                yield chat_display(new_turns), new_turns, "", status
            elif progress.state is ReplyState.GENERATING:
                display = chat_display(with_message) + [_assistant(progress.text or PENDING_REPLY)]
                # The state keeps a partial reply too, so after Stop it matches the display.
                new_turns = with_message + [_assistant(progress.text)] if progress.text else turns
                yield display, new_turns, "", status
            elif progress.finished:
                # The request failed: drop the turn and give the message back for another try.
                yield chat_display(with_message), turns, message, status
            else:
                yield pending, turns, "", status

    def reset(self, request: gr.Request) -> tuple[list, list, str, str]:
        """Clear the conversation; a reply still streaming clears it again when it ends."""
        self._requests.add((request.session_hash or "", CHAT_RESET))
        return self.reset_outputs()

    @staticmethod
    def reset_outputs() -> tuple[list, list, str, str]:
        return [], [], "", ""

    def stop_chat(self, request: gr.Request) -> None:
        self._requests.add((request.session_hash or "", CHAT_STOP))

    def stop_compare(self, request: gr.Request) -> None:
        self._requests.add((request.session_hash or "", COMPARE_STOP))

    # ----- compare ----------------------------------------------------------------------------

    async def compare(
        self,
        prompt: str,
        custom: bool,
        temperature: float,
        top_p: float,
        top_k: int,
        repetition_penalty: float,
        max_new_tokens: int,
        seed: float | None,
        persona: str,
        request: gr.Request,
    ) -> AsyncIterator[tuple[str, str, str, str]]:
        """Stream the replies with and without the adapter, yielding both texts and statuses."""
        language = language_of(request)
        if not prompt.strip():
            yield "", "", text(language, "empty_message"), ""
            return
        settings = SessionSettings(
            custom, temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed, persona
        )
        reply_request = ReplyRequest(
            history=[],
            user_text=prompt,
            options=settings.options(),
            system_prompt=settings.system_prompt(),
        )
        session = request.session_hash or ""
        self._drop_requests(session, COMPARE_STOP)
        try:
            async with contextlib.aclosing(
                self.backend().stream_comparison(reply_request)
            ) as pairs:
                async for left, right in pairs:
                    if self._take_request(session, COMPARE_STOP):
                        left, right = _stopped(left), _stopped(right)
                    yield (
                        left.text,
                        right.text,
                        render_status(language, left),
                        render_status(language, right),
                    )
                    if left.finished and right.finished:
                        return
        except RedisError as exc:
            logger.warning("admin compare failed: Redis error: %s", exc)
            message = text(language, "redis_error", detail=exc)
            yield "", "", message, message

    # ----- chats ------------------------------------------------------------------------------

    async def look_up_chat(
        self, chat_id_text: str, request: gr.Request
    ) -> tuple[list[dict[str, str]], str]:
        language = language_of(request)
        chat_id = parse_chat_id(chat_id_text)
        if chat_id is None:
            return [], text(language, "chat_id_invalid")
        try:
            turns = await self.backend().load_chat(chat_id)
        except RedisError as exc:
            return [], text(language, "redis_error", detail=exc)
        messages = [{"role": turn.role, "content": turn.content} for turn in turns]
        if not messages:
            return [], text(language, "chat_empty", chat_id=chat_id)
        return messages, text(language, "chat_found", chat_id=chat_id, turns=len(messages))

    async def clear_chat(
        self, chat_id_text: str, request: gr.Request
    ) -> tuple[list[dict[str, str]], str]:
        language = language_of(request)
        chat_id = parse_chat_id(chat_id_text)
        if chat_id is None:
            return [], text(language, "chat_id_invalid")
        try:
            removed = await self.backend().clear_chat(chat_id)
        except RedisError as exc:
            return [], text(language, "redis_error", detail=exc)
        logger.info("admin user %s cleared chat %s (%d turns)", request.username, chat_id, removed)
        return [], text(language, "chat_cleared", chat_id=chat_id, turns=removed)

    # ----- queue ------------------------------------------------------------------------------

    async def queue_overview(self, request: gr.Request) -> tuple[str, dict, dict]:
        language = language_of(request)
        try:
            overview = await self.backend().queue_overview()
        except RedisError as exc:
            message = text(language, "redis_error", detail=exc)
            return message, workers_table(language, []), jobs_table(language, [])
        summary = text(
            language, "queue_summary", depth=overview.depth, workers=len(overview.workers)
        )
        return (
            summary,
            workers_table(language, overview.workers),
            jobs_table(language, overview.recent_jobs),
        )

    # ----- shared -----------------------------------------------------------------------------

    async def _stream(
        self, request: ReplyRequest, stopping: tuple[str, str, str]
    ) -> AsyncIterator[ReplyProgress]:
        """Yield the reply's progress until it is final or a request in `stopping` arrives.

        `stopping` is (session, stop kind, reset kind). Either request ends the stream with a
        STOPPED copy of the progress. A stop request is consumed here, but a reset request is
        left for the caller, which clears the conversation.
        """
        session, stop_kind, reset_kind = stopping
        try:
            async with contextlib.aclosing(self.backend().stream_reply(request)) as progresses:
                async for progress in progresses:
                    stop = self._take_request(session, stop_kind)
                    if stop or (session, reset_kind) in self._requests:
                        yield _stopped(progress)
                        return
                    yield progress
        except RedisError as exc:
            logger.warning("admin reply failed: Redis error: %s", exc)
            yield ReplyProgress(ReplyState.ERROR, error_code="redis", error=str(exc))

    def _take_request(self, session: str, kind: str) -> bool:
        """Consume a request of `kind` for the session; return whether there was one."""
        if (session, kind) in self._requests:
            self._requests.discard((session, kind))
            return True
        return False

    def _drop_requests(self, session: str, *kinds: str) -> None:
        """Forget requests made while nothing was running, so they do not stop the next one."""
        for kind in kinds:
            self._requests.discard((session, kind))


def render_status(language: str, progress: ReplyProgress) -> str:
    """Return the status line under a reply: what is happening, or the reply's stats."""
    state = progress.state
    if state is ReplyState.NO_WORKERS:
        return text(language, "no_workers")
    if state is ReplyState.QUEUED:
        if progress.jobs_ahead:
            return text(language, "queued_behind", jobs=progress.jobs_ahead)
        return text(language, "queued")
    if state is ReplyState.TIMED_OUT:
        return text(language, "timed_out")
    if state is ReplyState.ERROR:
        return render_error(language, progress)
    if state is ReplyState.GENERATING:
        return text(language, "generating", worker=progress.stats.get("worker", "?"))
    parts = render_stats(language, progress.stats)
    if state is ReplyState.STOPPED:
        parts.insert(0, text(language, "stopped"))
    return " · ".join(parts)


def _stopped(progress: ReplyProgress) -> ReplyProgress:
    """Return a running reply's progress marked as stopped; a finished one stays as it is."""
    if progress.finished:
        return progress
    return replace(progress, state=ReplyState.STOPPED, stats={})


def chat_display(turns: list[dict[str, str]]) -> list[dict[str, str]]:
    """Return chatbot messages for the turns, with each reply's stats line below its text."""
    messages = []
    for turn in turns:
        content = turn["content"]
        if turn.get("stats"):
            content = f"{content}\n\n{STATS_MARK} {turn['stats']}"
        messages.append({"role": turn["role"], "content": content})
    return messages


def render_error(language: str, progress: ReplyProgress) -> str:
    key = {
        "invalid_options": "error_invalid_options",
        "no_engine": "error_no_engine",
        "worker_lost": "error_worker_lost",
        "generation_failed": "error_generation_failed",
        "redis": "redis_error",
    }.get(progress.error_code, "error")
    return text(language, key, detail=progress.error)


def render_stats(language: str, stats: dict[str, Any]) -> list[str]:
    """Return the stats of a finished or stopped reply as short phrases."""
    parts: list[str] = []
    if stats.get("first_token_s") is not None:
        parts.append(text(language, "stat_first_token", seconds=_seconds(stats["first_token_s"])))
    if stats.get("tokens_per_s") is not None:
        parts.append(text(language, "stat_speed", rate=f"{stats['tokens_per_s']:.1f}"))
    if stats.get("new_tokens") is not None:
        parts.append(
            text(language, "stat_tokens", prompt=stats["prompt_tokens"], new=stats["new_tokens"])
        )
    if stats.get("seconds") is not None:
        parts.append(text(language, "stat_total", seconds=_seconds(stats["seconds"])))

    if stats.get("queue_s") is not None:
        parts.append(text(language, "stat_queue", seconds=_seconds(stats["queue_s"])))
    if stats.get("first_piece_after_request_s") is not None:
        seconds = _seconds(stats["first_piece_after_request_s"])
        parts.append(text(language, "stat_request_to_text", seconds=seconds))

    if not stats.get("has_adapter", True):
        parts.append(text(language, "stat_no_adapter"))
    elif "use_adapter" in stats:
        key = "stat_adapter_on" if stats["use_adapter"] else "stat_adapter_off"
        parts.append(text(language, key))
    if stats.get("hit_token_limit"):
        parts.append(text(language, "stat_token_limit"))
    if stats.get("fallback"):
        parts.append(text(language, "stat_fallback"))

    if stats.get("seed") is not None:
        parts.append(text(language, "stat_seed", seed=stats["seed"]))
    if stats.get("worker"):
        parts.append(text(language, "stat_worker", worker=stats["worker"]))
    return parts


def parse_chat_id(value: str | float | None) -> int | None:
    """Return the chat id as an int, or None when the input is not an integer."""
    try:
        return int(str(value).strip())
    except ValueError:
        return None


def workers_table(language: str, workers: list[dict[str, Any]]) -> dict[str, list]:
    """Return the live workers as a Gradio Dataframe value: headers and rows."""
    rows = [
        [
            worker.get("id", ""),
            worker.get("host", ""),
            worker.get("pid", ""),
            _timestamp(worker.get("started")),
            worker.get("jobs_done", ""),
            _model_name(worker.get("model")),
        ]
        for worker in workers
    ]
    return {"headers": _columns(language, _WORKER_COLUMNS), "data": rows}


def jobs_table(language: str, jobs: list[dict[str, Any]]) -> dict[str, list]:
    """Return job records, newest first, as a Gradio Dataframe value: headers and rows."""
    rows = [
        [
            _timestamp(job.get("finished_at")),
            job.get("job_id", ""),
            job.get("kind", ""),
            "" if job.get("chat_id") is None else job["chat_id"],
            _rounded(job.get("queue_wait_s")),
            _rounded(job.get("duration_s")),
            "" if job.get("new_tokens") is None else job["new_tokens"],
            job.get("outcome", ""),
        ]
        for job in jobs
    ]
    return {"headers": _columns(language, _JOB_COLUMNS), "data": rows}


_WORKER_COLUMNS = ("col_worker", "col_host", "col_pid", "col_started", "col_jobs_done", "col_model")
_JOB_COLUMNS = (
    "col_finished",
    "col_job",
    "col_kind",
    "col_chat",
    "col_queue_wait",
    "col_duration",
    "col_tokens",
    "col_outcome",
)


def _columns(language: str, keys: tuple[str, ...]) -> list[str]:
    return [text(language, key) for key in keys]


def _assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


def _seconds(value: float) -> str:
    return f"{value:.2f}"


def _rounded(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, int | float):
        return round(value, 2)
    return value


def _timestamp(value: Any) -> str:
    """Format a Unix time or an ISO string as UTC `YYYY-MM-DD HH:MM:SS`."""
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S")
    return "" if value is None else str(value)


def _model_name(model: Any) -> str:
    if isinstance(model, dict):
        base = model.get("base", "")
        adapter = model.get("adapter", "")
        return f"{base} + {adapter}" if adapter else str(base)
    return "" if model is None else str(model)


def build_blocks(page: AdminPage, defaults: GenerationSettings) -> gr.Blocks:
    """Lay out the page and wire its events to `page`'s handlers."""
    i18n = build_i18n()
    with gr.Blocks(title="Joey admin", analytics_enabled=False) as blocks:
        with gr.Row():
            gr.Markdown(f"## {i18n('title')}")
            gr.Button(i18n("logout"), link="/logout", size="sm", scale=0, elem_id="logout")
        settings_inputs = _build_settings(i18n, defaults)
        with gr.Tabs():
            with gr.Tab(i18n("tab_chat"), id="chat") as chat_tab:
                _build_chat(page, i18n, settings_inputs)
            with gr.Tab(i18n("tab_compare"), id="compare") as compare_tab:
                _build_compare(page, i18n, settings_inputs)
            with gr.Tab(i18n("tab_chats"), id="chats") as chats_tab:
                _build_chats(page, i18n)
            with gr.Tab(i18n("tab_queue"), id="queue") as queue_tab:
                timer = _build_queue(page, i18n, queue_tab)
        for tab in (chat_tab, compare_tab, chats_tab):
            tab.select(lambda: gr.Timer(active=False), outputs=timer)
    blocks.queue(default_concurrency_limit=STREAM_CONCURRENCY, api_open=False)
    return blocks


def _build_settings(i18n: gr.I18n, defaults: GenerationSettings) -> list[gr.components.Component]:
    with gr.Accordion(i18n("settings"), open=False, elem_id="settings"):
        custom = gr.Checkbox(
            False, label=i18n("custom_settings"), info=i18n("custom_settings_info")
        )
        with gr.Row():
            temperature = gr.Slider(
                0.0, 2.0, defaults.temperature, step=0.05, label=i18n("temperature")
            )
            top_p = gr.Slider(0.05, 1.0, defaults.top_p, step=0.05, label=i18n("top_p"))
            top_k = gr.Slider(0, 200, defaults.top_k, step=1, label=i18n("top_k"))
        with gr.Row():
            repetition_penalty = gr.Slider(
                1.0, 2.0, defaults.repetition_penalty, step=0.01, label=i18n("repetition_penalty")
            )
            max_new_tokens = gr.Slider(
                1, 1024, defaults.max_new_tokens, step=1, label=i18n("max_new_tokens")
            )
            seed = gr.Number(defaults.seed, precision=0, label=i18n("seed"), info=i18n("seed_info"))
        persona = gr.Textbox(
            "", lines=4, label=i18n("persona"), placeholder=i18n("persona_placeholder")
        )
    return [custom, temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed, persona]


def _build_chat(page: AdminPage, i18n: gr.I18n, settings_inputs: list) -> None:
    turns = gr.State([])
    chatbot = gr.Chatbot(
        label=i18n("conversation"),
        render_markdown=False,
        height=420,
        buttons=["copy", "copy_all"],
        elem_id="chatbot",
    )
    status = gr.Markdown("", elem_id="chat-status")
    with gr.Row():
        message = gr.Textbox(
            label=i18n("message"),
            placeholder=i18n("message_placeholder"),
            scale=4,
            elem_id="message",
        )
        use_adapter = gr.Checkbox(True, label=i18n("use_adapter"), scale=1)
    with gr.Row():
        send = gr.Button(i18n("send"), variant="primary", elem_id="send")
        stop = gr.Button(i18n("stop"), variant="stop", elem_id="stop")
        reset = gr.Button(i18n("reset"), elem_id="reset")
    inputs = [message, turns, use_adapter, *settings_inputs]
    outputs = [chatbot, turns, message, status]
    send.click(page.send, inputs, outputs, show_progress="hidden")
    message.submit(page.send, inputs, outputs, show_progress="hidden")
    stop.click(page.stop_chat, None, None)
    reset.click(page.reset, None, outputs)
    # The chatbot's own trash button clears only what it shows; forget the turns too.
    chatbot.clear(page.reset, None, outputs)


def _build_compare(page: AdminPage, i18n: gr.I18n, settings_inputs: list) -> None:
    gr.Markdown(i18n("compare_info"))
    prompt = gr.Textbox(label=i18n("compare_prompt"), elem_id="compare-prompt")
    with gr.Row():
        run = gr.Button(i18n("compare_button"), variant="primary", elem_id="compare")
        stop = gr.Button(i18n("stop"), variant="stop", elem_id="compare-stop")
    with gr.Row():
        with gr.Column():
            left = gr.Textbox(
                label=i18n("with_adapter"), lines=8, interactive=False, elem_id="left-answer"
            )
            left_status = gr.Markdown("", elem_id="left-status")
        with gr.Column():
            right = gr.Textbox(
                label=i18n("without_adapter"), lines=8, interactive=False, elem_id="right-answer"
            )
            right_status = gr.Markdown("", elem_id="right-status")
    outputs = [left, right, left_status, right_status]
    run.click(page.compare, [prompt, *settings_inputs], outputs, show_progress="hidden")
    prompt.submit(page.compare, [prompt, *settings_inputs], outputs, show_progress="hidden")
    stop.click(page.stop_compare, None, None)


def _build_chats(page: AdminPage, i18n: gr.I18n) -> None:
    with gr.Row():
        chat_id = gr.Textbox(label=i18n("chat_id"), scale=3, elem_id="chat-id")
        look_up = gr.Button(i18n("look_up"), scale=1, elem_id="look-up")
        clear = gr.Button(i18n("clear_history"), variant="stop", scale=1, elem_id="clear-history")
    status = gr.Markdown("", elem_id="chats-status")
    history = gr.Chatbot(
        label=i18n("chat_history"),
        render_markdown=False,
        height=360,
        buttons=["copy", "copy_all"],
        elem_id="chat-history",
    )
    look_up.click(page.look_up_chat, chat_id, [history, status])
    chat_id.submit(page.look_up_chat, chat_id, [history, status])
    clear.click(page.clear_chat, chat_id, [history, status])


def _build_queue(page: AdminPage, i18n: gr.I18n, tab: gr.Tab) -> gr.Timer:
    summary = gr.Markdown("", elem_id="queue-summary")
    refresh = gr.Button(i18n("refresh"), size="sm", elem_id="queue-refresh")
    workers = gr.Dataframe(label=i18n("workers"), interactive=False, elem_id="workers")
    jobs = gr.Dataframe(label=i18n("recent_jobs"), interactive=False, elem_id="recent-jobs")
    timer = gr.Timer(QUEUE_REFRESH_S, active=False)
    outputs = [summary, workers, jobs]
    refresh.click(page.queue_overview, None, outputs)
    timer.tick(page.queue_overview, None, outputs, show_progress="hidden")
    # The queue refreshes itself only while its tab is open.
    tab.select(page.queue_overview, None, outputs)
    tab.select(lambda: gr.Timer(active=True), outputs=timer)
    return timer
