"""One entry point for every persona data format: ``read_source(path, format, character)``."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.conversation import DataError, ReadResult, load_json
from finetune.readers.card import card_conversations, read_card
from finetune.readers.discord_export import read_discord_export
from finetune.readers.jsonl import read_jsonl
from finetune.readers.script import read_script
from finetune.readers.sharegpt import read_sharegpt

FORMATS = ("jsonl", "sharegpt", "card", "script", "discord")
_BY_SUFFIX = {".jsonl": "jsonl", ".png": "card", ".txt": "script"}
_SET_FORMAT = f"set format to one of: {', '.join(FORMATS)}"


def read_source(path: str | Path, format: str | None = None, character: str | None = None) -> ReadResult:
    """Read one data file; ``character`` names the character's speaker in script and discord files."""
    path = Path(path)
    if format is not None and format not in FORMATS:
        raise DataError(f"{path}: unknown format {format!r}; valid formats: {', '.join(FORMATS)}")
    kind = format or infer_format(path)
    if kind in ("script", "discord"):
        if not character or not character.strip():
            raise DataError(
                f"{path}: {kind} files hold many speakers; set 'character' to the one who is the character"
            )
        if kind == "script":
            return read_script(path, character)
        return read_discord_export(path, character)
    if kind == "card":
        return card_conversations(read_card(path), path)
    if kind == "sharegpt":
        return read_sharegpt(path)
    return read_jsonl(path)


def infer_format(path: str | Path) -> str:
    """The format from the extension, or for .json from the shape of the content."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in _BY_SUFFIX:
        return _BY_SUFFIX[suffix]
    if suffix != ".json":
        shown = suffix or "(none)"
        raise DataError(f"{path}: cannot tell the format from the extension {shown!r}; {_SET_FORMAT}")
    kind = sniff_json(load_json(path))
    if kind is None:
        raise DataError(f"{path}: cannot tell what kind of JSON this is; {_SET_FORMAT}")
    return kind


def sniff_json(data: Any) -> str | None:
    """Which format a decoded JSON document looks like, None when it matches none."""
    if isinstance(data, dict):
        if "spec" in data or "first_mes" in data or isinstance(data.get("data"), dict):
            return "card"
        messages = data.get("messages")
        if isinstance(messages, list) and any(isinstance(m, dict) and "author" in m for m in messages):
            return "discord"
        return None
    if isinstance(data, list):
        first = next((r for r in data if isinstance(r, dict)), {})
        if "conversations" in first:
            return "sharegpt"
        if "messages" in first:
            return "jsonl"
    return None
