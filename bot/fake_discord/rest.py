"""The fake REST API: the routes discord.py uses for login, messages, webhooks, commands and interactions.

Validation mirrors Discord where it matters to a bot: 2000-char and empty-message errors, editing only
your own messages, bad tokens (401), unknown routes (404, logged), permissions (403 with 50001 Missing Access
when the bot cannot see the channel, 50013 Missing Permissions when it lacks one it needs), the 3-second
deadline for an interaction's first response. Every reply body is shaped as Discord's OpenAPI spec says
(tests/discord_spec checks it).
"""
from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .model import Channel, P, User, Webhook

if TYPE_CHECKING:
    from .server import FakeDiscord

API = r"/api/v{version:\d+}"
INTERACTION_DEADLINE = 3.0
"""Seconds Discord waits for an interaction's first response before the token stops working."""
VIEW, SEND, SEND_IN_THREADS = P(view_channel=True).value, P(send_messages=True).value, P(
    send_messages_in_threads=True).value
HISTORY, MANAGE_WEBHOOKS = P(read_message_history=True).value, P(manage_webhooks=True).value


def reply(data: Any = None, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """JSON with Content-Type exactly ``application/json`` (discord.py compares it verbatim)."""
    if data is None and status == 204:
        return web.Response(status=204, headers=headers)
    return web.Response(body=json.dumps(data).encode(), status=status, content_type="application/json",
                        headers=headers)


class ApiError(Exception):
    """A Discord error reply: HTTP status, JSON error code and message."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code

    def response(self) -> web.Response:
        return reply({"code": self.code, "message": str(self)}, self.status)


def check_content(content: Any) -> str:
    if not isinstance(content, str) or not content.strip():
        raise ApiError(400, 50006, "Cannot send an empty message")
    if len(content) > 2000:
        raise ApiError(400, 50035, "Invalid Form Body: content: Must be 2000 or fewer in length.")
    return content


class Rest:
    """Route handlers over the fake's state."""

    def __init__(self, fake: FakeDiscord) -> None:
        self.fake = fake

    def routes(self) -> list[web.RouteDef]:
        r = web
        return [
            r.get(f"{API}/users/@me", self.me),
            r.get(f"{API}/oauth2/applications/@me", self.application),
            r.get(f"{API}/gateway", self.gateway),
            r.get(f"{API}/gateway/bot", self.gateway),
            r.put(f"{API}/applications/{{app_id}}/commands", self.put_commands),
            r.put(f"{API}/applications/{{app_id}}/guilds/{{guild_id}}/commands", self.put_commands),
            r.get(f"{API}/applications/{{app_id}}/commands", self.get_commands),
            r.get(f"{API}/channels/{{channel_id}}", self.get_channel),
            r.get(f"{API}/channels/{{channel_id}}/messages", self.history),
            r.post(f"{API}/channels/{{channel_id}}/messages", self.create_message),
            r.get(f"{API}/channels/{{channel_id}}/messages/{{message_id}}", self.get_message),
            r.patch(f"{API}/channels/{{channel_id}}/messages/{{message_id}}", self.edit_message),
            r.delete(f"{API}/channels/{{channel_id}}/messages/{{message_id}}", self.delete_message),
            r.post(f"{API}/channels/{{channel_id}}/typing", self.typing),
            r.get(f"{API}/channels/{{channel_id}}/webhooks", self.list_webhooks),
            r.post(f"{API}/channels/{{channel_id}}/webhooks", self.create_webhook),
            r.get(f"{API}/guilds/{{guild_id}}/webhooks", self.guild_webhooks),
            r.post(f"{API}/users/@me/channels", self.open_dm),
            r.post(f"{API}/webhooks/{{webhook_id}}/{{token}}", self.execute_webhook),
            r.get(f"{API}/webhooks/{{webhook_id}}/{{token}}/messages/{{message_id}}", self.get_webhook_message),
            r.patch(f"{API}/webhooks/{{webhook_id}}/{{token}}/messages/{{message_id}}", self.edit_webhook_message),
            r.post(f"{API}/interactions/{{interaction_id}}/{{token}}/callback", self.interaction_callback),
        ]

    # helpers

    def bot(self, request: web.Request) -> User:
        auth = request.headers.get("Authorization", "")
        bot = self.fake.bot_by_token(auth.removeprefix("Bot ")) if auth.startswith("Bot ") else None
        if bot is None:
            raise ApiError(401, 0, "401: Unauthorized")
        return bot

    def channel(self, request: web.Request, bot: User | None = None, need: int = 0) -> Channel:
        """The route's channel, if ``bot`` can see it and holds the ``need`` permissions there."""
        channel = self.fake.channels.get(int(request.match_info["channel_id"]))
        if channel is None:
            raise ApiError(404, 10003, "Unknown Channel")
        if bot is not None:
            perms = self.fake.permissions(bot, channel)
            if not perms & VIEW:
                raise ApiError(403, 50001, "Missing Access")
            if perms & need != need:
                raise ApiError(403, 50013, "Missing Permissions")
        return channel

    @staticmethod
    def message(channel: Channel, message_id: str) -> dict:
        found = channel.find(int(message_id))
        if found is None:
            raise ApiError(404, 10008, "Unknown Message")
        return found

    @staticmethod
    async def body(request: web.Request) -> dict[str, Any]:
        if request.content_type == "multipart/form-data":
            form = await request.post()
            return json.loads(str(form.get("payload_json") or "{}"))
        return await request.json() if request.body_exists else {}

    def webhook(self, request: web.Request) -> Webhook:
        hook = self.fake.webhooks.get(int(request.match_info["webhook_id"]))
        if hook is None or hook.token != request.match_info["token"]:
            raise ApiError(404, 10015, "Unknown Webhook")
        return hook

    # login and setup

    async def me(self, request: web.Request) -> web.Response:
        return reply({**self.bot(request).payload(), "mfa_enabled": False, "locale": "en-US", "verified": True})

    async def application(self, request: web.Request) -> web.Response:
        bot = self.bot(request)
        return reply({
            "id": str(bot.app_id), "name": bot.name, "description": "", "icon": None, "type": None,
            "bot_public": True, "bot_require_code_grant": False,
            "verify_key": "0" * 64, "flags": 1 << 19, "flags_new": str(1 << 19),
            "redirect_uris": [], "interactions_endpoint_url": None, "role_connections_verification_url": None,
            "approximate_guild_count": sum(bot.id in g.members for g in self.fake.guilds.values()),
            "approximate_user_install_count": 0, "approximate_user_authorization_count": 0,
            "explicit_content_filter": 0, "eligible_oauth2_scopes": ["bot", "applications.commands"],
            **self.fake.application_owner(bot),
        })

    async def gateway(self, request: web.Request) -> web.Response:
        if request.path.endswith("/bot"):
            return reply({"url": self.fake.gateway_url, "shards": 1, "session_start_limit": {
                "total": 1000, "remaining": 1000, "reset_after": 0, "max_concurrency": 1}})
        return reply({"url": self.fake.gateway_url})

    async def put_commands(self, request: web.Request) -> web.Response:
        bot = self.bot(request)
        registered = []
        for command in await request.json():
            command = {**{k: v for k, v in command.items() if v is not None}, "id": str(self.fake.snowflake()),
                       "application_id": str(bot.app_id), "version": str(self.fake.snowflake()),
                       "type": command.get("type", 1),
                       "default_member_permissions": command.get("default_member_permissions")}
            command.pop("dm_permission", None)
            if "guild_id" in request.match_info:
                command["guild_id"] = request.match_info["guild_id"]
            bot.commands[command["name"]] = command
            registered.append(command)
        return reply(registered)

    async def get_commands(self, request: web.Request) -> web.Response:
        return reply(list(self.bot(request).commands.values()))

    # channels and messages

    async def get_channel(self, request: web.Request) -> web.Response:
        return reply(self.channel(request, self.bot(request)).payload())

    async def history(self, request: web.Request) -> web.Response:
        bot = self.bot(request)
        channel = self.channel(request, bot)
        if not self.fake.permissions(bot, channel) & HISTORY:  # Discord answers, with nothing in it
            return reply([])
        limit = min(int(request.query.get("limit", 50)), 100)
        before = int(request.query.get("before", 1 << 63))
        after = int(request.query.get("after", 0))
        found = [m for m in channel.messages if after < int(m["id"]) < before]
        found = found[:limit] if "after" in request.query and "before" not in request.query else found[-limit:]
        return reply([self.fake.rest_message(m) for m in found[::-1]])

    async def get_message(self, request: web.Request) -> web.Response:
        channel = self.channel(request, self.bot(request), HISTORY)
        return reply(self.fake.rest_message(self.message(channel, request.match_info["message_id"])))

    async def create_message(self, request: web.Request) -> web.Response:
        bot = self.bot(request)
        channel = self.channel(request, bot)
        need = SEND_IN_THREADS if channel.parent is not None else SEND
        body = await self.body(request)
        reference = None
        if ref := body.get("message_reference"):
            need |= HISTORY
            reference = channel.find(int(ref["message_id"]))
            if reference is None and ref.get("fail_if_not_exists", True):
                raise ApiError(400, 50035, "Invalid Form Body: message_reference: Unknown message")
        self.channel(request, bot, need)
        message = self.fake.create_message(channel, bot, check_content(body.get("content")), reference=reference)
        return reply(self.fake.rest_message(message))

    async def edit_message(self, request: web.Request) -> web.Response:
        bot = self.bot(request)
        message = self.message(self.channel(request, bot), request.match_info["message_id"])
        if message["author"]["id"] != str(bot.id) or "webhook_id" in message:
            raise ApiError(403, 50005, "Cannot edit a message authored by another user")
        body = await self.body(request)
        return reply(self.fake.rest_message(self.fake.edit_message(message, check_content(body.get("content")))))

    async def delete_message(self, request: web.Request) -> web.Response:
        bot = self.bot(request)
        message = self.message(self.channel(request, bot), request.match_info["message_id"])
        if message["author"]["id"] != str(bot.id):
            self.channel(request, bot, P(manage_messages=True).value)
        self.fake.delete(message)
        return reply(status=204)

    async def typing(self, request: web.Request) -> web.Response:
        bot = self.bot(request)
        channel = self.channel(request, bot, SEND)
        self.fake.typing.append((bot.id, channel.id))
        return reply(status=204)

    async def open_dm(self, request: web.Request) -> web.Response:
        bot = self.bot(request)
        user = self.fake.users.get(int((await request.json())["recipient_id"]))
        if user is None:
            raise ApiError(404, 10013, "Unknown User")
        return reply(self.fake.dm_channel(user, bot).payload())

    # webhooks

    async def list_webhooks(self, request: web.Request) -> web.Response:
        channel = self.channel(request, self.bot(request), MANAGE_WEBHOOKS)
        return reply([h.payload() for h in self.fake.webhooks.values() if h.channel is channel])

    async def guild_webhooks(self, request: web.Request) -> web.Response:
        bot = self.bot(request)
        guild = self.fake.guilds.get(int(request.match_info["guild_id"]))
        if guild is None or bot.id not in guild.members:
            raise ApiError(403, 50001, "Missing Access")
        if not guild.permissions(bot) & MANAGE_WEBHOOKS:
            raise ApiError(403, 50013, "Missing Permissions")
        return reply([h.payload() for h in self.fake.webhooks.values() if h.channel.guild_id == guild.id])

    async def create_webhook(self, request: web.Request) -> web.Response:
        bot = self.bot(request)
        channel = self.channel(request, bot, MANAGE_WEBHOOKS)
        hook = Webhook(self.fake.snowflake(), f"hook-{self.fake.snowflake()}", channel,
                       (await request.json()).get("name", "hook"), bot)
        self.fake.webhooks[hook.id] = hook
        return reply(hook.payload())

    async def execute_webhook(self, request: web.Request) -> web.Response:
        interaction = self.fake.interaction_by_token(request.match_info["token"])
        body = await self.body(request)
        if interaction is not None:  # an interaction follow-up
            ephemeral = bool(body.get("flags", 0) & 64)
            interaction.respond("followup", body.get("content"), ephemeral)
            message = self.fake.interaction_message(interaction, body.get("content") or "", ephemeral)
            return reply(self.fake.rest_message(message))
        hook = self.webhook(request)
        message = self.fake.create_message(hook.channel, hook.author(body.get("username")),
                                           check_content(body.get("content")), webhook_id=hook.id,
                                           avatar_url=body.get("avatar_url"))
        wait = request.query.get("wait") in ("1", "true", "True")
        return reply(self.fake.rest_message(message)) if wait else reply(status=204)

    def _webhook_message(self, request: web.Request) -> tuple[dict, Any]:
        """The message a webhook route names, and the interaction whose token it used (or None)."""
        interaction = self.fake.interaction_by_token(request.match_info["token"])
        message_id = request.match_info.get("message_id", "@original")
        if interaction is not None:
            found = next((m for m in self.fake.interaction_messages.get(interaction.id, [])
                          if message_id in ("@original", m["id"])), None)
            if found is None:
                raise ApiError(404, 10008, "Unknown Message")
            return found, interaction
        hook = self.webhook(request)
        message = self.message(hook.channel, message_id)
        if message.get("webhook_id") != str(hook.id):
            raise ApiError(403, 50005, "Cannot edit a message authored by another user")
        return message, None

    async def get_webhook_message(self, request: web.Request) -> web.Response:
        return reply(self.fake.rest_message(self._webhook_message(request)[0]))

    async def edit_webhook_message(self, request: web.Request) -> web.Response:
        message, interaction = self._webhook_message(request)
        body = await self.body(request)
        content = check_content(body.get("content"))
        if interaction is not None:  # editing a deferred response fills it in
            interaction.respond("edit", content, bool(message.get("flags", 0) & 64))
        return reply(self.fake.rest_message(self.fake.edit_message(message, content)))

    # interactions

    async def interaction_callback(self, request: web.Request) -> web.Response:
        interaction = self.fake.interactions.get(int(request.match_info["interaction_id"]))
        if interaction is None or interaction.token != request.match_info["token"]:
            raise ApiError(404, 10062, "Unknown interaction")
        if time.monotonic() - interaction.created > INTERACTION_DEADLINE:
            raise ApiError(404, 10062, "Unknown interaction")
        if interaction.responses:
            raise ApiError(400, 40060, "Interaction has already been acknowledged.")
        body = await request.json()
        data = body.get("data") or {}
        ephemeral = bool(data.get("flags", 0) & 64)
        kind = {4: "message", 5: "deferred"}.get(body["type"], f"type {body['type']}")
        interaction.respond(kind, data.get("content") if body["type"] == 4 else None, ephemeral)
        message = self.fake.interaction_message(interaction, data.get("content") or "", ephemeral)
        if request.query.get("with_response") not in ("1", "true", "True"):
            return reply(status=204)
        created = {"interaction": {"id": str(interaction.id), "type": 2, "response_message_id": message["id"],
                                   "response_message_loading": body["type"] == 5,
                                   "response_message_ephemeral": ephemeral}}
        if body["type"] == 4:  # a deferral has created no message yet: no resource
            created["resource"] = {"type": 4, "message": self.fake.rest_message(message)}
        return reply(created)
