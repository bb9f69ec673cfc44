"""The fake's world: one guild with users, bots, channels, messages and webhooks, as Discord payloads."""
from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from typing import Any

import discord

DISCORD_EPOCH_MS = 1420070400000
MEMBER_PERMISSIONS = discord.Permissions(
    view_channel=True, send_messages=True, read_message_history=True, use_application_commands=True,
    add_reactions=True, embed_links=True, attach_files=True,
).value
ALL_PERMISSIONS = discord.Permissions.all().value
MESSAGE_CONTENT_INTENT = 1 << 15
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
    admin: bool = False
    roles: list[int] = field(default_factory=list)
    message_content: bool = True  # bots: is the privileged Message Content intent enabled for this app?
    commands: dict[str, dict] = field(default_factory=dict)

    @property
    def mention(self) -> str:
        return f"<@{self.id}>"

    def payload(self) -> dict[str, Any]:
        return {"id": str(self.id), "username": self.name, "global_name": None if self.bot else self.name,
                "discriminator": "0", "avatar": None, "bot": self.bot, "public_flags": 0}

    def member(self, guild_id: int, *, with_user: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {"roles": [str(r) for r in self.roles], "joined_at": timestamp(guild_id),
                                "nick": None, "deaf": False, "mute": False, "flags": 0, "pending": False}
        if with_user:
            data["user"] = self.payload()
        return data

    @property
    def permissions(self) -> int:
        return ALL_PERMISSIONS if self.admin else MEMBER_PERMISSIONS


@dataclass(eq=False)
class Channel:
    id: int
    name: str
    guild_id: int | None
    recipient: User | None = None  # DMs: the human talking to a bot
    messages: list[dict] = field(default_factory=list)

    def payload(self) -> dict[str, Any]:
        if self.guild_id is None:
            return {"id": str(self.id), "type": 1, "recipients": [self.recipient.payload()] if self.recipient else [],
                    "last_message_id": self.messages[-1]["id"] if self.messages else None}
        return {"id": str(self.id), "type": 0, "guild_id": str(self.guild_id), "name": self.name, "position": 0,
                "permission_overwrites": [], "nsfw": False, "topic": None, "parent_id": None,
                "rate_limit_per_user": 0, "last_message_id": self.messages[-1]["id"] if self.messages else None}

    def find(self, message_id: int) -> dict | None:
        return next((m for m in reversed(self.messages) if int(m["id"]) == message_id), None)


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


@dataclass(eq=False)
class Interaction:
    """A slash command a user ran, and every response the bot gave to it."""

    id: int
    token: str
    bot: User
    user: User
    channel: Channel
    responses: list[dict] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def respond(self, kind: str, content: str | None, ephemeral: bool) -> None:
        self.responses.append({"kind": kind, "content": content, "ephemeral": ephemeral})
        self.changed.set()

    async def text(self, timeout: float = 10.0) -> str:
        """The first response that has content (a message, or the follow-up to a deferral)."""
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
    message_id: int, channel: Channel, author: User | dict, content: str, *, webhook_id: int | None = None,
    reference: dict | None = None, users: dict[int, User] | None = None, extra: dict | None = None,
) -> dict[str, Any]:
    """A message as Discord sends it: author, member, mentions and the message it replies to."""
    author_payload = author.payload() if isinstance(author, User) else author
    mentioned = [users[int(i)] for i in _MENTION.findall(content) if users and int(i) in users]
    data: dict[str, Any] = {
        "id": str(message_id), "channel_id": str(channel.id), "author": author_payload, "content": content,
        "timestamp": timestamp(message_id), "edited_timestamp": None, "tts": False, "mention_everyone": False,
        "mentions": [u.payload() for u in mentioned], "mention_roles": [], "attachments": [], "embeds": [],
        "pinned": False, "type": 19 if reference else 0, "flags": 0, "components": [],
    }
    if channel.guild_id is not None:
        data["guild_id"] = str(channel.guild_id)
        if isinstance(author, User):
            data["member"] = author.member(channel.guild_id, with_user=False)
    if webhook_id is not None:
        data["webhook_id"] = str(webhook_id)
    if reference is not None:
        data["message_reference"] = {"type": 0, "message_id": reference["id"], "channel_id": str(channel.id),
                                     **({"guild_id": str(channel.guild_id)} if channel.guild_id else {})}
        data["referenced_message"] = {k: v for k, v in reference.items() if k != "referenced_message"}
    data.update(extra or {})
    return data
