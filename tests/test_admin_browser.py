"""The admin page in headless Chromium: log in, stream a reply, compare, switch language.

Needs Debian's Chromium at /usr/bin/chromium (`apt install chromium`) and Playwright for
Python. Playwright never downloads a browser here. The page, the worker and Redis all run
on 127.0.0.1. The browser aborts every request to another host, and the tests fail if the
page makes one. Screenshots go to test-output/.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from joeybot.admin.server import build_app
from joeybot.config import GenerationSettings, ModelSettings, Settings
from joeybot.history import HistoryStore
from joeybot.inference.generation import JoeyEngine
from joeybot.inference.loading import load_model
from joeybot.redis_client import create_redis
from joeybot.workers import recent_jobs

from .admin_support import RedisServer, WorkerThread, free_port, serving
from .conftest import build_lora_adapter, build_tiny_llama

sync_api = pytest.importorskip("playwright.sync_api")

T = TypeVar("T")
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
OUTPUT_DIR = Path(__file__).resolve().parents[1] / "test-output"
USERNAME = "operator"
PASSWORD = "browser-test-password"
REPLY_TIMEOUT_MS = 60_000
REPLY_TOKENS = 300

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Chromium at /usr/bin/chromium (apt install chromium)"
)

SOME_REPLY_TEXT = "window.botTexts.some(text => text.length > 5)"

# Records every distinct text of the newest bot message as the page updates it.
WATCH_BOT_MESSAGE = """
() => {
  window.botTexts = [];
  const chatbot = document.querySelector('#chatbot');
  const record = () => {
    const messages = chatbot.querySelectorAll('[data-testid="bot"]');
    if (!messages.length) return;
    const text = messages[messages.length - 1].innerText;
    if (window.botTexts[window.botTexts.length - 1] !== text) window.botTexts.push(text);
  };
  new MutationObserver(record).observe(
    chatbot, {subtree: true, childList: true, characterData: true}
  );
}
"""


@dataclass(frozen=True)
class Site:
    url: str
    settings: Settings


@pytest.fixture(scope="module")
def long_context_model(
    tmp_path_factory: pytest.TempPathFactory, llama2_tokenizer_dir: Path
) -> tuple[Path, Path]:
    """A tiny model with 1024 positions and its adapter: room for replies that take seconds."""
    folder = tmp_path_factory.mktemp("long-tiny-llama")
    base = build_tiny_llama(folder, llama2_tokenizer_dir, max_position_embeddings=1024)
    return base, build_lora_adapter(base, tmp_path_factory.mktemp("long-tiny-adapter"))


@pytest.fixture(scope="module")
def site(
    tmp_path_factory: pytest.TempPathFactory, long_context_model: tuple[Path, Path]
) -> Iterator[Site]:
    """Redis, one worker with the tiny model and the admin application."""
    redis_server = RedisServer(tmp_path_factory.mktemp("redis"))
    redis_server.start()
    settings = Settings(
        _env_file=None,
        redis={"url": redis_server.url},
        admin={"username": USERNAME, "password": PASSWORD},
    )
    base, adapter = long_context_model
    loaded = load_model(ModelSettings(base=str(base), adapter=str(adapter)))
    # Replies of REPLY_TOKENS take a few seconds on one CPU thread, so the browser gets many
    # updates to watch. A random-weight model rarely ends a reply early.
    generation = GenerationSettings(system_prompt="You are Joey.", max_new_tokens=REPLY_TOKENS)
    engine = JoeyEngine(loaded, generation)
    try:
        with WorkerThread(settings, engine), serving(build_app(settings), free_port()) as url:
            yield Site(url, settings)
    finally:
        redis_server.stop()


@pytest.fixture(scope="module")
def playwright() -> Iterator:
    with sync_api.sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright) -> Iterator:
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
    yield browser
    browser.close()


@pytest.fixture
def external_requests() -> list[str]:
    return []


def new_page(browser, site: str, external_requests: list[str], locale: str = "en-US"):
    """Open a page in a fresh context that may reach only the URL `site`."""
    context = browser.new_context(locale=locale, viewport={"width": 1280, "height": 900})

    def only_local(route) -> None:
        if route.request.url.startswith(site):
            route.continue_()
        else:
            external_requests.append(route.request.url)
            route.abort()

    context.route("**/*", only_local)
    return context.new_page()


def log_in(page, site: str) -> None:
    page.goto(site + "/")
    assert "/login" in page.url
    page.fill("#username", USERNAME)
    page.fill("#password", PASSWORD)
    page.click("#login")
    page.wait_for_selector("#message textarea", timeout=REPLY_TIMEOUT_MS)


def normalized(text: str) -> str:
    return " ".join(text.split())


def test_anonymous_api_requests_refused(playwright, site: Site) -> None:
    api = playwright.request.new_context(base_url=site.url)
    join = api.post("/gradio_api/queue/join", data={"data": [], "fn_index": 0})
    config = api.get("/config")
    info = api.get("/gradio_api/info")
    cancel = api.post("/gradio_api/cancel", data={})
    api.dispose()

    assert join.status == 401
    assert config.status == 401
    assert info.status == 401
    assert cancel.status == 401


def test_chat_reply_grows_while_streaming(
    browser, site: Site, external_requests: list[str]
) -> None:
    page = new_page(browser, site.url, external_requests)
    log_in(page, site.url)
    page.evaluate(WATCH_BOT_MESSAGE)

    page.fill("#message textarea", "How you doin'?")
    page.click("#send")
    page.wait_for_function(
        "document.querySelector('#chat-status').innerText.includes('tokens/s')",
        timeout=REPLY_TIMEOUT_MS,
    )

    OUTPUT_DIR.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT_DIR / "admin-chat.png"), full_page=True)
    final = normalized(page.locator('#chatbot [data-testid="bot"]').last.inner_text())
    seen = [normalized(text) for text in page.evaluate("window.botTexts")]
    partial = {text for text in seen if text and text not in (final, "…")}
    assert final
    assert len(partial) >= 2, f"saw {len(partial)} partial texts: {seen}"
    assert all(final.startswith(text) for text in partial)
    status = page.inner_text("#chat-status")
    for part in ("first token", "tokens/s", "prompt +", "new tokens", "adapter on"):
        assert part in status
    assert final.endswith(normalized(status))  # the reply keeps its stats in the chat
    assert external_requests == []


def test_stop_button_ends_generation(browser, site: Site, external_requests: list[str]) -> None:
    page = new_page(browser, site.url, external_requests)
    log_in(page, site.url)
    page.evaluate(WATCH_BOT_MESSAGE)
    jobs_before = len(run_async(_recent_jobs(site.settings)))

    page.fill("#message textarea", "Tell me about the sandwich.")
    page.click("#send")
    page.wait_for_function(SOME_REPLY_TEXT, timeout=REPLY_TIMEOUT_MS)
    page.click("#stop")

    page.wait_for_function(
        "document.querySelector('#chat-status').innerText.includes('Stopped.')",
        timeout=REPLY_TIMEOUT_MS,
    )
    record = _wait_for_job_record(site.settings, jobs_before)
    assert record["kind"] == "admin"
    assert record["outcome"] == "stopped"
    assert external_requests == []


def test_reset_clears_chat_and_ends_generation(
    browser, site: Site, external_requests: list[str]
) -> None:
    page = new_page(browser, site.url, external_requests)
    log_in(page, site.url)
    page.evaluate(WATCH_BOT_MESSAGE)
    jobs_before = len(run_async(_recent_jobs(site.settings)))

    page.fill("#message textarea", "Tell me about Ross.")
    page.click("#send")
    page.wait_for_function(SOME_REPLY_TEXT, timeout=REPLY_TIMEOUT_MS)
    page.click("#reset")

    record = _wait_for_job_record(site.settings, jobs_before)
    assert record["outcome"] == "stopped"
    page.wait_for_timeout(1000)  # room for a late update to bring the conversation back
    assert page.locator('#chatbot [data-testid="bot"]').count() == 0
    assert page.locator('#chatbot [data-testid="user"]').count() == 0
    assert page.inner_text("#chat-status").strip() == ""


def test_closing_tab_ends_generation(browser, site: Site, external_requests: list[str]) -> None:
    page = new_page(browser, site.url, external_requests)
    log_in(page, site.url)
    page.evaluate(WATCH_BOT_MESSAGE)
    jobs_before = len(run_async(_recent_jobs(site.settings)))

    page.fill("#message textarea", "Tell me about Chandler.")
    page.click("#send")
    page.wait_for_function(SOME_REPLY_TEXT, timeout=REPLY_TIMEOUT_MS)
    page.context.close()

    record = _wait_for_job_record(site.settings, jobs_before)
    assert record["outcome"] == "stopped"


def test_compare_shows_two_answers(browser, site: Site, external_requests: list[str]) -> None:
    page = new_page(browser, site.url, external_requests)
    log_in(page, site.url)

    page.get_by_role("tab", name="Compare").click()
    page.fill("#compare-prompt textarea", "Who is your best friend?")
    page.click("#compare")
    for status in ("#left-status", "#right-status"):
        page.wait_for_function(
            f"document.querySelector('{status}').innerText.includes('tokens/s')",
            timeout=REPLY_TIMEOUT_MS,
        )

    OUTPUT_DIR.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT_DIR / "admin-compare.png"), full_page=True)
    left = page.input_value("#left-answer textarea")
    right = page.input_value("#right-answer textarea")
    assert left.strip()
    assert right.strip()
    assert "adapter on" in page.inner_text("#left-status")
    assert "adapter off" in page.inner_text("#right-status")
    assert external_requests == []


def test_russian_browser_gets_russian_labels(
    browser, site: Site, external_requests: list[str]
) -> None:
    page = new_page(browser, site.url, external_requests, locale="ru-RU")

    page.goto(site.url + "/login")
    assert page.inner_text("#login") == "Войти"
    log_in(page, site.url)

    OUTPUT_DIR.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT_DIR / "admin-ru.png"), full_page=True)
    assert page.get_by_role("tab", name="Сравнение").is_visible()
    assert page.get_by_role("button", name="Отправить").is_visible()
    assert page.get_by_text("Админка Джоуи").is_visible()
    assert external_requests == []


def test_chats_and_queue_tabs(browser, site: Site, external_requests: list[str]) -> None:
    run_async(_store_chat(site.settings, 777, "How you doin'?", "Pretty good, pal."))
    page = new_page(browser, site.url, external_requests)
    log_in(page, site.url)

    page.get_by_role("tab", name="Chats").click()
    page.fill("#chat-id textarea", "777")
    page.click("#look-up")
    page.wait_for_function(
        "document.querySelector('#chats-status').innerText.includes('2 turn(s)')",
        timeout=REPLY_TIMEOUT_MS,
    )
    assert "Pretty good, pal." in page.inner_text("#chat-history")
    page.click("#clear-history")
    page.wait_for_function(
        "document.querySelector('#chats-status').innerText.includes('history cleared')",
        timeout=REPLY_TIMEOUT_MS,
    )
    assert run_async(_load_chat(site.settings, 777)) == []

    page.get_by_role("tab", name="Queue").click()
    page.wait_for_function(
        "document.querySelector('#queue-summary').innerText.includes('workers online: 1')",
        timeout=REPLY_TIMEOUT_MS,
    )
    assert "test-worker" in page.inner_text("#workers")
    OUTPUT_DIR.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT_DIR / "admin-queue.png"), full_page=True)
    assert external_requests == []


def _wait_for_job_record(settings: Settings, count_before: int, timeout_s: float = 30.0) -> dict:
    """Wait until the recent-jobs list grows past `count_before`; return the newest record."""
    deadline = time.monotonic() + timeout_s
    while True:
        jobs = run_async(_recent_jobs(settings))
        if len(jobs) > count_before:
            return jobs[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no new job record within {timeout_s} s")
        time.sleep(0.1)


async def _recent_jobs(settings: Settings) -> list[dict]:
    redis = create_redis(settings.redis)
    try:
        return await recent_jobs(redis)
    finally:
        await redis.aclose()


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine in another thread, because Playwright's event loop runs in this one."""
    with ThreadPoolExecutor(max_workers=1) as executor:
        return executor.submit(asyncio.run, coroutine).result()


async def _store_chat(settings: Settings, chat_id: int, user_text: str, reply_text: str) -> None:
    redis = create_redis(settings.redis)
    try:
        await HistoryStore(redis, settings.history).append(chat_id, user_text, reply_text)
    finally:
        await redis.aclose()


async def _load_chat(settings: Settings, chat_id: int) -> list:
    redis = create_redis(settings.redis)
    try:
        return await HistoryStore(redis, settings.history).load(chat_id)
    finally:
        await redis.aclose()
