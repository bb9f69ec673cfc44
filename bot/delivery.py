"""Keep trying a Discord call through rate limits and outages, up to a deadline.

discord.py retries a 429 five times and then raises; it does not retry a 429 without a ``Via`` header at
all (Cloudflare's, which blocks the IP for a while) nor a 5xx it has already retried. Losing a reply to that
is worse than being late, so the bot's writes and history reads go through ``persist``: backoff from
``FIRST_BACKOFF`` doubling to ``MAX_BACKOFF`` (or Discord's ``Retry-After``), until ``deadline`` seconds
have passed; then ``DeliveryError``, which the caller logs with what was lost.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import aiohttp
import discord

log = logging.getLogger(__name__)
T = TypeVar("T")
FIRST_BACKOFF = 0.25
MAX_BACKOFF = 15.0


class DeliveryError(RuntimeError):
    """Discord kept refusing a call until the deadline."""


def retryable(exc: BaseException) -> bool:
    """A failure that may pass: rate limited, Discord's 5xx, the network."""
    if isinstance(exc, discord.HTTPException):
        return exc.status == 429 or exc.status >= 500
    return isinstance(exc, (aiohttp.ClientError, asyncio.TimeoutError, OSError))


async def persist(call: Callable[[], Awaitable[T]], what: str, deadline: float) -> T:
    """``await call()``, retried on retryable failures with backoff for up to ``deadline`` seconds."""
    end = time.monotonic() + deadline
    backoff = FIRST_BACKOFF
    while True:
        try:
            return await call()
        except Exception as exc:
            if not retryable(exc):
                raise
            wait = max(backoff, _retry_after(exc))
            if time.monotonic() + wait > end:
                raise DeliveryError(f"{what}: Discord still refuses after {deadline:g} s: {exc}") from exc
            log.warning("%s: %s; retrying in %.2f s", what, exc, wait)
            await asyncio.sleep(wait)
            backoff = min(backoff * 2, MAX_BACKOFF)


def _retry_after(exc: BaseException) -> float:
    response = getattr(exc, "response", None)
    try:
        return float(response.headers.get("Retry-After", 0)) if response is not None else 0.0
    except (TypeError, ValueError):
        return 0.0
