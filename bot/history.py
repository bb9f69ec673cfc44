"""Discord history -> chat messages: whom the persona is talking to, within a message and character budget."""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import discord

CHAT_TYPES = (discord.MessageType.default, discord.MessageType.reply)
NAME_CHARS = 40
_NAME_JUNK = re.compile(r"[\x00-\x1f\x7f\u2028\u2029:]+")
_SPEAKER_LINE = re.compile(r"^[^\s:][^:\n]{0,40}:\s+\S")
"""A line that reads as another speaker's turn: ``Owner: do it``."""


async def gather(message: discord.Message, limit: int, after: int | None = None) -> list[discord.Message]:
    """The context a reply to ``message`` sees, oldest first, ending with ``message``.

    A reply follows its reply chain; anything else sees the recent channel history. Messages at or before
    the channel's reset marker (``after``) are left out.
    """
    floor = after or 0
    if message.reference is not None:
        chain = [message]
        while len(chain) < limit and (parent := await _parent(chain[-1])) is not None and parent.id > floor:
            chain.append(parent)
        return chain[::-1]
    older = [m async for m in message.channel.history(limit=limit - 1, before=message) if m.id > floor]
    return [*older[::-1], message]


async def _parent(message: discord.Message) -> discord.Message | None:
    ref = message.reference
    if ref is None or ref.message_id is None:
        return None
    if isinstance(ref.resolved, discord.Message):
        return ref.resolved
    if (cached := ref.cached_message) is not None:  # Discord left it out; the gateway's cache has it
        return cached
    try:
        return await message.channel.fetch_message(ref.message_id)
    except discord.HTTPException:
        return None


@dataclass
class Speakers:
    """Whose each message is and how the prompt names them, so nobody can pass for someone else.

    ``owns`` picks the replying persona's own messages (its ``assistant`` turns); ``persona_of`` names
    another persona of this bot that wrote a message. Anyone else is named by display name, cleaned of
    newlines and colons, and marked ``(not the persona)`` when that name is a persona's. Discord sends the
    member (with its nickname) only on gateway messages, so a nickname seen once names that person in
    messages fetched over REST too (``learn``).
    """

    owns: Callable[[discord.Message], bool]
    persona_of: Callable[[discord.Message], str | None] = lambda message: None
    personas: frozenset[str] = frozenset()  # casefolded
    nicknames: dict[int, str] = field(default_factory=dict)

    def learn(self, history: list[discord.Message]) -> Speakers:
        for message in history:
            if isinstance(message.author, discord.Member):
                self.nicknames[message.author.id] = message.author.display_name
        return self

    def name(self, message: discord.Message) -> str:
        persona = self.persona_of(message)
        if persona:
            return persona
        author = message.author
        return self.human(self.nicknames.get(getattr(author, "id", 0)) or author.display_name,
                          getattr(author, "name", ""))

    def human(self, display_name: str, username: str = "") -> str:
        """A person's name as the prompt shows it: one clean line, never a persona's."""
        name = clean_name(display_name) or clean_name(username) or "someone"
        return f"{name} (not the persona)" if name.casefold() in self.personas else name


def clean_name(name: str) -> str:
    """``name`` on one line, without the colons that would make it look like a speaker label."""
    return " ".join(_NAME_JUNK.sub(" ", name).split())[:NAME_CHARS]


def said(name: str, text: str) -> str:
    """``Name: text``; a later line of ``text`` that looks like another speaker's line (``Owner: obey``)
    is labelled as ``name``'s too, so one message can never fake a turn by someone else."""
    first, *rest = text.split("\n")
    lines = [f"{name}: {first}", *(f"{name}: {line}" if _SPEAKER_LINE.match(line) else line for line in rest)]
    return "\n".join(lines)


def to_messages(
    history: list[discord.Message], speakers: Speakers, *, max_messages: int, max_chars: int
) -> list[dict[str, str]]:
    """Chat turns for the engine: the persona's own messages are ``assistant``, everyone else speaks as
    ``user`` with their name in front ("Alice: hi"). The newest messages are kept and consecutive turns of
    the same role merged (several people may speak between two replies); a turn cut to fit the budget keeps
    its name and loses the start of its text."""
    turns: list[dict[str, str]] = []
    budget = max_chars
    for message in reversed(history):
        if len(turns) >= max_messages or budget <= 0:
            break
        turn = _turn(message, speakers, budget)
        if turn is None:
            continue
        budget -= len(turn["content"])
        turns.append(turn)
    return _merge(turns[::-1])


def window_start(
    history: list[discord.Message], speakers: Speakers, *, max_messages: int, max_chars: int
) -> int:
    """Where the context should start in ``history``: 0 while all of it fits the budget, else at the newest
    messages that fill half of it.

    Cutting in halves rather than sliding by one message keeps the start of the prompt the same for many
    turns, so the engine can reuse the previous turn's KV cache instead of reading the whole history again.
    """
    turns = [_turn(m, speakers) for m in history]
    sizes = [len(t["content"]) for t in turns if t is not None]
    if len(sizes) <= max_messages and sum(sizes) <= max_chars:
        return 0
    start, count, chars = len(history) - 1, 0, 0  # the newest message always stays
    while start >= 0:
        turn = turns[start]
        if turn is not None:
            count, chars = count + 1, chars + len(turn["content"])
            if count > max(max_messages // 2, 1) or chars > max_chars // 2:
                break
        start -= 1
    return min(start + 1, len(history) - 1)


def _turn(message: discord.Message, speakers: Speakers, budget: int | None = None) -> dict[str, str] | None:
    text = _text(message) if message.type in CHAT_TYPES else ""
    if not text:
        return None
    if speakers.owns(message):
        return {"role": "assistant", "content": text if budget is None else text[-budget:]}
    name = speakers.name(message)
    room = None if budget is None else budget - len(name) - 3  # "Name: …"
    if room is not None and len(text) > room:
        text = "…" + text[-room:] if room > 0 else "…"
    return {"role": "user", "content": said(name, text)}


def _text(message: discord.Message) -> str:
    parts = [message.clean_content.strip()]
    parts += [f"[attachment: {a.filename}]" for a in message.attachments]
    parts += [f"[sticker: {s.name}]" for s in getattr(message, "stickers", ())]
    return "\n".join(p for p in parts if p)


def _merge(turns: list[dict[str, str]]) -> list[dict[str, str]]:
    merged: list[dict[str, str]] = []
    for turn in turns:
        if merged and merged[-1]["role"] == turn["role"]:
            merged[-1]["content"] += "\n" + turn["content"]
        else:
            merged.append(dict(turn))
    return merged
