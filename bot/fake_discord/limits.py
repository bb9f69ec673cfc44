"""Discord's rate limits as a client meets them: per-route buckets with ``X-RateLimit-*`` headers, the global
50 requests/second per bot, injected 429s, and Cloudflare's HTML 429 (no ``Via`` header) that discord.py
cannot retry.

A bucket is a route (Discord groups some routes under one opaque ``X-RateLimit-Bucket`` hash) times its major
parameter (channel, guild, webhook or interaction). Interaction callbacks and token-less webhook calls do not
count toward the global limit, as on Discord.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

from aiohttp import web

GLOBAL_PER_SECOND = 50
DEFAULT_LIMIT = (50, 1.0)
"""Per-bucket (requests, seconds) unless configured: roomy, so the tests' fast cadence runs unthrottled."""
MESSAGE_WRITES = "messages"
"""The bucket shared by creating and editing messages in one channel (``FakeDiscord.limit_writes``)."""
_SHARED = {
    ("POST", "/channels/{channel_id}/messages"): MESSAGE_WRITES,
    ("PATCH", "/channels/{channel_id}/messages/{message_id}"): MESSAGE_WRITES,
}
_MAJOR = ("channel_id", "guild_id", "webhook_id", "interaction_id")
CLOUDFLARE_BODY = (b"<!DOCTYPE html><html><head><title>Access denied | discord.com used Cloudflare to restrict "
                   b"access</title></head><body>error code: 1015</body></html>")


@dataclass
class Fault:
    """Answer the next ``times`` calls to ``method`` on a path matching ``path`` with a 429."""

    method: str
    path: re.Pattern
    retry_after: float
    times: int
    cloudflare: bool = False


@dataclass
class Window:
    limit: int
    per: float
    hits: deque = field(default_factory=deque)

    def trim(self, now: float) -> None:
        while self.hits and self.hits[0] <= now - self.per:
            self.hits.popleft()

    def reset_after(self, now: float) -> float:
        return max(0.0, self.hits[0] + self.per - now) if self.hits else self.per


class RateLimits:
    """Decides, per request, whether Discord would answer 429, and the rate-limit headers it would send."""

    def __init__(self) -> None:
        self.limits: dict[str, tuple[int, float]] = {}
        self.faults: list[Fault] = []
        self.global_per_second: int | None = GLOBAL_PER_SECOND
        self._buckets: dict[tuple, Window] = {}
        self._global: dict[str, deque] = defaultdict(deque)

    def check(self, request: web.Request) -> tuple[web.Response | None, dict[str, str]]:
        """(a 429 to send instead of handling the request, or None; the headers for the reply)."""
        template = _template(request)
        for fault in self.faults:
            if fault.times > 0 and fault.method == request.method and fault.path.search(request.path):
                fault.times -= 1
                return (cloudflare_429() if fault.cloudflare else too_many(fault.retry_after, "user")), {}
        if template is None:
            return None, {}
        now = time.monotonic()
        token = request.headers.get("Authorization")
        if token and self.global_per_second and not template.startswith("/interactions/"):
            window = self._global[token]
            while window and window[0] <= now - 1.0:
                window.popleft()
            if len(window) >= self.global_per_second:
                return too_many(window[0] + 1.0 - now, "global"), {}
            window.append(now)
        name = _SHARED.get((request.method, template), f"{request.method} {template}")
        major = tuple(request.match_info.get(k) for k in _MAJOR)
        key = (token, name, major)
        window = self._buckets.get(key)
        if window is None:
            window = self._buckets[key] = Window(*self.limits.get(name, DEFAULT_LIMIT))
        window.trim(now)
        if len(window.hits) >= window.limit:
            retry = window.reset_after(now)
            return too_many(retry, "user", headers=_headers(name, window, now)), {}
        window.hits.append(now)
        return None, _headers(name, window, now)


def _template(request: web.Request) -> str | None:
    """The route as Discord's docs spell it (``/channels/{channel_id}/messages``), None for an unknown route."""
    route = request.match_info.route
    resource = getattr(route, "resource", None)
    canonical = getattr(resource, "canonical", None)
    if not canonical or not canonical.startswith("/api/"):
        return None
    return re.sub(r"^/api/v\{version\}", "", canonical)


def _headers(name: str, window: Window, now: float) -> dict[str, str]:
    reset_after = window.reset_after(now)
    return {
        "X-RateLimit-Limit": str(window.limit), "X-RateLimit-Remaining": str(max(0, window.limit - len(window.hits))),
        "X-RateLimit-Reset": f"{time.time() + reset_after:.3f}", "X-RateLimit-Reset-After": f"{reset_after:.3f}",
        "X-RateLimit-Bucket": hashlib.sha1(name.encode()).hexdigest()[:16],
    }


def too_many(retry_after: float, scope: str, headers: dict[str, str] | None = None) -> web.Response:
    """Discord's own 429: JSON body, ``Via`` header (discord.py retries only when it sees one)."""
    is_global = scope == "global"
    extra = {"Retry-After": str(max(1, math.ceil(retry_after))), "Via": "1.1 google", "X-RateLimit-Scope": scope,
             **({"X-RateLimit-Global": "true"} if is_global else {}), **(headers or {})}
    body = {"message": "You are being rate limited.", "retry_after": round(retry_after, 3), "global": is_global,
            "code": 0}
    return web.Response(body=json.dumps(body).encode(), status=429, content_type="application/json", headers=extra)


def cloudflare_429() -> web.Response:
    """What Cloudflare sends when it blocks an IP (too many invalid requests): HTML, no ``Via`` header."""
    return web.Response(body=CLOUDFLARE_BODY, status=429, content_type="text/html")
