"""Slash commands: /persona list|swap|reload|settings, /converse, /stop, /reset, /memory show|forget|guild.

Each command is a plain function in ``COMMANDS``, the one table Discord registration (``register``) and
``personabot simulate``'s terminal both read, so a command cannot exist in one and be missing in the other.
"""
from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, Optional, Protocol

import discord
from discord import app_commands

from .engine.base import EngineError
from .errors import CommandError
from .state import ChannelSettings

if TYPE_CHECKING:
    from finetune.bundle import Manifest

    from .config import Settings
    from .converse import ConverseSession
    from .engine.base import Engine
    from .memory import Memory
    from .state import State
    from .voices import Voice


class App(Protocol):
    """What the commands act on: every persona of the process (``bot.app.PersonaBot``)."""

    settings: Settings
    voices: list[Voice]

    @property
    def engine(self) -> Engine: ...

    def voice(self, name: str) -> Voice | None: ...

    async def swap(self, voice: Voice, adapter: str, keep: bool = False, by_user: int = 0) -> Manifest: ...

    async def reload(self, voice: Voice) -> Manifest: ...

    def public(self, text: str) -> str: ...

    def stop(self, channel_id: int) -> bool: ...

    async def reset(self, channel_id: int) -> None: ...

    def greeting(self, voice: Voice, channel: discord.abc.Messageable, user: discord.abc.User) -> str | None: ...

    async def greet(self, voice: Voice, channel: discord.abc.Messageable, text: str) -> None: ...

    def settings_for(self, channel_id: int) -> ChannelSettings: ...

    async def set_channel_settings(self, channel_id: int, settings: ChannelSettings) -> None: ...

    def remembers(self, guild_id: int | None) -> bool: ...

    async def set_guild_memory(self, guild_id: int, on: bool) -> int: ...

    @property
    def state(self) -> State: ...

    @property
    def memory(self) -> Memory: ...

    def converse(self, channel: discord.abc.Messageable, names: list[str], topic: str, turns: int | None,
                 user: discord.abc.User) -> ConverseSession: ...


@dataclass(frozen=True)
class Param:
    """One option of a command, as Discord shows it and as the simulate terminal parses it.

    ``persona`` is a persona's name (autocompleted), ``word`` one word, ``text`` the rest of the line,
    ``count`` a whole number within ``bounds``, ``flag`` yes or no (Discord's boolean option).
    """

    name: str
    description: str
    kind: Literal["persona", "word", "text", "count", "flag"] = "word"
    required: bool = True
    bounds: tuple[int, int] = (1, 100)

    def parameter(self) -> inspect.Parameter:
        """The callback parameter discord.py reads the option's type and default from."""
        kind: Any = {"count": app_commands.Range[int, self.bounds[0], self.bounds[1]], "flag": bool}.get(self.kind, str)
        return inspect.Parameter(self.name, inspect.Parameter.KEYWORD_ONLY,
                                 annotation=kind if self.required else Optional[kind],
                                 default=inspect.Parameter.empty if self.required else None)


@dataclass(frozen=True)
class Reply:
    """What a command answers; ``private`` replies are shown only to the user who ran it. ``then`` runs once
    the answer is shown: what the command posts in the channel comes after its answer."""

    text: str
    private: bool = True
    then: Callable[[], Awaitable[None]] | None = None


async def by_owner(interaction: discord.Interaction, owner_ids: Collection[int]) -> bool:
    """Whether the bot's owners did this: the OWNER_IDS users, and the application's owner or (for a
    team-owned application) its accepted team members, as Discord reports them now. Server roles do not
    count: a persona is the same in every server the bot is in, and anyone can invite a public bot."""
    user = interaction.user.id
    if user in owner_ids:
        return True
    info = await interaction.client.application_info()
    if info.team is not None:
        return any(m.id == user and m.membership_state == discord.TeamMembershipState.accepted
                   for m in info.team.members)
    return info.owner.id == user


async def by_admin(interaction: discord.Interaction, owner_ids: Collection[int]) -> bool:
    """Whether a server's admin (Manage Server there) or the bot's owners did this: for what changes only
    this server or channel, never the persona everywhere."""
    in_guild = interaction.guild_id is not None and interaction.permissions.manage_guild
    return in_guild or await by_owner(interaction, owner_ids)


@dataclass
class Call:
    """One run of a command: the app, the personas of the client it ran on, and Discord's interaction."""

    app: App
    voices: list[Voice]
    interaction: discord.Interaction

    async def by_owner(self) -> bool:
        return await by_owner(self.interaction, self.app.settings.owner_ids)

    async def by_admin(self) -> bool:
        return await by_admin(self.interaction, self.app.settings.owner_ids)

    def persona(self, name: str | None) -> Voice:
        """The persona a command acts on: the one named, else this bot's only persona."""
        voice = self.app.voice(name) if name else (self.voices[0] if len(self.voices) == 1 else None)
        if voice is None:
            known = ", ".join(v.name for v in self.app.voices)
            problem = f"no persona named '{name}'" if name else "this bot hosts several personas; name one"
            raise CommandError(f"{problem} ({known})")
        return voice

    async def working(self) -> None:
        """Show 'thinking…' (privately) before something slow, such as loading an adapter."""
        await self.interaction.response.defer(ephemeral=True, thinking=True)

    async def send(self, reply: Reply) -> None:
        if self.interaction.response.is_done():
            await self.interaction.followup.send(reply.text, ephemeral=reply.private)
        else:
            await self.interaction.response.send_message(reply.text, ephemeral=reply.private)


Handler = Callable[..., Awaitable[Reply]]


@dataclass(frozen=True)
class Command:
    """A slash command: ``name`` is ``"group sub"`` for a subcommand; ``owner`` ones only the bot's owners
    may run (they change a persona in every server, see ``by_owner``), ``admin`` ones also a server's members
    with Manage Server (they change only that server or channel, see ``by_admin``)."""

    name: str
    description: str
    handler: Handler
    params: tuple[Param, ...] = ()
    owner: bool = False
    admin: bool = False

    def __post_init__(self) -> None:
        try:
            inspect.signature(self.handler).bind(None, **{p.name: None for p in self.params})
        except TypeError as exc:
            raise TypeError(f"command /{self.name}: handler {self.handler.__name__} does not take the options "
                            f"{[p.name for p in self.params]}: {exc} (make its signature match the params)") from exc

    @property
    def usage(self) -> str:
        """``/name ARGS`` as typed in the simulate terminal: the rest-of-line ``text`` option comes last."""
        ordered = [p for p in self.params if p.kind != "text"] + [p for p in self.params if p.kind == "text"]
        args = [p.name.upper() if p.required else f"[{p.name.upper()}]" for p in ordered]
        return " ".join([f"/{self.name}", *args])


DENIED = ("🚫 Only the bot's owners can do that (OWNER_IDS, or the application's owner or team in the "
          "Developer Portal): it changes the persona in every server.")
DENIED_ADMIN = "🚫 Only members with Manage Server (or the bot's owners) can do that."
PERSONA = Param("persona", "which persona (default: this bot's)", "persona", required=False)


async def list_personas(call: Call) -> Reply:
    lines = []
    for voice in call.app.voices:
        try:
            served = f"`{call.app.engine.manifest(voice.name).name}`"
        except EngineError as exc:  # not loaded: say why instead of failing the whole list
            served = f"not loaded ({call.app.public(str(exc))})"
        mode = "webhook" if voice.persona.webhook else "own account"
        channels = ", ".join(f"<#{c}>" for c in voice.persona.channels) or "none"
        lines.append(f"**{voice.name}** ({mode}): {served}; own channels: {channels}")
    return Reply("\n".join(lines))


async def swap(call: Call, adapter: str, persona: str | None = None, keep: bool | None = None) -> Reply:
    voice = call.persona(persona)
    kept = bool(keep)
    await call.working()
    try:
        manifest = await call.app.swap(voice, adapter, keep=kept, by_user=call.interaction.user.id)
    except CommandError as exc:  # shown to the owner, without host paths; the old adapter keeps serving
        return Reply(f"❌ {exc}\n**{voice.name}** keeps serving its current adapter.")
    after = "also after a restart" if kept else "until the bot restarts (`keep:yes` keeps it)"
    return Reply(f"✅ **{voice.name}** now serves `{manifest.name}`, {after}.")


async def reload(call: Call, persona: str | None = None) -> Reply:
    voice = call.persona(persona)
    await call.working()
    try:
        manifest = await call.app.reload(voice)
    except CommandError as exc:
        return Reply(f"❌ {exc}\n**{voice.name}** keeps serving the loaded adapter.")
    return Reply(f"🔄 **{voice.name}** reloaded `{manifest.name}`.")


async def converse(call: Call, persona_a: str, persona_b: str, topic: str, turns: int | None = None) -> Reply:
    interaction = call.interaction
    if interaction.guild is None or interaction.channel is None:
        raise CommandError("conversations run in server channels")
    session = call.app.converse(interaction.channel, [persona_a, persona_b], topic, turns, interaction.user)
    a, b = session.voices
    return Reply(f"🎭 **{a.name}** and **{b.name}** talk about *{topic}* for {session.turns} turns. "
                 "`/stop` ends it; writing here interrupts.", private=False)


async def stop(call: Call) -> Reply:
    channel_id = call.interaction.channel_id
    if channel_id is not None and call.app.stop(channel_id):
        return Reply("⏹️ Stopped.", private=False)
    return Reply("Nothing is running here.")


async def reset(call: Call, persona: str | None = None) -> Reply:
    """The named persona (by default this bot's only one) then opens the new context with its card's
    greeting, as a new chat starts in SillyTavern."""
    interaction = call.interaction
    voice = call.persona(persona) if persona or len(call.voices) == 1 else None
    if interaction.channel is None:
        raise CommandError("run this in a channel")
    if interaction.guild is None and voice is not None and voice not in call.voices:
        raise CommandError(f"{voice.name} cannot write in this DM; reset it without naming a persona")
    await call.app.reset(interaction.channel.id)
    text = "🧹 Context reset: the personas ignore everything above this."
    if voice is None:  # several personas on this bot: which one opens the new context is not guessed
        return Reply(f"{text} (`/reset persona:NAME` has one of them greet.)", private=False)
    greeting = call.app.greeting(voice, interaction.channel, interaction.user)
    if greeting is None:
        return Reply(f"{text} (**{voice.name}** has no greeting for this chat.)", private=False)
    return Reply(text, private=False, then=partial(call.app.greet, voice, interaction.channel, greeting))


async def channel_settings(call: Call, group: bool | None = None, temperature: str | None = None,
                           length: int | None = None) -> Reply:
    """Per-channel settings; with no option, shows them. ``temperature`` and ``length`` 'default' clear."""
    channel_id = call.interaction.channel_id
    if channel_id is None:
        raise CommandError("settings are per channel; run this in one")
    current = call.app.settings_for(channel_id)
    if group is not None or temperature is not None or length is not None:
        heat = current.temperature
        if temperature is not None:
            try:
                heat = None if temperature.strip().lower() == "default" else float(temperature)
            except ValueError:
                raise CommandError(f"temperature: a number such as 0.7, or 'default' (got '{temperature}')") from None
            if heat is not None and not 0 <= heat <= 2:
                raise CommandError(f"temperature: between 0 and 2 (got {heat})")
        current = ChannelSettings(group if group is not None else current.group_chat, heat,
                                  length if length is not None else current.max_new_tokens)
        await call.app.set_channel_settings(channel_id, current)
    return Reply("⚙️ Here: group chat " + ("on (personas answer each other when named; a person writing or "
                 "`/stop` resets it)" if current.group_chat else "off")
                 + f"; temperature {current.temperature if current.temperature is not None else 'persona default'}"
                 + f"; reply length {current.max_new_tokens or 'persona default'} tokens.")


async def memory_show(call: Call) -> Reply:
    user = call.interaction.user
    count, notes, latest = await call.app.state.run(call.app.memory.about, user.id)
    if not count and not notes:
        return Reply("🧠 Nothing is kept about you.")
    lines = [f"🧠 Kept about you: {count} of your messages (searchable so personas can recall them)."]
    lines += [f"Newest: {m.line()[2:]}" for m in latest[-3:]]
    lines += [f"{persona}'s note: {note}" for persona, note in sorted(notes.items())]
    return Reply("\n".join(lines)[:1900] + "\n`/memory forget` deletes all of it.")


async def memory_forget(call: Call) -> Reply:
    gone = await call.app.state.run(call.app.memory.forget_user, call.interaction.user.id)
    return Reply(f"🗑️ Deleted {gone} of your messages and every note about you.")


async def memory_guild(call: Call, on: bool) -> Reply:
    guild_id = call.interaction.guild_id
    if guild_id is None:
        raise CommandError("run this in a server")
    gone = await call.app.set_guild_memory(guild_id, on)
    if on:
        return Reply("🧠 Memory is on here: messages are kept so personas can recall them.", private=False)
    return Reply(f"🧠 Memory is off here; {gone} kept messages were deleted.", private=False)


GROUPS = {"persona": "The personas this bot serves", "memory": "What the personas remember"}
COMMANDS: tuple[Command, ...] = (
    Command("persona list", "Personas, the adapters they serve, and their channels", list_personas),
    Command("persona swap", "Serve another adapter bundle in every server, live (bot owners)", swap, (
        Param("adapter", "a bundle's folder name inside ADAPTERS_DIR"), PERSONA,
        Param("keep", "serve it after a restart too", "flag", required=False)), owner=True),
    Command("persona reload", "Re-read the persona's adapter bundle from disk (bot owners)", reload,
            (PERSONA,), owner=True),
    Command("converse", "Let two personas talk to each other here", converse, (
        Param("persona_a", "first speaker", "persona"), Param("persona_b", "second speaker", "persona"),
        Param("topic", "what they talk about", "text"),
        Param("turns", "how many messages in all", "count", required=False))),
    Command("stop", "Stop the conversation and any reply being written here", stop),
    Command("reset", "Forget the conversation so far in this channel; the persona greets anew", reset,
            (Param("persona", "who greets (default: this bot's)", "persona", required=False),)),
    Command("persona settings", "This channel's group chat, temperature and reply length (Manage Server)",
            channel_settings, (
                Param("group", "personas answer each other when named", "flag", required=False),
                Param("temperature", "e.g. 0.7, or 'default'", required=False),
                Param("length", "reply length in tokens", "count", required=False, bounds=(16, 2000))), admin=True),
    Command("memory show", "What is kept about you", memory_show),
    Command("memory forget", "Delete everything kept about you", memory_forget),
    Command("memory guild", "Turn memory on or off in this server; off deletes it (Manage Server)", memory_guild,
            (Param("on", "keep messages for recall here", "flag"),), admin=True),
)


def register(tree: app_commands.CommandTree, *, app: App, voices: list[Voice]) -> None:
    """Add every command of ``COMMANDS`` to a client's tree; ``voices`` are that client's personas (the
    default target), the commands act on the whole process (all personas)."""
    groups: dict[str, app_commands.Group] = {}
    for command in COMMANDS:
        group, _, name = command.name.rpartition(" ")
        built = app_commands.Command(name=name, description=command.description,
                                     callback=_callback(command, app, voices))
        if group:
            if group not in groups:
                groups[group] = app_commands.Group(name=group, description=GROUPS[group])
                tree.add_command(groups[group])
            groups[group].add_command(built)
        else:
            tree.add_command(built)


def _callback(command: Command, app: App, voices: list[Voice]) -> Callable[..., Awaitable[None]]:
    """The discord.py callback for ``command``: its options come from the table, not from a signature."""
    async def callback(interaction: discord.Interaction, **options: Any) -> None:
        call = Call(app, voices, interaction)
        try:
            denied = (DENIED if command.owner and not await call.by_owner()
                      else DENIED_ADMIN if command.admin and not await call.by_admin() else None)
            reply = Reply(denied) if denied else await command.handler(call, **options)
        except CommandError as exc:
            reply = Reply(f"❓ {exc}")
        await call.send(reply)
        if reply.then is not None:
            await reply.then()

    async def names(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        return [app_commands.Choice(name=v.name, value=v.name) for v in app.voices
                if current.lower() in v.name.lower()][:25]

    first = inspect.Parameter("interaction", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=discord.Interaction)
    signature = inspect.Signature([first, *(p.parameter() for p in command.params)])
    callback.__signature__ = signature  # type: ignore[attr-defined]
    app_commands.describe(**{p.name: p.description for p in command.params})(callback)
    personas = {p.name: names for p in command.params if p.kind == "persona"}
    return app_commands.autocomplete(**personas)(callback) if personas else callback
