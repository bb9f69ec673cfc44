"""The fake's world: guilds with roles, members, channels, threads, messages and webhooks, as Discord payloads.

Messages are stored as the REST API returns them (no ``member``, no ``guild_id``: Discord adds those only to
gateway events), and each reply's ``referenced_message`` is looked up when it is sent, so it is null once the
original is deleted, as on Discord.
"""
from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from typing import Any

import discord

DISCORD_EPOCH_MS = 1420070400000
P = discord.Permissions
ALL_PERMISSIONS = P.all().value
EVERYONE_PERMISSIONS = P(
    view_channel=True, send_messages=True, send_messages_in_threads=True, read_message_history=True,
    use_application_commands=True, add_reactions=True, embed_links=True, attach_files=True,
).value
BOT_PERMISSIONS = P(
    view_channel=True, send_messages=True, send_messages_in_threads=True, read_message_history=True,
    manage_webhooks=True, embed_links=True, attach_files=True, add_reactions=True,
).value
"""What the bot's own (managed) role grants by default: what its invite link asked for."""
ADMINISTRATOR, VIEW_CHANNEL = P(administrator=True).value, P(view_channel=True).value
MESSAGE_CONTENT_INTENT = 1 << 15
TEXT, DM, PUBLIC_THREAD = 0, 1, 11
_MENTION = re.compile(r"<@!?(\d+)>")


class Snowflakes:
    """Increasing ids that encode the current time, like Discord's."""

    def __init__(self) -> None:
        self._last = 0

    def __call__(self) -> int:
        self._last = max(self._last + 1, (int(time.time() * 1000) - DISCORD_EPOCH_MS) << 22)
        return self._last


def timestamp(snowflake: int) -> str:
    return discord.utils.snowflake_time(snowflake).isoformat()


@dataclass(eq=False)
class User:
    id: int
    name: str
    bot: bool = False
    token: str | None = None
    app_id: int | None = None
    message_content: bool = True  # bots: is the privileged Message Content intent enabled for this app?
    commands: dict[str, dict] = field(default_factory=dict)

    @property
    def mention(self) -> str:
        return f"<@{self.id}>"

    def payload(self) -> dict[str, Any]:
        return {"id": str(self.id), "username": self.name, "global_name": None if self.bot else self.name,
                "discriminator": "0", "avatar": None, "bot": self.bot, "public_flags": 0, "flags": 0,
                "primary_guild": None}


@dataclass(eq=False)
class Role:
    id: int
    name: str
    permissions: int
    managed: bool = False  # a bot's own role, created when it joins

    def payload(self, guild_id: int) -> dict[str, Any]:
        return {"id": str(self.id), "name": self.name, "permissions": str(self.permissions), "color": 0,
                "hoist": False, "position": 0 if self.id == guild_id else 1, "managed": self.managed,
                "mentionable": False, "flags": 0}


@dataclass(eq=False)
class Member:
    user: User
    roles: list[int] = field(default_factory=list)
    nick: str | None = None
    joined_at: str = ""

    def payload(self, *, with_user: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {"roles": [str(r) for r in self.roles], "joined_at": self.joined_at,
                                "nick": self.nick, "deaf": False, "mute": False, "flags": 0, "pending": False}
        if with_user:
            data["user"] = self.user.payload()
        return data


@dataclass
class Overwrite:
    """A channel permission overwrite for a role (``member=False``) or a member."""

    id: int
    allow: int = 0
    deny: int = 0
    member: bool = False

    def payload(self) -> dict[str, Any]:
        return {"id": str(self.id), "type": 1 if self.member else 0, "allow": str(self.allow), "deny": str(self.deny)}


@dataclass(eq=False)
class Channel:
    id: int
    name: str
    guild_id: int | None
    recipient: User | None = None  # DMs: the human talking to a bot
    messages: list[dict] = field(default_factory=list)
    overwrites: list[Overwrite] = field(default_factory=list)
    parent: Channel | None = None  # threads: the text channel they hang off
    owner: User | None = None  # threads: who started it

    @property
    def type(self) -> int:
        return DM if self.guild_id is None else PUBLIC_THREAD if self.parent is not None else TEXT

    def payload(self) -> dict[str, Any]:
        last = self.messages[-1]["id"] if self.messages else None
        if self.guild_id is None:
            return {"id": str(self.id), "type": DM, "flags": 0, "last_message_id": last,
                    "recipients": [self.recipient.payload()] if self.recipient else []}
        base = {"id": str(self.id), "type": self.type, "guild_id": str(self.guild_id), "name": self.name,
                "flags": 0, "last_message_id": last, "rate_limit_per_user": 0}
        if self.parent is not None:
            owner = self.owner.id if self.owner else 0
            return {**base, "parent_id": str(self.parent.id), "owner_id": str(owner), "message_count": len(
                self.messages), "member_count": 1, "total_message_sent": len(self.messages), "thread_metadata": {
                "archived": False, "auto_archive_duration": 1440, "archive_timestamp": timestamp(self.id),
                "locked": False, "create_timestamp": timestamp(self.id)}}
        return {**base, "position": 0, "permission_overwrites": [o.payload() for o in self.overwrites],
                "nsfw": False, "topic": None, "parent_id": None}

    def find(self, message_id: int) -> dict | None:
        return next((m for m in reversed(self.messages) if int(m["id"]) == message_id), None)


@dataclass(eq=False)
class Guild:
    """A server: its owner, roles (the @everyone role shares the guild's id), members and channels."""

    id: int
    name: str
    owner: User
    roles: dict[int, Role] = field(default_factory=dict)
    members: dict[int, Member] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.roles.setdefault(self.id, Role(self.id, "@everyone", EVERYONE_PERMISSIONS))

    def permissions(self, user: User, channel: Channel | None = None) -> int:
        """Discord's algorithm: base from @everyone and the member's roles, then the channel's overwrites
        (@everyone, then the roles together, then the member); owner and Administrator get everything.
        A thread uses its parent channel's overwrites. 0 for a user who is not a member."""
        member = self.members.get(user.id)
        if member is None:
            return 0
        if user is self.owner:
            return ALL_PERMISSIONS
        perms = self.roles[self.id].permissions
        for role_id in member.roles:
            perms |= self.roles[role_id].permissions if role_id in self.roles else 0
        if perms & ADMINISTRATOR:
            return ALL_PERMISSIONS
        channel = channel.parent if channel is not None and channel.parent is not None else channel
        if channel is None:
            return perms
        by_id = {(o.member, o.id): o for o in channel.overwrites}
        if everyone := by_id.get((False, self.id)):
            perms = (perms & ~everyone.deny) | everyone.allow
        roles = [by_id[(False, r)] for r in member.roles if (False, r) in by_id]
        perms = (perms & ~_union(o.deny for o in roles)) | _union(o.allow for o in roles)
        if own := by_id.get((True, user.id)):
            perms = (perms & ~own.deny) | own.allow
        return perms if perms & VIEW_CHANNEL else 0

    def payload(self, channels: list[Channel]) -> dict[str, Any]:
        members = [m.payload() for m in self.members.values()]
        return {
            "id": str(self.id), "name": self.name, "owner_id": str(self.owner.id), "icon": None,
            "splash": None, "discovery_splash": None, "banner": None, "description": None, "features": [],
            "roles": [r.payload(self.id) for r in self.roles.values()], "emojis": [], "stickers": [],
            "channels": [c.payload() for c in channels if c.parent is None],
            "threads": [c.payload() for c in channels if c.parent is not None],
            "members": members, "member_count": len(members), "voice_states": [], "presences": [],
            "stage_instances": [], "guild_scheduled_events": [], "soundboard_sounds": [], "large": False,
            "unavailable": False, "joined_at": timestamp(self.id), "afk_timeout": 300,
            "verification_level": 0, "default_message_notifications": 0, "explicit_content_filter": 0,
            "mfa_level": 0, "premium_tier": 0, "preferred_locale": "en-US", "nsfw_level": 0,
            "system_channel_flags": 0, "premium_progress_bar_enabled": False,
        }


def _union(values: Any) -> int:
    total = 0
    for value in values:
        total |= value
    return total


@dataclass(eq=False)
class Webhook:
    id: int
    token: str
    channel: Channel
    name: str
    owner: User

    def payload(self) -> dict[str, Any]:
        return {"id": str(self.id), "type": 1, "channel_id": str(self.channel.id),
                "guild_id": str(self.channel.guild_id), "name": self.name, "avatar": None, "token": self.token,
                "application_id": None, "user": self.owner.payload()}

    def author(self, username: str | None) -> dict[str, Any]:
        """The author Discord shows on a message this webhook posted: the webhook's id, the chosen name."""
        return {"id": str(self.id), "username": username or self.name, "discriminator": "0000", "avatar": None,
                "bot": True, "global_name": None, "public_flags": 0, "flags": 0, "primary_guild": None}


@dataclass(eq=False)
class Interaction:
    """A slash command a user ran, and every response the bot gave to it."""

    id: int
    token: str
    bot: User
    user: User
    channel: Channel
    created: float = field(default_factory=time.monotonic)
    responses: list[dict] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def respond(self, kind: str, content: str | None, ephemeral: bool) -> None:
        self.responses.append({"kind": kind, "content": content, "ephemeral": ephemeral})
        self.changed.set()

    async def text(self, timeout: float = 10.0) -> str:
        """The first response that has content (a message, the follow-up to a deferral, or its edit)."""
        async def first() -> str:
            while True:
                for response in self.responses:
                    if response["content"]:
                        return response["content"]
                self.changed.clear()
                await self.changed.wait()

        return await asyncio.wait_for(first(), timeout)

    @property
    def ephemeral(self) -> bool:
        return any(r["ephemeral"] for r in self.responses if r["content"])


def message_payload(
    message_id: int, channel: Channel, author: dict, content: str, *, webhook_id: int | None = None,
    reference: dict | None = None, users: dict[int, User] | None = None, extra: dict | None = None,
) -> dict[str, Any]:
    """A message as Discord's REST API returns it (``referenced_message`` is added when it is sent)."""
    mentioned = [users[int(i)] for i in _MENTION.findall(content) if users and int(i) in users]
    data: dict[str, Any] = {
        "id": str(message_id), "channel_id": str(channel.id), "author": author, "content": content,
        "timestamp": timestamp(message_id), "edited_timestamp": None, "tts": False, "mention_everyone": False,
        "mentions": [u.payload() for u in mentioned], "mention_roles": [], "attachments": [], "embeds": [],
        "pinned": False, "type": 19 if reference else 0, "flags": 0, "components": [],
    }
    if webhook_id is not None:
        data["webhook_id"] = str(webhook_id)
    if reference is not None:
        data["message_reference"] = {"type": 0, "message_id": reference["id"], "channel_id": str(channel.id),
                                     **({"guild_id": str(channel.guild_id)} if channel.guild_id else {})}
    data.update(extra or {})
    return data
