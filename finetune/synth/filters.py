"""Which teacher replies become training data: each check names the reason a reply was rejected."""
from __future__ import annotations

import re
from difflib import SequenceMatcher

STYLE, SHORT, LONG, DUPLICATE, OUT_OF_CHARACTER, OTHER_TURNS = (
    "fails a style check", "too short", "too long", "near-duplicate", "out of character",
    "writes other speakers' lines",
)
OUT_OF_CHARACTER_TEXT = re.compile(
    r"as an ai\b|\bi(?:'m| am) (?:just |only )?an? (?:ai|bot|chat ?bot|assistant|language model|computer program)\b"
    r"|\bai (?:language )?model|language model|artificial intelligence|as an? (?:helpful )?assistant|openai"
    r"|chatgpt|\bi(?:'m| am) (?:sorry|unable),? but|\bi can(?:no|')t (?:help|assist) with",
    re.IGNORECASE,
)
"""Assistant talk: admitting to be an AI, refusing, naming model makers. "I'm not a bot" passes."""


def clean_reply(text: str, name: str) -> str:
    """The reply without surrounding space or a leading "Name:" tag (teachers often label their own line)."""
    text = text.strip()
    return re.sub(rf"\A{re.escape(name)}\s*:\s*", "", text, flags=re.IGNORECASE).strip()


class ReplyFilter:
    """Rejection reasons for a character's reply, remembering kept replies to catch near-duplicates.

    ``similarity``: difflib ratio above which a reply counts as a copy of a kept one (or of an example
    reply: a small teacher likes to repeat the examples it was shown)."""

    def __init__(self, name: str, style_checks: list[str], min_words: int = 4, max_chars: int = 600,
                 similarity: float = 0.8, seen: list[str] = ()) -> None:
        self.checks = [re.compile(c) for c in style_checks]
        self.min_words = min_words
        self.max_chars = max_chars
        self.similarity = similarity
        speakers = ["user", "you", "human", "anon", "assistant", r"\{\{\s*(user|char)\s*\}\}", "<user>", "<bot>",
                    re.escape(name)]
        self._other_turns = re.compile(rf"^\s*({'|'.join(speakers)})\s*:", re.IGNORECASE | re.MULTILINE)
        self._kept = [r.casefold() for r in seen]

    def reason(self, reply: str) -> str | None:
        """Why ``reply`` (already ``clean_reply``'d) is rejected, or None to keep it."""
        if len(reply.split()) < self.min_words:
            return SHORT
        if len(reply) > self.max_chars:
            return LONG
        if self._other_turns.search(reply):
            return OTHER_TURNS
        if OUT_OF_CHARACTER_TEXT.search(reply):
            return OUT_OF_CHARACTER
        if not all(c.search(reply) for c in self.checks):
            return STYLE
        if self._duplicate(reply.casefold()):
            return DUPLICATE
        return None

    def keep(self, reply: str) -> None:
        self._kept.append(reply.casefold())

    def _duplicate(self, text: str) -> bool:
        matcher = SequenceMatcher(None, autojunk=False)
        matcher.set_seq2(text)
        for kept in self._kept:
            matcher.set_seq1(kept)
            if (matcher.real_quick_ratio() > self.similarity and matcher.quick_ratio() > self.similarity
                    and matcher.ratio() > self.similarity):
                return True
        return False


def clean_user_line(text: str, name: str) -> str | None:
    """A generated user message made usable (first line, no "User:" tag), or None when it cannot be: empty,
    long, out of character, or the character's own line."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return None
    line = re.sub(r"\A(user|you|me)\s*:\s*", "", lines[0], flags=re.IGNORECASE).strip()
    if not line or len(line) > 200 or re.match(rf"{re.escape(name)}\s*:", line, re.IGNORECASE):
        return None
    if OUT_OF_CHARACTER_TEXT.search(line):
        return None
    return line
