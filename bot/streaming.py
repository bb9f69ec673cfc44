"""One streamed reply: a message that appears fast, is edited at a safe cadence and splits at 2000 chars."""
from __future__ import annotations

import asyncio
import logging
import re
import time
import unicodedata
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Protocol

import discord

from .delivery import DeliveryError, persist
from .redact import redact

log = logging.getLogger(__name__)

DISCORD_LIMIT = 2000
PLACEHOLDER = "…"
FAILED = "⚠️ Sorry, I could not finish this reply (the bot's log says why)."
TIMED_OUT = "⚠️ Sorry, the model took too long; this reply ends here."
EMPTY = "(no reply)"
TYPING_AFTER = 0.2
"""Seconds without text before 'is typing…' is shown: most replies start sooner, and each is a request."""
STOPPED = "⏹️ (stopped)"


class ReplyTarget(Protocol):
    """Where a reply's messages go: a bot's channel or a persona's webhook."""

    async def post(self, content: str) -> int:
        """Send a new message; returns its id."""

    async def edit(self, message_id: int, content: str) -> None:
        """Replace the content of a message this target posted."""

    def typing(self) -> AbstractAsyncContextManager[object]:
        """Show 'is typing…' while the reply is being thought up."""


class EditLimiter:
    """Spaces every message write in the process: per channel, and globally, shared fairly between guilds.

    A write first waits for its channel's turn (``per_channel`` after that channel's previous write; a channel
    waiting for its own turn never holds up others), then for a global slot: slots come ``1 / per_second``
    apart and go round-robin to the guilds that have a write waiting, so one busy guild cannot make another
    guild's first reply wait behind its backlog. The rate holds however many replies stream at once, so
    Discord's per-route buckets are never exhausted by us.
    """

    def __init__(self, per_channel: float = 1.2, per_second: float = 20.0) -> None:
        self.per_channel = per_channel
        self.spacing = 1.0 / per_second
        self._next: dict[int, float] = {}
        self._waiting: OrderedDict[int | None, deque[asyncio.Future[None]]] = OrderedDict()
        self._granted = float("-inf")  # when the last global slot was given
        self._turns: asyncio.Task[None] | None = None

    async def acquire(self, channel_id: int, guild_id: int | None = None) -> None:
        now = time.monotonic()
        ready = max(now, self._next.get(channel_id, 0.0))
        self._next[channel_id] = ready + self.per_channel  # reserved now: the channel's next writer waits
        if len(self._next) > 4096:
            self._next = {k: t for k, t in self._next.items() if t > now}
        if ready > now:
            await asyncio.sleep(ready - now)
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(guild_id, deque()).append(turn)
        if self._turns is None or self._turns.done():
            self._turns = asyncio.create_task(self._give_turns(), name="edit-limiter")
        await turn
        # .get: the table may have been pruned of old channels while this write waited
        self._next[channel_id] = max(self._next.get(channel_id, 0.0), time.monotonic() + self.per_channel)

    async def _give_turns(self) -> None:
        """One global slot at a time, to the guild whose turn it is (round-robin over those waiting)."""
        while self._waiting:
            guild, queue = next(iter(self._waiting.items()))
            turn = queue.popleft()
            if queue:
                self._waiting.move_to_end(guild)
            else:
                del self._waiting[guild]
            if turn.done():  # its writer was cancelled while waiting
                continue
            wait = self._granted + self.spacing - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not turn.done():
                turn.set_result(None)
                self._granted = time.monotonic()


def split_message(text: str, limit: int = DISCORD_LIMIT) -> list[str]:
    """Cut text into messages of at most ``limit`` chars, at a line break, else a space, else anywhere but
    inside a character an emoji modifier or joiner extends. A code block cut in two is closed at the end of
    one message and reopened (with its language) at the start of the next, so both render as code.

    Only the first ``limit + 1`` chars decide each cut, so chunks already sent never change as text grows.
    """
    chunks: list[str] = []
    rest, opener = text.strip(), ""
    while len(opener) + len(rest) > limit:
        room = limit - len(opener)
        chunk = opener + rest[:_cut(rest, room)].rstrip()
        if _open_fence(chunk) is not None:  # leave room to close it
            chunk = opener + rest[:_cut(rest, room - len(FENCE_CLOSE))].rstrip()
        fence = _open_fence(chunk)
        body = len(chunk) - len(opener)
        rest = rest[body:].lstrip()
        chunks.append(chunk + FENCE_CLOSE if fence is not None else chunk)
        opener = f"```{fence}\n" if fence is not None else ""
    if rest:
        chunks.append(opener + rest)
    return chunks


FENCE_CLOSE = "\n```"
_EXTENDS = re.compile("[\u200d\ufe0e\ufe0f\U0001f3fb-\U0001f3ff\U000e0020-\U000e007f\u20e3]")
"""Joiner, variation selectors, skin tones, tag characters, keycap: they belong to the character before."""


def _cut(rest: str, room: int) -> int:
    window = rest[: room + 1]
    cut = window.rfind("\n")
    if cut < room // 2:
        cut = window.rfind(" ")
    if cut <= 0:
        cut = room
        while 0 < cut < len(rest) and (_EXTENDS.match(rest[cut]) or rest[cut - 1] == "\u200d"
                                       or unicodedata.combining(rest[cut])):
            cut -= 1
        cut = cut or room
    return cut


def _open_fence(chunk: str) -> str | None:
    """The language of a code block ``chunk`` leaves open ("" for none), or None when all are closed."""
    fences = chunk.split("```")
    if len(fences) % 2:
        return None
    return re.match(r"[\w+#.-]*", fences[-1]).group(0)


class ReplyStream:
    """Mirror a growing text into Discord messages; ``stop()`` ends it early, keeping what was written.

    Every reply ends visibly: with its text, or a note when the engine failed, fell silent for ``timeout``
    seconds, said nothing, or was stopped before it said anything. Writes Discord refuses (429, 5xx) are
    retried for ``deadline`` seconds; an edit that still fails is posted as a new message instead.
    """

    def __init__(
        self, target: ReplyTarget, limiter: EditLimiter, channel_id: int, *, placeholder_after: float = 0.8,
        limit: int = DISCORD_LIMIT, timeout: float | None = None, deadline: float = 120.0,
        guild_id: int | None = None,
    ) -> None:
        self.target = target
        self.limiter = limiter
        self.channel_id = channel_id
        self.guild_id = guild_id
        self.placeholder_after = placeholder_after
        self.limit = limit
        self.timeout = timeout
        self.deadline = deadline
        self.text = ""
        self.message_ids: list[int] = []
        self._shown: list[str] = []
        self._changed = asyncio.Event()
        self._pump: asyncio.Task | None = None
        self._stopped = False

    def stop(self) -> None:
        """Stop generating (frees the engine slot at once); what was generated so far still lands."""
        if self._pump is not None:
            self._stopped = True
            self._pump.cancel()

    async def run(self, pieces: AsyncIterator[str]) -> str:
        """Stream ``pieces`` to Discord; returns the full text. The last write always has the final text."""
        self._pump = pump = asyncio.create_task(self._consume(pieces))
        try:
            first = min(TYPING_AFTER, self.placeholder_after)
            await self._wait(pump, first)
            if not self.text and not pump.done():  # still thinking: say so (a quick reply needs no request)
                async with self.target.typing():
                    await self._wait(pump, self.placeholder_after - first)
            while True:  # from here on something is visible: the text so far, or a placeholder
                if self._target() == self._shown:
                    if pump.done():
                        return self.text
                    self._changed.clear()
                    await self._wait(pump, None)
                    continue
                self._changed.clear()
                await self.limiter.acquire(self.channel_id, self.guild_id)
                await self._write(self._target())
        except DeliveryError as exc:
            log.error("channel %s: a reply of %d chars is lost: %s", self.channel_id, len(self.text), exc)
            return self.text
        finally:
            pump.cancel()

    async def _consume(self, pieces: AsyncIterator[str]) -> None:
        stream = aiter(pieces)
        try:
            while True:
                try:
                    piece = await asyncio.wait_for(anext(stream), self.timeout)
                except StopAsyncIteration:
                    return
                self.text += piece
                self._changed.set()
        except asyncio.TimeoutError:
            log.warning("generation in channel %s: no text for %s s, gave up", self.channel_id, self.timeout)
            self.text += f"\n{TIMED_OUT}"
        except Exception as exc:  # the engine failed: a short note in the reply, the detail in the log only
            log.warning("generation failed in channel %s: %s", self.channel_id, redact(f"{exc!r}"))
            self.text += f"\n{FAILED}"
        finally:
            aclose = getattr(pieces, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _wait(self, pump: asyncio.Task, timeout: float | None) -> None:
        """Until new text, the end of the stream, or the timeout."""
        changed = asyncio.ensure_future(self._changed.wait())
        try:
            await asyncio.wait({pump, changed}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            changed.cancel()

    def _target(self) -> list[str]:
        chunks = split_message(self.text, self.limit)
        if chunks:
            return chunks
        if self._pump is None or not self._pump.done():
            return [PLACEHOLDER]
        return [STOPPED if self._stopped else EMPTY]

    async def _write(self, chunks: list[str]) -> None:
        """Bring the first message that differs up to date: one write per limiter slot."""
        where = f"reply in channel {self.channel_id}"
        for i, chunk in enumerate(chunks):
            if i == len(self._shown):
                self.message_ids.append(await persist(lambda: self.target.post(chunk), where, self.deadline))
                self._shown.append(chunk)
                return
            if self._shown[i] != chunk:
                try:
                    await persist(lambda: self.target.edit(self.message_ids[i], chunk), where, self.deadline)
                except (DeliveryError, discord.HTTPException) as exc:  # gone, or never editable again: repost
                    log.warning("%s: cannot edit message %s (%s); posting the text anew", where,
                                self.message_ids[i], exc)
                    self.message_ids[i] = await persist(lambda: self.target.post(chunk), where, self.deadline)
                self._shown[i] = chunk
                return
