"""A fake Telegram Bot API server on 127.0.0.1 for tests and load benchmarks.

aiogram reaches it through ``TelegramAPIServer.from_base(fake.api_url)``, the same setting
operators use for a self-hosted Bot API server. The fake serves ``getUpdates`` from updates that
the test pushes, records every call, and can inject the errors Telegram returns.

Wire format, as aiogram 3.31 sends it: ``POST {base}/bot{token}/{method}`` with an urlencoded
form, or a multipart form when files are attached. Form values are strings. aiogram sends
numbers, booleans and objects JSON-encoded and plain strings as they are. The fake also accepts
JSON bodies and query strings, which other clients use.

All timestamps are ``time.monotonic()`` seconds, a clock that every process on the same Linux
machine shares. Call the methods from the event loop that started the server.
"""

import asyncio
import bisect
import itertools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiogram import Bot
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiohttp import web
from yarl import URL

from joeybot.testing import telegram_objects as objects

logger = logging.getLogger(__name__)

DEFAULT_TOKEN = "123456:TEST"
SECRET_TOKEN_HEADER = "X-Telegram-Bot-Api-Secret-Token"

# Form fields that carry free text. The other fields are JSON-decoded when they parse as JSON,
# because aiogram JSON-encodes every non-string value, but a text such as "42" must stay a string.
_TEXT_FIELDS = frozenset(
    "text caption parse_mode action url secret_token ip_address emoji callback_query_id"
    " inline_message_id business_connection_id language_code title description query".split()
)
_CHAT_ACTIONS = frozenset(
    "typing upload_photo record_video upload_video record_voice upload_voice upload_document"
    " choose_sticker find_location record_video_note upload_video_note".split()
)
# Update types that Telegram sends only when allowed_updates names them.
_OPT_IN_UPDATE_TYPES = frozenset({"chat_member", "message_reaction", "message_reaction_count"})
_LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


@dataclass(frozen=True)
class Fault:
    """An error response, or a dropped connection when `status` is None."""

    status: int | None
    description: str = ""
    retry_after_s: int | None = None


def too_many_requests(retry_after_s: int) -> Fault:
    """Build the 429 flood-control error, which aiogram raises as TelegramRetryAfter."""
    return Fault(429, f"Too Many Requests: retry after {retry_after_s}", retry_after_s)


def bad_request(description: str = "Bad Request: message text is empty") -> Fault:
    return Fault(400, description)


BOT_BLOCKED = Fault(403, "Forbidden: bot was blocked by the user")
SERVER_ERROR = Fault(500, "Internal Server Error")
DROPPED_CONNECTION = Fault(None)


@dataclass
class ApiCall:
    """One Bot API request, recorded when it arrives and completed when the fake responds."""

    method: str
    """The canonical method name, such as "sendMessage", whatever case the client used."""
    params: dict[str, Any]
    """Parameters with JSON-encoded values decoded, so `chat_id` is an int."""
    files: dict[str, bytes]
    """Uploaded multipart files by field name, which parameters name as "attach://name"."""
    received_at: float
    responded_at: float | None = None
    """None while the call is in flight (a held long poll, a delay)."""
    status: int | None = None
    """HTTP status of the response, None in flight or when no response was sent."""
    description: str | None = None
    """Error description of a failed call."""
    result: Any = None
    """The result of a successful call as sent back, such as the Message of sendMessage."""

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass(eq=False)  # Identity equality, so removing a duplicate never removes its original.
class PushedUpdate:
    """An update that the test pushed, and when getUpdates or the webhook handed it out."""

    update_id: int
    payload: dict[str, Any]
    pushed_at: float
    delivered_at: list[float] = field(default_factory=list)
    redeliver: bool = False
    """True for a copy from push_duplicate that is delivered even below the client's offset."""

    @property
    def update_type(self) -> str:
        return next(key for key in self.payload if key != "update_id")

    @property
    def message(self) -> dict[str, Any] | None:
        """The Message object of a message-like update, None for other update types."""
        value = self.payload.get(self.update_type)
        return value if isinstance(value, dict) and "message_id" in value else None


@dataclass
class _PendingFault:
    method: str | None
    chat_id: int | None
    fault: Fault
    remaining: int


class _ApiError(Exception):
    def __init__(self, status: int, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.description = description


class _ConnectionDropped(Exception):
    pass


class FakeTelegram:
    """A Bot API server on an ephemeral port of 127.0.0.1, used as ``async with``.

    Requests with a token other than `token` get 401, as from Telegram. The bot's user id
    is the number before the colon of `token`, as in real tokens and in aiogram's ``Bot.id``.
    """

    def __init__(
        self,
        token: str = DEFAULT_TOKEN,
        *,
        bot_username: str = "joey_test_bot",
        bot_first_name: str = "Joey",
    ) -> None:
        self.token = token
        self.bot_username = bot_username
        bot_id = int(token.split(":")[0])
        self.bot_user = objects.build_bot_user(bot_id, bot_username, bot_first_name)
        self.updates: list[PushedUpdate] = []
        """Every pushed update in push order, including those already confirmed."""
        self.api_calls: list[ApiCall] = []

        self._runner: web.AppRunner | None = None
        self._client: aiohttp.ClientSession | None = None
        self._port: int | None = None
        self._closing = False
        self._changed = asyncio.Event()

        self._update_ids = itertools.count(1000)
        self._pending: list[PushedUpdate] = []
        self._allowed_updates: set[str] | None = None
        self._poll_generation = 0

        self._chats: dict[int, dict[str, Any]] = {}
        self._messages: dict[tuple[int, int], dict[str, Any]] = {}
        self._message_ids: dict[int, itertools.count[int]] = {}
        self._sent: list[dict[str, Any]] = []
        self._sent_by_chat: dict[int, list[dict[str, Any]]] = {}
        self._actions_by_chat: dict[int, list[str]] = {}

        self._faults: list[_PendingFault] = []
        self._blocked_chats: set[int] = set()
        self._delays_s: dict[str, float] = {}
        self._webhook: dict[str, Any] = {"url": ""}
        self._commands: list[Any] = []

        self._methods: dict[str, tuple[str, Callable[..., Awaitable[Any]]]] = {}
        for name, handler in (
            ("getMe", self._get_me),
            ("getUpdates", self._get_updates),
            ("sendMessage", self._send_message),
            ("sendChatAction", self._send_chat_action),
            ("editMessageText", self._edit_message_text),
            ("deleteMessage", self._delete_message),
            ("sendPhoto", self._send_photo),
            ("sendSticker", self._send_sticker),
            ("setWebhook", self._set_webhook),
            ("deleteWebhook", self._delete_webhook),
            ("getWebhookInfo", self._get_webhook_info),
            ("setMyCommands", self._set_my_commands),
            ("getMyCommands", self._get_my_commands),
            ("deleteMyCommands", self._delete_my_commands),
            ("answerCallbackQuery", self._return_true),
            ("setMessageReaction", self._return_true),
            ("logOut", self._return_true),
            ("close", self._return_true),
        ):
            self._methods[name.lower()] = (name, handler)

    # ---- lifecycle ----

    async def start(self) -> None:
        app = web.Application(client_max_size=50 * 1024 * 1024)  # Telegram's upload limit
        app.router.add_route("*", "/bot{token}/{method}", self._handle_http)
        # Cancelling the handler when its client disconnects keeps an abandoned long poll from
        # counting as delivery and from conflicting with the client's next getUpdates.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self._port = self._runner.addresses[0][1]
        logger.info("Fake Bot API server listening on %s", self.api_url)

    async def close(self) -> None:
        """End pending long polls with an empty result, then stop the server."""
        self._closing = True
        self._notify()
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            logger.info("Fake Bot API server stopped after %d calls", len(self.api_calls))

    async def __aenter__(self) -> "FakeTelegram":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def api_url(self) -> str:
        """Base URL for ``TELEGRAM_API_URL`` and ``TelegramAPIServer.from_base``."""
        if self._port is None:
            raise RuntimeError(
                "FakeTelegram is not started. Start it with 'async with FakeTelegram()'."
            )
        return f"http://127.0.0.1:{self._port}"

    def create_bot(self) -> Bot:
        """Create an aiogram Bot with this server's token, talking to this server."""
        session = AiohttpSession(api=TelegramAPIServer.from_base(self.api_url))
        return Bot(self.token, session=session)

    # ---- scripted updates ----

    def push_update(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Queue a raw update such as ``{"message": {...}}`` and return it with its update_id.

        An `update_id` in `payload` is kept, and otherwise the next one is assigned.
        """
        update_id = payload.get("update_id")
        if update_id is None:
            update_id = next(self._update_ids)
        else:
            self._update_ids = itertools.count(max(update_id + 1, next(self._update_ids)))
        update = {"update_id": update_id, **payload}
        self._queue(PushedUpdate(update_id, update, time.monotonic()))
        return update

    def push_message(
        self,
        chat_id: int,
        content: dict[str, Any],
        *,
        user_id: int | None = None,
        language_code: str | None = "en",
        reply_to_message_id: int | None = None,
    ) -> dict[str, Any]:
        """Queue a message update from a user, with `content` such as ``{"text": "hi"}``.

        In a private chat the sender is the user whose id is `chat_id`. Group chats (negative
        ids) need `user_id`. `reply_to_message_id` must name a message already in that chat.
        """
        if objects.chat_type_for(chat_id) == "private":
            if user_id not in (None, chat_id):
                raise ValueError(
                    f"user_id {user_id} must equal chat_id {chat_id} in a private chat"
                )
            user_id = chat_id
        elif user_id is None:
            raise ValueError(f"user_id is required for a message in group chat {chat_id}")

        user = objects.build_user(user_id, language_code)
        chat = self._chats.setdefault(chat_id, objects.build_chat(chat_id, user))
        message = {
            "message_id": self._next_message_id(chat_id),
            "date": int(time.time()),
            "chat": chat,
            "from": user,
            **content,
        }
        if reply_to_message_id is not None:
            target = self._messages.get((chat_id, reply_to_message_id))
            if target is None:
                raise ValueError(f"message {reply_to_message_id} not found in chat {chat_id}")
            message["reply_to_message"] = objects.without_reply(target)
        self._messages[(chat_id, message["message_id"])] = message
        return self.push_update({"message": message})

    def push_text(self, chat_id: int, text: str, **options: Any) -> dict[str, Any]:
        """Queue a text message, with the command and mention entities Telegram would detect.

        `options` are push_message's keyword arguments: user_id, language_code and
        reply_to_message_id.
        """
        content: dict[str, Any] = {"text": text}
        entities = objects.parse_entities(text)
        if entities:
            content["entities"] = entities
        return self.push_message(chat_id, content, **options)

    def push_command(
        self, chat_id: int, command: str, args: str = "", **options: Any
    ) -> dict[str, Any]:
        """Queue ``/command args``. Push "/start@bot" in groups with push_text."""
        text = f"/{command} {args}" if args else f"/{command}"
        return self.push_text(chat_id, text, **options)

    def push_mention(self, chat_id: int, text: str, **options: Any) -> dict[str, Any]:
        """Queue ``@bot_username text``, the way a group member addresses the bot."""
        return self.push_text(chat_id, f"@{self.bot_username} {text}", **options)

    def push_reply_to_bot(
        self, chat_id: int, text: str, *, message_id: int | None = None, **options: Any
    ) -> dict[str, Any]:
        """Queue a reply to the bot's message `message_id`, by default its latest in the chat.

        When the bot has sent nothing to the chat yet, a bot message is added to the chat's
        history first so there is something to reply to.
        """
        if message_id is None:
            sent = self._sent_by_chat.get(chat_id)
            target = sent[-1] if sent else self._add_bot_message(chat_id, {"text": "Hey!"})
            message_id = target["message_id"]
        return self.push_text(chat_id, text, reply_to_message_id=message_id, **options)

    def push_sticker(self, chat_id: int, emoji: str = "👍", **options: Any) -> dict[str, Any]:
        return self.push_message(chat_id, {"sticker": objects.build_sticker(emoji)}, **options)

    def push_photo(
        self, chat_id: int, caption: str | None = None, **options: Any
    ) -> dict[str, Any]:
        content: dict[str, Any] = {"photo": objects.build_photo_sizes()}
        if caption is not None:
            content["caption"] = caption
        return self.push_message(chat_id, content, **options)

    def push_voice(self, chat_id: int, duration_s: int = 3, **options: Any) -> dict[str, Any]:
        return self.push_message(chat_id, {"voice": objects.build_voice(duration_s)}, **options)

    def push_duplicate(self, update_id: int, *, new_update_id: bool = False) -> dict[str, Any]:
        """Queue a second copy of an earlier update, as Telegram does after a lost confirmation.

        The copy keeps `update_id` and is delivered once even if the client's offset has moved
        past it. With `new_update_id`, the same message arrives in an update with a fresh id.
        """
        original = next((u for u in self.updates if u.update_id == update_id), None)
        if original is None:
            raise ValueError(f"update {update_id} was never pushed")
        if new_update_id:
            payload = {k: v for k, v in original.payload.items() if k != "update_id"}
            return self.push_update(payload)
        self._queue(PushedUpdate(update_id, original.payload, time.monotonic(), redeliver=True))
        return original.payload

    def pending_update_count(self) -> int:
        return len(self._pending)

    # ---- recorded traffic ----

    def calls(
        self, method: str | None = None, *, ok: bool | None = None, **params: Any
    ) -> list[ApiCall]:
        """Return recorded calls of `method` (any when None) whose params equal `params`.

        `ok` keeps only successful (True) or only failed (False) calls. None also keeps calls
        still in flight.
        """
        return [call for call in self.api_calls if _call_matches(call, method, ok, params)]

    def sent_messages(self, chat_id: int | None = None) -> list[dict[str, Any]]:
        """Return the Message objects the bot sent to `chat_id` (all chats when None) in order.

        Edits through editMessageText show in the returned objects.
        """
        if chat_id is None:
            return list(self._sent)
        return list(self._sent_by_chat.get(chat_id, []))

    def sent_texts(self, chat_id: int) -> list[str]:
        return [m["text"] for m in self._sent_by_chat.get(chat_id, []) if "text" in m]

    def chat_actions(self, chat_id: int) -> list[str]:
        """Return the actions ("typing", …) of successful sendChatAction calls for `chat_id`."""
        return list(self._actions_by_chat.get(chat_id, []))

    async def wait_for(
        self, predicate: Callable[[], bool], *, timeout_s: float = 10.0, what: str = "condition"
    ) -> None:
        """Wait until `predicate()` is true, re-checking after every call and pushed update.

        Raises TimeoutError naming `what` and summarising the calls recorded so far.
        """
        if not await self._wait_until(predicate, timeout_s):
            raise TimeoutError(
                f"timed out after {timeout_s} s waiting for {what}. "
                f"Calls so far: {self._summarise_calls()}"
            )

    async def wait_for_calls(
        self,
        method: str,
        *,
        count: int = 1,
        timeout_s: float = 10.0,
        ok: bool | None = None,
        **params: Any,
    ) -> list[ApiCall]:
        """Wait for at least `count` calls matching like calls() and return all matches."""
        await self.wait_for(
            lambda: len(self.calls(method, ok=ok, **params)) >= count,
            timeout_s=timeout_s,
            what=f"{count} {method} call(s) with ok={ok} and params {params}",
        )
        return self.calls(method, ok=ok, **params)

    async def wait_for_messages(
        self, chat_id: int | None, *, count: int = 1, timeout_s: float = 10.0
    ) -> list[dict[str, Any]]:
        """Wait until the bot has sent `count` messages to `chat_id` and return them all.

        With `chat_id` None it counts messages to all chats. Each re-check takes constant time,
        unlike wait_for_calls, which scans every recorded call, so benchmarks should wait here.
        """
        sent = self._sent if chat_id is None else self._sent_by_chat.setdefault(chat_id, [])
        where = "all chats" if chat_id is None else f"chat {chat_id}"
        await self.wait_for(
            lambda: len(sent) >= count,
            timeout_s=timeout_s,
            what=f"{count} message(s) sent to {where}",
        )
        return list(sent)

    # ---- fault injection ----

    def fail_next(
        self, method: str | None, fault: Fault, *, times: int = 1, chat_id: int | None = None
    ) -> None:
        """Fail the next `times` calls of `method` (any when None) with `fault`.

        With `chat_id`, only calls for that chat count. Faults apply in the order they were added.
        """
        if times < 1:
            raise ValueError(f"times must be at least 1, got {times}")
        self._faults.append(_PendingFault(method and method.lower(), chat_id, fault, times))

    def clear_faults(self) -> None:
        self._faults.clear()
        self._delays_s.clear()
        self._blocked_chats.clear()

    def block_bot(self, chat_id: int) -> None:
        """Make every call for `chat_id` fail with 403 until unblock_bot, as after a user blocks
        the bot (or, for a group, removes it)."""
        self._blocked_chats.add(chat_id)

    def unblock_bot(self, chat_id: int) -> None:
        self._blocked_chats.discard(chat_id)

    def set_delay(self, method: str, delay_s: float) -> None:
        """Hold every response to `method` for `delay_s` seconds, or remove the delay with 0."""
        if delay_s > 0:
            self._delays_s[method.lower()] = delay_s
        else:
            self._delays_s.pop(method.lower(), None)

    def add_method(self, name: str, handler: Callable[[dict[str, Any]], Any]) -> None:
        """Serve `name` with `handler(params)`, whose return value becomes the result."""

        async def run(params: dict[str, Any], files: dict[str, bytes]) -> Any:
            return handler(params)

        self._methods[name.lower()] = (name, run)

    # ---- webhook ----

    def webhook_info(self) -> dict[str, Any]:
        """Return the WebhookInfo object that getWebhookInfo sends."""
        info = {
            "url": self._webhook["url"],
            "has_custom_certificate": False,
            "pending_update_count": len(self._pending),
        }
        for key in ("max_connections", "allowed_updates"):
            if key in self._webhook:
                info[key] = self._webhook[key]
        return info

    async def post_to_webhook(
        self,
        update: dict[str, Any],
        *,
        url: str | None = None,
        secret_token: str | None = None,
    ) -> int:
        """POST `update` to a local webhook and return the HTTP status of its response.

        `url` and `secret_token` default to those from the bot's setWebhook call. A method call
        in the response body (aiogram's ``handle_in_background=False``) is executed and recorded
        like a request, as Telegram does.
        """
        url = url or self._webhook["url"]
        if not url:
            raise ValueError("no webhook URL: pass url= or let the bot call setWebhook first")
        if URL(url).host not in _LOCAL_HOSTS:
            raise ValueError(
                f"webhook URL {url} is not local. The fake posts only to 127.0.0.1 or localhost."
            )
        if secret_token is None:
            secret_token = self._webhook.get("secret_token")
        headers = {SECRET_TOKEN_HEADER: secret_token} if secret_token else {}

        if self._client is None:
            self._client = aiohttp.ClientSession()
        async with self._client.post(url, json=update, headers=headers) as response:
            if response.ok:
                await self._run_webhook_reply(response)
            return response.status

    async def deliver_webhook_updates(self) -> list[int]:
        """POST pending updates in order to the webhook and return the response statuses.

        A 2xx status confirms an update. The first other status stops delivery and keeps that
        update and the rest pending.
        """
        statuses = []
        for pushed in self._deliverable(offset=0):
            status = await self.post_to_webhook(pushed.payload)
            statuses.append(status)
            if not 200 <= status < 300:
                break
            pushed.delivered_at.append(time.monotonic())
            self._pending.remove(pushed)
        return statuses

    # ---- request handling ----

    async def _handle_http(self, request: web.Request) -> web.StreamResponse:
        try:
            params, files = await _read_params(request)
        except ValueError as error:
            logger.warning(
                "Fake Bot API: rejected a %s request with an invalid body: %s",
                request.match_info["method"],
                error,
            )
            return _error_response(400, f"Bad Request: {error}")

        try:
            status, body = await self._process_call(
                request.match_info["method"], request.match_info["token"], params, files
            )
        except _ConnectionDropped:
            assert request.transport is not None
            request.transport.close()
            return web.Response()  # The client's connection is closed, so this is never sent.
        return web.json_response(body, status=status)

    async def _process_call(
        self, method_name: str, token: str, params: dict[str, Any], files: dict[str, bytes]
    ) -> tuple[int, dict[str, Any]]:
        """Respond to one call and record it, also when it fails or its client goes away."""
        method, handler = self._methods.get(method_name.lower(), (method_name, None))
        call = ApiCall(method, params, files, received_at=time.monotonic())
        self.api_calls.append(call)
        self._notify()
        try:
            call.status, body = await self._respond(method, handler, token, params, files)
            if call.ok:
                call.result = body["result"]
            else:
                call.description = body["description"]
            return call.status, body
        finally:
            call.responded_at = time.monotonic()
            if call.status is None:
                call.description = "no response: the connection was dropped"
            logger.debug("Fake Bot API: %s -> %s", method, call.status)
            self._notify()

    async def _respond(
        self,
        method: str,
        handler: Callable[..., Awaitable[Any]] | None,
        token: str,
        params: dict[str, Any],
        files: dict[str, bytes],
    ) -> tuple[int, dict[str, Any]]:
        if token != self.token:
            return _error_body(401, "Unauthorized")

        fault = self._take_fault(method, params)
        delay_s = self._delays_s.get(method.lower())
        if delay_s:
            await self._wait_until(lambda: self._closing, delay_s)

        if fault is not None:
            if fault.status is None:
                raise _ConnectionDropped
            return _error_body(fault.status, fault.description, fault.retry_after_s)
        if params.get("chat_id") in self._blocked_chats:
            return _error_body(403, _blocked_description(params["chat_id"]))
        if handler is None:
            return _error_body(404, "Not Found")

        try:
            result = await handler(params, files)
        except _ApiError as error:
            return _error_body(error.status, error.description)
        return 200, {"ok": True, "result": result}

    def _take_fault(self, method: str, params: dict[str, Any]) -> Fault | None:
        for pending in self._faults:
            if pending.method not in (None, method.lower()):
                continue
            if pending.chat_id is not None and pending.chat_id != params.get("chat_id"):
                continue
            pending.remaining -= 1
            if pending.remaining == 0:
                self._faults.remove(pending)
            return pending.fault
        return None

    async def _run_webhook_reply(self, response: aiohttp.ClientResponse) -> None:
        params: dict[str, Any] = {}
        files: dict[str, bytes] = {}
        if response.content_type == "application/json":
            body = await response.json()
            if isinstance(body, dict):
                params = body
        elif response.content_type.startswith("multipart/"):
            reader = aiohttp.MultipartReader.from_response(response)
            while (part := await reader.next()) is not None:
                assert isinstance(part, aiohttp.BodyPartReader) and part.name is not None
                data = await part.read(decode=True)
                if part.filename:
                    files[part.name] = bytes(data)
                else:
                    params[part.name] = _decode_form_value(part.name, data.decode())

        method = params.pop("method", None)
        if isinstance(method, str):
            try:
                await self._process_call(method, self.token, params, files)
            except _ConnectionDropped:
                logger.debug(
                    "Fake Bot API: dropped webhook reply %s as the injected fault requires", method
                )

    # ---- update delivery ----

    def _queue(self, pushed: PushedUpdate) -> None:
        self.updates.append(pushed)
        # Telegram hands out updates in update_id order, and a duplicate goes back in its place.
        bisect.insort(self._pending, pushed, key=lambda u: u.update_id)
        self._notify()

    def _forget_confirmed(self, offset: int) -> int:
        """Drop updates confirmed by `offset` and return the offset to deliver from.

        A negative offset keeps only the last -offset updates, as the Bot API specifies.
        """
        if offset < 0:
            del self._pending[:offset]
            return 0
        self._pending = [u for u in self._pending if _is_unconfirmed(u, offset)]
        return offset

    def _deliverable(self, offset: int) -> list[PushedUpdate]:
        return [
            u
            for u in self._pending
            if _is_unconfirmed(u, offset) and self._is_allowed(u.update_type)
        ]

    def _is_allowed(self, update_type: str) -> bool:
        if self._allowed_updates is None:
            return update_type not in _OPT_IN_UPDATE_TYPES
        return update_type in self._allowed_updates

    def _set_allowed_updates(self, allowed_updates: Any) -> None:
        # Absent keeps the previous setting and an empty list restores the default, as in the
        # Bot API.
        if isinstance(allowed_updates, list):
            self._allowed_updates = set(allowed_updates) or None

    # ---- Bot API methods ----

    async def _get_me(self, params: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
        return self.bot_user

    async def _get_updates(
        self, params: dict[str, Any], files: dict[str, bytes]
    ) -> list[dict[str, Any]]:
        """Serve updates like the Bot API: confirm by offset, long-poll up to `timeout` s.

        A newer getUpdates ends a waiting one with 409, as Telegram does when two bot instances
        poll with one token.
        """
        if self._webhook["url"]:
            raise _ApiError(
                409,
                "Conflict: can't use getUpdates method while webhook is active; "
                "use deleteWebhook to delete the webhook first",
            )
        offset = _int_param(params, "offset", 0)
        limit = min(max(_int_param(params, "limit", 100), 1), 100)
        timeout_s = max(_int_param(params, "timeout", 0), 0)
        self._set_allowed_updates(params.get("allowed_updates"))

        self._poll_generation += 1
        generation = self._poll_generation
        self._notify()
        offset = self._forget_confirmed(offset)
        await self._wait_until(
            lambda: (
                self._closing
                or generation != self._poll_generation
                or bool(self._deliverable(offset))
            ),
            timeout_s,
        )
        if generation != self._poll_generation:
            raise _ApiError(
                409,
                "Conflict: terminated by other getUpdates request; "
                "make sure that only one bot instance is running",
            )
        if self._closing:
            return []

        batch = self._deliverable(offset)[:limit]
        now = time.monotonic()
        for pushed in batch:
            pushed.delivered_at.append(now)
        return [pushed.payload for pushed in batch]

    async def _send_message(
        self, params: dict[str, Any], files: dict[str, bytes]
    ) -> dict[str, Any]:
        chat_id = _chat_id_param(params)
        text = params.get("text")
        if not isinstance(text, str) or not text.strip():
            raise _ApiError(400, "Bad Request: message text is empty")
        # NOTE: with a parse_mode Telegram counts the length after removing the markup, but the
        # fake counts the raw text and does not validate the markup.
        if objects.utf16_length(text) > objects.MAX_MESSAGE_UTF16:
            raise _ApiError(400, "Bad Request: message is too long")
        return self._send_bot_message(chat_id, {"text": text}, params)

    async def _send_photo(self, params: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
        chat_id = _chat_id_param(params)
        _require_file(params, files, "photo")
        content: dict[str, Any] = {"photo": objects.build_photo_sizes()}
        caption = params.get("caption")
        if caption:
            if objects.utf16_length(caption) > objects.MAX_CAPTION_UTF16:
                raise _ApiError(400, "Bad Request: message caption is too long")
            content["caption"] = caption
        return self._send_bot_message(chat_id, content, params)

    async def _send_sticker(
        self, params: dict[str, Any], files: dict[str, bytes]
    ) -> dict[str, Any]:
        chat_id = _chat_id_param(params)
        _require_file(params, files, "sticker")
        sticker = objects.build_sticker(params.get("emoji") or "👍")
        return self._send_bot_message(chat_id, {"sticker": sticker}, params)

    async def _send_chat_action(self, params: dict[str, Any], files: dict[str, bytes]) -> bool:
        chat_id = _chat_id_param(params)
        action = params.get("action")
        if action not in _CHAT_ACTIONS:
            raise _ApiError(400, "Bad Request: wrong parameter action in request")
        self._actions_by_chat.setdefault(chat_id, []).append(action)
        return True

    async def _edit_message_text(
        self, params: dict[str, Any], files: dict[str, bytes]
    ) -> dict[str, Any]:
        chat_id = _chat_id_param(params)
        message = self._bot_message(chat_id, params.get("message_id"), "edit")
        text = params.get("text")
        if not isinstance(text, str) or not text.strip():
            raise _ApiError(400, "Bad Request: message text is empty")
        if message.get("text") == text:
            raise _ApiError(
                400,
                "Bad Request: message is not modified: specified new message content and reply "
                "markup are exactly the same as a current content and reply markup of the message",
            )
        message["text"] = text
        message["edit_date"] = int(time.time())
        return message

    async def _delete_message(self, params: dict[str, Any], files: dict[str, bytes]) -> bool:
        chat_id = _chat_id_param(params)
        message_id = params.get("message_id")
        if (chat_id, message_id) not in self._messages:
            raise _ApiError(400, "Bad Request: message to delete not found")
        del self._messages[(chat_id, message_id)]
        return True

    async def _set_webhook(self, params: dict[str, Any], files: dict[str, bytes]) -> bool:
        # Telegram requires an HTTPS URL on port 443, 80, 88 or 8443. The fake accepts any URL
        # so that tests can use a plain HTTP server on an ephemeral port.
        url = params.get("url") or ""
        if params.get("drop_pending_updates"):
            self._pending.clear()
        self._webhook = {"url": url}
        for key in ("secret_token", "max_connections", "allowed_updates"):
            if key in params:
                self._webhook[key] = params[key]
        self._set_allowed_updates(params.get("allowed_updates"))
        self._poll_generation += 1  # a waiting getUpdates ends with 409, as in Telegram
        return True

    async def _delete_webhook(self, params: dict[str, Any], files: dict[str, bytes]) -> bool:
        if params.get("drop_pending_updates"):
            self._pending.clear()
        self._webhook = {"url": ""}
        return True

    async def _get_webhook_info(
        self, params: dict[str, Any], files: dict[str, bytes]
    ) -> dict[str, Any]:
        return self.webhook_info()

    async def _set_my_commands(self, params: dict[str, Any], files: dict[str, bytes]) -> bool:
        commands = params.get("commands")
        if not isinstance(commands, list):
            raise _ApiError(400, 'Bad Request: parameter "commands" is required')
        self._commands = commands
        return True

    async def _get_my_commands(self, params: dict[str, Any], files: dict[str, bytes]) -> list[Any]:
        return self._commands

    async def _delete_my_commands(self, params: dict[str, Any], files: dict[str, bytes]) -> bool:
        self._commands = []
        return True

    async def _return_true(self, params: dict[str, Any], files: dict[str, bytes]) -> bool:
        return True

    # ---- chat state ----

    def _next_message_id(self, chat_id: int) -> int:
        # Telegram numbers messages per chat, so user and bot messages share one sequence.
        return next(self._message_ids.setdefault(chat_id, itertools.count(1)))

    def _send_bot_message(
        self, chat_id: int, content: dict[str, Any], params: dict[str, Any]
    ) -> dict[str, Any]:
        reply_to = self._reply_target(chat_id, params)
        message = self._add_bot_message(chat_id, content, reply_to)
        self._sent.append(message)
        self._sent_by_chat.setdefault(chat_id, []).append(message)
        return message

    def _add_bot_message(
        self,
        chat_id: int,
        content: dict[str, Any],
        reply_to: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        message = {
            "message_id": self._next_message_id(chat_id),
            "date": int(time.time()),
            "chat": self._chats.get(chat_id) or objects.build_chat(chat_id),
            "from": self.bot_user,
            **content,
        }
        if reply_to is not None:
            message["reply_to_message"] = objects.without_reply(reply_to)
        self._messages[(chat_id, message["message_id"])] = message
        return message

    def _reply_target(self, chat_id: int, params: dict[str, Any]) -> dict[str, Any] | None:
        """Find the message named by reply_parameters or the older reply_to_message_id."""
        reply = params.get("reply_parameters")
        if isinstance(reply, dict):
            message_id = reply.get("message_id")
            allow_missing = reply.get("allow_sending_without_reply", False)
        else:
            message_id = params.get("reply_to_message_id")
            allow_missing = params.get("allow_sending_without_reply", False)
        if message_id is None:
            return None

        target = self._messages.get((chat_id, message_id))
        if target is None and not allow_missing:
            raise _ApiError(400, "Bad Request: message to be replied not found")
        return target

    def _bot_message(self, chat_id: int, message_id: Any, action: str) -> dict[str, Any]:
        message = self._messages.get((chat_id, message_id))
        if message is None or message["from"]["id"] != self.bot_user["id"]:
            raise _ApiError(400, f"Bad Request: message to {action} not found")
        return message

    # ---- waiting ----

    def _notify(self) -> None:
        """Wake every waiter, and each one re-checks its own condition."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_until(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        """Wait up to `timeout_s` for `predicate()` and return its final value."""
        try:
            async with asyncio.timeout(timeout_s):
                while not predicate():
                    await self._changed.wait()
        except TimeoutError:
            return predicate()
        return True

    def _summarise_calls(self) -> str:
        counts: dict[str, int] = {}
        for call in self.api_calls:
            key = f"{call.method}:{call.status}"
            counts[key] = counts.get(key, 0) + 1
        return ", ".join(f"{key} x{count}" for key, count in counts.items()) or "none"


def _is_unconfirmed(pushed: PushedUpdate, offset: int) -> bool:
    # A redelivered duplicate sits below the client's offset, so offset confirms it only
    # after it has been handed out once.
    return pushed.update_id >= offset or (pushed.redeliver and not pushed.delivered_at)


# ---- request parsing ----


async def _read_params(request: web.Request) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Read a call's parameters from its query string and its JSON, form or multipart body."""
    params: dict[str, Any] = {
        name: _decode_form_value(name, value) for name, value in request.query.items()
    }
    files: dict[str, bytes] = {}
    if not request.can_read_body:
        return params, files

    if request.content_type == "application/json":
        try:
            body = await request.json()
        except json.JSONDecodeError as error:
            raise ValueError(f"invalid JSON body: {error}") from error
        if not isinstance(body, dict):
            raise ValueError("the JSON body must be an object")
        params.update(body)
        return params, files

    form = await request.post()
    for name, value in form.items():
        if isinstance(value, web.FileField):
            files[name] = value.file.read()
        else:
            text = value if isinstance(value, str) else bytes(value).decode()
            params[name] = _decode_form_value(name, text)
    return params, files


def _decode_form_value(name: str, value: str) -> Any:
    if name in _TEXT_FIELDS:
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _int_param(params: dict[str, Any], name: str, default: int) -> int:
    value = params.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _ApiError(400, f'Bad Request: parameter "{name}" must be an integer, got {value!r}')
    return value


def _chat_id_param(params: dict[str, Any]) -> int:
    chat_id = params.get("chat_id")
    if chat_id is None or chat_id == "":
        raise _ApiError(400, "Bad Request: chat_id is empty")
    if isinstance(chat_id, bool) or not isinstance(chat_id, int):
        # "@channelname" addresses a public channel, and the fake has none.
        raise _ApiError(400, "Bad Request: chat not found")
    return chat_id


def _require_file(params: dict[str, Any], files: dict[str, bytes], name: str) -> None:
    """Check that `name` is a file id or an "attach://part" reference to an uploaded part."""
    value = params.get(name)
    if name in files:
        return
    if isinstance(value, str) and value.startswith("attach://"):
        if value.removeprefix("attach://") in files:
            return
        raise _ApiError(400, f"Bad Request: file {value} not found in the request")
    if not isinstance(value, str) or not value:
        raise _ApiError(400, f"Bad Request: there is no {name} in the request")


def _blocked_description(chat_id: int) -> str:
    if objects.chat_type_for(chat_id) == "private":
        return BOT_BLOCKED.description
    return "Forbidden: bot was kicked from the group chat"


def _call_matches(
    call: ApiCall, method: str | None, ok: bool | None, params: dict[str, Any]
) -> bool:
    if method is not None and call.method.lower() != method.lower():
        return False
    if ok is True and not call.ok:
        return False
    if ok is False and (call.responded_at is None or call.ok):
        return False
    return all(call.params.get(name) == value for name, value in params.items())


def _error_body(
    status: int, description: str, retry_after_s: int | None = None
) -> tuple[int, dict[str, Any]]:
    body: dict[str, Any] = {"ok": False, "error_code": status, "description": description}
    if retry_after_s is not None:
        body["parameters"] = {"retry_after": retry_after_s}
    return status, body


def _error_response(status: int, description: str) -> web.Response:
    return web.json_response(_error_body(status, description)[1], status=status)
