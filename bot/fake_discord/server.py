"""A local, protocol-level fake Discord (REST + gateway on 127.0.0.1) that the real discord.py client uses.

``personabot simulate`` runs the bot against it; tests drive it as users do (messages, replies, DMs, slash
commands) and inspect every request the bot made. It can also misbehave on purpose: 429s with Retry-After,
a per-channel write limit like Discord's, dropped gateway connections, a disabled Message Content intent.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import discord
import discord.gateway
import discord.http
import yarl
from aiohttp import web

from .gateway import Gateway
from .model import (
    ALL_PERMISSIONS, MEMBER_PERMISSIONS, Channel, Interaction, Snowflakes, User, Webhook, message_payload, timestamp,
)
from .rest import ApiError, Rest, reply

log = logging.getLogger(__name__)
Watcher = Callable[[str, dict], None]


@dataclass
class Request:
    """One REST call the bot made, as the fake saw it."""

    at: float
    method: str
    path: str
    status: int
    body: Any
    channel_id: int | None


@dataclass
class _Fault:
    method: str
    path: re.Pattern
    retry_after: float
    times: int


@dataclass
class _WriteLimit:
    count: int
    per: float
    windows: dict[tuple, deque] = field(default_factory=lambda: defaultdict(deque))


class FakeDiscord:
    """One guild, its users, bots, channels and webhooks; REST under /api/v10 and the gateway under /ws."""

    def __init__(self, guild_name: str = "personabot sim", owner_name: str = "owner") -> None:
        self.snowflake = Snowflakes()
        self.guild_id = self.snowflake()
        self.guild_name = guild_name
        self.users: dict[int, User] = {}
        self.roles: dict[int, str] = {}
        self.channels: dict[int, Channel] = {}
        self.webhooks: dict[int, Webhook] = {}
        self.interactions: dict[int, Interaction] = {}
        self.interaction_messages: dict[int, list[dict]] = defaultdict(list)
        self.requests: list[Request] = []
        self.rate_limited: list[Request] = []
        self.typing: list[tuple[int, int]] = []
        self.watchers: list[Watcher] = []
        self.owner = self.add_user(owner_name, admin=True)
        self.gateway = Gateway(self)
        self._rest = Rest(self)
        self._faults: list[_Fault] = []
        self._write_limit: _WriteLimit | None = None
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    # server lifecycle

    async def start(self, port: int = 0) -> FakeDiscord:
        app = web.Application(middlewares=[self._middleware])
        app.add_routes([web.get("/ws", self.gateway.handle), *self._rest.routes()])
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.port = self._runner.addresses[0][1]
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v10"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @contextmanager
    def patched(self) -> Iterator[None]:
        """Point discord.py's REST base and default gateway at this fake."""
        old = discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
        discord.http.Route.BASE = self.api_url
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(self.gateway_url)
        try:
            yield
        finally:
            discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = old

    # the world

    def add_user(self, name: str, *, admin: bool = False, roles: list[int] | None = None) -> User:
        user = User(self.snowflake(), name, admin=admin, roles=list(roles or []))
        self.users[user.id] = user
        return user

    def add_bot(self, name: str, token: str, *, message_content: bool = True) -> User:
        """A bot account (and its application) that logs in with ``token``."""
        bot = User(self.snowflake(), name, bot=True, token=token, app_id=self.snowflake(),
                   message_content=message_content)
        self.users[bot.id] = bot
        return bot

    def add_role(self, name: str) -> int:
        role_id = self.snowflake()
        self.roles[role_id] = name
        for bot in self.bots:
            self.gateway.dispatch(bot, "GUILD_ROLE_CREATE", {"guild_id": str(self.guild_id),
                                                             "role": self._role(role_id, name, 0)})
        return role_id

    def _role(self, role_id: int, name: str, permissions: int) -> dict[str, Any]:
        return {"id": str(role_id), "name": name, "permissions": str(permissions), "color": 0, "hoist": False,
                "position": 0 if role_id == self.guild_id else 1, "managed": False, "mentionable": False, "flags": 0}

    def add_channel(self, name: str, channel_id: int | None = None) -> Channel:
        channel = Channel(channel_id or self.snowflake(), name, self.guild_id)
        self.channels[channel.id] = channel
        for bot in self.bots:
            self.gateway.dispatch(bot, "CHANNEL_CREATE", channel.payload())
        return channel

    def dm_channel(self, user: User, bot: User) -> Channel:
        for channel in self.channels.values():
            if channel.guild_id is None and channel.recipient is user and channel.name == f"dm-{bot.id}":
                return channel
        channel = Channel(self.snowflake(), f"dm-{bot.id}", None, recipient=user)
        self.channels[channel.id] = channel
        return channel

    @property
    def bots(self) -> list[User]:
        return [u for u in self.users.values() if u.bot]

    def bot_by_token(self, token: str) -> User | None:
        return next((b for b in self.bots if b.token == token), None)

    def interaction_by_token(self, token: str) -> Interaction | None:
        return next((i for i in self.interactions.values() if i.token == token), None)

    def ready_payload(self, bot: User, session_id: str) -> dict[str, Any]:
        return {"v": 10, "user": bot.payload(), "guilds": [{"id": str(self.guild_id), "unavailable": True}],
                "session_id": session_id, "resume_gateway_url": self.gateway_url, "session_type": "normal",
                "application": {"id": str(bot.app_id), "flags": 1 << 19}, "private_channels": [],
                "relationships": [], "geo_ordered_rtc_regions": []}

    def guild_payload(self) -> dict[str, Any]:
        roles = [self._role(self.guild_id, "@everyone", MEMBER_PERMISSIONS),
                 *(self._role(i, n, 0) for i, n in self.roles.items())]
        members = [u.member(self.guild_id) for u in self.users.values()]
        return {
            "id": str(self.guild_id), "name": self.guild_name, "owner_id": str(self.owner.id), "icon": None,
            "splash": None, "discovery_splash": None, "banner": None, "description": None, "features": [],
            "roles": roles, "emojis": [], "stickers": [], "channels": [
                c.payload() for c in self.channels.values() if c.guild_id is not None],
            "members": members, "member_count": len(members), "threads": [], "voice_states": [], "presences": [],
            "stage_instances": [], "guild_scheduled_events": [], "soundboard_sounds": [], "large": False,
            "unavailable": False, "joined_at": timestamp(self.guild_id), "afk_timeout": 300,
            "verification_level": 0, "default_message_notifications": 0, "explicit_content_filter": 0,
            "mfa_level": 0, "premium_tier": 0, "preferred_locale": "en-US", "nsfw_level": 0,
            "system_channel_flags": 0, "premium_progress_bar_enabled": False,
        }

    # messages (called by REST handlers and by the user-facing helpers below)

    def create_message(
        self, channel: Channel, author: User | dict, content: str, *, reference: dict | None = None,
        webhook_id: int | None = None, avatar_url: str | None = None, extra: dict | None = None,
    ) -> dict:
        message = message_payload(self.snowflake(), channel, author, content, webhook_id=webhook_id,
                                  reference=reference, users=self.users, extra=extra)
        if avatar_url:
            message["author"]["avatar_url"] = avatar_url
        channel.messages.append(message)
        self._broadcast(channel, "MESSAGE_CREATE", message)
        self._notify("create", message)
        return message

    def edit_message(self, message: dict, content: str) -> dict:
        message["content"] = content
        message["edited_timestamp"] = discord.utils.utcnow().isoformat()
        channel = self.channels.get(int(message["channel_id"]))
        if channel is not None:
            self._broadcast(channel, "MESSAGE_UPDATE", message)
        self._notify("update", message)
        return message

    def interaction_message(self, interaction: Interaction, content: str, ephemeral: bool) -> dict:
        """The message an interaction response creates; ephemeral ones are seen only by the user."""
        extra = {"type": 20, "application_id": str(interaction.bot.app_id), "flags": 64 if ephemeral else 0,
                 "interaction_metadata": {"id": str(interaction.id), "type": 2, "user": interaction.user.payload(),
                                          "authorizing_integration_owners": {}}}
        if ephemeral or not content:
            message = message_payload(self.snowflake(), interaction.channel, interaction.bot, content or "…",
                                      extra=extra)
        else:
            message = self.create_message(interaction.channel, interaction.bot, content, extra=extra)
        self.interaction_messages[interaction.id].append(message)
        return message

    def _broadcast(self, channel: Channel, event: str, message: dict) -> None:
        dm = channel.guild_id is None
        for bot in self.bots:
            if dm and channel.name != f"dm-{bot.id}":
                continue
            self.gateway.dispatch(bot, event, message)

    def _notify(self, kind: str, message: dict) -> None:
        for watcher in self.watchers:
            watcher(kind, message)
        self._changed.set()

    # acting as users

    def post(self, author: User, channel: Channel, content: str, *, reply_to: dict | None = None) -> dict:
        """``author`` writes in ``channel`` (optionally replying to a message)."""
        return self.create_message(channel, author, content, reference=reply_to)

    def delete(self, message: dict) -> None:
        """The author (or a moderator) deletes ``message``: gone from the channel, MESSAGE_DELETE to the bots."""
        channel = self.channels[int(message["channel_id"])]
        channel.messages.remove(message)
        event = {"id": message["id"], "channel_id": message["channel_id"]}
        if channel.guild_id is not None:
            event["guild_id"] = str(channel.guild_id)
        for bot in self.bots:
            if channel.guild_id is not None or channel.name == f"dm-{bot.id}":
                self.gateway.dispatch(bot, "MESSAGE_DELETE", event)
        self._changed.set()

    def command(self, bot: User, user: User, channel: Channel, name: str, **options: Any) -> Interaction:
        """``user`` runs ``/name`` (e.g. ``"persona swap"``) of ``bot``'s app, with typed options."""
        words = name.split()
        schema = bot.commands.get(words[0])
        if schema is None:
            raise AssertionError(f"{bot.name} has not registered /{words[0]} (has: {sorted(bot.commands)})")
        node, path = schema, []
        for word in words[1:]:
            node = next((o for o in node.get("options", []) if o["name"] == word), None)
            if node is None:
                raise AssertionError(f"/{name}: no subcommand '{word}'")
            path.append(node)
        values = []
        for option in node.get("options", []):
            if option["name"] in options:
                values.append({"name": option["name"], "type": option["type"], "value": options.pop(option["name"])})
        if options:
            raise AssertionError(f"/{name} has no options {sorted(options)}")
        for sub in reversed(path):
            values = [{"name": sub["name"], "type": sub["type"], "options": values}]
        interaction = Interaction(self.snowflake(), f"itoken-{self.snowflake()}", bot, user, channel)
        self.interactions[interaction.id] = interaction
        payload: dict[str, Any] = {
            "id": str(interaction.id), "application_id": str(bot.app_id), "type": 2, "token": interaction.token,
            "version": 1, "data": {"id": schema["id"], "name": words[0], "type": 1, "options": values},
            "channel_id": str(channel.id), "channel": channel.payload(), "locale": "en-US",
            "app_permissions": str(ALL_PERMISSIONS), "attachment_size_limit": 8 << 20,
            "entitlements": [], "authorizing_integration_owners": {"0": str(self.guild_id)}, "context": 0,
        }
        if channel.guild_id is not None:
            member = user.member(self.guild_id)
            member["permissions"] = str(user.permissions)
            payload.update(guild_id=str(self.guild_id), member=member, guild_locale="en-US",
                           guild={"id": str(self.guild_id), "locale": "en-US", "features": []})
        else:
            payload.update(user=user.payload(), context=1)
        self.gateway.dispatch(bot, "INTERACTION_CREATE", payload)
        return interaction

    # inspection and misbehaviour

    async def wait_for(self, condition: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Until ``condition()`` is truthy (checked on every change in the fake, and every 20 ms)."""
        async def watch() -> Any:
            while not (value := condition()):
                self._changed.clear()
                with suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), 0.02)
            return value

        return await asyncio.wait_for(watch(), timeout)

    def rate_limit(self, method: str, path: str, *, retry_after: float = 0.5, times: int = 1) -> None:
        """Answer the next ``times`` calls matching ``method`` and the ``path`` regex with a 429."""
        self._faults.append(_Fault(method.upper(), re.compile(path), retry_after, times))

    def limit_writes(self, count: int, per: float) -> None:
        """Enforce a Discord-like bucket: at most ``count`` message writes per ``per`` seconds per channel."""
        self._write_limit = _WriteLimit(count, per)

    async def disconnect(self, bot: User, code: int = 1001) -> None:
        await self.gateway.disconnect(bot, code)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        body = await request.json() if request.body_exists and request.content_type == "application/json" else None
        channel_id = self._channel_of(request)
        limited = self._limited(request, channel_id)
        if limited is not None:
            response = limited
        else:
            try:
                response = await handler(request)
            except ApiError as exc:
                response = exc.response()
            except web.HTTPException as exc:  # no such route: worth a warning, the bot expects one
                log.warning("fake Discord: %s %s -> %s", request.method, request.path, exc.status)
                response = reply({"code": 0, "message": f"{exc.status}: {exc.reason}"}, exc.status)
        entry = Request(time.monotonic(), request.method, request.path, response.status, body, channel_id)
        if request.path.startswith("/api/"):
            self.requests.append(entry)
            if response.status == 429:
                self.rate_limited.append(entry)
        return response

    def _channel_of(self, request: web.Request) -> int | None:
        info = request.match_info
        if "channel_id" in info:
            return int(info["channel_id"])
        hook = self.webhooks.get(int(info["webhook_id"])) if info.get("webhook_id", "").isdigit() else None
        return hook.channel.id if hook is not None else None

    def _limited(self, request: web.Request, channel_id: int | None) -> web.Response | None:
        for fault in self._faults:
            if fault.times > 0 and fault.method == request.method and fault.path.search(request.path):
                fault.times -= 1
                return self._429(fault.retry_after)
        limit = self._write_limit
        is_write = request.method in ("POST", "PATCH") and (
            "/messages" in request.path or "/webhooks/" in request.path) and channel_id is not None
        if limit is None or not is_write:
            return None
        now = time.monotonic()
        window = limit.windows[(request.headers.get("Authorization"), channel_id)]
        while window and window[0] <= now - limit.per:
            window.popleft()
        if len(window) >= limit.count:
            return self._429(window[0] + limit.per - now)
        window.append(now)
        return None

    @staticmethod
    def _429(retry_after: float) -> web.Response:
        return reply({"message": "You are being rate limited.", "retry_after": round(retry_after, 3),
                      "global": False}, 429,
                     headers={"Retry-After": f"{retry_after:.3f}", "Via": "1.1 google", "X-RateLimit-Scope": "user"})
