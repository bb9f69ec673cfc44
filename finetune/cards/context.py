"""A card's serve-time state and the one function that puts it into a chat: for the bot's prompt seam.

SillyTavern's order: lorebook entries "before_char" go ahead of the character's prompt and "after_char"
after it (both inside the system prompt, which they extend, never replace); the depth prompt and
"at_depth" entries go ``depth`` messages from the end of the chat; post-history instructions come after
the last message. Standard library only, so the bot can import it without the readers."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from finetune.cards.lorebook import Lorebook, triggered_entries

Message = dict[str, str]


@dataclass(frozen=True)
class CardContext:
    """What of a card matters once the adapter is trained; JSON-able for the bundle manifest."""

    lorebook: Lorebook | None = None
    post_history_instructions: str = ""
    depth_prompt: str = ""
    depth_prompt_depth: int = 4
    depth_prompt_role: str = "system"
    greetings: list[str] = field(default_factory=list)
    group_greetings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["lorebook"] = self.lorebook.to_dict() if self.lorebook else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CardContext:
        book = data.get("lorebook")
        return cls(**{**data, "lorebook": Lorebook.from_dict(book) if book else None})

    @property
    def empty(self) -> bool:
        return self == CardContext()


def apply_card_context(
    system_prompt: str,
    history: list[Message],
    context: CardContext,
    count_tokens: Callable[[str], int],
    lore_budget: int | None = None,
) -> list[Message]:
    """Engine messages for one reply: ``system_prompt`` extended by the triggered lore, then ``history``
    with the depth prompt, depth entries and post-history instructions placed as SillyTavern places them.

    ``lore_budget`` caps the lorebook's tokens (the book's own ``token_budget`` applies too)."""
    entries = []
    if context.lorebook is not None:
        recent = [m["content"] for m in history if m["role"] != "system"]
        entries = triggered_entries(context.lorebook, recent, count_tokens, lore_budget)
    before = [e.content for e in entries if e.position == "before_char"]
    after = [e.content for e in entries if e.position == "after_char"]
    system = "\n\n".join(p for p in (*before, system_prompt, *after) if p)
    chat = list(history)
    inserts: list[tuple[int, Message]] = [
        (e.depth, {"role": e.role, "content": e.content}) for e in entries if e.position == "at_depth"
    ]
    if context.depth_prompt:
        inserts.append((context.depth_prompt_depth,
                        {"role": context.depth_prompt_role, "content": context.depth_prompt}))
    for depth, message in sorted(inserts, key=lambda x: -x[0]):  # deepest first keeps the others' depth
        chat.insert(max(len(chat) - depth, 0), message)
    if context.post_history_instructions:
        chat.append({"role": "system", "content": context.post_history_instructions})
    return ([{"role": "system", "content": system}] if system else []) + chat
