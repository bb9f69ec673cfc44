"""The one place where what the bot knows about a persona and a conversation becomes the engine's messages.

The engine puts the bundle's system prompt first (``finetune.prompt.with_system_prompt``) and appends the
system message built here to it, so context added here (lorebook entries, memories) never replaces the
character, and the prompt renders through the bundle's chat template exactly as in training.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from finetune.cards.context import CardContext, apply_card_context

Message = dict[str, str]


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
    turns (from Discord history or a /converse transcript) with the card's depth prompt and post-history
    instructions placed among them (``finetune.cards.context``)."""
    if card is not None:
        added = apply_card_context(turns, card, count_tokens)
        turns, context = added.turns, [*context, *added.blocks]
    blocks = [block.strip() for block in context if block.strip()]
    system = [{"role": "system", "content": "\n\n".join(blocks)}] if blocks else []
    return [*system, *(dict(turn) for turn in turns)]
