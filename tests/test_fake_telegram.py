"""Tests of the fake Bot API server, driven by real aiogram clients over HTTP on 127.0.0.1."""

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiogram import Bot, Dispatcher, F
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.exceptions import (
    TelegramBadRequest,
    TelegramConflictError,
    TelegramForbiddenError,
    TelegramNetworkError,
    TelegramRetryAfter,
    TelegramServerError,
    TelegramUnauthorizedError,
)
from aiogram.methods import SendMessage
from aiogram.types import BotCommand, BufferedInputFile, Message, ReplyParameters, Update
from aiogram.webhook.aiohttp_server import SimpleRequestHandler
from aiohttp import web

from joeybot.testing import (
    BOT_BLOCKED,
    DROPPED_CONNECTION,
    SERVER_ERROR,
    FakeTelegram,
    bad_request,
    too_many_requests,
)

# A guard against a hang, far above the milliseconds these steps take. No test measures time.
HANG_GUARD_S = 20


@pytest.fixture
async def tg() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram() as fake:
        yield fake


@pytest.fixture
async def bot(tg: FakeTelegram) -> AsyncIterator[Bot]:
    bot = tg.create_bot()
    async with bot:
        yield bot


def echo_dispatcher() -> Dispatcher:
    """Build a dispatcher that replies "echo: <text>" to every text message."""
    dp = Dispatcher()

    @dp.message(F.text)
    async def echo(message: Message) -> None:
        await message.answer(f"echo: {message.text}")

    return dp


async def start_polling(dp: Dispatcher, bot: Bot) -> asyncio.Task[None]:
    task = asyncio.create_task(
        dp.start_polling(bot, handle_signals=False, close_bot_session=False, polling_timeout=30)
    )
    return task


async def stop_polling(dp: Dispatcher, task: asyncio.Task[None]) -> None:
    await dp.stop_polling()
    await asyncio.wait_for(task, HANG_GUARD_S)


def parse_update(update: dict[str, Any], bot: Bot) -> Update:
    return Update.model_validate(update, context={"bot": bot})


# ---- basic methods ----


async def test_get_me_returns_bot_user(tg: FakeTelegram, bot: Bot) -> None:
    me = await bot.get_me()

    assert me.id == bot.id
    assert me.is_bot
    assert me.username == "joey_test_bot"
    assert tg.calls("getMe", ok=True)


async def test_send_message_round_trip(tg: FakeTelegram, bot: Bot) -> None:
    tg.push_text(42, "hello")

    sent = await bot.send_message(42, "How you doin'?")

    assert sent.text == "How you doin'?"
    assert sent.chat.id == 42
    assert sent.from_user is not None
    assert sent.from_user.id == bot.id
    assert sent.message_id == 2  # after the user's message 1 in the same chat
    assert tg.sent_texts(42) == ["How you doin'?"]
    [call] = tg.calls("sendMessage")
    assert call.params == {"chat_id": 42, "text": "How you doin'?"}
    assert call.ok
    assert call.responded_at is not None
    assert call.result["message_id"] == sent.message_id


async def test_send_message_keeps_numeric_text_as_string(tg: FakeTelegram, bot: Bot) -> None:
    await bot.send_message(42, "42")
    await bot.send_message(42, "true")

    assert tg.sent_texts(42) == ["42", "true"]
    assert tg.calls("sendMessage")[0].params["chat_id"] == 42


async def test_send_message_reply_links_target(tg: FakeTelegram, bot: Bot) -> None:
    update = tg.push_text(-1001, "@joey_test_bot hi", user_id=7)
    user_message_id = update["message"]["message_id"]

    sent = await bot.send_message(
        -1001, "Hey!", reply_parameters=ReplyParameters(message_id=user_message_id)
    )

    assert sent.reply_to_message is not None
    assert sent.reply_to_message.message_id == user_message_id
    assert tg.sent_messages(-1001)[0]["reply_to_message"]["from"]["id"] == 7


async def test_send_message_reply_to_unknown_message(bot: Bot) -> None:
    with pytest.raises(TelegramBadRequest, match="message to be replied not found"):
        await bot.send_message(42, "Hey!", reply_parameters=ReplyParameters(message_id=999))


async def test_send_message_length_counts_utf16(tg: FakeTelegram, bot: Bot) -> None:
    # Each emoji outside the Basic Multilingual Plane is two UTF-16 code units.
    await bot.send_message(42, "😀" * 2048)

    with pytest.raises(TelegramBadRequest, match="message is too long"):
        await bot.send_message(42, "😀" * 2048 + "a")
    with pytest.raises(TelegramBadRequest, match="message text is empty"):
        await bot.send_message(42, "   ")
    assert len(tg.sent_messages(42)) == 1


async def test_send_chat_action_recorded(tg: FakeTelegram, bot: Bot) -> None:
    assert await bot.send_chat_action(42, "typing")

    with pytest.raises(TelegramBadRequest, match="wrong parameter action"):
        await bot.send_chat_action(42, "dancing")
    assert tg.chat_actions(42) == ["typing"]


async def test_edit_and_delete_message(tg: FakeTelegram, bot: Bot) -> None:
    sent = await bot.send_message(42, "first")

    edited = await bot.edit_message_text("second", chat_id=42, message_id=sent.message_id)
    assert isinstance(edited, Message)
    assert edited.text == "second"
    with pytest.raises(TelegramBadRequest, match="message is not modified"):
        await bot.edit_message_text("second", chat_id=42, message_id=sent.message_id)

    assert await bot.delete_message(42, sent.message_id)
    with pytest.raises(TelegramBadRequest, match="message to delete not found"):
        await bot.delete_message(42, sent.message_id)


async def test_send_photo_multipart_upload(tg: FakeTelegram, bot: Bot) -> None:
    photo = BufferedInputFile(b"\x89PNG fake image", filename="joey.png")

    sent = await bot.send_photo(42, photo, caption="Joey doesn't share food!")

    assert sent.photo
    assert sent.caption == "Joey doesn't share food!"
    [call] = tg.calls("sendPhoto")
    assert call.params["photo"].startswith("attach://")
    assert call.files == {call.params["photo"].removeprefix("attach://"): b"\x89PNG fake image"}


async def test_set_my_commands_round_trip(bot: Bot) -> None:
    assert await bot.set_my_commands([BotCommand(command="reset", description="Forget")])

    [command] = await bot.get_my_commands()
    assert command.command == "reset"


async def test_unknown_method_and_token(tg: FakeTelegram) -> None:
    async with aiohttp.ClientSession() as client:
        url = f"{tg.api_url}/bot{tg.token}/sendTelepathy"
        async with client.post(url, json={"chat_id": 42}) as response:
            body = await response.json()
    assert response.status == 404
    assert body == {"ok": False, "error_code": 404, "description": "Not Found"}

    session = AiohttpSession(api=TelegramAPIServer.from_base(tg.api_url))
    async with Bot("999:WRONG", session=session) as stranger:
        with pytest.raises(TelegramUnauthorizedError):
            await stranger.get_me()


async def test_json_body_and_method_case(tg: FakeTelegram) -> None:
    async with aiohttp.ClientSession() as client:
        url = f"{tg.api_url}/bot{tg.token}/SENDMESSAGE"
        async with client.post(url, json={"chat_id": 42, "text": "hi"}) as response:
            body = await response.json()

    assert response.status == 200
    assert body["result"]["text"] == "hi"
    assert tg.calls("sendMessage", chat_id=42, ok=True)


async def test_query_string_and_invalid_body(tg: FakeTelegram) -> None:
    base = f"{tg.api_url}/bot{tg.token}"
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{base}/sendMessage?chat_id=42&text=7") as response:
            query_status = response.status
        invalid = client.post(
            f"{base}/sendMessage", data=b"{not json", headers={"Content-Type": "application/json"}
        )
        async with invalid as response:
            invalid_status = response.status
            invalid_body = await response.json()

    assert query_status == 200
    assert tg.sent_texts(42) == ["7"]
    assert invalid_status == 400
    assert invalid_body["description"].startswith("Bad Request: invalid JSON body")


# ---- scripted updates ----


async def test_push_helpers_parse_as_aiogram_updates(tg: FakeTelegram, bot: Bot) -> None:
    text = parse_update(tg.push_text(42, "hi", language_code="ru"), bot).message
    command = parse_update(tg.push_command(42, "start"), bot).message
    sticker = parse_update(tg.push_sticker(42), bot).message
    photo = parse_update(tg.push_photo(42, caption="me"), bot).message
    voice = parse_update(tg.push_voice(42), bot).message

    assert text is not None
    assert text.from_user is not None
    assert text.from_user.language_code == "ru"
    assert text.chat.type == "private"
    assert command is not None
    assert command.text == "/start"
    assert command.entities is not None
    assert command.entities[0].type == "bot_command"
    assert sticker is not None
    assert sticker.content_type == "sticker"
    assert photo is not None
    assert photo.content_type == "photo"
    assert photo.caption == "me"
    assert voice is not None
    assert voice.content_type == "voice"
    message_ids = [m.message_id for m in (text, command, sticker, photo, voice)]
    assert message_ids == [1, 2, 3, 4, 5]


async def test_group_mention_entity_offsets(tg: FakeTelegram, bot: Bot) -> None:
    update = tg.push_text(-1002, "😀 hey @joey_test_bot, /start@joey_test_bot", user_id=7)
    message = parse_update(update, bot).message

    assert message is not None
    assert message.chat.type == "supergroup"
    assert message.entities is not None
    mention, command = message.entities
    assert mention.type == "mention"
    assert mention.extract_from(message.text or "") == "@joey_test_bot"
    assert command.type == "bot_command"
    assert command.extract_from(message.text or "") == "/start@joey_test_bot"


async def test_push_mention_addresses_bot(tg: FakeTelegram, bot: Bot) -> None:
    message = parse_update(tg.push_mention(-55, "how you doin?", user_id=7), bot).message

    assert message is not None
    assert message.chat.type == "group"
    assert message.text == "@joey_test_bot how you doin?"
    assert message.entities is not None
    assert message.entities[0].type == "mention"


async def test_push_reply_to_bot(tg: FakeTelegram, bot: Bot) -> None:
    first = parse_update(tg.push_reply_to_bot(-1003, "and you?", user_id=7), bot).message
    sent = await bot.send_message(-1003, "Joey's great")
    second = parse_update(tg.push_reply_to_bot(-1003, "sure", user_id=8), bot).message

    assert first is not None
    assert first.reply_to_message is not None
    assert first.reply_to_message.from_user is not None
    assert first.reply_to_message.from_user.id == bot.id
    assert second is not None
    assert second.reply_to_message is not None
    assert second.reply_to_message.message_id == sent.message_id


async def test_push_message_rejects_missing_group_user(tg: FakeTelegram) -> None:
    with pytest.raises(ValueError, match="user_id is required"):
        tg.push_text(-1004, "hi")
    with pytest.raises(ValueError, match="must equal chat_id"):
        tg.push_text(42, "hi", user_id=43)
    with pytest.raises(ValueError, match="not found in chat"):
        tg.push_text(42, "hi", reply_to_message_id=77)


async def test_get_updates_offset_and_limit(tg: FakeTelegram, bot: Bot) -> None:
    ids = [tg.push_text(42, f"message {n}")["update_id"] for n in range(3)]

    first = await bot.get_updates(limit=2)
    again = await bot.get_updates(limit=2)
    rest = await bot.get_updates(offset=first[-1].update_id + 1)
    confirmed = await bot.get_updates(offset=ids[-1] + 1)

    assert [u.update_id for u in first] == ids[:2]
    assert [u.update_id for u in again] == ids[:2]  # not confirmed yet
    assert [u.update_id for u in rest] == ids[2:]
    assert confirmed == []
    assert tg.pending_update_count() == 0
    assert [len(u.delivered_at) for u in tg.updates] == [2, 2, 1]


async def test_get_updates_negative_offset(tg: FakeTelegram, bot: Bot) -> None:
    ids = [tg.push_text(42, f"message {n}")["update_id"] for n in range(3)]

    last = await bot.get_updates(offset=-1)

    assert [u.update_id for u in last] == ids[-1:]
    assert tg.pending_update_count() == 1


async def test_get_updates_honours_allowed_updates(tg: FakeTelegram, bot: Bot) -> None:
    tg.push_update({"edited_message": tg.push_text(42, "typo")["message"]})

    updates = await bot.get_updates(allowed_updates=["message"])

    assert [u.event_type for u in updates] == ["message"]


async def test_long_poll_wakes_on_push(tg: FakeTelegram, bot: Bot) -> None:
    poll = asyncio.create_task(bot.get_updates(timeout=60, request_timeout=90))
    [call] = await tg.wait_for_calls("getUpdates")
    assert call.responded_at is None  # held: there is nothing to deliver yet

    update_id = tg.push_text(42, "hi")["update_id"]

    updates = await asyncio.wait_for(poll, HANG_GUARD_S)
    assert [u.update_id for u in updates] == [update_id]


async def test_long_poll_ends_on_close() -> None:
    fake = FakeTelegram()
    await fake.start()
    session = AiohttpSession(api=TelegramAPIServer.from_base(fake.api_url))
    async with Bot(fake.token, session=session) as local_bot:
        poll = asyncio.create_task(local_bot.get_updates(timeout=60, request_timeout=90))
        await fake.wait_for_calls("getUpdates")

        await asyncio.wait_for(fake.close(), HANG_GUARD_S)

        assert await asyncio.wait_for(poll, HANG_GUARD_S) == []


async def test_abandoned_poll_delivers_nothing(tg: FakeTelegram, bot: Bot) -> None:
    poll = asyncio.create_task(bot.get_updates(timeout=60, request_timeout=90))
    [call] = await tg.wait_for_calls("getUpdates")
    poll.cancel()
    await tg.wait_for(lambda: call.responded_at is not None, what="the server to drop the poll")

    update_id = tg.push_text(42, "hi")["update_id"]

    assert call.status is None
    assert tg.updates[0].delivered_at == []
    assert [u.update_id for u in await bot.get_updates()] == [update_id]


async def test_second_poller_conflicts_first(tg: FakeTelegram, bot: Bot) -> None:
    first = asyncio.create_task(bot.get_updates(timeout=60, request_timeout=90))
    await tg.wait_for_calls("getUpdates")
    second = asyncio.create_task(bot.get_updates(timeout=60, request_timeout=90))

    with pytest.raises(TelegramConflictError, match="terminated by other getUpdates"):
        await asyncio.wait_for(first, HANG_GUARD_S)
    tg.push_text(42, "hi")
    assert len(await asyncio.wait_for(second, HANG_GUARD_S)) == 1


async def test_dispatcher_polling_answers_update(tg: FakeTelegram, bot: Bot) -> None:
    dp = echo_dispatcher()
    polling = await start_polling(dp, bot)
    await tg.wait_for_calls("getUpdates")
    update_id = tg.push_text(42, "Joey doesn't share food")["update_id"]

    [reply] = await tg.wait_for_messages(42)
    # The next poll confirms the update, so it is never handed out again.
    await tg.wait_for_calls("getUpdates", offset=update_id + 1)
    await stop_polling(dp, polling)

    assert reply["text"] == "echo: Joey doesn't share food"
    assert tg.pending_update_count() == 0
    assert len(tg.updates[0].delivered_at) == 1


async def test_replies_line_up_with_deliveries(tg: FakeTelegram, bot: Bot) -> None:
    """Check the records a load benchmark reads: when each update left and its reply came."""
    dp = echo_dispatcher()
    polling = await start_polling(dp, bot)
    chat_ids = [101, 102, 103]
    pushed = {chat_id: tg.push_text(chat_id, f"from {chat_id}") for chat_id in chat_ids}

    replies = await tg.wait_for_messages(None, count=len(chat_ids))
    await stop_polling(dp, polling)

    assert sorted(m["chat"]["id"] for m in replies) == chat_ids
    for update in tg.updates:
        assert update.message is not None
        chat_id = update.message["chat"]["id"]
        assert update.update_id == pushed[chat_id]["update_id"]
        [reply_call] = tg.calls("sendMessage", chat_id=chat_id, ok=True)
        assert update.pushed_at <= update.delivered_at[0] <= reply_call.received_at
        assert reply_call.result["text"] == f"echo: from {chat_id}"


async def test_duplicate_update_delivered_twice(tg: FakeTelegram, bot: Bot) -> None:
    dp = Dispatcher()
    seen: list[tuple[int, int]] = []

    @dp.message(F.text)
    async def record(message: Message) -> None:
        seen.append((message.chat.id, message.message_id))
        await message.answer("got it")

    polling = await start_polling(dp, bot)
    update = tg.push_text(42, "hi")
    await tg.wait_for_messages(42, count=1)
    await tg.wait_for_calls("getUpdates", offset=update["update_id"] + 1)

    tg.push_duplicate(update["update_id"])
    await tg.wait_for_messages(42, count=2)
    tg.push_duplicate(update["update_id"], new_update_id=True)
    await tg.wait_for_messages(42, count=3)
    await stop_polling(dp, polling)

    message_key = (42, update["message"]["message_id"])
    assert seen == [message_key, message_key, message_key]
    delivered_ids = [u.update_id for u in tg.updates]
    assert delivered_ids[0] == delivered_ids[1] != delivered_ids[2]


async def test_push_duplicate_unknown_update(tg: FakeTelegram) -> None:
    with pytest.raises(ValueError, match="never pushed"):
        tg.push_duplicate(123)


# ---- faults ----


async def test_flood_error_raises_retry_after(tg: FakeTelegram, bot: Bot) -> None:
    tg.fail_next("sendMessage", too_many_requests(7), chat_id=42)

    await bot.send_message(43, "other chat is not limited")
    with pytest.raises(TelegramRetryAfter) as raised:
        await bot.send_message(42, "hi")
    await bot.send_message(42, "the fault was used up")

    assert raised.value.retry_after == 7
    assert [c.status for c in tg.calls("sendMessage")] == [200, 429, 200]
    assert tg.sent_texts(42) == ["the fault was used up"]


async def test_blocked_bot_raises_forbidden(tg: FakeTelegram, bot: Bot) -> None:
    tg.fail_next("sendMessage", BOT_BLOCKED)
    with pytest.raises(TelegramForbiddenError, match="bot was blocked by the user"):
        await bot.send_message(42, "hi")

    tg.block_bot(42)
    tg.block_bot(-1005)
    with pytest.raises(TelegramForbiddenError, match="blocked by the user"):
        await bot.send_chat_action(42, "typing")
    with pytest.raises(TelegramForbiddenError, match="kicked from the group"):
        await bot.send_message(-1005, "hi")

    tg.unblock_bot(42)
    await bot.send_message(42, "welcome back")
    assert tg.sent_texts(42) == ["welcome back"]


async def test_fault_kinds_map_to_aiogram_errors(tg: FakeTelegram, bot: Bot) -> None:
    tg.fail_next("sendMessage", bad_request("Bad Request: chat not found"))
    tg.fail_next("sendMessage", SERVER_ERROR)
    tg.fail_next(None, DROPPED_CONNECTION)

    with pytest.raises(TelegramBadRequest, match="chat not found"):
        await bot.send_message(42, "one")
    with pytest.raises(TelegramServerError):
        await bot.send_message(42, "two")
    with pytest.raises(TelegramNetworkError):
        await bot.get_me()
    await bot.send_message(42, "three")

    assert [c.status for c in tg.calls()] == [400, 500, None, 200]
    assert tg.calls(ok=False)[-1].description == "no response: the connection was dropped"


async def test_fail_next_repeats_times(tg: FakeTelegram, bot: Bot) -> None:
    tg.fail_next("sendChatAction", SERVER_ERROR, times=2)

    for _ in range(2):
        with pytest.raises(TelegramServerError):
            await bot.send_chat_action(42, "typing")
    assert await bot.send_chat_action(42, "typing")


async def test_delay_holds_response_until_close() -> None:
    fake = FakeTelegram()
    await fake.start()
    session = AiohttpSession(api=TelegramAPIServer.from_base(fake.api_url))
    async with Bot(fake.token, session=session) as local_bot:
        fake.set_delay("getMe", 60)
        request = asyncio.create_task(local_bot.get_me())
        [call] = await fake.wait_for_calls("getMe")
        assert call.responded_at is None

        await asyncio.wait_for(fake.close(), HANG_GUARD_S)

        me = await asyncio.wait_for(request, HANG_GUARD_S)
        assert me.username == "joey_test_bot"


async def test_wait_for_timeout_names_condition(tg: FakeTelegram, bot: Bot) -> None:
    await bot.get_me()

    with pytest.raises(TimeoutError, match=r"1 message\(s\) sent to chat 42.*getMe:200 x1"):
        await tg.wait_for_messages(42, timeout_s=0.05)


# ---- webhook ----


async def serve_webhook(dp: Dispatcher, bot: Bot, **options: Any) -> tuple[web.AppRunner, str]:
    """Serve aiogram's webhook handler on an ephemeral port of 127.0.0.1 and return its URL."""
    app = web.Application()
    SimpleRequestHandler(dp, bot, **options).register(app, path="/webhook")
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}/webhook"


async def test_webhook_delivers_updates(tg: FakeTelegram, bot: Bot) -> None:
    runner, url = await serve_webhook(echo_dispatcher(), bot, secret_token="s3cret")
    try:
        assert await bot.set_webhook(url, secret_token="s3cret")
        info = await bot.get_webhook_info()
        assert info.url == url
        with pytest.raises(TelegramConflictError, match="webhook is active"):
            await bot.get_updates()

        tg.push_text(42, "over the hook")
        assert (await bot.get_webhook_info()).pending_update_count == 1
        assert await tg.deliver_webhook_updates() == [200]
        [reply] = await tg.wait_for_messages(42)
        assert reply["text"] == "echo: over the hook"

        wrong_secret = await tg.post_to_webhook(tg.updates[0].payload, secret_token="nope")
        assert wrong_secret == 401
        assert tg.pending_update_count() == 0
    finally:
        await runner.cleanup()


async def test_webhook_reply_method_executed(tg: FakeTelegram, bot: Bot) -> None:
    dp = Dispatcher()

    @dp.message(F.text)
    async def reply_in_response(message: Message) -> SendMessage:
        return message.answer("in the webhook response")

    runner, url = await serve_webhook(dp, bot, handle_in_background=False)
    try:
        await bot.set_webhook(url)
        tg.push_text(42, "hi")

        assert await tg.deliver_webhook_updates() == [200]

        assert tg.sent_texts(42) == ["in the webhook response"]
    finally:
        await runner.cleanup()


async def test_webhook_rejects_remote_url(tg: FakeTelegram) -> None:
    with pytest.raises(ValueError, match="not local"):
        await tg.post_to_webhook({"update_id": 1}, url="https://example.org/webhook")


async def test_delete_webhook_restores_polling(tg: FakeTelegram, bot: Bot) -> None:
    await bot.set_webhook("http://127.0.0.1:9/webhook")
    tg.push_text(42, "dropped")

    assert await bot.delete_webhook(drop_pending_updates=True)

    assert (await bot.get_webhook_info()).url == ""
    assert await bot.get_updates() == []
