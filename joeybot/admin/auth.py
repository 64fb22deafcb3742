"""Login for the admin page: a form, server-side sessions and a gate in front of every route.

Gradio's own `auth=` leaves some routes open (in Gradio 6.31 `/gradio_api/cancel`,
`/gradio_api/heartbeat/...`, `/gradio_api/stream/...` and `/gradio_api/reset` skip its login
check), so the page uses its own login instead. `SessionGate` is an ASGI middleware around
the whole application: without a valid session cookie it passes only `GET /login` and
`POST /login`. Browsers asking for a page are redirected to the login form; every other request
gets 401, and a WebSocket is closed before it is accepted.
"""

from __future__ import annotations

import hmac
import html
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from joeybot.admin.texts import language_from_header, text

logger = logging.getLogger(__name__)

SESSION_COOKIE = "joeybot_admin_session"
SESSION_TTL_S = 12 * 3600
LOGIN_PATH = "/login"
LOGOUT_PATH = "/logout"
# Failed logins allowed per client address within the window before it gets 429.
MAX_FAILED_LOGINS = 5
FAILED_LOGIN_WINDOW_S = 300


@dataclass
class Session:
    """A logged-in browser."""

    username: str
    expires_at: float


class SessionStore:
    """Sessions in process memory: a restart of the page logs everybody out."""

    def __init__(self, ttl_s: float = SESSION_TTL_S, clock: Callable[[], float] = time.time):
        self.ttl_s = ttl_s
        self.clock = clock
        self._sessions: dict[str, Session] = {}

    def create(self, username: str) -> str:
        """Start a session and return its token (the cookie value)."""
        self._drop_expired()
        token = secrets.token_urlsafe(32)
        self._sessions[token] = Session(username, self.clock() + self.ttl_s)
        return token

    def username_for(self, token: str | None) -> str | None:
        """Return the session's user, or None for a missing, unknown or expired token."""
        if not token:
            return None
        session = self._sessions.get(token)
        if session is None:
            return None
        if session.expires_at <= self.clock():
            del self._sessions[token]
            return None
        return session.username

    def delete(self, token: str | None) -> None:
        if token:
            self._sessions.pop(token, None)

    def _drop_expired(self) -> None:
        now = self.clock()
        for token in [t for t, s in self._sessions.items() if s.expires_at <= now]:
            del self._sessions[token]


class LoginThrottle:
    """Count failed logins per client address and block an address that fails too often."""

    def __init__(
        self,
        max_failures: int = MAX_FAILED_LOGINS,
        window_s: float = FAILED_LOGIN_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}

    def blocked(self, client: str) -> bool:
        return len(self._recent(client)) >= self.max_failures

    def record_failure(self, client: str) -> None:
        self._recent(client).append(self.clock())

    def reset(self, client: str) -> None:
        self._failures.pop(client, None)

    def _recent(self, client: str) -> deque[float]:
        failures = self._failures.setdefault(client, deque())
        while failures and failures[0] <= self.clock() - self.window_s:
            failures.popleft()
        return failures


class Credentials:
    """The one admin account; compares in constant time."""

    def __init__(self, username: str, password: str) -> None:
        if not password:
            raise ValueError("the admin password is empty")
        self.username = username
        self._password = password.encode()

    def check(self, username: str, password: str) -> bool:
        user_ok = hmac.compare_digest(username.encode(), self.username.encode())
        password_ok = hmac.compare_digest(password.encode(), self._password)
        return user_ok and password_ok


def session_token(cookie_header: str | None) -> str | None:
    """Return the session cookie's value from a raw Cookie header."""
    if not cookie_header:
        return None
    cookies = SimpleCookie()
    try:
        cookies.load(cookie_header)
    except Exception:  # http.cookies raises CookieError and others on malformed headers
        return None
    morsel = cookies.get(SESSION_COOKIE)
    return morsel.value if morsel else None


class SessionGate:
    """ASGI middleware: pass requests with a valid session, reject the rest.

    Public without a session: `GET /login` and `POST /login` only.
    """

    def __init__(self, app: ASGIApp, sessions: SessionStore) -> None:
        self.app = app
        self.sessions = sessions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        token = session_token(headers.get("cookie"))
        if self.sessions.username_for(token) is not None:
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["path"] == LOGIN_PATH and scope["method"] in ("GET", "POST"):
            await self.app(scope, receive, send)
            return
        await self._reject(scope, headers, receive, send)

    async def _reject(
        self, scope: Scope, headers: dict[str, str], receive: Receive, send: Send
    ) -> None:
        wants_page = scope["method"] in ("GET", "HEAD") and "text/html" in headers.get("accept", "")
        if wants_page:
            target = scope["path"]
            if scope.get("query_string"):
                target += "?" + scope["query_string"].decode("latin-1")
            response: Response = RedirectResponse(
                f"{LOGIN_PATH}?next={quote(target, safe='')}", status_code=303
            )
        else:
            response = Response(
                '{"detail":"Not authenticated: log in at /login first"}',
                status_code=401,
                media_type="application/json",
            )
        await response(scope, receive, send)


def build_login_router(
    credentials: Credentials,
    sessions: SessionStore,
    throttle: LoginThrottle | None = None,
) -> APIRouter:
    """Return the routes of the login form, the login itself and the logout."""
    throttle = throttle or LoginThrottle()
    router = APIRouter()

    @router.get(LOGIN_PATH, response_class=HTMLResponse)
    async def login_form(request: Request, next: str = "/") -> HTMLResponse:
        return _login_page(request, next, error_key=None, status_code=200)

    @router.post(LOGIN_PATH)
    async def login(
        request: Request,
        username: str = Form(""),
        password: str = Form(""),
        next: str = Form("/"),
    ) -> Response:
        client = request.client.host if request.client else "unknown"
        if throttle.blocked(client):
            logger.warning("admin login rejected for %s: too many failed attempts", client)
            return _login_page(request, next, error_key="login_throttled", status_code=429)
        if not credentials.check(username, password):
            throttle.record_failure(client)
            # The user name stays out of the log: people type passwords into it by mistake.
            logger.warning("admin login failed from %s", client)
            return _login_page(request, next, error_key="login_failed", status_code=401)
        throttle.reset(client)
        token = sessions.create(username)
        logger.info("admin user %s logged in from %s", username, client)
        response = RedirectResponse(_safe_next(next), status_code=303)
        response.set_cookie(
            SESSION_COOKIE,
            token,
            max_age=int(sessions.ttl_s),
            httponly=True,
            samesite="lax",
            secure=request.url.scheme == "https",
            path="/",
        )
        return response

    @router.get(LOGOUT_PATH)
    async def logout(request: Request) -> Response:
        sessions.delete(request.cookies.get(SESSION_COOKIE))
        response = RedirectResponse(LOGIN_PATH, status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    return router


def _safe_next(target: str) -> str:
    """Return `target` when it is a path on this site, else "/": no open redirects."""
    if target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/"


def _login_page(
    request: Request, next_path: str, *, error_key: str | None, status_code: int
) -> HTMLResponse:
    language = language_from_header(request.headers.get("accept-language"))
    error = ""
    if error_key:
        error = f'<p class="error" role="alert">{html.escape(text(language, error_key))}</p>'
    page = _LOGIN_TEMPLATE.format(
        lang=language,
        title=html.escape(text(language, "login_title")),
        username=html.escape(text(language, "login_username")),
        password=html.escape(text(language, "login_password")),
        submit=html.escape(text(language, "login_submit")),
        error=error,
        next=html.escape(_safe_next(next_path), quote=True),
    )
    return HTMLResponse(page, status_code=status_code)


def _headers(scope: Scope) -> dict[str, Any]:
    return {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]}


_LOGIN_TEMPLATE = """<!doctype html>
<html lang="{lang}">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; background: #f4f4f5; margin: 0; }}
main {{ max-width: 22rem; margin: 12vh auto; background: #fff; padding: 2rem;
        border-radius: 0.75rem; box-shadow: 0 1px 4px rgba(0,0,0,.12); }}
h1 {{ font-size: 1.3rem; margin-top: 0; }}
label {{ display: block; margin: 0.8rem 0 0.3rem; }}
input {{ width: 100%; box-sizing: border-box; padding: 0.5rem; font-size: 1rem; }}
button {{ margin-top: 1.2rem; width: 100%; padding: 0.6rem; font-size: 1rem; cursor: pointer; }}
.error {{ color: #b91c1c; }}
</style>
</head>
<body>
<main>
<h1>{title}</h1>
{error}
<form method="post" action="/login">
<label for="username">{username}</label>
<input id="username" name="username" autocomplete="username" required autofocus>
<label for="password">{password}</label>
<input id="password" name="password" type="password" autocomplete="current-password" required>
<input type="hidden" name="next" value="{next}">
<button type="submit" id="login">{submit}</button>
</form>
</main>
</body>
</html>
"""
