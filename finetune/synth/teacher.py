"""The teacher's prompt for playing the character, and the names it is served and recorded under."""
from __future__ import annotations

from .sheet import CharacterSheet

CHARACTER_RULES = (
    "You are {char}, chatting with people on Discord. Stay in character in every message: never say you are "
    "an AI, a model or an assistant; when asked, answer as {char} would. Write only {char}'s next message, "
    "short, in {char}'s own voice, then stop."
)


def character_prompt(sheet: CharacterSheet) -> str:
    """The persona's system prompt, its lore, then the rules of the game."""
    lore = "\n".join(f"- {fact}" for fact in sheet.lore)
    parts = [sheet.system_prompt, f"What {sheet.name} knows:\n{lore}" if lore else "",
             CHARACTER_RULES.format(char=sheet.name)]
    return "\n\n".join(p for p in parts if p)


def character_messages(
    sheet: CharacterSheet, examples: tuple[int, ...], conversation: list[dict[str, str]]
) -> list[dict[str, str]]:
    """System prompt, the chosen example dialogues as earlier turns (a small teacher copies a voice it has
    seen far better than one described to it), then the conversation so far."""
    shown = [{"role": m["role"], "content": m["content"]}  # only what a chat API takes
             for i in examples for m in sheet.examples[i].messages if m["role"] != "system"]
    return [{"role": "system", "content": character_prompt(sheet)}, *shown, *conversation]
