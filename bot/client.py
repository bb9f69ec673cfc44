"""One discord.py client per bot token: it hosts one persona (its own account) or several (webhooks)."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiohttp
import discord
from discord import app_commands

from .voices import ALLOWED_MENTIONS

log = logging.getLogger(__name__)


def intents() -> discord.Intents:
    """Guild and DM messages with their content (the privileged Message Content intent)."""
    value = discord.Intents.default()
    value.message_content = True
    value.presences = False
    value.members = False
    return value


GLOBAL_PER_SECOND = 40
"""Requests per second one token sends at most: well under Discord's global 50 (network jitter bunches
arrivals), whose 429s count toward the invalid-request ban (10,000 in 10 minutes blocks the IP)."""
BURST = 5
"""Requests that may go out together before the rest are spaced ``1 / GLOBAL_PER_SECOND`` apart."""


class Pacer:
    """A token's REST requests, at most ``per_second`` and spread out (discord.py only reacts to a global 429,
    after the fact). Each request takes its slot as it goes out (aiohttp's request-start hook), after
    discord.py's own per-bucket waits, which release several requests at once. Slots come ``1 / per_second``
    apart, ``burst`` at once after an idle spell, so no second holds more than ``per_second + burst - 1``.
    (A sliding window let 40 go at once and 40 more a second later: the fake Discord, its event loop busy,
    saw 50 arrive within a second, a global 429 in most runs of 200 messages in 20 channels.)"""

    def __init__(self, per_second: int = GLOBAL_PER_SECOND, burst: int = BURST) -> None:
        self.spacing = 1.0 / per_second
        self.burst = burst
        self._due = float("-inf")  # when the next slot falls due, burst aside

    async def wait(self) -> None:
        now = time.monotonic()
        due = max(self._due, now)
        self._due = due + self.spacing  # taken before sleeping: requests keep their order
        early = due - now - (self.burst - 1) * self.spacing
        if early > 0:
            await asyncio.sleep(early)

    def trace(self) -> aiohttp.TraceConfig:
        """The hook for the client's HTTP session; interaction callbacks are exempt on Discord (and due
        within 3 s)."""
        async def on_start(session: Any, context: Any, params: aiohttp.TraceRequestStartParams) -> None:
            if "/interactions/" not in params.url.path:
                await self.wait()

        config = aiohttp.TraceConfig()
        config.on_request_start.append(on_start)
        return config


class BotClient(discord.Client):
    """Hands this token's messages to ``on_message`` (their edits and deletions to ``on_edit`` and ``on_delete``,
    reply-button presses to ``on_button``, each new gateway session to ``on_new_session``) and serves the slash
    commands ``add_commands`` puts in its tree, synced globally or, when ``command_guilds`` are given, to those
    guilds (instantly visible)."""

    def __init__(
        self, token: str, label: str, *, on_message: Callable[[BotClient, discord.Message], None],
        add_commands: Callable[[app_commands.CommandTree], None], command_guilds: Sequence[int] = (),
        on_edit: Callable[[discord.Message], None] = lambda message: None,
        on_delete: Callable[[set[int]], None] = lambda message_ids: None,
        on_button: Callable[[BotClient, discord.Interaction], Awaitable[None]] | None = None,
        on_new_session: Callable[[BotClient], Awaitable[None]] | None = None,
        **options: Any,
    ) -> None:
        discord.VoiceClient.warn_nacl = discord.VoiceClient.warn_dave = False  # text only: no voice warnings
        self.pacer = Pacer()
        super().__init__(intents=intents(), allowed_mentions=ALLOWED_MENTIONS, http_trace=self.pacer.trace(),
                         **options)
        self.login_token = token
        self.label = label
        self.connection: asyncio.Task | None = None
        self._on_message = on_message
        self._on_edit = on_edit
        self._on_delete = on_delete
        self._on_button = on_button
        self._on_new_session = on_new_session
        self._add_commands = add_commands
        self._command_guilds = list(command_guilds)
        self.tree = app_commands.CommandTree(self)
        self.tree.on_error = self._on_command_error

    async def setup_hook(self) -> None:
        self._add_commands(self.tree)
        if not self._command_guilds:
            await self.tree.sync()
        for guild_id in self._command_guilds:
            guild = discord.Object(guild_id)
            self.tree.copy_global_to(guild=guild)
            await self.tree.sync(guild=guild)

    async def on_message(self, message: discord.Message) -> None:
        self._on_message(self, message)

    async def on_ready(self) -> None:
        """Every new gateway session (not a RESUME): what was said while it was down was never sent to it."""
        if self._on_new_session is not None:
            await self._on_new_session(self)

    async def on_interaction(self, interaction: discord.Interaction) -> None:
        """Button presses on reply messages (``bot.buttons`` ids); slash commands go through the tree."""
        custom_id = str((interaction.data or {}).get("custom_id", ""))
        if interaction.type is discord.InteractionType.component and custom_id.startswith("pb:") and self._on_button:
            await self._on_button(self, interaction)

    async def on_raw_message_edit(self, payload: discord.RawMessageUpdateEvent) -> None:
        self._on_edit(payload.message)

    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        self._on_delete({payload.message_id})

    async def on_raw_bulk_message_delete(self, payload: discord.RawBulkMessageDeleteEvent) -> None:
        self._on_delete(set(payload.message_ids))

    async def _on_command_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        log.error("/%s failed: %s", interaction.command.qualified_name if interaction.command else "?", error,
                  exc_info=error)
        text = f"⚠️ {getattr(error, 'original', error)}"
        if interaction.response.is_done():
            await interaction.followup.send(text, ephemeral=True)
        else:
            await interaction.response.send_message(text, ephemeral=True)
