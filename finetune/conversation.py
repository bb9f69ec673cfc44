"""The one in-memory shape every reader produces and every later stage consumes."""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.cards.context import CardContext

ROLES: tuple[str, ...] = ("system", "user", "assistant")


class DataError(ValueError):
    """Bad persona data. The message always starts with where: ``file:line: what is wrong``."""


@dataclass(frozen=True)
class Conversation:
    """One training dialogue in chat-message form; ``origin`` is ``file:line`` for error messages.

    ``context_turns``: indices of assistant messages that are context only, not trained (OpenAI's
    ``weight: 0``); they render exactly like the others."""

    messages: list[dict[str, str]]
    origin: str
    context_turns: frozenset[int] = frozenset()

    @classmethod
    def weighted(cls, messages: list[dict[str, Any]], origin: str) -> Conversation:
        """From tidy messages that may carry ``"weight": 0`` (context only); the key does not stay."""
        context = frozenset(i for i, m in enumerate(messages) if m.get("weight", 1) == 0)
        plain = [{"role": m["role"], "content": m["content"]} for m in messages]
        return cls(plain, origin, context)


@dataclass
class ReadResult:
    """What a reader got out of one file: the good conversations, every problem it skipped, and what the
    file carries beyond dialogue if its format has it (a character card does): the system prompt (and for a
    card, ``prompt_with``: its prompt around a persona's global one), the serve-time card context, and
    ``notes`` on how its parts are used (not problems)."""

    conversations: list[Conversation] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    system_prompt: str = ""
    prompt_with: Callable[[str], str] | None = None
    card: CardContext | None = None
    notes: list[str] = field(default_factory=list)

    def extend(self, other: ReadResult) -> None:
        """Add another file's result; the first system prompt and card found are kept."""
        self.conversations.extend(other.conversations)
        self.problems.extend(other.problems)
        self.notes.extend(other.notes)
        if not self.system_prompt:
            self.system_prompt, self.prompt_with = other.system_prompt, other.prompt_with
        self.card = self.card or other.card


def tidy_messages(messages: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Strip, drop empty and merge same-role neighbours, so training sees clean alternating turns.

    A ``"weight"`` key (0: context only) stays, and only messages of equal weight merge.
    Raises ValueError when nothing the character says is left to train: such a dialogue teaches nothing.
    """
    tidy: list[dict[str, Any]] = []
    for message in messages:
        content = message["content"].strip()
        if not content:
            continue
        weight = {"weight": message["weight"]} if "weight" in message else {}
        if tidy and tidy[-1]["role"] == message["role"] and tidy[-1].get("weight", 1) == message.get("weight", 1):
            tidy[-1]["content"] += "\n" + content
        else:
            tidy.append({"role": message["role"], "content": content, **weight})
    if not any(m["role"] == "assistant" for m in tidy):
        raise ValueError("no turns by the character")
    if not any(m["role"] == "assistant" and m.get("weight", 1) != 0 for m in tidy):
        raise ValueError("no trained turns by the character (every assistant message has weight 0)")
    return tidy


def read_text(path: Path) -> str:
    """A whole data file as text; a DataError says which line is not UTF-8 rather than a byte offset."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x})") from e


def load_json(path: Path) -> Any:
    """A whole JSON file; a parse error becomes a DataError with json's line and column."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from e
