"""A card's serve-time state and the one function that puts it into a chat: for the bot's prompt seam.

Lorebook entries join the system prompt after the persona's own ("before_char" ones first: the bot's
seam always puts the character first, so it is extended, never replaced); the depth prompt and "at_depth"
entries go ``depth`` messages from the end of the chat, as SillyTavern puts them; post-history
instructions come after the last message; a greeting opens a new chat (the bot's /reset). Standard library
only, so the bot can import it without the readers."""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from finetune.cards.lorebook import Lorebook, triggered_entries
from finetune.cards.macros import fill_user

Message = dict[str, str]


@dataclass(frozen=True)
class CardContext:
    """What of a card matters once the adapter is trained; the bundle manifest carries it (pydantic
    validates and serialises the dataclasses)."""

    lorebook: Lorebook | None = None
    post_history_instructions: str = ""
    depth_prompt: str = ""
    depth_prompt_depth: int = 4
    depth_prompt_role: str = "system"
    greetings: list[str] = field(default_factory=list)
    group_greetings: list[str] = field(default_factory=list)

    def greeting(self, user: str, group: bool, rng: random.Random) -> str | None:
        """The message a new chat with ``user`` opens with, picked at random as swiping through them would:
        the first message or an alternate, and in a group chat the group-only ones too (the V3 spec's
        "additional greetings"); None when the card has none for this chat."""
        pool = [*self.greetings, *(self.group_greetings if group else ())]
        return fill_user(rng.choice(pool), user) if pool else None


@dataclass(frozen=True)
class CardTurns:
    """What a card adds to one reply: system blocks for the prompt seam, and the turns to send."""

    blocks: list[str]  # triggered lore, in insertion order: appended to the persona's system prompt
    turns: list[Message]  # the history with the depth prompt, depth entries and post-history instructions


def apply_card_context(
    history: list[Message],
    context: CardContext,
    count_tokens: Callable[[str], int],
    lore_budget: int | None = None,
) -> CardTurns:
    """Place a card's serve-time state around ``history`` (user/assistant turns, oldest first).

    Lorebook entries triggered by the recent turns become system blocks ("before_char" ones first); the
    depth prompt and "at_depth" entries go ``depth`` turns from the end; post-history instructions follow
    the last turn. ``lore_budget`` caps the lore's tokens (the book's own ``token_budget`` applies too)."""
    entries = []
    if context.lorebook is not None:
        recent = [m["content"] for m in history if m["role"] != "system"]
        entries = triggered_entries(context.lorebook, recent, count_tokens, lore_budget)
    blocks = [e.content for e in entries if e.position == "before_char"]
    blocks += [e.content for e in entries if e.position == "after_char"]
    turns = [dict(m) for m in history]
    inserts: list[tuple[int, Message]] = [
        (e.depth, {"role": e.role, "content": e.content}) for e in entries if e.position == "at_depth"
    ]
    if context.depth_prompt:
        inserts.append((context.depth_prompt_depth,
                        {"role": context.depth_prompt_role, "content": context.depth_prompt}))
    for depth, message in sorted(inserts, key=lambda x: -x[0]):  # deepest first keeps the others' depth
        turns.insert(max(len(turns) - depth, 0), message)
    if context.post_history_instructions:
        turns.append({"role": "system", "content": context.post_history_instructions})
    return CardTurns(blocks, turns)
