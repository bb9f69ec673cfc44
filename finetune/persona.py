"""Load a persona (a folder with persona.toml, or a lone character card) into training-ready data."""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from finetune.bundle import Sampling
from finetune.cards.context import CardContext
from finetune.cards.files import CARD_SUFFIXES
from finetune.conversation import Conversation, DataError, ReadResult, read_text
from finetune.readers import READERS, Format, infer_format, read_source
from finetune.readers.card import card_source, read_card
from finetune.validation import describe

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

PERSONA_FILE = "persona.toml"


class _Source(BaseModel):
    """One data file; keys beyond these are the format's own options, checked by its reader's model."""

    model_config = ConfigDict(extra="allow", str_strip_whitespace=True)

    path: str = Field(min_length=1)
    format: Format | None = None
    character: str | None = None  # script/discord speaker; defaults to the persona's name


class _PersonaFile(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    name: str = Field(min_length=1)
    system_prompt: str | None = None
    description: str = ""
    sampling: Sampling = Field(default_factory=Sampling)
    sources: list[_Source] = Field(min_length=1)
    style_checks: list[str] = Field(
        default_factory=list, description="regexes every in-character reply matches; `finetune eval` scores them"
    )

    @field_validator("style_checks")
    @classmethod
    def _compiles(cls, checks: list[str]) -> list[str]:
        for check in checks:
            try:
                re.compile(check)
            except re.error as exc:
                raise ValueError(f"{check!r} is not a valid regex: {exc}") from exc
        return checks


@dataclass
class PersonaData:
    """Everything later stages need; ``data_hash`` changes whenever any input file does."""

    name: str
    system_prompt: str
    description: str
    sampling: Sampling
    conversations: list[Conversation]
    problems: list[str]
    files: list[Path]
    data_hash: str
    style_checks: list[str] = field(default_factory=list)
    card: CardContext | None = None  # a card source's lorebook, depth prompt, ...: served with the adapter
    notes: list[str] = field(default_factory=list)  # how the sources' parts are used, for `finetune data check`


def load_persona(path: str | Path) -> PersonaData:
    """Load a persona folder, its persona.toml, or a single character card (.json/.png/.charx)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such persona folder or file")
    if path.is_dir():
        path = path / PERSONA_FILE
        if not path.is_file():
            raise DataError(f"{path.parent}: no {PERSONA_FILE} in this folder")
    elif path.suffix.lower() in CARD_SUFFIXES:
        return _load_card_persona(path)
    elif path.name != PERSONA_FILE:
        raise DataError(f"{path}: not a persona folder, {PERSONA_FILE} or character card (.json/.png/.charx)")
    return _load_toml_persona(path)


def _load_toml_persona(toml_path: Path) -> PersonaData:
    spec = _parse_persona_file(toml_path)
    folder = toml_path.parent
    data = ReadResult()
    files = [toml_path]
    for i, source in enumerate(spec.sources):
        source_path = folder / source.path
        if not source_path.is_file():
            raise DataError(f"{toml_path}: sources[{i}]: file not found: {source_path}")
        kind = source.format or infer_format(source_path)
        options = _source_options(toml_path, i, kind, source)
        data.extend(read_source(source_path, kind, source.character or spec.name, options))
        if source_path not in files:
            files.append(source_path)
    system_prompt = _system_prompt(toml_path, spec.system_prompt or "", data)
    if not system_prompt:
        raise DataError(
            f"{toml_path}: field 'system_prompt': required when no character card source provides one"
        )
    _require_conversations(toml_path, data.conversations, data.problems)
    return PersonaData(
        name=spec.name,
        system_prompt=system_prompt,
        description=spec.description,
        sampling=spec.sampling,
        conversations=data.conversations,
        problems=data.problems,
        files=files,
        data_hash=_data_hash(folder, files),
        style_checks=spec.style_checks,
        card=data.card,
        notes=data.notes,
    )


def _system_prompt(toml_path: Path, own: str, data: ReadResult) -> str:
    """persona.toml's prompt, or a source's; with a card source, persona.toml's is the global prompt of the
    V2 spec, which the card's own system_prompt replaces (inserting it at ``{{original}}``)."""
    if data.prompt_with is None:
        return own or data.system_prompt
    prompt = data.prompt_with(own)
    if own and prompt == data.prompt_with(""):
        data.problems.append(
            f"{toml_path}: field 'system_prompt' not used: the card's own system_prompt replaces it "
            "(write {{original}} in the card's system_prompt to insert it there)"
        )
    return prompt


def _source_options(toml_path: Path, index: int, kind: str, source: _Source) -> BaseModel:
    """The source's extra keys, validated by its format's options model once the format is known."""
    model = READERS[kind].options
    try:
        return model.model_validate(source.model_extra or {})
    except ValidationError as e:
        known = ", ".join(model.model_fields) or "none"
        raise DataError(
            f"{toml_path}: {describe(e, within=('sources', index))} (options of {kind} sources: {known})"
        ) from e


def _load_card_persona(card_path: Path) -> PersonaData:
    card = read_card(card_path)
    result = card_source(card, card_path)
    if not result.system_prompt:
        raise DataError(
            f"{card_path}: card has no description, personality, scenario or system_prompt to prompt with"
        )
    _require_conversations(card_path, result.conversations, result.problems)
    return PersonaData(
        name=card.name,
        system_prompt=result.system_prompt,
        description="",
        sampling=Sampling(),
        conversations=result.conversations,
        problems=result.problems,
        files=[card_path],
        data_hash=_data_hash(card_path.parent, [card_path]),
        card=result.card,
        notes=result.notes,
    )


def _parse_persona_file(toml_path: Path) -> _PersonaFile:
    try:
        raw = tomllib.loads(read_text(toml_path))
    except tomllib.TOMLDecodeError as e:
        raise DataError(f"{toml_path}: invalid TOML: {e}") from e
    try:
        return _PersonaFile.model_validate(raw)
    except ValidationError as e:
        raise DataError(f"{toml_path}: {describe(e)}") from e


def _require_conversations(where: Path, conversations: list[Conversation], problems: list[str]) -> None:
    if not conversations:
        listed = "".join(f"\n  {p}" for p in problems[:10]) or " none (the sources are empty)"
        raise DataError(f"{where}: no usable conversations in any source; first problems:{listed}")


def _data_hash(root: Path, files: list[Path]) -> str:
    """sha256 over (relative path, bytes) of every input, sorted, so a rename or edit retrains."""
    digest = hashlib.sha256()
    for name, file in sorted((Path(os.path.relpath(f, root)).as_posix(), f) for f in files):
        data = file.read_bytes()
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()
