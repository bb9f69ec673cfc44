"""Add a source to persona.toml as text, so the owner's comments and layout survive."""
from __future__ import annotations

import json
import shutil
from pathlib import Path, PurePosixPath

from finetune.conversation import DataError, read_text
from finetune.persona import CARD_SUFFIXES, PERSONA_FILE

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def add_source(toml_path: Path, path: str, format: str = "jsonl") -> bool:
    """Append a ``[[sources]]`` entry for ``path`` unless one lists it already; True if it was added."""
    text = read_text(toml_path)
    listed = {PurePosixPath(s.get("path", "")) for s in tomllib.loads(text).get("sources", [])}
    if PurePosixPath(path) in listed:
        return False
    entry = f"[[sources]]\npath = {json.dumps(path)}\nformat = {json.dumps(format)}\n"  # JSON strings are TOML
    separator = "" if not text or text.endswith("\n\n") else "\n" if text.endswith("\n") else "\n\n"
    toml_path.write_text(text + separator + entry, encoding="utf-8")
    return True


def persona_folder_for(card: Path, work: Path) -> Path:
    """A persona folder synth may write into: a copy of the card-only persona folder ``card`` (or a new one
    listing the lone card ``card``) at ``work``. What an earlier run synthesized there stays, to resume."""
    work.mkdir(parents=True, exist_ok=True)
    if card.is_dir():
        if not (card / PERSONA_FILE).is_file():
            raise DataError(f"{card}: no {PERSONA_FILE} in this folder")
        listed = (work / PERSONA_FILE).read_text(encoding="utf-8") if (work / PERSONA_FILE).is_file() else ""
        shutil.copytree(card, work, dirs_exist_ok=True)
        if listed:  # keep the sources synth added to the copy
            (work / PERSONA_FILE).write_text(listed, encoding="utf-8")
        return work
    if card.suffix.lower() not in CARD_SUFFIXES:
        raise DataError(f"{card}: not a persona folder or a character card (.json/.png)")
    from finetune.readers.card import read_card

    shutil.copy2(card, work / card.name)
    if not (work / PERSONA_FILE).is_file():
        name = read_card(card).name
        (work / PERSONA_FILE).write_text(
            f"name = {json.dumps(name)}\n\n[[sources]]\npath = {json.dumps(card.name)}\nformat = \"card\"\n",
            encoding="utf-8")
    return work
