"""A local, protocol-level fake Discord (REST + gateway on 127.0.0.1) that the real discord.py client uses.

``personabot simulate`` runs the bot against it; tests drive it as users do (messages, replies, DMs, slash
commands, nicknames, deletions) and inspect every request the bot made. It holds Discord's rules where a bot
meets them: REST messages without ``member``, permissions from roles and overwrites (403 50001/50013),
per-route and global rate limits with their headers, the 3-second interaction deadline. It can also misbehave
on purpose: injected and Cloudflare-style 429s, dropped connections, RECONNECT, INVALID_SESSION, heartbeat
requests, omitted ``referenced_message``, a disabled Message Content intent.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import discord
import discord.gateway
import discord.http
import yarl
from aiohttp import web

from .gateway import Gateway
from .limits import MESSAGE_WRITES, Fault, RateLimits
from .model import (
    ADMINISTRATOR, ALL_PERMISSIONS, BOT_PERMISSIONS, Channel, Guild, Interaction, Member, Overwrite, Role,
    Snowflakes, User, Webhook, message_payload, timestamp,
)
from .rest import ApiError, Rest, reply

log = logging.getLogger(__name__)
Watcher = Callable[[str, dict], None]
ReplyObserver = Callable[[str, str, int, "str | None", bytes], None]
"""Sees every REST reply: method, path, status, content type (None without a body), body."""


@dataclass
class Request:
    """One REST call the bot made, as the fake saw it."""

    at: float
    method: str
    path: str
    status: int
    body: Any
    channel_id: int | None


class FakeDiscord:
    """Guilds, their users, bots, channels, threads and webhooks; REST under /api/v10 and the gateway at /ws.

    The first guild is the default one (``guild``, ``guild_id``) that helpers use unless told otherwise.
    """

    def __init__(self, guild_name: str = "personabot sim", owner_name: str = "owner") -> None:
        self.snowflake = Snowflakes()
        self.users: dict[int, User] = {}
        self.guilds: dict[int, Guild] = {}
        self.channels: dict[int, Channel] = {}
        self.webhooks: dict[int, Webhook] = {}
        self.interactions: dict[int, Interaction] = {}
        self.interaction_messages: dict[int, list[dict]] = defaultdict(list)
        self.avatar_urls: dict[str, str] = {}  # message id -> the avatar_url a webhook post asked for
        self.requests: list[Request] = []
        self.rate_limited: list[Request] = []
        self.invalid_requests = 0  # 401, 403 and 429 replies: Discord bans an IP at 10,000 per 10 minutes
        self.typing: list[tuple[int, int]] = []
        self.watchers: list[Watcher] = []
        self.reply_observers: list[ReplyObserver] = []
        self.teams: dict[int, list[User]] = {}  # bot id -> the developer team owning its application
        self.omit_referenced = False  # send replies without ``referenced_message``, as Discord may
        self.limits = RateLimits()
        self.gateway = Gateway(self)
        self._rest = Rest(self)
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.owner = self._new_user(owner_name)
        self.guild = self.add_guild(guild_name, self.owner)

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

    @property
    def guild_id(self) -> int:
        return self.guild.id

    def _new_user(self, name: str, **kwargs: Any) -> User:
        user = User(self.snowflake(), name, **kwargs)
        self.users[user.id] = user
        return user

    def add_guild(self, name: str, owner: User | None = None) -> Guild:
        """A server owned by ``owner`` (a new user if none); every bot joins it with its managed role."""
        owner = owner or self._new_user(f"{name} owner")
        guild = Guild(self.snowflake(), name, owner)
        self.guilds[guild.id] = guild
        self.join(owner, guild)
        for bot in self.bots:
            self._join_bot(bot, guild)
            self.gateway.dispatch(bot, "GUILD_CREATE", self.guild_payload(guild))
        return guild

    def join(self, user: User, guild: Guild | None = None, *, roles: list[int] | None = None,
             nick: str | None = None) -> Member:
        guild = guild or self.guild
        member = guild.members[user.id] = Member(user, list(roles or []), nick, timestamp(self.snowflake()))
        return member

    def _join_bot(self, bot: User, guild: Guild, permissions: int = BOT_PERMISSIONS) -> None:
        role = Role(self.snowflake(), bot.name, permissions, managed=True)
        guild.roles[role.id] = role
        self.join(bot, guild, roles=[role.id])

    def add_user(self, name: str, *, admin: bool = False, roles: list[int] | None = None, nick: str | None = None,
                 guild: Guild | None = None) -> User:
        """A human in ``guild`` (default: the first); ``admin`` gives a role with Administrator."""
        user = self._new_user(name)
        roles = list(roles or [])
        if admin:
            roles.append(self.add_role("admin", ADMINISTRATOR, guild=guild))
        self.join(user, guild, roles=roles, nick=nick)
        return user

    def add_bot(self, name: str, token: str, *, message_content: bool = True,
                permissions: int = BOT_PERMISSIONS) -> User:
        """A bot account (and its application) that logs in with ``token``; it joins every guild with a
        managed role granting ``permissions`` (what its invite link asked for)."""
        bot = self._new_user(name, bot=True, token=token, app_id=self.snowflake(), message_content=message_content)
        for guild in self.guilds.values():
            self._join_bot(bot, guild, permissions)
        return bot

    def add_role(self, name: str, permissions: int = 0, *, guild: Guild | None = None) -> int:
        guild = guild or self.guild
        role = Role(self.snowflake(), name, permissions)
        guild.roles[role.id] = role
        for bot in self._bots_in(guild):
            self.gateway.dispatch(bot, "GUILD_ROLE_CREATE", {"guild_id": str(guild.id), "role": role.payload(guild.id)})
        return role.id

    def set_permissions(self, role: Role, permissions: int, guild: Guild | None = None) -> None:
        """A server admin edits ``role``: bots get GUILD_ROLE_UPDATE, as on Discord."""
        guild = guild or self.guild
        role.permissions = permissions
        for bot in self._bots_in(guild):
            self.gateway.dispatch(bot, "GUILD_ROLE_UPDATE", {"guild_id": str(guild.id), "role": role.payload(guild.id)})

    def set_nick(self, user: User, nick: str | None, guild: Guild | None = None) -> None:
        (guild or self.guild).members[user.id].nick = nick

    def bot_role(self, bot: User, guild: Guild | None = None) -> Role:
        guild = guild or self.guild
        return next(guild.roles[r] for r in guild.members[bot.id].roles if guild.roles[r].managed)

    def overwrite(self, channel: Channel, target: User | int, *, allow: int = 0, deny: int = 0) -> None:
        """Set ``channel``'s overwrite for a user or a role id (the guild's id is @everyone)."""
        is_member = isinstance(target, User)
        target_id = target.id if isinstance(target, User) else target
        channel.overwrites = [o for o in channel.overwrites if (o.member, o.id) != (is_member, target_id)]
        channel.overwrites.append(Overwrite(target_id, allow, deny, is_member))
        self._channel_event(channel, "CHANNEL_UPDATE")

    def add_channel(self, name: str, channel_id: int | None = None, *, guild: Guild | None = None) -> Channel:
        channel = Channel(channel_id or self.snowflake(), name, (guild or self.guild).id)
        self.channels[channel.id] = channel
        self._channel_event(channel, "CHANNEL_CREATE")
        return channel

    def add_thread(self, parent: Channel, name: str, owner: User | None = None) -> Channel:
        """A public thread under ``parent``; it inherits the parent's permission overwrites."""
        thread = Channel(self.snowflake(), name, parent.guild_id, parent=parent, owner=owner or self.owner)
        self.channels[thread.id] = thread
        self._channel_event(thread, "THREAD_CREATE")
        return thread

    def _channel_event(self, channel: Channel, event: str) -> None:
        guild = self.guilds[channel.guild_id] if channel.guild_id is not None else None
        for bot in self._bots_in(guild) if guild else []:
            self.gateway.dispatch(bot, event, {**channel.payload(), **(
                {"newly_created": True} if event == "THREAD_CREATE" else {})})

    def add_webhook(self, channel: Channel, owner: User, name: str = "proxy") -> Webhook:
        """A webhook someone else made (a proxy bot such as PluralKit posts any name through one)."""
        hook = Webhook(self.snowflake(), f"hook-{self.snowflake()}", channel, name, owner)
        self.webhooks[hook.id] = hook
        return hook

    def webhook_post(self, hook: Webhook, username: str, content: str, *, reply_to: dict | None = None) -> dict:
        """``hook`` posts ``content`` under ``username``."""
        return self.create_message(hook.channel, hook.author(username), content, webhook_id=hook.id,
                                   reference=reply_to)

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

    def _bots_in(self, guild: Guild) -> list[User]:
        return [b for b in self.bots if b.id in guild.members]

    def bot_by_token(self, token: str) -> User | None:
        return next((b for b in self.bots if b.token == token), None)

    def interaction_by_token(self, token: str) -> Interaction | None:
        return next((i for i in self.interactions.values() if i.token == token), None)

    def permissions(self, user: User, channel: Channel) -> int:
        """What ``user`` may do in ``channel`` (DMs: everything, if it is their DM)."""
        if channel.guild_id is None:
            return ALL_PERMISSIONS if user is channel.recipient or channel.name == f"dm-{user.id}" else 0
        return self.guilds[channel.guild_id].permissions(user, channel)

    def application_owner(self, bot: User) -> dict[str, Any]:
        """``owner`` and ``team`` of the bot's application: the fake's owner, or a team when one is set
        (then Discord reports a pseudo-user named after the team as the owner)."""
        members = self.teams.get(bot.id)
        if not members:
            return {"owner": self.owner.payload(), "team": None}
        team_id = bot.app_id + 1
        team = {"id": str(team_id), "icon": None, "name": f"{bot.name} team", "owner_user_id": str(members[0].id),
                "members": [{"user": m.payload(), "team_id": str(team_id), "membership_state": 2,
                             "role": "admin", "permissions": ["*"]} for m in members]}
        owner = {**User(team_id, f"team{team_id}").payload(), "flags": 1024, "global_name": None}
        return {"owner": owner, "team": team}

    def ready_payload(self, bot: User, session_id: str) -> dict[str, Any]:
        guilds = [{"id": str(g.id), "unavailable": True} for g in self.guilds.values() if bot.id in g.members]
        return {"v": 10, "user": bot.payload(), "guilds": guilds,
                "session_id": session_id, "resume_gateway_url": self.gateway_url, "session_type": "normal",
                "application": {"id": str(bot.app_id), "flags": 1 << 19}, "private_channels": [],
                "relationships": [], "geo_ordered_rtc_regions": []}

    def guild_payload(self, guild: Guild) -> dict[str, Any]:
        return guild.payload([c for c in self.channels.values() if c.guild_id == guild.id])

    # messages (called by REST handlers and by the user-facing helpers below)

    def create_message(
        self, channel: Channel, author: User | dict, content: str, *, reference: dict | None = None,
        webhook_id: int | None = None, avatar_url: str | None = None, extra: dict | None = None,
    ) -> dict:
        """Store a message (REST shape) and send MESSAGE_CREATE (gateway shape) to the bots that can see it."""
        author_payload = author.payload() if isinstance(author, User) else author
        message = message_payload(self.snowflake(), channel, author_payload, content, webhook_id=webhook_id,
                                  reference=reference, users=self.users, extra=extra)
        if avatar_url:
            self.avatar_urls[message["id"]] = avatar_url
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

    def delete(self, message: dict) -> None:
        """The author (or a moderator) deletes ``message``: gone from the channel, MESSAGE_DELETE to the bots
        that see it; replies to it now carry ``referenced_message: null``."""
        channel = self.channels[int(message["channel_id"])]
        channel.messages.remove(message)
        payload = {"id": message["id"], "channel_id": message["channel_id"],
                   **({"guild_id": str(channel.guild_id)} if channel.guild_id else {})}
        for bot in self._viewers(channel):
            self.gateway.dispatch(bot, "MESSAGE_DELETE", payload)
        self._notify("delete", message)

    def rest_message(self, message: dict) -> dict:
        """``message`` as REST returns it: the replied-to message looked up now (null once deleted)."""
        ref = message.get("message_reference")
        if ref is None or self.omit_referenced or "message_id" not in ref:
            return message
        original = self.channels[int(ref["channel_id"])].find(int(ref["message_id"]))
        return {**message, "referenced_message": original}

    def gateway_message(self, message: dict, channel: Channel) -> dict:
        """``message`` as the gateway sends it: with ``guild_id`` and the author's ``member`` (nick, roles)."""
        data = self.rest_message(message)
        if channel.guild_id is None:
            return data
        guild = self.guilds[channel.guild_id]
        data = {**data, "guild_id": str(guild.id)}
        member = guild.members.get(int(message["author"]["id"]))
        if member is not None and "webhook_id" not in message:
            data["member"] = member.payload(with_user=False)
        return data

    def interaction_message(self, interaction: Interaction, content: str, ephemeral: bool) -> dict:
        """The message an interaction response creates; ephemeral ones are seen only by the user."""
        extra = {"type": 20, "application_id": str(interaction.bot.app_id), "flags": 64 if ephemeral else 0,
                 "interaction_metadata": {"id": str(interaction.id), "type": 2, "user": interaction.user.payload(),
                                          "authorizing_integration_owners": {}}}
        if ephemeral or not content:
            message = message_payload(self.snowflake(), interaction.channel, interaction.bot.payload(),
                                      content or "…", extra=extra)
        else:
            message = self.create_message(interaction.channel, interaction.bot, content, extra=extra)
        self.interaction_messages[interaction.id].append(message)
        return message

    def _viewers(self, channel: Channel) -> list[User]:
        if channel.guild_id is None:
            return [b for b in self.bots if channel.name == f"dm-{b.id}"]
        guild = self.guilds[channel.guild_id]
        return [b for b in self._bots_in(guild) if guild.permissions(b, channel)]

    def _broadcast(self, channel: Channel, event: str, message: dict) -> None:
        for bot in self._viewers(channel):
            self.gateway.dispatch(bot, event, self.gateway_message(message, channel))

    def _notify(self, kind: str, message: dict) -> None:
        for watcher in self.watchers:
            watcher(kind, message)
        self._changed.set()

    # acting as users

    def post(self, author: User, channel: Channel, content: str, *, reply_to: dict | None = None) -> dict:
        """``author`` writes in ``channel`` (optionally replying to a message)."""
        return self.create_message(channel, author, content, reference=reply_to)

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
        return self.interact(bot, user, channel, 2, {"id": schema["id"], "name": words[0], "type": 1,
                                                     "options": values})

    def interact(self, bot: User, user: User, channel: Channel, kind: int, data: dict[str, Any],
                 **fields: Any) -> Interaction:
        """An INTERACTION_CREATE of type ``kind`` (2 a slash command, 3 a component) by ``user`` in
        ``channel``, with the member, permissions and context Discord sends; ``fields`` add to the payload."""
        interaction = Interaction(self.snowflake(), f"itoken-{self.snowflake()}", bot, user, channel)
        self.interactions[interaction.id] = interaction
        payload: dict[str, Any] = {
            "id": str(interaction.id), "application_id": str(bot.app_id), "type": kind, "token": interaction.token,
            "version": 1, "data": data, **fields,
            "channel_id": str(channel.id), "channel": channel.payload(), "locale": "en-US",
            "app_permissions": str(self.permissions(bot, channel)), "attachment_size_limit": 8 << 20,
            "entitlements": [], "authorizing_integration_owners": {"0": str(channel.guild_id or 0)}, "context": 0,
        }
        if channel.guild_id is not None:
            guild = self.guilds[channel.guild_id]
            member = guild.members[user.id].payload()
            member["permissions"] = str(guild.permissions(user, channel))
            payload.update(guild_id=str(guild.id), member=member, guild_locale="en-US",
                           guild={"id": str(guild.id), "locale": "en-US", "features": []})
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

    def rate_limit(self, method: str, path: str, *, retry_after: float = 0.5, times: int = 1,
                   cloudflare: bool = False) -> None:
        """Answer the next ``times`` calls matching ``method`` and the ``path`` regex with a 429: Discord's own,
        or with ``cloudflare`` the HTML one without a ``Via`` header that Cloudflare sends."""
        self.limits.faults.append(Fault(method.upper(), re.compile(path), retry_after, times, cloudflare))

    def limit_writes(self, count: int, per: float) -> None:
        """At most ``count`` message creates and edits per ``per`` seconds per channel and bot (one bucket)."""
        self.limits.limits[MESSAGE_WRITES] = (count, per)

    async def disconnect(self, bot: User, code: int = 1001) -> None:
        await self.gateway.disconnect(bot, code)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        body = await request.json() if request.body_exists and request.content_type == "application/json" else None
        channel_id = self._channel_of(request)
        limited, headers = self.limits.check(request)
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
            response.headers.update(headers)
        entry = Request(time.monotonic(), request.method, request.path, response.status, body, channel_id)
        if request.path.startswith("/api/"):
            self.requests.append(entry)
            self.invalid_requests += response.status in (401, 403, 429)
            if response.status == 429:
                self.rate_limited.append(entry)
            raw = bytes(response.body) if isinstance(response, web.Response) and response.body else b""
            for observe in self.reply_observers:
                observe(request.method, request.path, response.status, response.content_type if raw else None, raw)
        return response

    def _channel_of(self, request: web.Request) -> int | None:
        info = request.match_info
        if "channel_id" in info:
            return int(info["channel_id"])
        hook = self.webhooks.get(int(info["webhook_id"])) if info.get("webhook_id", "").isdigit() else None
        return hook.channel.id if hook is not None else None
