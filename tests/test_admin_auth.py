"""Login, sessions and the gate in front of every route of the admin application."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from starlette.routing import Mount, WebSocketRoute

from joeybot.admin.auth import (
    SESSION_COOKIE,
    LoginThrottle,
    SessionGate,
    SessionStore,
    session_token,
)
from joeybot.admin.server import build_app
from joeybot.cli import main
from joeybot.config import Settings, SettingsError

from .admin_support import RedisServer, free_port, serving

USERNAME = "operator"
PASSWORD = "correct horse battery staple"
# Concrete values for path parameters when requesting every route.
PATH_PARAMETER = re.compile(r"\{[^}]+\}")


@pytest.fixture(scope="module")
def settings(redis_server: RedisServer) -> Settings:
    return Settings(
        _env_file=None,
        redis={"url": redis_server.url},
        admin={"username": USERNAME, "password": PASSWORD},
    )


@pytest.fixture(scope="module")
def app(settings: Settings) -> FastAPI:
    return build_app(settings)


@pytest.fixture(scope="module")
def base_url(app: FastAPI) -> Iterator[str]:
    with serving(app, free_port()) as url:
        yield url


def log_in(base_url: str, username: str = USERNAME, password: str = PASSWORD) -> httpx.Client:
    client = httpx.Client(base_url=base_url)
    response = client.post("/login", data={"username": username, "password": password})
    assert response.status_code == 303, response.text
    return client


def all_routes(app: FastAPI) -> list[tuple[str, str]]:
    """Return (method, path) for every route, Gradio's mounted application included."""
    found: list[tuple[str, str]] = []

    def walk(routes: list, prefix: str) -> None:
        for route in routes:
            if isinstance(route, Mount):
                walk(route.routes, prefix + route.path)
            elif hasattr(route, "original_router"):  # a router included by FastAPI 0.16x
                walk(route.original_router.routes, prefix + route.include_context.prefix)
            elif isinstance(route, WebSocketRoute):
                found.append(("WEBSOCKET", prefix + route.path))
            else:
                for method in sorted(getattr(route, "methods", None) or {"GET"}):
                    found.append((method, prefix + route.path))

    walk(app.routes, "")
    return found


# ----- the gate -------------------------------------------------------------------------------


def test_route_list_includes_gradio_api(app: FastAPI) -> None:
    paths = {path for _, path in all_routes(app)}

    for expected in ("/gradio_api/queue/join", "/gradio_api/queue/data", "/gradio_api/cancel",
                     "/gradio_api/heartbeat/{session_hash}", "/config", "/login"):  # fmt: skip
        assert expected in paths


def test_every_route_rejects_anonymous_requests(app: FastAPI, base_url: str) -> None:
    client = httpx.Client(base_url=base_url)
    checked = 0
    for method, path in all_routes(app):
        if path == "/login" and method in ("GET", "POST"):
            continue
        assert method != "WEBSOCKET", f"untested WebSocket route {path}"
        url = PATH_PARAMETER.sub("x", path)
        response = client.request(method, url, json={} if method == "POST" else None)
        assert response.status_code == 401, f"{method} {url} answered {response.status_code}"
        checked += 1
    assert checked > 50


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/nonexistent"),
        ("PUT", "/"),
        ("DELETE", "/gradio_api/queue/join"),
        ("GET", "/gradio_api/queue/data?session_hash=abc"),
        ("POST", "/gradio_api/run/predict"),
        ("GET", "/gradio_api/file=/etc/passwd"),
        ("GET", "/login/../config"),
        ("POST", "/login/"),
    ],
)
def test_other_requests_rejected(base_url: str, method: str, path: str) -> None:
    response = httpx.request(method, base_url + path)

    assert response.status_code == 401


def test_page_redirects_browser_to_login(base_url: str) -> None:
    response = httpx.get(base_url + "/?view=api", headers={"accept": "text/html"})

    assert response.status_code == 303
    assert response.headers["location"] == "/login?next=%2F%3Fview%3Dapi"


def test_forged_cookie_rejected(base_url: str) -> None:
    client = httpx.Client(base_url=base_url, cookies={SESSION_COOKIE: "made-up"})

    assert client.get("/config").status_code == 401


def test_session_opens_page_and_api(base_url: str) -> None:
    client = log_in(base_url)

    assert client.get("/", headers={"accept": "text/html"}).status_code == 200
    assert client.get("/config").status_code == 200
    assert client.get("/gradio_api/info").status_code == 200


def test_websocket_rejected_before_accept() -> None:
    sessions = SessionStore()
    inner_calls: list[dict] = []

    async def inner(scope, receive, send) -> None:
        inner_calls.append(scope)

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def receive() -> dict:
        return {"type": "websocket.connect"}

    gate = SessionGate(inner, sessions)
    scope = {"type": "websocket", "path": "/gradio_api/ws", "headers": []}

    asyncio.run(gate(scope, receive, send))

    assert inner_calls == []
    assert sent == [{"type": "websocket.close", "code": 1008}]


# ----- login and logout -----------------------------------------------------------------------


def test_login_sets_safe_cookie(base_url: str) -> None:
    response = httpx.post(
        base_url + "/login", data={"username": USERNAME, "password": PASSWORD, "next": "/"}
    )

    cookie = response.headers["set-cookie"].lower()
    assert response.status_code == 303
    assert cookie.startswith(SESSION_COOKIE + "=")
    assert "httponly" in cookie
    assert "samesite=lax" in cookie
    assert "path=/" in cookie


def test_wrong_password_rejected(base_url: str) -> None:
    response = httpx.post(
        base_url + "/login",
        data={"username": USERNAME, "password": "wrong"},
        headers={"accept-language": "ru-RU,ru;q=0.9"},
    )

    assert response.status_code == 401
    assert "set-cookie" not in response.headers
    assert "Неверное имя пользователя или пароль." in response.text


def test_wrong_username_rejected(base_url: str) -> None:
    response = httpx.post(base_url + "/login", data={"username": "admin", "password": PASSWORD})

    assert response.status_code == 401
    assert "Wrong user name or password." in response.text


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/?tab=queue", "/?tab=queue"),
        ("//evil.example/", "/"),
        ("https://evil.example/", "/"),
        ("/\\evil.example", "/"),
    ],
)
def test_login_redirects_only_within_site(base_url: str, target: str, expected: str) -> None:
    response = httpx.post(
        base_url + "/login", data={"username": USERNAME, "password": PASSWORD, "next": target}
    )

    assert response.headers["location"] == expected


def test_login_page_language(base_url: str) -> None:
    english = httpx.get(base_url + "/login", headers={"accept-language": "en-US,en;q=0.9"})
    russian = httpx.get(base_url + "/login", headers={"accept-language": "ru,en;q=0.5"})

    assert "Log in" in english.text
    assert '<html lang="ru">' in russian.text
    assert "Войти" in russian.text


def test_logout_ends_session(base_url: str) -> None:
    client = log_in(base_url)
    token = client.cookies[SESSION_COOKIE]

    client.get("/logout")
    stale = httpx.Client(base_url=base_url, cookies={SESSION_COOKIE: token})

    assert stale.get("/config").status_code == 401


def test_failed_logins_throttled(settings: Settings) -> None:
    with serving(build_app(settings), free_port()) as url:
        for _ in range(5):
            wrong = httpx.post(url + "/login", data={"username": USERNAME, "password": "nope"})
            assert wrong.status_code == 401
        right = httpx.post(url + "/login", data={"username": USERNAME, "password": PASSWORD})

    assert right.status_code == 429
    assert "set-cookie" not in right.headers


# ----- units ----------------------------------------------------------------------------------


def test_session_expires() -> None:
    now = [1000.0]
    sessions = SessionStore(ttl_s=60, clock=lambda: now[0])
    token = sessions.create("operator")

    assert sessions.username_for(token) == "operator"
    now[0] += 61
    assert sessions.username_for(token) is None


def test_throttle_forgets_old_failures() -> None:
    now = [0.0]
    throttle = LoginThrottle(max_failures=2, window_s=10, clock=lambda: now[0])
    throttle.record_failure("10.0.0.1")
    throttle.record_failure("10.0.0.1")

    assert throttle.blocked("10.0.0.1")
    assert not throttle.blocked("10.0.0.2")
    now[0] += 11
    assert not throttle.blocked("10.0.0.1")


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("other=1", None),
        (f"other=1; {SESSION_COOKIE}=abc", "abc"),
        ('bad"cookie', None),
    ],
)
def test_session_token_from_cookie_header(header: str | None, expected: str | None) -> None:
    assert session_token(header) == expected


# ----- start-up -------------------------------------------------------------------------------


def test_app_requires_password(redis_server: RedisServer) -> None:
    settings = Settings(_env_file=None, redis={"url": redis_server.url})

    with pytest.raises(SettingsError, match="ADMIN_PASSWORD is empty"):
        build_app(settings)


def test_cli_refuses_empty_password(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env here
    monkeypatch.setenv("ADMIN_PASSWORD", "")

    code = main(["admin"])

    assert code == 2
    assert "ADMIN_PASSWORD is empty" in capsys.readouterr().err


def test_cli_reports_unreachable_redis(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ADMIN_PASSWORD", "secret-for-test")
    monkeypatch.setenv("REDIS_URL", f"redis://:hidden-pw@127.0.0.1:{free_port()}/0")

    code = main(["admin"])

    error = capsys.readouterr().err
    assert code == 1
    assert "cannot reach Redis" in error
    assert "hidden-pw" not in error


def test_cli_serves_on_configured_address(redis_server: RedisServer, tmp_path: Path) -> None:
    port = free_port()
    environment = os.environ | {
        "ADMIN_PASSWORD": PASSWORD,
        "ADMIN_HOST": "127.0.0.1",
        "ADMIN_PORT": str(port),
        "REDIS_URL": redis_server.url,
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "joeybot.cli", "admin"],
        cwd=tmp_path,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        response = _wait_for_login_page(f"http://127.0.0.1:{port}/login", process)
        assert response.status_code == 200
        assert "<form" in response.text
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=30)
    assert PASSWORD not in stderr
    assert f"admin page starting on http://127.0.0.1:{port}" in stderr


def _wait_for_login_page(url: str, process: subprocess.Popen, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return httpx.get(url)
        except httpx.ConnectError as exc:
            if process.poll() is not None:
                raise AssertionError(f"joeybot admin exited: {process.returncode}") from exc
            if time.monotonic() > deadline:
                raise AssertionError(f"joeybot admin did not answer within {timeout_s} s") from exc
            time.sleep(0.2)
