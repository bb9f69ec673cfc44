"""Bot-to-bot conversations (/converse): personas take turns in one channel, each under its own identity.

Guards: a turn budget, a cooldown between turns, /stop, and any human message in the channel ends the
session (the app answers that message instead). Personas never react to each other's messages on their own,
so outside a session bots cannot ping-pong.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextlib import suppress

from .history import said
from .voices import Voice

log = logging.getLogger(__name__)

Speak = Callable[[Voice, list[dict[str, str]]], Awaitable[str]]


class ConverseSession:
    """One /converse session in one channel."""

    def __init__(
        self, channel_id: int, voices: list[Voice], topic: str, turns: int, *, cooldown: float, started_by: str
    ) -> None:
        self.channel_id = channel_id
        self.voices = voices
        self.topic = topic
        self.turns = turns
        self.cooldown = cooldown
        self.started_by = started_by
        self.transcript: list[tuple[Voice, str]] = []
        self.streams: set[object] = set()  # the ReplyStreams of its turns now being written
        self.reason = ""
        self._stopped = asyncio.Event()

    @property
    def active(self) -> bool:
        return not self._stopped.is_set()

    @property
    def next_speaker(self) -> Voice:
        return self.voices[len(self.transcript) % len(self.voices)]

    def stop(self, reason: str) -> None:
        if self.active:
            self.reason = reason
            self._stopped.set()

    def messages_for(self, voice: Voice) -> list[dict[str, str]]:
        """The session so far from ``voice``'s side: its own lines are assistant turns, the others' are
        labelled so that no line can pass for another speaker's (``history.said``)."""
        turns = [{"role": "user", "content": said(self.started_by, f"Let's talk about {self.topic}.")}]
        for speaker, text in self.transcript:
            if speaker is voice:
                turns.append({"role": "assistant", "content": text})
            elif turns[-1]["role"] == "user":
                turns[-1]["content"] += "\n" + said(speaker.name, text)
            else:
                turns.append({"role": "user", "content": said(speaker.name, text)})
        return turns

    async def run(self, speak: Speak) -> None:
        """Take turns until the budget is spent or the session is stopped; ``speak`` writes one turn."""
        try:
            while self.active and len(self.transcript) < self.turns:
                voice = self.next_speaker
                text = await speak(voice, self.messages_for(voice))
                self.transcript.append((voice, text))
                if len(self.transcript) < self.turns:
                    with suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._stopped.wait(), self.cooldown)
            self.stop("turn budget spent")
        except Exception as exc:  # the turn's job already logged the traceback
            self.stop(f"failed: {exc}")
        finally:
            self.stop("closed")
            log.info("conversation in channel %s ended after %d turns (%s)", self.channel_id, len(self.transcript),
                     self.reason)
