"""Generated token ids -> streamed text: whole characters only, and nothing of a stop string."""
from __future__ import annotations

from typing import Any

PROMPT_CONTEXT = 5
"""Prompt tokens decoded in front of the reply, so tokenizers that drop a leading space on the first token
(SentencePiece) render the reply exactly as they would inside the whole sequence."""


class IncrementalDecoder:
    """Decode a growing list of token ids into only the new text (the approach of TGI and vLLM).

    One token can carry part of a multi-byte character: decoding tokens one by one would emit U+FFFD
    halves. Each push decodes the window since the last emitted boundary and emits only what it adds;
    a window ending in U+FFFD is an unfinished character and waits for the next token.
    """

    def __init__(self, tokenizer: Any, prompt_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids[-PROMPT_CONTEXT:])
        self._prefix = 0
        self._read = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """The held-back tail at the end of the reply (an unfinished character stays U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        before = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        if len(text) <= len(before) or (text.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(before):]


class StopFilter:
    """Cut the reply at the first stop string (which is not sent, like OpenAI's ``stop``).

    Text that could still turn into a stop string is held back until the next piece decides it.
    """

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        if not self._stops:
            return piece
        self._pending += piece
        hits = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self._pending = self._pending[:min(hits)], ""
            return out
        keep = self._partial_stop_len()
        cut = len(self._pending) - keep
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out

    def _partial_stop_len(self) -> int:
        """Length of the longest tail of the pending text that begins some stop string."""
        best = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(stop[:k]):
                    best = k
                    break
        return best


class ReplyText:
    """Token ids of one reply -> the text pieces to send, stop strings applied."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int], stops: list[str]) -> None:
        self._decoder = IncrementalDecoder(tokenizer, prompt_ids)
        self._stops = StopFilter(stops)

    @property
    def stopped(self) -> bool:
        """A stop string was generated: the reply is complete."""
        return self._stops.stopped

    def push(self, token_id: int) -> str:
        return self._stops.push(self._decoder.push(token_id))

    def flush(self) -> str:
        if self._stops.stopped:
            return ""
        piece = self._stops.push(self._decoder.flush())
        return piece if self._stops.stopped else piece + self._stops.flush()
