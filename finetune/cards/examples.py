"""A card's own dialogue as training conversations: mes_example blocks, greetings, and lorebook entries
whose content is a dialogue (cards often keep ready-made question/answer scenes there)."""
from __future__ import annotations

import re

from finetune.cards.card import Card
from finetune.cards.macros import USER_NAME, fill_user
from finetune.conversation import Conversation, ReadResult, tidy_messages

# another speaker in an example: one to three capitalised words ("Anon", "User 2", "Old Tom")
_OTHER = r"[A-Z][\w'’\-]*(?: [A-Z0-9][\w'’\-]*){0,2}"


def card_conversations(card: Card, where: str) -> ReadResult:
    """Each example block, each greeting (the character speaking first) and each dialogue lorebook entry."""
    result = ReadResult(problems=list(card.problems))
    tag = _speaker_pattern(card)
    for i, block in enumerate(card.examples):
        at = f"{where}: mes_example[{i}]"
        messages = _dialogue(block, tag, card, at, result.problems)
        try:
            result.conversations.append(Conversation(tidy_messages(messages), at))
        except ValueError as e:
            result.problems.append(f"{at}: {e}")
    greetings = [*((f"greetings[{i}]", g) for i, g in enumerate(card.greetings)),
                 *((f"group_only_greetings[{i}]", g) for i, g in enumerate(card.group_greetings))]
    for at, greeting in greetings:  # the character speaking first, to the User of the examples
        result.conversations.append(Conversation([{"role": "assistant", "content": fill_user(greeting, USER_NAME)}],
                                                 f"{where}: {at}"))
    for i, entry in enumerate(card.lorebook.entries if card.lorebook else ()):
        if not is_dialogue(entry.content, tag, card):
            continue
        at = f"{where}: character_book.entries[{i}]"
        messages = _dialogue(entry.content, tag, card, at, result.problems)
        try:
            result.conversations.append(Conversation(tidy_messages(messages), at))
        except ValueError as e:
            result.problems.append(f"{at}: {e}")
    return result


def is_dialogue(text: str, tag: re.Pattern[str], card: Card) -> bool:
    """Speaker-tagged lines from the start, with both the character and someone else speaking."""
    lines = [line for line in text.split("\n") if line.strip()]
    if not lines or not tag.match(lines[0]):
        return False
    speakers = {m["who"].casefold() for m in map(tag.match, lines) if m}
    own = {n.casefold() for n in (card.name, card.char, card.name.split()[0])}
    return bool(speakers & own) and bool(speakers - own)


def lorebook_usage(card: Card, where: str) -> list[str]:
    """One line per lorebook entry saying how it is used, for ``finetune data check``."""
    if card.lorebook is None:
        return []
    tag = _speaker_pattern(card)
    lines = [f"{where}: character_book: {len(card.lorebook.entries)} entries"]
    for i, e in enumerate(card.lorebook.entries):
        label = e.name or ", ".join(e.keys[:3]) or "(no keys)"
        if not e.enabled:
            use = "disabled: never used"
        elif e.constant or e.force:
            use = "always in the prompt when serving"
        else:
            use = f"in the prompt when serving, when {', '.join(repr(k) for k in e.keys[:4])} comes up"
        if is_dialogue(e.content, tag, card):
            use += "; its dialogue is also a training conversation"
        lines.append(f"  entries[{i}] {label}: {use}")
    return lines


def _speaker_pattern(card: Card) -> re.Pattern[str]:
    own = {card.name, card.char, card.name.split()[0]}
    names = "|".join(re.escape(n) for n in sorted(own | {USER_NAME}, key=len, reverse=True))
    return re.compile(rf"^\s*(?P<who>(?i:{names})|{_OTHER})\s*:\s?(?P<text>.*)$")


def _dialogue(block: str, tag: re.Pattern[str], card: Card, where: str, problems: list[str]):
    own = {n.casefold() for n in (card.name, card.char, card.name.split()[0])}
    turns: list[tuple[str, str]] = []  # (speaker, text)
    for line in block.split("\n"):
        match = tag.match(line)
        if match:
            turns.append((match["who"], match["text"]))
        elif turns:
            turns[-1] = (turns[-1][0], turns[-1][1] + "\n" + line)
        elif line.strip():
            problems.append(f"{where}: text before the first speaker tag skipped: {line.strip()[:60]!r}")
    others = {who.casefold() for who, _ in turns if who.casefold() not in own}
    messages = []
    for who, text in turns:
        if who.casefold() in own:
            messages.append({"role": "assistant", "content": text})
        elif who.casefold() == USER_NAME.casefold() and len(others) == 1:
            messages.append({"role": "user", "content": text})
        else:  # another participant: the model must know who said it
            messages.append({"role": "user", "content": f"{who}: {text.strip()}"})
    return messages
