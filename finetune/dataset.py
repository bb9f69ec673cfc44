"""Conversations -> token ids with assistant-only labels, split into train/eval, and the batch collator."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset

from .conversation import Conversation, DataError
from .prompt import render, stop_token_ids, with_default_system_prompt

IGNORE = -100


@dataclass
class Encoded:
    """One tokenized conversation; ``labels`` is ``IGNORE`` everywhere but the character's own tokens."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool


def encode_conversation(
    tokenizer: Any,
    messages: list[dict[str, str]],
    chat_template: str | None = None,
    max_seq_len: int | None = None,
) -> Encoded:
    """Render through the chat template and label exactly the character's turns, end-of-turn token included.

    Each assistant turn's text span is found by rendering the conversation up to that turn (with the
    generation prompt) and up to its end; tokens whose text starts inside a span are trained. Working on
    characters, not on separately tokenized pieces, keeps tokenization identical to serving.
    """
    full = render(tokenizer, messages, chat_template)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], chat_template, add_generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1], chat_template)
        if not (full.startswith(before) and full.startswith(upto)):
            raise DataError(
                "the chat template renders earlier turns differently once later turns follow, "
                "so the character's tokens cannot be located; use a prefix-stable template"
            )
        spans.append((len(before), len(upto)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    labels = [IGNORE] * len(ids)
    span_i = 0
    for t, (begin, _end) in enumerate(enc["offset_mapping"]):
        while span_i < len(spans) and begin >= spans[span_i][1]:
            span_i += 1
        if span_i < len(spans) and spans[span_i][0] <= begin:
            labels[t] = ids[t]
    truncated = max_seq_len is not None and len(ids) > max_seq_len
    if truncated:
        ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    return Encoded(ids, labels, truncated)


@dataclass
class DataStats:
    """What data prep did, for ``finetune data check`` and the training log."""

    conversations: int = 0
    train_examples: int = 0
    eval_examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    max_len: int = 0
    problems: list[str] = field(default_factory=list)


def split_conversations(
    conversations: list[Conversation], eval_fraction: float, seed: int
) -> tuple[list[Conversation], list[Conversation]]:
    """Deterministic held-out split by conversation; no eval set for tiny data (< 10 conversations)."""
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(order) * eval_fraction)) if eval_fraction > 0 and len(order) >= 10 else 0
    held = set(order[:n_eval])
    train = [c for i, c in enumerate(conversations) if i not in held]
    return train, [c for i, c in enumerate(conversations) if i in held]


def tokenize(
    conversations: list[Conversation],
    tokenizer: Any,
    system_prompt: str,
    chat_template: str | None,
    max_seq_len: int,
    stats: DataStats,
    desc: str = "Tokenizing",
) -> Dataset:
    """A ``datasets.Dataset`` of input_ids/labels; conversations that fail or lose all labels go to stats."""
    stops = stop_token_ids(tokenizer)

    def encode(row: dict[str, Any]) -> dict[str, Any]:
        out = {"input_ids": [], "labels": [], "truncated": False, "problem": "", "warning": ""}
        try:
            enc = encode_conversation(
                tokenizer, with_default_system_prompt(system_prompt, row["messages"]), chat_template, max_seq_len
            )
        except DataError as exc:
            return out | {"problem": f"{row['origin']}: {exc}"}
        trained = [t for t in enc.labels if t != IGNORE]
        if not trained:
            return out | {"problem": f"{row['origin']}: no character tokens left within max_seq_len={max_seq_len}"}
        if not enc.truncated and not stops.intersection(trained):
            out["warning"] = f"{row['origin']}: the chat template does not end the character's turn with EOS"
        return out | {"input_ids": enc.input_ids, "labels": enc.labels, "truncated": enc.truncated}

    rows = [{"messages": c.messages, "origin": c.origin} for c in conversations]
    if not rows:
        return Dataset.from_dict({"input_ids": [], "labels": []})
    ds = Dataset.from_list(rows).map(encode, remove_columns=["messages"], desc=desc)
    stats.problems.extend(p for p in [*ds["problem"], *ds["warning"]] if p)
    ds = ds.filter(lambda r: r["problem"] == "")
    stats.truncated += sum(ds["truncated"])
    lengths = [len(x) for x in ds["input_ids"]]
    stats.tokens += sum(lengths)
    stats.trained_tokens += sum(sum(1 for t in lab if t != IGNORE) for lab in list(ds["labels"]))
    stats.max_len = max([stats.max_len, *lengths])
    return ds.remove_columns(["origin", "truncated", "problem", "warning"])  # the collators want ids only


def build_datasets(
    conversations: list[Conversation],
    tokenizer: Any,
    system_prompt: str,
    chat_template: str | None,
    max_seq_len: int,
    eval_fraction: float,
    seed: int,
) -> tuple[Dataset, Dataset | None, DataStats]:
    """Split by conversation, then tokenize each side. Raises DataError if nothing trainable is left."""
    stats = DataStats(conversations=len(conversations))
    train_c, eval_c = split_conversations(conversations, eval_fraction, seed)
    train = tokenize(train_c, tokenizer, system_prompt, chat_template, max_seq_len, stats, "Tokenizing train")
    evals = tokenize(eval_c, tokenizer, system_prompt, chat_template, max_seq_len, stats, "Tokenizing eval")
    stats.train_examples, stats.eval_examples = len(train), len(evals)
    if len(train) == 0:
        shown = "\n  ".join(stats.problems[:10]) or "no conversations"
        raise DataError(f"no trainable examples:\n  {shown}")
    return train, (evals if len(evals) else None), stats


def make_collator(tokenizer: Any, packing: bool, boundaries: bool = False):
    """Padding-free packing (one row, position ids restart per conversation) or classic right padding.

    ``boundaries``: packed rows also carry where each conversation starts (``cu_seq_lens_*``), for
    variable-length attention (``finetune.attention``)."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if packing:
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE,
                                          return_flash_attn_kwargs=boundaries)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE, return_tensors="pt")
