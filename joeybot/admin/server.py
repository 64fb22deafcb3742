"""Build and serve the admin application: login, session gate and the Gradio page.

The FastAPI application contains the login routes and mounts the Gradio page at "/". The
`SessionGate` middleware wraps all of it, Gradio's API and queue routes included.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import gradio as gr
import uvicorn
from fastapi import FastAPI, Request

from joeybot.admin.auth import (
    SESSION_COOKIE,
    Credentials,
    LoginThrottle,
    SessionGate,
    SessionStore,
    build_login_router,
)
from joeybot.admin.backend import AdminBackend
from joeybot.admin.ui import CSS, AdminPage, build_blocks, build_i18n
from joeybot.config import Settings, SettingsError
from joeybot.history import HistoryStore
from joeybot.redis_client import check_redis, create_redis, describe_url

logger = logging.getLogger(__name__)


class _BackendHolder:
    """The AdminBackend, created when the application starts and closed when it stops."""

    def __init__(self) -> None:
        self.backend: AdminBackend | None = None

    def get(self) -> AdminBackend:
        if self.backend is None:
            raise RuntimeError("the admin application has not started yet")
        return self.backend


def check_admin_settings(settings: Settings) -> None:
    """Raise SettingsError when the page cannot start safely: no password or no user name."""
    if not settings.admin.password.get_secret_value():
        raise SettingsError(
            "ADMIN_PASSWORD is empty: the admin page reaches the model and the chat histories, "
            "so it does not start without a login. Set ADMIN_PASSWORD in the environment or "
            "in .env."
        )
    if not settings.admin.username.strip():
        raise SettingsError("ADMIN_USERNAME is empty: set the login name in the environment.")


def build_app(settings: Settings, sessions: SessionStore | None = None) -> FastAPI:
    """Return the admin application; Redis is connected when the application starts."""
    check_admin_settings(settings)
    sessions = sessions or SessionStore()
    holder = _BackendHolder()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = create_redis(settings.redis)
        holder.backend = AdminBackend(redis, HistoryStore(redis, settings.history))
        logger.info("admin page connected to Redis at %s", describe_url(settings.redis.url))
        try:
            yield
        finally:
            holder.backend = None
            await redis.aclose()
            logger.info("admin page stopped")

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    credentials = Credentials(
        settings.admin.username.strip(), settings.admin.password.get_secret_value()
    )
    app.include_router(build_login_router(credentials, sessions, LoginThrottle()))

    def current_user(request: Request) -> str | None:
        return sessions.username_for(request.cookies.get(SESSION_COOKIE))

    blocks = build_blocks(AdminPage(holder.get), settings.generation)
    gr.mount_gradio_app(
        app,
        blocks,
        path="/",
        # Gradio checks the same session on the routes it guards; SessionGate guards the rest.
        auth_dependency=current_user,
        server_name=settings.admin.host,
        server_port=settings.admin.port,
        footer_links=["settings"],
        run_history=False,
        ssr_mode=False,
        enable_monitoring=False,
        mcp_server=False,
        pwa=False,
        i18n=build_i18n(),
        css=CSS,
    )
    app.add_middleware(SessionGate, sessions=sessions)
    return app


def serve(settings: Settings) -> None:
    """Check the settings and Redis, then serve the page until interrupted."""
    check_admin_settings(settings)
    asyncio.run(check_redis(settings.redis))
    app = build_app(settings)
    logger.info(
        "admin page starting on http://%s:%d (user %s, Redis %s)",
        settings.admin.host,
        settings.admin.port,
        settings.admin.username,
        describe_url(settings.redis.url),
    )
    config = uvicorn.Config(
        app,
        host=settings.admin.host,
        port=settings.admin.port,
        log_config=None,
        access_log=False,
        server_header=False,
    )
    uvicorn.Server(config).run()
