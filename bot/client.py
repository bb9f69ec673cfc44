"""One discord.py client per bot token: it hosts one persona (its own account) or several (webhooks)."""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands

from .commands import register
from .voices import ALLOWED_MENTIONS, Voice

if TYPE_CHECKING:
    from .app import PersonaBot

log = logging.getLogger(__name__)


def intents() -> discord.Intents:
    """Guild and DM messages with their content (the privileged Message Content intent)."""
    value = discord.Intents.default()
    value.message_content = True
    value.presences = False
    value.members = False
    return value


class BotClient(discord.Client):
    """Routes this token's messages to the app and serves its slash commands."""

    def __init__(self, bot: PersonaBot, token: str, label: str, **options: Any) -> None:
        discord.VoiceClient.warn_nacl = discord.VoiceClient.warn_dave = False  # text only: no voice warnings
        super().__init__(intents=intents(), allowed_mentions=ALLOWED_MENTIONS, **options)
        self.bot = bot
        self.login_token = token
        self.label = label
        self.connection: asyncio.Task | None = None
        self.voices: list[Voice] = []
        self.tree = app_commands.CommandTree(self)
        self.tree.on_error = self._on_command_error

    async def setup_hook(self) -> None:
        register(self.tree, self.bot, self)
        guilds = self.bot.settings.command_guilds
        if not guilds:
            await self.tree.sync()
        for guild_id in guilds:
            guild = discord.Object(guild_id)
            self.tree.copy_global_to(guild=guild)
            await self.tree.sync(guild=guild)

    async def on_message(self, message: discord.Message) -> None:
        self.bot.on_message(self, message)

    async def _on_command_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        log.error("/%s failed: %s", interaction.command.qualified_name if interaction.command else "?", error,
                  exc_info=error)
        text = f"⚠️ {getattr(error, 'original', error)}"
        if interaction.response.is_done():
            await interaction.followup.send(text, ephemeral=True)
        else:
            await interaction.response.send_message(text, ephemeral=True)
