"""Terminal chat with an adapter bundle: replies stream token by token, history kept like the bot keeps it."""
from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape

from .bundle import Manifest
from .inference import stream_reply

COMMANDS = "/reset forgets the conversation, /quit (or Ctrl-D) leaves"


def chat_loop(model: Any, tokenizer: Any, manifest: Manifest, console: Console | None = None) -> None:
    console = console or Console()
    console.print(f"[bold]{escape(manifest.name)}[/bold] is listening. {COMMANDS}.")
    history: list[dict[str, str]] = []
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
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        console.print(f"[bold magenta]{escape(manifest.name)}>[/bold magenta] ", end="")
        pieces = []
        for piece in stream_reply(model, tokenizer, manifest, history):
            pieces.append(piece)
            console.print(piece, end="", markup=False, highlight=False)
        console.print()
        history.append({"role": "assistant", "content": "".join(pieces).strip()})
