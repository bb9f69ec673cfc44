"""The ``card`` format: a Character Card V1/V2/V3 (.json, a PNG's ccv3/chara chunk, .charx) as persona data.

``finetune.cards`` reads the card as the specs and SillyTavern do; this reader turns it into what a
persona source yields: conversations, the system prompt, the serve-time card context (lorebook, depth
prompt, post-history instructions, greetings) and a note per lorebook entry on how it is used."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from finetune.cards.card import Card, parse_card
from finetune.cards.examples import card_conversations, lorebook_usage
from finetune.cards.files import load_card_json
from finetune.conversation import DataError, ReadResult


def read_card(path: str | Path) -> Card:
    """Read and parse a card file; problems met on the way (a broken ccv3 chunk, ignored fields) stay on it."""
    path = Path(path)
    raw, problems = load_card_json(path)
    try:
        card = parse_card(raw, str(path))
    except ValueError as e:
        raise DataError(f"{path}: {e}") from e
    return replace(card, problems=[*problems, *card.problems])


def read_card_source(path: str | Path) -> ReadResult:
    return card_source(read_card(path), path)


def card_source(card: Card, path: str | Path) -> ReadResult:
    """Everything a card gives a persona; see the module docstring."""
    result = card_conversations(card, str(path))
    result.system_prompt = card.system_prompt
    result.prompt_with = card.prompt
    result.card = card.context()
    result.notes = lorebook_usage(card, str(path))
    return result
