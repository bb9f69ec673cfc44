"""`personabot simulate`: the real bot against a local fake Discord, with this terminal as the user.

Replies stream in as they are edited; bot-to-bot conversations scroll by. Type `/help` for commands.
"""
from __future__ import annotations

import asyncio
import re
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from .app import PersonaBot
from .commands import COMMANDS, Command
from .config import PersonaSpec, Settings
from .engine.base import Engine
from .fake_discord import FakeDiscord, Interaction, User

TERMINAL = [
    ("#name", "Switch to (or create) channel #name"),
    ("/reply TEXT", "Reply to the latest persona message here"),
    ("/dm NAME TEXT", "Direct message a persona (own-account personas)"),
]


def help_text() -> str:
    """The terminal's own lines, then every bot command of the table as it is typed here."""
    rows = [*TERMINAL, *((c.usage, c.description) for c in COMMANDS), ("/help  /quit", "This text / leave")]
    width = max(len(usage) for usage, _ in rows)
    lines = [f"  {usage:<{width}}  {what}" for usage, what in rows]
    return "\n".join(["type a message to post it in the current channel; `@Name` addresses a persona", *lines])


HELP = help_text()


FLAGS = {"yes": True, "on": True, "true": True, "no": False, "off": False, "false": False}


class Usage(ValueError):
    """A typed command line does not fit the command; the message shows how to type it."""


class World:
    """The fake guild for a set of personas: a bot account per token persona, one host bot for webhooks."""

    def __init__(self, fake: FakeDiscord, personas: list[PersonaSpec]) -> None:
        self.fake = fake
        self.user = fake.owner
        self.general = fake.add_channel("general")
        self.bots: dict[str, User] = {}
        self.tokens: dict[str, str] = {}
        host: User | None = None
        for persona in personas:
            if persona.webhook:
                host = host or fake.add_bot("personabot", "sim-host")
                self.bots[persona.name], self.tokens[persona.name] = host, "sim-host"
            else:
                token = f"sim-{persona.name}"
                self.bots[persona.name], self.tokens[persona.name] = fake.add_bot(persona.name, token), token
            for channel_id in persona.channels:
                if channel_id not in fake.channels:
                    fake.add_channel(f"{persona.name.lower()}-home", channel_id)

    def bot_for(self, name: str | None) -> User:
        """The bot whose app runs a command: the named persona's, else the first."""
        by_name = {n.lower(): b for n, b in self.bots.items()}
        return by_name.get((name or "").lower()) or next(iter(self.bots.values()))

    def persona_first(self, text: str) -> tuple[str | None, str]:
        """Split a leading persona name (which may contain spaces, or be quoted) off ``text``."""
        text = text.lstrip(" ,")
        if text[:1] in ('"', "'") and (end := text.find(text[0], 1)) > 0:
            quoted = text[1:end].strip().lower()
            name = next((n for n in self.bots if n.lower() == quoted), None)
            return (name, text[end + 1 :].strip(" ,")) if name else (None, text)
        for name in sorted(self.bots, key=len, reverse=True):
            if text.lower().startswith(name.lower()) and text[len(name):len(name) + 1] in ("", " "):
                return name, text[len(name):].strip(" ,")
        return None, text

    def mentions(self, text: str) -> str:
        """`@Name` becomes a real mention for own-account personas (webhook personas read `@Name` as is)."""
        for name, bot in self.bots.items():
            if bot.token != "sim-host":
                text = re.sub(rf"(?<!\w)@{re.escape(name)}(?!\w)", bot.mention, text, flags=re.IGNORECASE)
        return text


class Terminal:
    """Prints messages as they stream (appending each edit's new text) and turns typed lines into actions."""

    def __init__(self, world: World, console: Console, *, echo: bool = False) -> None:
        self.world = world
        self.echo = echo  # input that is not typed (a pipe) is shown, so the transcript reads right
        self.fake = world.fake
        self.console = console
        self.channel = world.general
        self.shown: dict[str, str] = {}
        self.open: str | None = None
        self.fake.watchers.append(self.show)

    def show(self, kind: str, message: dict) -> None:
        if int(message["author"]["id"]) == self.world.user.id:
            return
        text, mid = message["content"], message["id"]
        before = self.shown.get(mid)
        if mid == self.open and before is not None and text.startswith(before):
            self.console.out(text[len(before):], end="", highlight=False)
        else:
            channel = self.fake.channels.get(int(message["channel_id"]))
            where = "" if channel is self.channel or channel is None else f"[dim]#{escape(channel.name)}[/] "
            edited = "[dim](edited)[/] " if before is not None else ""
            self.console.print(("\n" if self.open else "") + f"{where}{edited}[bold cyan]"
                               f"{escape(message['author']['username'])}[/]: ", end="")
            self.console.out(text, end="", highlight=False)
            self.open = mid
        self.shown[mid] = text
        self.console.file.flush()  # partial lines too: the reply is still being written

    def say(self, text: str) -> None:
        self.console.print(("\n" if self.open else "") + text, highlight=False)
        self.open = None

    async def run(self, lines: asyncio.Queue[str | None]) -> None:
        self.say(f"[dim]{escape(HELP)}[/]\n[bold]#{self.channel.name}[/] — you are '{self.world.user.name}'")
        while (line := await lines.get()) is not None:
            line = line.strip()
            if self.echo:
                self.say(f"[dim]you>[/] {escape(line)}")
            self.open = None
            if line in ("/quit", "/exit"):
                return
            if line:
                self.handle(line)

    def handle(self, line: str) -> None:
        fake, world = self.fake, self.world
        word, _, rest = line.partition(" ")
        if line.startswith("#"):
            name = line[1:].strip() or "general"
            self.channel = next((c for c in fake.channels.values() if c.name == name), None) or fake.add_channel(name)
            self.say(f"[bold]#{escape(name)}[/]")
        elif word == "/help":
            self.say(f"[dim]{escape(HELP)}[/]")
        elif word == "/reply":
            target = next((m for m in reversed(self.channel.messages) if m["author"].get("bot")
                           and m.get("type") in (0, 19)), None)
            fake.post(world.user, self.channel, world.mentions(rest), reply_to=target)
        elif word == "/dm":
            name, text = world.persona_first(rest)
            bot = world.bots.get(name or "")
            if bot is None or bot.token == "sim-host":
                self.say(f"[red]no own-account persona at the start of '{escape(rest)}'[/]")
            else:
                fake.post(world.user, fake.dm_channel(world.user, bot), text)
        elif word.startswith("/"):
            try:
                command, options = parse(line, world)
            except Usage as exc:
                self.say(f"[red]{escape(str(exc))}[/]")
                return
            named = [str(options[p.name]) for p in command.params if p.kind == "persona" and p.name in options]
            self.command(world.bot_for(named[0] if named else None), command.name, **options)
        else:
            fake.post(world.user, self.channel, world.mentions(line))

    def command(self, bot: User, name: str, **options: object) -> None:
        try:
            interaction = self.fake.command(bot, self.world.user, self.channel, name, **options)
        except AssertionError as exc:
            self.say(f"[red]{escape(str(exc))}[/]")
            return
        asyncio.get_running_loop().create_task(self._private_reply(interaction))

    async def _private_reply(self, interaction: Interaction) -> None:
        """Ephemeral answers exist only in the interaction: print them here (public ones stream as messages)."""
        text = await interaction.text(timeout=600)
        if interaction.ephemeral:
            self.say(f"[dim](only you)[/] {escape(text)}")


def parse(line: str, world: World) -> tuple[Command, dict[str, object]]:
    """``/name args`` -> the table command and its options, read in the order ``Command.usage`` shows."""
    text = line[1:].strip()
    command = max((c for c in COMMANDS if text == c.name or text.startswith(c.name + " ")),
                  key=lambda c: len(c.name), default=None)
    if command is None:
        word = text.split(" ")[0]
        group = [c.usage for c in COMMANDS if c.name.startswith(word + " ")]
        raise Usage(f"usage: {' | '.join(group)}" if group else f"unknown command /{word} (/help)")
    rest = text[len(command.name):].strip()
    options: dict[str, object] = {}
    for param in command.params:
        value: object = None
        if param.kind == "persona":
            value, rest = world.persona_first(rest)
        elif param.kind == "count" and rest.split(" ")[0].isdecimal():
            word, _, rest = rest.partition(" ")
            value = int(word)
        elif param.kind == "flag" and rest.split(" ")[0].lower() in FLAGS:
            word, _, rest = rest.partition(" ")
            value = FLAGS[word.lower()]
        elif param.kind == "word" and rest:
            value, _, rest = rest.partition(" ")
        rest = rest.strip()
        if value is not None:
            options[param.name] = value
        elif param.required and param.kind != "text":
            raise _usage(command, world)
    text_param = next((p for p in command.params if p.kind == "text"), None)
    if text_param is not None and rest:
        options[text_param.name] = rest
    elif rest or (text_param is not None and text_param.required):
        raise _usage(command, world)
    return command, options


def _usage(command: Command, world: World) -> Usage:
    personas = [p.name.upper() for p in command.params if p.kind == "persona"]
    names = f" ({', '.join(personas)}: one of {', '.join(world.bots)})" if personas else ""
    return Usage(f"usage: {command.usage}{names}")


def stdin_lines() -> asyncio.Queue[str | None]:
    """Lines typed on stdin, read by a daemon thread so Ctrl-C never waits on a blocked read."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    def pump() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(queue.put_nowait, line)
        loop.call_soon_threadsafe(queue.put_nowait, None)

    threading.Thread(target=pump, daemon=True, name="stdin").start()
    return queue


async def simulate(
    settings: Settings, personas: list[PersonaSpec], engine: Engine | Callable[[], Engine], *, port: int = 0,
    console: Console, lines: asyncio.Queue[str | None] | None = None,
) -> None:
    """Run the bot against a fresh fake Discord until /quit or end of input."""
    settings = settings.model_copy(update={"state_db": Path(":memory:")})  # a fresh fake has no past to keep
    fake = await FakeDiscord(owner_name="you").start(port)
    world = World(fake, personas)
    console.print(f"fake Discord on {fake.api_url}; starting {', '.join(p.name for p in personas)}…")
    try:
        with fake.patched():
            bot = PersonaBot(settings, personas, engine, tokens=world.tokens,
                             client_options={"guild_ready_timeout": 0.1})
            try:
                await bot.start()
                terminal = Terminal(world, console, echo=lines is None and not sys.stdin.isatty())
                await terminal.run(lines or stdin_lines())
            finally:
                await bot.close()
    finally:
        await fake.close()
