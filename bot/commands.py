"""Slash commands: /persona list|swap|reload, /converse, /stop, /reset."""
from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands

from finetune.bundle import BundleError

from .engine.base import EngineError

if TYPE_CHECKING:
    from .app import PersonaBot
    from .client import BotClient
    from .voices import Voice


class CommandError(ValueError):
    """A command cannot be carried out; the message is shown to the user who ran it."""


def register(tree: app_commands.CommandTree, bot: PersonaBot, client: BotClient) -> None:
    """Add the commands to ``client``'s tree; they act on the whole process (all personas)."""

    async def names(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        return [app_commands.Choice(name=v.name, value=v.name) for v in bot.voices
                if current.lower() in v.name.lower()][:25]

    async def denied(interaction: discord.Interaction) -> bool:
        """Admins are members with Manage Server, and the OWNER_IDS users anywhere."""
        if interaction.user.id in bot.settings.owner_ids or (
            interaction.guild_id is not None and interaction.permissions.manage_guild
        ):
            return False
        await interaction.response.send_message(
            "🚫 Only members with Manage Server (or the bot's owners) can do that.", ephemeral=True
        )
        return True

    async def target(interaction: discord.Interaction, name: str | None) -> Voice | None:
        """The persona a command acts on: the one named, else this bot's only persona."""
        voice = bot.voice(name) if name else (client.voices[0] if len(client.voices) == 1 else None)
        if voice is None:
            known = ", ".join(v.name for v in bot.voices)
            problem = f"no persona named '{name}'" if name else "this bot hosts several personas; name one"
            await interaction.response.send_message(f"❓ {problem} ({known})", ephemeral=True)
        return voice

    persona = app_commands.Group(name="persona", description="The personas this bot serves")

    @persona.command(name="list", description="Personas, the adapters they serve, and their channels")
    async def list_(interaction: discord.Interaction) -> None:
        lines = []
        for voice in bot.voices:
            try:
                served = f"`{bot.engine.manifest(voice.name).name}` from `{bot.engine.bundle_dir(voice.name)}`"
            except EngineError as exc:  # not loaded: say why instead of failing the whole list
                served = f"not loaded ({exc})"
            mode = "webhook" if voice.persona.webhook else "own account"
            channels = ", ".join(f"<#{c}>" for c in voice.persona.channels) or "none"
            lines.append(f"**{voice.name}** ({mode}): {served}; own channels: {channels}")
        await interaction.response.send_message("\n".join(lines), ephemeral=True)

    @persona.command(name="swap", description="Serve another adapter bundle, live (Manage Server)")
    @app_commands.describe(adapter="bundle folder, or a bundle name under ADAPTERS_DIR",
                           persona="which persona (default: this bot's)")
    @app_commands.autocomplete(persona=names)
    async def swap(interaction: discord.Interaction, adapter: str, persona: str | None = None) -> None:
        if await denied(interaction) or (voice := await target(interaction, persona)) is None:
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        try:
            manifest = await bot.swap(voice, adapter)
        except (EngineError, BundleError) as exc:  # shown to the admin; the old adapter keeps serving
            await interaction.followup.send(
                f"❌ {exc}\n**{voice.name}** keeps serving its current adapter.", ephemeral=True
            )
            return
        await interaction.followup.send(f"✅ **{voice.name}** now serves `{manifest.name}`.", ephemeral=True)

    @persona.command(name="reload", description="Re-read the persona's adapter bundle from disk (Manage Server)")
    @app_commands.describe(persona="which persona (default: this bot's)")
    @app_commands.autocomplete(persona=names)
    async def reload(interaction: discord.Interaction, persona: str | None = None) -> None:
        if await denied(interaction) or (voice := await target(interaction, persona)) is None:
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        try:
            manifest = await bot.engine.reload_adapter(voice.name)
        except (EngineError, BundleError) as exc:
            await interaction.followup.send(f"❌ {exc}\n**{voice.name}** keeps serving the loaded adapter.",
                                            ephemeral=True)
            return
        await interaction.followup.send(f"🔄 **{voice.name}** reloaded `{manifest.name}`.", ephemeral=True)

    @app_commands.command(name="converse", description="Let two personas talk to each other here")
    @app_commands.describe(persona_a="first speaker", persona_b="second speaker", topic="what they talk about",
                           turns="how many messages in all")
    @app_commands.autocomplete(persona_a=names, persona_b=names)
    async def converse(
        interaction: discord.Interaction, persona_a: str, persona_b: str, topic: str,
        turns: app_commands.Range[int, 1, 100] | None = None,
    ) -> None:
        try:
            if interaction.guild is None or interaction.channel is None:
                raise CommandError("conversations run in server channels")
            session = bot.converse(interaction.channel, [persona_a, persona_b], topic, turns, interaction.user)
        except CommandError as exc:
            await interaction.response.send_message(f"❓ {exc}", ephemeral=True)
            return
        a, b = session.voices
        await interaction.response.send_message(
            f"🎭 **{a.name}** and **{b.name}** talk about *{topic}* for {session.turns} turns. "
            "`/stop` ends it; writing here interrupts."
        )

    @app_commands.command(name="stop", description="Stop the conversation and any reply being written here")
    async def stop(interaction: discord.Interaction) -> None:
        if interaction.channel_id is not None and bot.stop(interaction.channel_id):
            await interaction.response.send_message("⏹️ Stopped.")
        else:
            await interaction.response.send_message("Nothing is running here.", ephemeral=True)

    @app_commands.command(name="reset", description="Forget the conversation so far in this channel")
    async def reset(interaction: discord.Interaction) -> None:
        if interaction.channel_id is not None:
            bot.reset(interaction.channel_id)
        await interaction.response.send_message("🧹 Context reset: the personas ignore everything above this.")

    for command in (persona, converse, stop, reset):
        tree.add_command(command)
