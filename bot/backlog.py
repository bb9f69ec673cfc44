"""Recent channel history without a request per reply: one REST read per channel, then the gateway's cache.

Under load a history GET per message is a third of the bot's requests, and Discord allows 50 per second per
bot. After the first read of a channel, every newer message reaches discord.py's message cache through the
gateway (edits and deletions included) for as long as the gateway session lasts: a RESUME replays what was
missed, a new IDENTIFY may not have, and the cache drops its oldest messages when full. While neither has
happened, that read plus the cache is the channel's whole recent history. Each client (an own-account
persona's, or the webhook host's) has its own session and cache, so each keeps its own reads.
"""
from __future__ import annotations

from collections import OrderedDict

import discord

from .history import gather


class Backlog:
    """The history ``history.gather`` would read, from the cache where it is known complete."""

    def __init__(self, channels: int = 1024) -> None:  # reads kept: one per client and channel
        self.channels = channels
        self.reads = 0  # REST reads of channel history: how often the cache did not suffice
        self._read: OrderedDict[tuple[int, int], tuple[str | None, list[discord.Message]]] = OrderedDict()
        """(client, channel) -> the client's session then, and what it read"""

    async def history(self, client: discord.Client, message: discord.Message, limit: int,
                      after: int | None = None) -> list[discord.Message]:
        """Up to ``limit`` messages ending with ``message``, oldest first, newer than ``after``."""
        if message.reference is not None:  # a reply chain: gather follows it (through the cache first)
            return await gather(message, limit, after)
        channel_id, floor = message.channel.id, after or 0
        session = getattr(client.ws, "session_id", None)
        key = (id(client), channel_id)
        read = self._read.get(key)
        cache = client.cached_messages
        if read is not None and read[0] == session and cache and cache[0].id <= read[1][-1].id:
            known = {m.id: m for m in read[1]}
            known.update((m.id, m) for m in cache if m.channel.id == channel_id)  # fresher, and all since
            older = sorted((m for i, m in known.items() if floor < i < message.id), key=lambda m: m.id)
            return [*(older[-(limit - 1):] if limit > 1 else []), message]
        history = await gather(message, limit, after)
        self.reads += 1
        self._read[key] = (session, history)
        self._read.move_to_end(key)
        while len(self._read) > self.channels:
            self._read.popitem(last=False)
        return history
