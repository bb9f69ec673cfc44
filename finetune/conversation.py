"""The one in-memory shape every reader produces and every later stage consumes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")


class DataError(ValueError):
    """Bad persona data. The message always starts with where: ``file:line: what is wrong``."""


@dataclass(frozen=True)
class Conversation:
    """One training dialogue in chat-message form; ``origin`` is ``file:line`` for error messages."""

    messages: list[dict[str, str]]
    origin: str


@dataclass
class ReadResult:
    """What a reader got out of one file: the good conversations and every problem it skipped."""

    conversations: list[Conversation] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def extend(self, other: ReadResult) -> None:
        self.conversations.extend(other.conversations)
        self.problems.extend(other.problems)
