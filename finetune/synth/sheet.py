"""What the teacher plays: the character's prompt, example dialogues and world, from a loaded persona."""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from finetune.cards.lorebook import LoreEntry
from finetune.conversation import Conversation
from finetune.persona import PersonaData

MAX_EXAMPLES = 12
"""Example dialogues kept to choose from; each conversation's teacher sees a few (``usersim.Plan.examples``)."""

_PROPER_NOUN = re.compile(r"(?<![.!?\n]\s)(?<!^)\b([A-Z][a-z]{2,}(?: [A-Z][a-z]{2,})*)")
_COMMON = {"The", "She", "Her", "His", "They", "Every", "When", "Scenario", "User", "Discord"}


@dataclass(frozen=True)
class CharacterSheet:
    name: str
    system_prompt: str
    examples: list[Conversation]
    """dialogues the teacher sees as earlier turns, so it copies the voice (the card's mes_example)"""
    world: list[str]
    """names and things of the character's world the user simulator asks about"""
    lore: list[str] = field(default_factory=list)
    """background facts the teacher's prompt carries (lorebook entries)"""
    style_checks: list[str] = field(default_factory=list)


def sheet_from_persona(persona: PersonaData, exclude: Path, lore: Sequence[LoreEntry] | None = None) -> CharacterSheet:
    """The persona as a teacher plays it. ``exclude``: the synth output file itself, whose conversations are
    not examples. ``lore``: lorebook entries, by default the enabled ones of the persona's card: every entry's
    text goes into the teacher's prompt and its first key into the world the user simulator talks about."""
    if lore is None:
        book = persona.card.lorebook if persona.card else None
        lore = [entry for entry in book.entries if entry.enabled] if book else []
    mine = f"{exclude}:"
    examples = [c for c in persona.conversations if not c.origin.startswith(mine) and _has_exchange(c)]
    world = [entry.keys[0] for entry in lore if entry.keys]
    for noun in _PROPER_NOUN.findall(persona.system_prompt):
        words = noun.split()
        noun = " ".join(words[1:] if words[0] in _COMMON else words)
        if noun and noun != persona.name and noun not in world:
            world.append(noun)
    return CharacterSheet(
        name=persona.name,
        system_prompt=persona.system_prompt,
        examples=examples[:MAX_EXAMPLES],
        world=world,
        lore=[entry.content for entry in lore],
        style_checks=persona.style_checks,
    )


def _has_exchange(conversation: Conversation) -> bool:
    """A user turn answered by the character: greetings alone show no reply to copy."""
    roles = [m["role"] for m in conversation.messages]
    return any(a == "user" and b == "assistant" for a, b in zip(roles, roles[1:]))
