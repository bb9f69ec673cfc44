"""The one place where what the bot knows about a persona and a conversation becomes the engine's messages.

The engine puts the bundle's system prompt first (``finetune.prompt.with_system_prompt``) and appends the
system message built here to it, so context added here (lorebook entries, memories) never replaces the
character, and the prompt renders through the bundle's chat template exactly as in training.

Text from Discord may spell a chat template's control tokens. The local engine knows its tokenizer and
breaks every special token's string (``engine.context.break_special_tokens``); an OpenAI-compatible server
renders and tokenizes the prompt itself, so the markers of the common templates are broken here, for every
engine.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

from .engine.context import WORD_JOINER

Message = dict[str, str]
MARKERS = re.compile(r"<\|[^|<>\s]{1,40}\|>|</?s>|\[/?INST\]|<</?SYS>>|<(?:start|end)_of_turn>|<bos>|<eos>")
"""ChatML and Llama 3 / Phi ``<|...|>``, Llama 2 / Mistral ``<s> [INST] <<SYS>>``, Gemma's turn markers."""


def assemble(turns: list[Message], context: Sequence[str] = ()) -> list[Message]:
    """The engine's messages for a reply: ``context`` blocks (empty ones dropped) as one leading system
    message, then the conversation's ``user``/``assistant`` turns (from Discord history or a /converse
    transcript), chat-template markers in them broken so they read as text."""
    blocks = [block.strip() for block in context if block.strip()]
    system = [{"role": "system", "content": "\n\n".join(blocks)}] if blocks else []
    return [*system, *({**turn, "content": break_markers(turn["content"])} for turn in turns)]


def break_markers(text: str) -> str:
    """``text`` with every chat-template marker in it broken by an invisible word joiner."""
    return MARKERS.sub(lambda marker: marker[0][0] + WORD_JOINER + marker[0][1:], text)
