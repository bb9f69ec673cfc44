"""DiscordChatExporter JSON exports: one character's messages become the assistant's."""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from finetune.conversation import Conversation, DataError, ReadResult, load_json, tidy_messages

_CHAT_TYPES = {"Default", "Reply"}  # joins, pins, calls etc. are not dialogue
_MENTION = re.compile(r"<@!?(\d+)>")
_FRACTION = re.compile(r"\.(\d+)")


class DiscordOptions(BaseModel):
    """What a persona.toml source of this format may set."""

    model_config = ConfigDict(extra="forbid")

    gap_minutes: float = Field(30.0, gt=0, description="a silence this long (minutes) starts a new conversation")


@dataclass(frozen=True)
class _Post:
    index: int
    time: datetime
    author: str  # shown name: nickname, else name
    author_id: str
    is_character: bool
    text: str


def read_discord_export(path: str | Path, character: str, options: DiscordOptions = DiscordOptions()) -> ReadResult:
    """Split the channel into conversations at silences longer than ``options.gap_minutes``.

    ``character`` matches an author's id, name or nickname (case-insensitive). Conversations the
    character takes no part in are dropped: they are other people's chat, not bad data.
    """
    path = Path(path)
    export = load_json(path)
    if not isinstance(export, dict) or not isinstance(export.get("messages"), list):
        raise DataError(f"{path}: not a DiscordChatExporter JSON export (no 'messages' list)")
    result = ReadResult()
    posts: list[_Post] = []
    for i, message in enumerate(export["messages"]):
        try:
            post = _post(i, message, character.strip().casefold())
        except ValueError as e:
            result.problems.append(f"{path}: messages[{i}]: {e}")
            continue
        if post is not None:
            posts.append(post)
    if not any(p.is_character for p in posts):
        counts = Counter((p.author, p.author_id) for p in posts)
        top = ", ".join(f"{name} (id {id_}): {n}" for (name, id_), n in counts.most_common(10)) or "none"
        raise DataError(
            f"{path}: character {character!r} never speaks (matched on author id, name, nickname); "
            f"top authors: {top}"
        )
    for group in _split(posts, timedelta(minutes=options.gap_minutes)):
        if any(p.is_character for p in group):
            messages = [
                {"role": "assistant", "content": p.text}
                if p.is_character
                else {"role": "user", "content": f"{p.author}: {p.text}"}
                for p in group
            ]
            where = f"{path}: messages[{group[0].index}]"
            try:
                result.conversations.append(Conversation(tidy_messages(messages), where))
            except ValueError as e:
                result.problems.append(f"{where}: {e}")
    return result


def _post(index: int, message: Any, wanted: str) -> _Post | None:
    """The message as dialogue, None for what is not dialogue; ValueError when malformed."""
    if not isinstance(message, dict):
        raise ValueError("expected a JSON object")
    if message.get("type", "Default") not in _CHAT_TYPES:
        return None
    content = message.get("content") or ""
    if not isinstance(content, str):
        raise ValueError("'content' must be a string")
    author = message.get("author")
    if not isinstance(author, dict):
        raise ValueError("missing 'author'")
    text = _resolve_mentions(content, message.get("mentions")).strip()
    if not text:  # attachment- or embed-only
        return None
    keys = {str(author.get(k) or "").casefold() for k in ("id", "name", "nickname")} - {""}
    shown = str(author.get("nickname") or author.get("name") or author.get("id") or "unknown")
    time = _timestamp(message.get("timestamp"))
    return _Post(index, time, shown, str(author.get("id", "?")), wanted in keys, text)


def _resolve_mentions(content: str, mentions: Any) -> str:
    names = {
        str(m.get("id")): m.get("nickname") or m.get("name")
        for m in (mentions if isinstance(mentions, list) else [])
        if isinstance(m, dict)
    }
    return _MENTION.sub(lambda m: f"@{names[m[1]]}" if names.get(m[1]) else m[0], content)


def _timestamp(value: Any) -> datetime:
    """Parse ISO 8601 as exported (".NET" 7-digit fractions, "Z") on Python 3.10's strict fromisoformat."""
    if not isinstance(value, str):
        raise ValueError("missing 'timestamp'")
    text = _FRACTION.sub(lambda m: "." + (m[1] + "000000")[:6], value.replace("Z", "+00:00"))
    try:
        time = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"bad timestamp {value!r}") from None
    return time if time.tzinfo else time.replace(tzinfo=timezone.utc)


def _split(posts: list[_Post], gap: timedelta) -> list[list[_Post]]:
    groups: list[list[_Post]] = []
    for i, post in enumerate(posts):
        if i == 0 or post.time - posts[i - 1].time > gap:
            groups.append([])
        groups[-1].append(post)
    return groups
