"""Fit a conversation into the context window, rendered exactly as in training, with what users wrote
tokenized as text."""
from __future__ import annotations

import re
from typing import Any

from finetune.bundle import Manifest
from finetune.prompt import encode_prompt, with_system_prompt

from .base import EngineError


WORD_JOINER = "\u2060"
"""Invisible; put inside a special token's string it makes the tokenizer read that string as text."""


def break_special_tokens(tokenizer: Any, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """``messages`` with every special token's string in them (``<|im_start|>`` typed by a user) broken by a
    word joiner, so it is tokenized as plain text and can never open a system or assistant turn. Messages
    without one are returned as they are, so prompts stay byte-identical to training's."""
    specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    specials |= set(tokenizer.all_special_tokens)
    specials = sorted((t for t in specials if len(t) > 1), key=len, reverse=True)
    if not specials:
        return messages
    pattern = re.compile("|".join(map(re.escape, specials)))
    return [{**m, "content": pattern.sub(lambda t: t[0][0] + WORD_JOINER + t[0][1:], m["content"])}
            for m in messages]


def prompt_budget(context: int, max_new_tokens: int, adapter: str) -> int:
    """Prompt tokens left once the reply's ``max_new_tokens`` are reserved."""
    budget = context - max_new_tokens
    if budget <= 0:
        raise EngineError(
            f"adapter '{adapter}': max_new_tokens {max_new_tokens} leaves no room for a prompt "
            f"in the {context}-token context"
        )
    return budget


def fit_messages(
    tokenizer: Any, manifest: Manifest, messages: list[dict[str, str]], budget: int, adapter: str
) -> tuple[list[dict[str, str]], list[int]]:
    """(messages as sent, with the system prompt; prompt token ids) within ``budget`` tokens.

    The oldest messages go first. The system prompt always stays, the kept history always starts at a
    user turn (chat templates often require it), and the latest user message with anything after it is
    never dropped: if that alone is too long, the error says so rather than answering out of context.
    """
    # the bundle's own system prompt is trusted; everything the bot sends may hold what users typed
    full = with_system_prompt(manifest.system_prompt, break_special_tokens(tokenizer, messages))
    head = full[:1] if full and full[0]["role"] == "system" else []
    body = full[len(head):]
    users = [i for i, m in enumerate(body) if m["role"] == "user"]
    starts = sorted({0, *users})

    def encode(start: int) -> list[int]:
        return encode_prompt(tokenizer, "", head + body[start:], manifest.chat_template)

    lo, hi = 0, len(starts) - 1
    best = encode(starts[hi])
    if len(best) > budget:
        raise EngineError(
            f"adapter '{adapter}': the latest message needs {len(best)} prompt tokens, more than the "
            f"{budget} left in the context window after the reply's max_new_tokens"
        )
    while lo < hi:  # smallest start (most history) that still fits; shorter suffixes never get longer
        mid = (lo + hi) // 2
        ids = encode(starts[mid])
        if len(ids) <= budget:
            hi, best = mid, ids
        else:
            lo = mid + 1
    return head + body[starts[hi]:], best
