"""Character cards (V1 flat, V2 "chara_card_v2", V3 "chara_card_v3") from .json or a PNG's text chunk."""
from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from finetune.conversation import Conversation, DataError, ReadResult, load_json, tidy_messages

USER_NAME = "User"  # what {{user}} becomes: the bot talks to many people, none of them known here
_CHAR_MACRO = re.compile(r"\{\{\s*char\s*\}\}|<bot>", re.IGNORECASE)
_USER_MACRO = re.compile(r"\{\{\s*user\s*\}\}|<user>", re.IGNORECASE)
_ORIGINAL_MACRO = re.compile(r"\{\{\s*original\s*\}\}", re.IGNORECASE)
_START = re.compile(r"<start>", re.IGNORECASE)
_PNG_KEYWORDS = ("ccv3", "chara")  # V3 first: a card carrying both is a V3 card with a V2 fallback


@dataclass(frozen=True)
class Card:
    """What training needs from a card, with {{char}}/{{user}} macros already expanded."""

    name: str
    system_prompt: str
    greetings: list[str]
    examples: list[str]  # mes_example blocks, one example dialogue each


def read_card(path: str | Path) -> Card:
    """Read a card from .json or from the "ccv3"/"chara" text chunk of a .png."""
    path = Path(path)
    raw = _png_card_json(path) if path.suffix.lower() == ".png" else load_json(path)
    return parse_card(raw, path)


def parse_card(raw: Any, path: Path) -> Card:
    """Build a Card from decoded card JSON; ``path`` is only for error messages."""
    if not isinstance(raw, dict):
        raise DataError(f"{path}: a character card must be a JSON object")
    nested = isinstance(raw.get("data"), dict)  # V2/V3 keep fields under "data"; V1 is flat
    fields = raw["data"] if nested else raw
    prefix = "data." if nested else ""

    def text(key: str) -> str:
        value = fields.get(key)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise DataError(f"{path}: field '{prefix}{key}' must be a string")
        return value.strip()

    name = text("name")
    if not name:
        raise DataError(f"{path}: card has no '{prefix}name'")
    alternates = fields.get("alternate_greetings") or []
    if not isinstance(alternates, list) or not all(isinstance(g, str) for g in alternates):
        raise DataError(f"{path}: field '{prefix}alternate_greetings' must be a list of strings")

    def expand(value: str) -> str:
        value = value.replace("\r\n", "\n")
        return _USER_MACRO.sub(USER_NAME, _CHAR_MACRO.sub(lambda _: name, value)).strip()

    personality, scenario = expand(text("personality")), expand(text("scenario"))
    default_prompt = "\n\n".join(
        part
        for part in (
            expand(text("description")),
            f"{name}'s personality: {personality}" if personality else "",
            f"Scenario: {scenario}" if scenario else "",
        )
        if part
    )
    custom_prompt = expand(text("system_prompt"))
    system_prompt = default_prompt
    if custom_prompt:
        system_prompt = _ORIGINAL_MACRO.sub(lambda _: default_prompt, custom_prompt)
    greetings = [expand(g) for g in [text("first_mes"), *alternates] if g.strip()]
    examples = [block.strip() for block in _START.split(expand(text("mes_example"))) if block.strip()]
    return Card(name, system_prompt.strip(), greetings, examples)


def card_conversations(card: Card, path: str | Path) -> ReadResult:
    """Each example block and each greeting (the character speaking first) as a conversation, and the card's
    system prompt."""
    result = ReadResult(system_prompt=card.system_prompt)
    speaker = re.compile(rf"^\s*({re.escape(USER_NAME)}|{re.escape(card.name)})\s*:\s?(.*)$", re.IGNORECASE)
    for i, block in enumerate(card.examples):
        where = f"{path}: mes_example[{i}]"
        messages: list[dict[str, str]] = []
        for line in block.split("\n"):
            match = speaker.match(line)
            if match:
                role = "user" if match[1].casefold() == USER_NAME.casefold() else "assistant"
                messages.append({"role": role, "content": match[2]})
            elif messages:
                messages[-1]["content"] += "\n" + line
            elif line.strip():
                stray = line.strip()[:60]
                result.problems.append(f"{where}: text before the first speaker tag skipped: {stray!r}")
        try:
            result.conversations.append(Conversation(tidy_messages(messages), where))
        except ValueError as e:
            result.problems.append(f"{where}: {e}")
    for i, greeting in enumerate(card.greetings):
        greeting_messages = [{"role": "assistant", "content": greeting}]
        result.conversations.append(Conversation(greeting_messages, f"{path}: greetings[{i}]"))
    return result


def _png_card_json(path: Path) -> Any:
    try:
        with Image.open(path) as image:
            kind = image.format
            chunks = {key.lower(): value for key, value in image.text.items()} if kind == "PNG" else {}
    except (OSError, ValueError) as e:  # ValueError: Pillow's text-chunk size limits
        raise DataError(f"{path}: cannot read PNG: {e}") from e
    if kind != "PNG":
        raise DataError(f"{path}: not a PNG image (Pillow reads it as {kind})")
    keyword = next((k for k in _PNG_KEYWORDS if k in chunks), None)
    if keyword is None:
        raise DataError(f"{path}: PNG holds no character card (no 'ccv3' or 'chara' text chunk)")
    encoded = chunks[keyword].strip()
    try:
        return json.loads(base64.b64decode(encoded + "=" * (-len(encoded) % 4)).decode("utf-8"))
    except (binascii.Error, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: '{keyword}' text chunk is not base64-encoded JSON: {e}") from e
