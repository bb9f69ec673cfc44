"""The one place where what the bot knows about a persona and a conversation becomes the engine's messages.

The engine puts the bundle's system prompt first (``finetune.prompt.with_system_prompt``) and appends the
system message built here to it, so context added here (lorebook entries, memories) never replaces the
character, and the prompt renders through the bundle's chat template exactly as in training.
"""
from __future__ import annotations

from collections.abc import Sequence

Message = dict[str, str]


def assemble(turns: list[Message], context: Sequence[str] = ()) -> list[Message]:
    """The engine's messages for a reply: ``context`` blocks (empty ones dropped) as one leading system
    message, then the conversation's ``user``/``assistant`` turns (from Discord history or a /converse
    transcript)."""
    blocks = [block.strip() for block in context if block.strip()]
    system = [{"role": "system", "content": "\n\n".join(blocks)}] if blocks else []
    return [*system, *(dict(turn) for turn in turns)]
