"""Discord history -> chat messages: whom the persona is talking to, within a message and character budget."""
from __future__ import annotations

from collections.abc import Callable

import discord

CHAT_TYPES = (discord.MessageType.default, discord.MessageType.reply)


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
    try:
        return await message.channel.fetch_message(ref.message_id)
    except discord.HTTPException:
        return None


def to_messages(
    history: list[discord.Message], owns: Callable[[discord.Message], bool], *, max_messages: int, max_chars: int
) -> list[dict[str, str]]:
    """Chat turns for the engine: the persona's own messages are ``assistant``, everyone else speaks as
    ``user`` with their name in front ("Alice: hi"). The newest messages are kept and consecutive turns of
    the same role merged (several people may speak between two replies)."""
    turns: list[dict[str, str]] = []
    budget = max_chars
    for message in reversed(history):
        if len(turns) >= max_messages or budget <= 0:
            break
        turn = _turn(message, owns)
        if turn is None:
            continue
        turn["content"] = turn["content"][-budget:]
        budget -= len(turn["content"])
        turns.append(turn)
    return _merge(turns[::-1])


def window_start(
    history: list[discord.Message], owns: Callable[[discord.Message], bool], *, max_messages: int, max_chars: int
) -> int:
    """Where the context should start in ``history``: 0 while all of it fits the budget, else at the newest
    messages that fill half of it.

    Cutting in halves rather than sliding by one message keeps the start of the prompt the same for many
    turns, so the engine can reuse the previous turn's KV cache instead of reading the whole history again.
    """
    turns = [_turn(m, owns) for m in history]
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


def _turn(message: discord.Message, owns: Callable[[discord.Message], bool]) -> dict[str, str] | None:
    text = _text(message) if message.type in CHAT_TYPES else ""
    if not text:
        return None
    if owns(message):
        return {"role": "assistant", "content": text}
    return {"role": "user", "content": f"{message.author.display_name}: {text}"}


def _text(message: discord.Message) -> str:
    parts = [message.clean_content.strip()]
    parts += [f"[attachment: {a.filename}]" for a in message.attachments]
    return "\n".join(p for p in parts if p)


def _merge(turns: list[dict[str, str]]) -> list[dict[str, str]]:
    merged: list[dict[str, str]] = []
    for turn in turns:
        if merged and merged[-1]["role"] == turn["role"]:
            merged[-1]["content"] += "\n" + turn["content"]
        else:
            merged.append(dict(turn))
    return merged
