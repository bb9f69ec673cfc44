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
from collections.abc import Callable, Sequence

from finetune.cards.context import CardContext, apply_card_context

from .engine.context import WORD_JOINER

Message = dict[str, str]
MARKERS = re.compile(r"<\|[^|<>\s]{1,40}\|>|</?s>|\[/?INST\]|<</?SYS>>|<(?:start|end)_of_turn>|<bos>|<eos>")
"""ChatML and Llama 3 / Phi ``<|...|>``, Llama 2 / Mistral ``<s> [INST] <<SYS>>``, Gemma's turn markers."""


def approx_tokens(text: str) -> int:
    """A tokenizer-free token estimate (about four characters a token) for lorebook budgets: the bot does
    not hold the engine's tokenizer, and a budget only needs the right order of magnitude."""
    return len(text) // 4 + 1


def assemble(
    turns: list[Message],
    context: Sequence[str] = (),
    card: CardContext | None = None,
    count_tokens: Callable[[str], int] = approx_tokens,
) -> list[Message]:
    """The engine's messages for a reply: ``context`` blocks (empty ones dropped) and the ``card``'s
    triggered lorebook entries as one leading system message, then the conversation's ``user``/``assistant``
    turns (from Discord history or a /converse transcript), chat-template markers in them broken so they read
    as text, with the card's depth prompt and post-history instructions placed among them
    (``finetune.cards.context``; the card's own text is the operator's and stays as written)."""
    turns = [{**turn, "content": break_markers(turn["content"])} for turn in turns]
    if card is not None:
        added = apply_card_context(turns, card, count_tokens)
        turns, context = added.turns, [*context, *added.blocks]
    blocks = [block.strip() for block in context if block.strip()]
    system = [{"role": "system", "content": "\n\n".join(blocks)}] if blocks else []
    return [*system, *turns]


def break_markers(text: str) -> str:
    """``text`` with every chat-template marker in it broken by an invisible word joiner."""
    return MARKERS.sub(lambda marker: marker[0][0] + WORD_JOINER + marker[0][1:], text)
