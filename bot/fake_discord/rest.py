"""The fake REST API: the routes discord.py uses for login, messages, webhooks, commands and interactions.

Validation mirrors Discord where it matters to a bot: 2000-char and empty-message errors, editing only
your own messages, bad tokens (401), unknown routes (404, logged).
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .model import Channel, User, Webhook

if TYPE_CHECKING:
    from .server import FakeDiscord

API = r"/api/v{version:\d+}"


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
            r.post(f"{API}/channels/{{channel_id}}/typing", self.typing),
            r.get(f"{API}/channels/{{channel_id}}/webhooks", self.list_webhooks),
            r.post(f"{API}/channels/{{channel_id}}/webhooks", self.create_webhook),
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

    def channel(self, request: web.Request) -> Channel:
        channel = self.fake.channels.get(int(request.match_info["channel_id"]))
        if channel is None:
            raise ApiError(404, 10003, "Unknown Channel")
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
        return reply(self.bot(request).payload())

    async def application(self, request: web.Request) -> web.Response:
        bot = self.bot(request)
        return reply({
            "id": str(bot.app_id), "name": bot.name, "description": "", "icon": None, "bot_public": True,
            "bot_require_code_grant": False, "owner": self.fake.owner.payload(), "verify_key": "0" * 64,
            "flags": 1 << 19, "team": None, "summary": "",
        })

    async def gateway(self, request: web.Request) -> web.Response:
        return reply({"url": self.fake.gateway_url, "shards": 1, "session_start_limit": {
            "total": 1000, "remaining": 1000, "reset_after": 0, "max_concurrency": 1}})

    async def put_commands(self, request: web.Request) -> web.Response:
        bot = self.bot(request)
        registered = []
        for command in await request.json():
            command = {**command, "id": str(self.fake.snowflake()), "application_id": str(bot.app_id),
                       "version": "1", "type": command.get("type", 1)}
            bot.commands[command["name"]] = command
            registered.append(command)
        return reply(registered)

    async def get_commands(self, request: web.Request) -> web.Response:
        return reply(list(self.bot(request).commands.values()))

    # channels and messages

    async def get_channel(self, request: web.Request) -> web.Response:
        self.bot(request)
        return reply(self.channel(request).payload())

    async def history(self, request: web.Request) -> web.Response:
        self.bot(request)
        channel = self.channel(request)
        limit = min(int(request.query.get("limit", 50)), 100)
        before = int(request.query.get("before", 1 << 63))
        after = int(request.query.get("after", 0))
        found = [m for m in channel.messages if after < int(m["id"]) < before]
        found = found[:limit] if "after" in request.query and "before" not in request.query else found[-limit:]
        return reply(found[::-1])

    async def get_message(self, request: web.Request) -> web.Response:
        self.bot(request)
        return reply(self.message(self.channel(request), request.match_info["message_id"]))

    async def create_message(self, request: web.Request) -> web.Response:
        bot = self.bot(request)
        channel = self.channel(request)
        body = await self.body(request)
        reference = None
        if ref := body.get("message_reference"):
            reference = channel.find(int(ref["message_id"]))
            if reference is None and ref.get("fail_if_not_exists", True):
                raise ApiError(400, 50035, "Invalid Form Body: message_reference: Unknown message")
        return reply(self.fake.create_message(channel, bot, check_content(body.get("content")), reference=reference))

    async def edit_message(self, request: web.Request) -> web.Response:
        bot = self.bot(request)
        message = self.message(self.channel(request), request.match_info["message_id"])
        if message["author"]["id"] != str(bot.id) or "webhook_id" in message:
            raise ApiError(403, 50005, "Cannot edit a message authored by another user")
        body = await self.body(request)
        return reply(self.fake.edit_message(message, check_content(body.get("content"))))

    async def typing(self, request: web.Request) -> web.Response:
        self.fake.typing.append((self.bot(request).id, self.channel(request).id))
        return reply(status=204)

    async def open_dm(self, request: web.Request) -> web.Response:
        bot = self.bot(request)
        user = self.fake.users.get(int((await request.json())["recipient_id"]))
        if user is None:
            raise ApiError(404, 10013, "Unknown User")
        return reply(self.fake.dm_channel(user, bot).payload())

    # webhooks

    async def list_webhooks(self, request: web.Request) -> web.Response:
        self.bot(request)
        channel = self.channel(request)
        return reply([h.payload() for h in self.fake.webhooks.values() if h.channel is channel])

    async def create_webhook(self, request: web.Request) -> web.Response:
        bot = self.bot(request)
        channel = self.channel(request)
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
            return reply(self.fake.interaction_message(interaction, body.get("content") or "", ephemeral))
        hook = self.webhook(request)
        author = {"id": str(hook.id), "username": body.get("username") or hook.name, "discriminator": "0000",
                  "avatar": None, "bot": True, "global_name": None}
        message = self.fake.create_message(hook.channel, author, check_content(body.get("content")),
                                           webhook_id=hook.id, avatar_url=body.get("avatar_url"))
        return reply(message) if request.query.get("wait") in ("1", "true", "True") else reply(status=204)

    def _webhook_message(self, request: web.Request) -> dict:
        interaction = self.fake.interaction_by_token(request.match_info["token"])
        message_id = request.match_info["message_id"]
        if interaction is not None:
            found = next((m for m in self.fake.interaction_messages.get(interaction.id, [])
                          if message_id in ("@original", m["id"])), None)
            if found is None:
                raise ApiError(404, 10008, "Unknown Message")
            return found
        hook = self.webhook(request)
        message = self.message(hook.channel, message_id)
        if message.get("webhook_id") != str(hook.id):
            raise ApiError(403, 50005, "Cannot edit a message authored by another user")
        return message

    async def get_webhook_message(self, request: web.Request) -> web.Response:
        return reply(self._webhook_message(request))

    async def edit_webhook_message(self, request: web.Request) -> web.Response:
        message = self._webhook_message(request)
        body = await self.body(request)
        return reply(self.fake.edit_message(message, check_content(body.get("content"))))

    # interactions

    async def interaction_callback(self, request: web.Request) -> web.Response:
        interaction = self.fake.interactions.get(int(request.match_info["interaction_id"]))
        if interaction is None or interaction.token != request.match_info["token"]:
            raise ApiError(404, 10062, "Unknown interaction")
        if interaction.responses:
            raise ApiError(400, 40060, "Interaction has already been acknowledged.")
        body = await request.json()
        data = body.get("data") or {}
        ephemeral = bool(data.get("flags", 0) & 64)
        kind = {4: "message", 5: "deferred"}.get(body["type"], f"type {body['type']}")
        interaction.respond(kind, data.get("content") if body["type"] == 4 else None, ephemeral)
        message = self.fake.interaction_message(interaction, data.get("content") or "", ephemeral)
        if request.query.get("with_response") not in ("1", "true"):
            return reply(status=204)
        return reply({
            "interaction": {"id": str(interaction.id), "type": 2, "response_message_id": message["id"],
                            "response_message_loading": body["type"] == 5, "response_message_ephemeral": ephemeral},
            "resource": {"type": body["type"], "message": message},
        })
