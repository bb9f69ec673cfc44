"""How a persona appears in Discord: its own bot account, or a webhook with its name and avatar.

A voice knows which messages are its own (they become ``assistant`` turns), when it is addressed, and
where its replies go.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import discord

from .config import PersonaSpec
from .streaming import ReplyTarget

log = logging.getLogger(__name__)

# Replies never ping @everyone, @here or roles; only the author of the message being replied to.
ALLOWED_MENTIONS = discord.AllowedMentions(everyone=False, roles=False, users=False, replied_user=True)
WEBHOOK_NAME = "personabot"


class Voice(ABC):
    """One persona as seen by one connected client."""

    can_dm = False

    def __init__(self, persona: PersonaSpec, client: discord.Client) -> None:
        self.persona = persona
        self.client = client

    @property
    def name(self) -> str:
        return self.persona.name

    @abstractmethod
    def owns(self, message: discord.Message) -> bool:
        """Whether this persona wrote ``message``."""

    @abstractmethod
    def addressed(self, message: discord.Message) -> bool:
        """Whether ``message`` speaks to this persona (mention, or a reply to one of its messages)."""

    @abstractmethod
    async def reply_target(self, channel: discord.abc.Messageable, reply_to: discord.Message | None) -> ReplyTarget:
        """Where a reply in ``channel`` is written."""

    def _replies_to_me(self, message: discord.Message) -> bool:
        ref = message.reference
        return ref is not None and isinstance(ref.resolved, discord.Message) and self.owns(ref.resolved)


class BotVoice(Voice):
    """A persona with its own bot token: it is the client's user."""

    can_dm = True

    def owns(self, message: discord.Message) -> bool:
        return self.client.user is not None and message.author.id == self.client.user.id

    def addressed(self, message: discord.Message) -> bool:
        me = self.client.user
        return me is not None and (me.id in message.raw_mentions or self._replies_to_me(message))

    async def reply_target(self, channel: discord.abc.Messageable, reply_to: discord.Message | None) -> ReplyTarget:
        return ChannelTarget(channel, reply_to)


class WebhookVoice(Voice):
    """A persona posted through a channel webhook under its own name and avatar; addressed as ``@Name``."""

    def __init__(self, persona: PersonaSpec, client: discord.Client, webhooks: Webhooks) -> None:
        super().__init__(persona, client)
        self.webhooks = webhooks
        self._mention = re.compile(rf"(?<!\w)@{re.escape(persona.name)}(?!\w)", re.IGNORECASE)

    def owns(self, message: discord.Message) -> bool:
        """Posted through one of this bot's own webhooks under the persona's name; anyone's webhook (a proxy
        bot such as PluralKit) can post under any name, so the name alone proves nothing."""
        return message.webhook_id in self.webhooks.ids and message.author.name == self.persona.name

    def addressed(self, message: discord.Message) -> bool:
        return bool(self._mention.search(message.content)) or self._replies_to_me(message)

    async def reply_target(self, channel: discord.abc.Messageable, reply_to: discord.Message | None) -> ReplyTarget:
        thread = channel if isinstance(channel, discord.Thread) else None
        parent = thread.parent if thread is not None else channel
        if not isinstance(parent, discord.TextChannel):
            raise RuntimeError(f"persona '{self.name}' (webhook mode) cannot post in {channel!r}")
        return WebhookTarget(await self.webhooks.get(parent), self.persona, channel, thread)


class ChannelTarget:
    """Messages sent by the bot account itself; the first one replies to the message being answered."""

    def __init__(self, channel: discord.abc.Messageable, reply_to: discord.Message | None) -> None:
        self.channel = channel
        self.reply_to = reply_to

    async def post(self, content: str) -> int:
        reference = self.reply_to.to_reference(fail_if_not_exists=False) if self.reply_to else None
        message = await self.channel.send(content, reference=reference, allowed_mentions=ALLOWED_MENTIONS)  # type: ignore[arg-type]
        self.reply_to = None  # only once it is sent: a retried first post still replies
        return message.id

    async def edit(self, message_id: int, content: str) -> None:
        await self.channel.get_partial_message(message_id).edit(  # type: ignore[attr-defined]
            content=content, allowed_mentions=ALLOWED_MENTIONS
        )

    def typing(self) -> AbstractAsyncContextManager[object]:
        return typing(self.channel)


class WebhookTarget:
    """Messages sent through a webhook with the persona's name and avatar."""

    def __init__(
        self, webhook: discord.Webhook, persona: PersonaSpec, channel: discord.abc.Messageable,
        thread: discord.Thread | None,
    ) -> None:
        self.webhook = webhook
        self.persona = persona
        self.channel = channel
        self.thread = thread or discord.utils.MISSING

    async def post(self, content: str) -> int:
        message = await self.webhook.send(
            content, username=self.persona.name, avatar_url=self.persona.avatar or discord.utils.MISSING,
            allowed_mentions=ALLOWED_MENTIONS, thread=self.thread, wait=True,
        )
        return message.id

    async def edit(self, message_id: int, content: str) -> None:
        await self.webhook.edit_message(
            message_id, content=content, allowed_mentions=ALLOWED_MENTIONS, thread=self.thread
        )

    def typing(self) -> AbstractAsyncContextManager[object]:
        return typing(self.channel)


TYPING_LASTS = 5.0
"""Seconds one typing request shows for (Discord shows it up to 10 s, or until the bot posts)."""
_typing_since: dict[tuple[int, int], float] = {}  # (bot user, channel) -> when its indicator was last sent


@asynccontextmanager
async def typing(channel: discord.abc.Messageable) -> AsyncIterator[None]:
    """'is typing…' in ``channel``; a reply never fails because the indicator could not be shown. Replies
    queued in one channel share one indicator: a bot sends at most one typing request per ``TYPING_LASTS``
    seconds there (under load these were a third of its requests)."""
    state = getattr(channel, "_state", None)
    key = (getattr(getattr(state, "user", None), "id", 0), getattr(channel, "id", 0))
    now = time.monotonic()
    if now - _typing_since.get(key, -TYPING_LASTS) < TYPING_LASTS:
        yield
        return
    if len(_typing_since) > 4096:
        for stale in [k for k, t in _typing_since.items() if now - t >= TYPING_LASTS]:
            del _typing_since[stale]
    _typing_since[key] = now
    indicator = channel.typing()
    try:
        await indicator.__aenter__()
    except discord.HTTPException as exc:
        log.debug("no typing indicator in %s: %s", getattr(channel, "id", channel), exc)
        yield
        return
    try:
        yield
    finally:
        await indicator.__aexit__(None, None, None)


class Webhooks:
    """One webhook per channel, owned by the hosting bot: found once (or created), then cached. ``ids`` are
    the bot's own webhooks seen so far: what tells its personas' messages from anyone else's."""

    def __init__(self, client: discord.Client) -> None:
        self.client = client
        self.ids: set[int] = set()
        self._hooks: dict[int, discord.Webhook] = {}
        self._locks: dict[int, asyncio.Lock] = {}

    def _mine(self, hooks: list[discord.Webhook]) -> list[discord.Webhook]:
        me = self.client.user
        mine = [h for h in hooks if h.token and h.user and me and h.user.id == me.id]
        self.ids.update(h.id for h in mine)
        return mine

    async def discover(self) -> None:
        """Learn the bot's webhooks in every guild (one request each), so its personas recognise their own
        messages from before this start; a guild where the bot may not list webhooks is skipped (the
        permission check reports it)."""
        for guild in self.client.guilds:
            try:
                self._mine(await guild.webhooks())
            except discord.HTTPException as exc:
                log.debug("cannot list webhooks in guild %s: %s", guild.id, exc)

    async def get(self, channel: discord.TextChannel) -> discord.Webhook:
        async with self._locks.setdefault(channel.id, asyncio.Lock()):
            hook = self._hooks.get(channel.id)
            if hook is None:
                mine = self._mine(await channel.webhooks())
                hook = mine[0] if mine else await channel.create_webhook(name=WEBHOOK_NAME)
                self.ids.add(hook.id)
                self._hooks[channel.id] = hook
            return hook
