"""Held-out loss/perplexity of base vs adapter on the same prompts, plus sample replies and a style check."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bot.prompt import assemble

from .bundle import Manifest
from .conversation import Conversation, DataError
from .dataset import IGNORE, DataStats, make_collator, split_conversations, tokenize
from .inference import reply
from .persona import PERSONA_FILE, load_persona
from .readers import infer_format, read_source


@dataclass
class Sample:
    prompt: str
    base: str
    adapter: str


@dataclass
class EvalReport:
    examples: int
    base_loss: float
    adapter_loss: float
    samples: list[Sample] = field(default_factory=list)
    style_checks: list[str] = field(default_factory=list)
    base_style: float | None = None
    adapter_style: float | None = None

    @property
    def base_perplexity(self) -> float:
        return math.exp(min(self.base_loss, 50))

    @property
    def adapter_perplexity(self) -> float:
        return math.exp(min(self.adapter_loss, 50))


def heldout(manifest: Manifest, data: str | Path | None = None) -> tuple[list[Conversation], list[str]]:
    """The eval split the bundle was trained without (same seed and fraction), and the persona's style checks.

    ``data`` may be another persona, or a lone dialogue file (e.g. a hand-written held-out JSONL for a persona
    trained on synthetic dialogue); the style checks then come from the persona the bundle was trained on."""
    training = manifest.training
    if data is not None and _is_dialogue_file(Path(data)):
        result = read_source(data, character=manifest.name)
        if not result.conversations:
            listed = "".join(f"\n  {p}" for p in result.problems[:10]) or " none (the file is empty)"
            raise DataError(f"{data}: no usable conversations; first problems:{listed}")
        return result.conversations, load_persona(training.persona).style_checks if training else []
    source = data or (training.persona if training else None)
    if not source:
        raise DataError("the bundle does not record its persona data; pass --data PERSONA_DIR")
    persona = load_persona(source)
    if data is not None or training is None:
        return persona.conversations, persona.style_checks
    _, held = split_conversations(persona.conversations, training.eval_fraction, training.seed)
    if not held:
        raise DataError(f"{source}: too few conversations for a held-out split; pass --data with other dialogue")
    return held, persona.style_checks


def _is_dialogue_file(path: Path) -> bool:
    return path.is_file() and path.name != PERSONA_FILE and infer_format(path) != "card"


@torch.no_grad()
def mean_loss(model: Any, dataset: Any, tokenizer: Any, batch_size: int = 8) -> float:
    """Token-weighted mean cross-entropy over the character's tokens."""
    collate = make_collator(tokenizer, packing=True)
    total, count = 0.0, 0
    rows = dataset.to_list()
    for i in range(0, len(rows), batch_size):
        batch = {k: v.to(model.device) for k, v in collate(rows[i : i + batch_size]).items()}
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        labels = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum"
        )
        total += losses.item()
        count += int((labels != IGNORE).sum())
    return total / max(count, 1)


def style_score(replies: list[str], checks: list[str]) -> float:
    """Fraction of (reply, check) pairs where the regex matches: 1.0 = every reply follows every rule."""
    if not replies or not checks:
        return 0.0
    hits = sum(bool(re.search(c, r)) for r in replies for c in checks)
    return hits / (len(replies) * len(checks))


def evaluate_bundle(model: Any, tokenizer: Any, manifest: Manifest, data: str | Path | None = None,
                    samples: int = 3, max_seq_len: int | None = None) -> EvalReport:
    """Compare the adapter with the same base (adapter disabled, same system prompt) on held-out dialogue.

    The loss reads the held-out turns as training renders them; the sampled replies (and their style
    checks) are prompted as the bot serves them, with the card's triggered lorebook entries, depth prompt
    and post-history instructions (``bot.prompt.assemble``). ``max_seq_len`` defaults to the one the bundle
    was trained with.
    """
    conversations, checks = heldout(manifest, data)
    max_seq_len = max_seq_len or (manifest.training.max_seq_len if manifest.training else 1024)
    stats = DataStats()
    ds = tokenize(conversations, tokenizer, manifest.system_prompt, manifest.chat_template, max_seq_len, stats,
                  desc="Tokenizing held-out")
    if len(ds) == 0:
        raise DataError("no held-out examples could be tokenized:\n  " + "\n  ".join(stats.problems[:10]))
    adapter_loss = mean_loss(model, ds, tokenizer)
    with model.disable_adapter():
        base_loss = mean_loss(model, ds, tokenizer)
    report = EvalReport(len(ds), base_loss, adapter_loss, style_checks=checks)
    prompts = [c.messages[: _first_assistant(c)] for c in conversations[:samples]]
    adapter_replies, base_replies = [], []
    for prompt in prompts:
        served = assemble(prompt, card=manifest.card)  # as the bot sends it: the card's lore and notes too
        adapter_replies.append(reply(model, tokenizer, manifest, served))
        with model.disable_adapter():
            base_replies.append(reply(model, tokenizer, manifest, served))
    report.samples = [Sample(p[-1]["content"] if p else "", b, a)
                      for p, b, a in zip(prompts, base_replies, adapter_replies)]
    if checks:
        report.base_style = style_score(base_replies, checks)
        report.adapter_style = style_score(adapter_replies, checks)
    return report


def _first_assistant(conversation: Conversation) -> int:
    return next(i for i, m in enumerate(conversation.messages) if m["role"] == "assistant")
