"""Regenerate and continue: buttons on each channel's latest persona reply.

🔄 writes a new sample in place of the text (every text generated for the reply is kept as a swipe, paged
with ◀ ▶), ➡️ extends the reply. The person who asked and admins may press them. Button ids carry the
reply's message id and the state database holds the reply (``bot.state`` ``replies``), so buttons keep
working after a restart; only the latest reply of a channel carries them, and the previous one loses its
buttons when a new one gets them.

Own-account personas only: a webhook's messages can carry buttons only when the webhook belongs to an
application and the request opts in, which the webhook path does not do yet.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

import discord

from .delivery import DeliveryError, persist
from .state import ReplyRecord
from .streaming import PLACEHOLDER, ReplyTarget, split_message

log = logging.getLogger(__name__)

CUSTOM_ID = re.compile(r"pb:(regen|more|prev|next):(\d+)")
STALE = "This reply can no longer be changed: only the latest persona reply in a channel can."
DENIED = "Only the person who asked, or an admin, can change this reply."


def custom_id(action: str, message_id: int) -> str:
    return f"pb:{action}:{message_id}"


def parse(value: str) -> tuple[str, int] | None:
    """(action, reply message id) of one of our button ids, else None (another view's component)."""
    match = CUSTOM_ID.fullmatch(value)
    return (match[1], int(match[2])) if match else None


def view(record: ReplyRecord) -> discord.ui.View:
    """The buttons for ``record``. Presses arrive through ``BotClient.on_interaction`` whatever view
    discord.py still tracks, so the view only needs to outlive the request that sends it."""
    buttons = discord.ui.View(timeout=1)
    if len(record.swipes) > 1:
        buttons.add_item(discord.ui.Button(emoji="◀", custom_id=custom_id("prev", record.message_id),
                                           disabled=record.shown == 0))
        buttons.add_item(discord.ui.Button(label=f"{record.shown + 1}/{len(record.swipes)}", disabled=True,
                                           custom_id=custom_id("page", record.message_id)))
        buttons.add_item(discord.ui.Button(emoji="▶", custom_id=custom_id("next", record.message_id),
                                           disabled=record.shown == len(record.swipes) - 1))
    buttons.add_item(discord.ui.Button(emoji="🔄", label="Regenerate", custom_id=custom_id("regen", record.message_id)))
    buttons.add_item(discord.ui.Button(emoji="➡️", label="Continue", custom_id=custom_id("more", record.message_id)))
    return buttons


@dataclass
class Rewrite:
    """A reply target that writes into messages that already exist (the reply being regenerated or
    continued) before posting new ones (a continuation past 2,000 characters)."""

    inner: ReplyTarget
    existing: list[int]

    async def post(self, content: str) -> int:
        if self.existing:
            message_id = self.existing.pop(0)
            await self.inner.edit(message_id, content)
            return message_id
        return await self.inner.post(content)

    async def edit(self, message_id: int, content: str) -> None:
        await self.inner.edit(message_id, content)

    def typing(self) -> AbstractAsyncContextManager[object]:
        return self.inner.typing()


async def show(channel: discord.abc.Messageable, record: ReplyRecord, write: Callable[[], Awaitable[None]],
               deadline: float) -> None:
    """Put ``record``'s shown swipe and its buttons on its message; ``write`` waits for a write slot."""
    await _edit(channel, record, view(record), write, deadline)


async def strip(channel: discord.abc.Messageable, record: ReplyRecord, write: Callable[[], Awaitable[None]],
                deadline: float) -> None:
    """Take the buttons off a reply that is no longer its channel's latest; a failure only logs."""
    try:
        await _edit(channel, record, None, write, deadline)
    except (discord.HTTPException, DeliveryError) as exc:
        log.info("cannot take the buttons off message %s: %s", record.message_id, exc)


async def _edit(channel: discord.abc.Messageable, record: ReplyRecord, buttons: discord.ui.View | None,
                write: Callable[[], Awaitable[None]], deadline: float) -> None:
    """One edit of the reply, retried through rate limits and outages as its text was (``delivery``)."""
    async def once() -> None:
        await write()
        await channel.get_partial_message(record.message_id).edit(  # type: ignore[attr-defined]
            content=_first(record), view=buttons)

    await persist(once, f"the buttons of message {record.message_id}", deadline)


def _first(record: ReplyRecord) -> str:
    """What the buttons' message shows of the shown swipe (a text past 2,000 characters continues in the
    messages after it, as streamed)."""
    return (split_message(record.swipes[record.shown]) or [PLACEHOLDER])[0]
