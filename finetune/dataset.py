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
    """One tokenized example; ``labels`` is ``IGNORE`` everywhere but the character's trained tokens."""

    input_ids: list[int]
    labels: list[int]


def encode_conversation(
    tokenizer: Any,
    messages: list[dict[str, str]],
    chat_template: str | None = None,
    context_turns: frozenset[int] = frozenset(),
) -> Encoded:
    """Render through the chat template and label the character's turns, end-of-turn token included.

    Each assistant turn's text span is found by rendering the conversation up to that turn (with the
    generation prompt) and up to its end; tokens whose text starts inside a span are trained. Working on
    characters, not on separately tokenized pieces, keeps tokenization identical to serving. Assistant
    turns in ``context_turns`` (indices into ``messages``) render the same but are not trained.
    """
    full = render(tokenizer, messages, chat_template)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i in context_turns:
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
    return Encoded(ids, labels)


def fit_examples(
    tokenizer: Any,
    system_prompt: str,
    conversation: Conversation,
    chat_template: str | None,
    max_seq_len: int,
) -> tuple[list[Encoded], list[str]]:
    """The conversation as examples of at most ``max_seq_len`` tokens, each ending with a whole reply.

    A conversation that fits is one example, exactly as rendered. A longer one drops its oldest turns
    first, as the bot's context trimming does at serve time (the system prompt stays; the kept history
    starts at a user turn): each window trains the replies not trained before it, with as much earlier
    dialogue as fits as untrained context. A reply that does not fit even alone is reported, never cut.
    """
    full = with_default_system_prompt(system_prompt, conversation.messages)
    added = len(full) - len(conversation.messages)  # 1 when the persona's prompt was put in front
    context = {i + added for i in conversation.context_turns}  # indices into full
    whole = encode_conversation(tokenizer, full, chat_template, frozenset(context))
    if len(whole.input_ids) <= max_seq_len:
        return [whole], []
    head = full[:1] if full and full[0]["role"] == "system" else []  # every window keeps the system prompt
    body = full[len(head):]
    trained = [i for i, m in enumerate(body) if m["role"] == "assistant" and i + len(head) not in context]
    starts = sorted({0, *(i for i, m in enumerate(body) if m["role"] == "user")})

    def length(start: int, end: int) -> int:
        text = render(tokenizer, head + body[start : end + 1], chat_template)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    examples, problems, k = [], [], 0
    while k < len(trained):
        target = trained[k]
        options = [s for s in starts if s <= target]
        lo, hi = 0, len(options)  # first start (most context) that fits; later starts are never longer
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if length(options[mid], target) <= max_seq_len else (mid + 1, hi)
        if lo == len(options):
            problems.append(
                f"{conversation.origin}: the character's reply (message {target + 1}) does not fit "
                f"max_seq_len={max_seq_len} even with no earlier turns; it is not trained "
                "(raise max_seq_len or split the reply)"
            )
            k += 1
            continue
        start, last = options[lo], k
        while last + 1 < len(trained) and length(start, trained[last + 1]) <= max_seq_len:
            last += 1
        window = head + body[start : trained[last] + 1]
        own = {i + len(head) - start for i in trained[k : last + 1]}
        untrained = frozenset(i for i, m in enumerate(window) if m["role"] == "assistant" and i not in own)
        examples.append(encode_conversation(tokenizer, window, chat_template, untrained))
        k = last + 1
    return examples, problems


@dataclass
class DataStats:
    """What data prep did, for ``finetune data check`` and the training log."""

    conversations: int = 0
    train_examples: int = 0
    eval_examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    split: int = 0  # conversations longer than max_seq_len, trained as windows of their latest turns
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
    """A ``datasets.Dataset`` of input_ids/labels (long conversations become several rows, see
    ``fit_examples``); conversations that fail or train nothing go to stats.

    Raises DataError when the system prompt alone leaves no room for a reply."""
    stops = stop_token_ids(tokenizer)
    _check_prompt_fits(tokenizer, system_prompt, chat_template, max_seq_len)

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "notes": [], "split": []}
        for messages, origin, context in zip(batch["messages"], batch["origin"], batch["context_turns"]):
            conversation = Conversation(messages, origin, frozenset(context))
            try:
                examples, notes = fit_examples(tokenizer, system_prompt, conversation, chat_template, max_seq_len)
            except DataError as exc:
                examples, notes = [], [f"{origin}: {exc}"]
            if not examples and not notes:
                notes = [f"{origin}: no character tokens to train"]
            for i, enc in enumerate(examples):
                trained = [t for t in enc.labels if t != IGNORE]
                warn = [] if stops.intersection(trained) else [
                    f"{origin}: the chat template does not end the character's turn with EOS"]
                out["input_ids"].append(enc.input_ids)
                out["labels"].append(enc.labels)
                out["notes"].append((notes if i == 0 else []) + warn)
                out["split"].append(len(examples) > 1 and i == 0)
            if not examples:  # a row for the problems only, filtered out below
                out["input_ids"].append([])
                out["labels"].append([])
                out["notes"].append(notes)
                out["split"].append(False)
        return out

    rows = [{"messages": c.messages, "origin": c.origin, "context_turns": sorted(c.context_turns)}
            for c in conversations]
    if not rows:
        return Dataset.from_dict({"input_ids": [], "labels": []})
    ds = Dataset.from_list(rows).map(encode, batched=True, batch_size=16,
                                     remove_columns=["messages", "origin", "context_turns"], desc=desc)
    stats.problems.extend(dict.fromkeys(p for notes in ds["notes"] for p in notes))  # once, not per window
    stats.split += sum(ds["split"])
    ds = ds.filter(lambda r: len(r["input_ids"]) > 0)
    lengths = [len(x) for x in ds["input_ids"]]
    stats.tokens += sum(lengths)
    stats.trained_tokens += sum(sum(1 for t in lab if t != IGNORE) for lab in list(ds["labels"]))
    stats.max_len = max([stats.max_len, *lengths])
    return ds.remove_columns(["notes", "split"])  # the collators want ids only


def _check_prompt_fits(tokenizer: Any, system_prompt: str, chat_template: str | None, max_seq_len: int) -> None:
    if not system_prompt:
        return
    prompt = render(tokenizer, [{"role": "system", "content": system_prompt}], chat_template,
                    add_generation_prompt=True)
    n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if n >= max_seq_len:
        enough = -(-(n + 256) // 256) * 256
        raise DataError(
            f"the system prompt alone is {n} tokens: max_seq_len={max_seq_len} leaves no room for any reply; "
            "raise max_seq_len (data.max_seq_len in the training config, --max-seq-len for `finetune data`) "
            f"to at least {enough}, or shorten the prompt (for a card: description, personality, scenario)"
        )


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
