"""Group chat without /converse: in a channel where it is turned on (``/persona settings group:on``), a persona
answers another persona's message that names or replies to it, under loop control in the manner of Discord
Pals: each consecutive bot-to-bot reply is less likely than the last (``decay ** streak``), none follows
``cap`` of them without a human message, two are at least ``cooldown`` seconds apart, a human message starts
over, and ``/stop`` ends it until a human writes again.

Only this process's own personas take part: another bot's messages never start a reply, so two bots that both
answer anything cannot ping-pong forever. Pure logic; ``bot.app`` feeds it messages and asks it.
"""
from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field


def named(text: str, name: str) -> bool:
    """Whether ``text`` names the persona (``Coral``, ``@Coral``, ``coral,``), as a word, any case."""
    return re.search(rf"(?<!\w)@?{re.escape(name)}(?!\w)", text, flags=re.IGNORECASE) is not None


@dataclass
class Loop:
    """One channel's bot-to-bot exchange since the last human message."""

    streak: int = 0
    last: float = float("-inf")
    stopped: bool = False


@dataclass
class GroupChats:
    """Loop control for every channel; ``clock`` and ``roll`` are injectable so tests need not sleep or guess."""

    cap: int = 4
    decay: float = 0.6
    cooldown: float = 5.0
    clock: Callable[[], float] = time.monotonic
    roll: Callable[[], float] = random.random
    loops: dict[int, Loop] = field(default_factory=dict)

    def human(self, channel_id: int) -> None:
        """A person wrote: the exchange starts over (and a /stop is lifted)."""
        self.loops.pop(channel_id, None)

    def stop(self, channel_id: int) -> None:
        """/stop: no bot-to-bot reply until a person writes again."""
        self.loops.setdefault(channel_id, Loop()).stopped = True

    def chance(self, channel_id: int) -> float:
        """The probability that the next bot-to-bot reply happens now (0 when capped, stopped or cooling)."""
        loop = self.loops.get(channel_id, Loop())
        if loop.stopped or loop.streak >= self.cap or self.clock() - loop.last < self.cooldown:
            return 0.0
        return self.decay ** loop.streak

    def decide(self, channel_id: int) -> bool:
        """Whether a persona answers the persona message just seen; a yes counts toward the cap."""
        chance = self.chance(channel_id)
        if chance <= 0.0 or self.roll() >= chance:
            return False
        loop = self.loops.setdefault(channel_id, Loop())
        loop.streak += 1
        loop.last = self.clock()
        return True
