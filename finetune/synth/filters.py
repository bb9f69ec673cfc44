"""Which synthetic replies are kept: rejection sampling against the persona's own checks and the usual
ways a teacher falls out of character. Each filter names its reason, for the report."""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

_OUT_OF_CHARACTER = re.compile(
    r"\bas an ai\b|\bi am an ai\b|\bi'm an ai\b|\blanguage model\b|\bi cannot (?:role-?play|pretend)\b|"
    r"\bi can(?:no|')t (?:help|assist) with (?:that|this)\b|\bopenai\b|\bassistant:|\(ooc\b|\bout of character\b",
    re.IGNORECASE,
)
_WORD = re.compile(r"\w+")


@dataclass
class ReplyFilter:
    """The checks one persona's synthetic replies must pass; ``kept`` remembers replies for near-duplicates."""

    style_checks: list[str]
    user_names: list[str]  # lines starting "Name:" mean the teacher wrote the user's turn too
    min_chars: int = 2
    max_chars: int = 1200
    duplicate_overlap: float = 0.8  # word-set Jaccard above this against a kept reply: a near-duplicate
    kept: list[frozenset[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._checks = [re.compile(c) for c in self.style_checks]
        names = "|".join(re.escape(n) for n in self.user_names if n)
        self._user_line = re.compile(rf"^\s*(?:{names})\s*:", re.IGNORECASE | re.MULTILINE) if names else None

    def reject(self, reply: str) -> str | None:
        """None to keep ``reply``, else why it is rejected (one of a few fixed reasons)."""
        if not (self.min_chars <= len(reply.strip()) <= self.max_chars):
            return "length"
        if _OUT_OF_CHARACTER.search(reply):
            return "out of character"
        if self._user_line is not None and self._user_line.search(reply):
            return "wrote the user's lines"
        if not all(check.search(reply) for check in self._checks):
            return "style checks"
        words = frozenset(_WORD.findall(reply.casefold()))
        if any(_jaccard(words, other) > self.duplicate_overlap for other in self.kept):
            return "near-duplicate"
        return None

    def keep(self, reply: str) -> None:
        self.kept.append(frozenset(_WORD.findall(reply.casefold())))

    def remember(self, replies: Iterable[str]) -> None:
        for reply in replies:
            self.keep(reply)


def _jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0
