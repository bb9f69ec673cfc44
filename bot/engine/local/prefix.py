"""Reuse the KV cache of finished replies for later prompts that start with the same tokens.

A chat bot re-sends the whole conversation for every reply: the next prompt is the previous prompt,
the previous reply and the new message. Keeping each finished row's keys and values (per LoRA slot: an
adapter changes them) lets the next request prefill only the tokens after the longest common prefix,
so time to first token stops growing with the conversation. Every prompt for a persona also starts with
its system prompt, which any finished reply on that adapter covers.

Entries are evicted least recently used first once their total size passes the budget, and dropped
when their slot's adapter is deleted (slots are reused).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]
"""Per layer (keys, values), each [1, kv_heads, tokens, head_dim]."""

MIN_REUSE = 8
"""Shorter common prefixes are not worth a separate prefill."""


@dataclass(frozen=True)
class Entry:
    slot: int
    tokens: list[int]
    kv: KV
    prompt_length: int
    """how many of ``tokens`` were the prompt (the rest is the reply)"""

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.kv)


class PrefixCache:
    """Finished rows' tokens and KV, at most ``budget_bytes`` of them; used by the scheduler's thread only."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self._entries: OrderedDict[int, Entry] = OrderedDict()
        self._next = 0
        self.size = 0
        self.reused_tokens = 0
        """Prompt tokens served from the cache so far (for tests and benchmarks)."""

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, slot: int, prompt: list[int]) -> tuple[int, KV] | None:
        """The longest cached prefix of ``prompt`` on this slot (at most all but its last token)."""
        best, best_key = 0, None
        for key, entry in self._entries.items():
            if entry.slot == slot:
                n = _common_prefix(entry.tokens, prompt)
                if n > best:
                    best, best_key = n, key
        best = min(best, len(prompt) - 1)  # the last prompt token must run to give the next token's logits
        if best < MIN_REUSE:
            return None
        self._entries.move_to_end(best_key)
        self.reused_tokens += best
        return best, [(k[:, :, :best], v[:, :, :best]) for k, v in self._entries[best_key].kv]

    def store(self, slot: int, tokens: list[int], kv: KV, prompt_length: int) -> None:
        """Keep a finished row. It replaces the entries whose whole prompt it starts with: the same
        conversation one turn on (their reply's tail may tokenize differently once it is in the history)."""
        if self.budget <= 0 or len(tokens) < MIN_REUSE:
            return
        entry = Entry(slot, list(tokens), kv, prompt_length)
        if entry.nbytes > self.budget:
            return
        older = [k for k, e in self._entries.items()
                 if e.slot == slot and _common_prefix(e.tokens, entry.tokens) >= e.prompt_length]
        for key in older:
            self._pop(key)
        self._entries[self._next] = entry
        self._next += 1
        self.size += entry.nbytes
        while self.size > self.budget:
            self._pop(next(iter(self._entries)))

    def clear(self) -> bool:
        """Forget everything (to free memory); True if there was anything to forget."""
        had = bool(self._entries)
        self._entries.clear()
        self.size = 0
        return had

    def drop(self, slot: int) -> None:
        """Forget every entry of this slot (its adapter is gone or replaced)."""
        for key in [k for k, e in self._entries.items() if e.slot == slot]:
            self._pop(key)

    def _pop(self, key: int) -> None:
        self.size -= self._entries.pop(key).nbytes


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
