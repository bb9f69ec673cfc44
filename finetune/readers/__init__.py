"""The registry of persona data formats, and one entry point for all of them: ``read_source``.

``READERS`` is the only place a format is named: persona.toml's ``format`` field, suffix inference, JSON
sniffing and dispatch all read it, so a new format is one row here.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from finetune.conversation import DataError, ReadResult, load_json
from finetune.readers.card import read_card_source
from finetune.readers.discord_export import DiscordOptions, read_discord_export
from finetune.readers.jsonl import read_jsonl
from finetune.readers.script import read_script
from finetune.readers.sharegpt import read_sharegpt


class NoOptions(BaseModel):
    """The options of a format that takes none: any key is an error."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Reader:
    """One format: how its files are recognised, what a source of it must or may set, and how it is read."""

    read: Callable[[Path, str, Any], ReadResult]
    """(path, character, options) -> result; ``character`` is "" for a format that does not need one."""
    suffixes: tuple[str, ...] = ()
    """extensions that mean this format; .json files are told apart by ``sniff`` instead"""
    needs_character: bool = False
    """the file holds many speakers and ``character`` names the one who is the character"""
    options: type[BaseModel] = NoOptions
    """the settings a persona.toml source of this format may add (e.g. Discord's gap_minutes)"""
    sniff: Callable[[Any], bool] | None = None
    """whether decoded .json content has this format's shape"""


def _first_record(data: Any) -> dict:
    return next((r for r in data if isinstance(r, dict)), {}) if isinstance(data, list) else {}


def _is_message_records(data: Any) -> bool:
    first = _first_record(data)
    return "messages" in first and "conversations" not in first  # a record with both is read as ShareGPT


def _is_sharegpt_records(data: Any) -> bool:
    return "conversations" in _first_record(data)


def _is_card(data: Any) -> bool:
    return isinstance(data, dict) and (
        "spec" in data or "first_mes" in data or isinstance(data.get("data"), dict)
    )


def _is_discord_export(data: Any) -> bool:
    messages = data.get("messages") if isinstance(data, dict) else None
    return isinstance(messages, list) and any(isinstance(m, dict) and "author" in m for m in messages)


READERS: dict[str, Reader] = {  # in this order formats are listed to the user and tried on .json content
    "jsonl": Reader(lambda path, _, __: read_jsonl(path), suffixes=(".jsonl",), sniff=_is_message_records),
    "sharegpt": Reader(lambda path, _, __: read_sharegpt(path), sniff=_is_sharegpt_records),
    "card": Reader(lambda path, _, __: read_card_source(path), suffixes=(".png", ".charx"), sniff=_is_card),
    "script": Reader(lambda path, who, _: read_script(path, who), suffixes=(".txt",), needs_character=True),
    "discord": Reader(read_discord_export, needs_character=True, options=DiscordOptions, sniff=_is_discord_export),
}
Format = Literal[tuple(READERS)]  # type: ignore[valid-type]  # persona.toml's `format`, spelled by the table
_SET_FORMAT = f"set format to one of: {', '.join(READERS)}"


def read_source(
    path: str | Path, format: str | None = None, character: str | None = None, options: BaseModel | None = None
) -> ReadResult:
    """Read one data file; ``character`` names the character's speaker where the format needs it, ``options``
    are the format's own (``READERS[format].options``; default: its defaults)."""
    path = Path(path)
    if format is not None and format not in READERS:
        raise DataError(f"{path}: unknown format {format!r}; valid formats: {', '.join(READERS)}")
    kind = format or infer_format(path)
    reader = READERS[kind]
    if reader.needs_character and not (character and character.strip()):
        raise DataError(f"{path}: {kind} files hold many speakers; set 'character' to the one who is the character")
    return reader.read(path, character or "", reader.options() if options is None else options)


def infer_format(path: str | Path) -> str:
    """The format from the extension, or for .json from the shape of the content."""
    path = Path(path)
    suffix = path.suffix.lower()
    claimed = next((name for name, reader in READERS.items() if suffix in reader.suffixes), None)
    if claimed is not None:
        return claimed
    if suffix != ".json":
        shown = suffix or "(none)"
        raise DataError(f"{path}: cannot tell the format from the extension {shown!r}; {_SET_FORMAT}")
    kind = sniff_json(load_json(path))
    if kind is None:
        raise DataError(f"{path}: cannot tell what kind of JSON this is; {_SET_FORMAT}")
    return kind


def sniff_json(data: Any) -> str | None:
    """Which format a decoded JSON document looks like, None when it matches none."""
    return next((name for name, reader in READERS.items() if reader.sniff and reader.sniff(data)), None)
