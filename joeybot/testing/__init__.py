"""Test helpers that ship with the package so that tests and benchmarks can share them."""

from joeybot.testing.fake_telegram import (
    BOT_BLOCKED,
    DROPPED_CONNECTION,
    SERVER_ERROR,
    ApiCall,
    FakeTelegram,
    Fault,
    PushedUpdate,
    bad_request,
    too_many_requests,
)

__all__ = [
    "BOT_BLOCKED",
    "DROPPED_CONNECTION",
    "SERVER_ERROR",
    "ApiCall",
    "FakeTelegram",
    "Fault",
    "PushedUpdate",
    "bad_request",
    "too_many_requests",
]
