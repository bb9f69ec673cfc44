"""Terminal chat with an adapter bundle: replies stream token by token, history kept like the bot keeps it,
and a card persona's greeting, lorebook, depth prompt and post-history instructions served as the bot serves
them (``bot.prompt.assemble``)."""
from __future__ import annotations

import random
from typing import Any

from rich.console import Console
from rich.markup import escape

from bot.prompt import assemble

from .bundle import Manifest
from .cards.macros import USER_NAME
from .inference import stream_reply

COMMANDS = "/reset forgets the conversation, /quit (or Ctrl-D) leaves"


def chat_loop(model: Any, tokenizer: Any, manifest: Manifest, console: Console | None = None) -> None:
    console = console or Console()
    console.print(f"[bold]{escape(manifest.name)}[/bold] is listening. {COMMANDS}.")
    speaker = f"[bold magenta]{escape(manifest.name)}>[/bold magenta] "
    rng = random.Random()
    history: list[dict[str, str]] = []

    def greet() -> None:
        """A new chat opens with one of the card's greetings, as the bot's /reset does."""
        greeting = manifest.card.greeting(USER_NAME, False, rng) if manifest.card else None
        if greeting:
            console.print(speaker + escape(greeting))
            history.append({"role": "assistant", "content": greeting})

    greet()
    while True:
        try:
            text = console.input("[bold cyan]you>[/bold cyan] ").strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        if text in ("/quit", "/exit"):
            return
        if text == "/reset":
            history.clear()
            console.print("[dim](conversation forgotten)[/dim]")
            greet()
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        console.print(speaker, end="")
        pieces = []
        for piece in stream_reply(model, tokenizer, manifest, assemble(history, card=manifest.card)):
            pieces.append(piece)
            console.print(piece, end="", markup=False, highlight=False)
        console.print()
        history.append({"role": "assistant", "content": "".join(pieces).strip()})
