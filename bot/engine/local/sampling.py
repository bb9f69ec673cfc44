"""Pick each row's next token with its own persona's sampling settings, for the whole batch at once."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from finetune.bundle import Sampling


def batch_params(settings: Sequence[Sampling], device: torch.device) -> dict[str, torch.Tensor]:
    """The requests' settings as one tensor each, row i for request i (rows of a ``DecodeBatch``)."""

    def column(values: list[float], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    return {
        "temperature": column([s.temperature for s in settings], torch.float32),
        "top_p": column([s.top_p for s in settings], torch.float32),
        "top_k": column([s.top_k for s in settings], torch.long),
        "penalty": column([s.repetition_penalty for s in settings], torch.float32),
    }


def seen_tokens(prompt: list[int], vocab: int, device: torch.device) -> torch.Tensor:
    """[1, vocab] flags of the tokens the repetition penalty applies to (the prompt, then the reply)."""
    seen = torch.zeros(1, vocab, dtype=torch.bool, device=device)
    seen[0, torch.tensor(prompt, dtype=torch.long, device=device)] = True
    return seen


def next_tokens(logits: torch.Tensor, rows: dict[str, torch.Tensor], settings: Sequence[Sampling]) -> torch.Tensor:
    """[B] next token ids from [B, V] float logits; the same order of steps as ``transformers.generate``.

    Repetition penalty (divide positive / multiply negative logits of seen tokens), then per row either
    greedy (temperature 0) or temperature, top-k (0 = off), top-p and a multinomial draw. ``rows`` holds the
    settings as tensors (``batch_params``), ``settings`` the same rows on the host: the branches are decided
    from those, since reading a value back from the GPU would wait for the step there to finish.
    """
    penalty = rows["penalty"][:, None]
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    logits = torch.where(rows["seen"], penalized, logits)
    greedy = logits.argmax(dim=-1)
    temperature = rows["temperature"]
    sampled_rows = [s for s in settings if s.temperature > 0]
    if not sampled_rows:
        return greedy

    scaled = logits / temperature.clamp(min=1e-5)[:, None]
    top_k = rows["top_k"][:, None]
    if any(s.top_k == 0 for s in sampled_rows):  # some row samples from the whole vocabulary
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
    else:  # only the best k can win: no need to sort the whole vocabulary
        sorted_logits, order = scaled.topk(min(max(s.top_k for s in settings), logits.shape[-1]), dim=-1)
    rank = torch.arange(sorted_logits.shape[-1], device=logits.device)[None, :]
    sorted_logits = sorted_logits.masked_fill((top_k > 0) & (rank >= top_k), float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    sorted_logits = sorted_logits.masked_fill(mass_before >= rows["top_p"][:, None], float("-inf"))
    choice = torch.multinomial(sorted_logits.softmax(dim=-1), 1)
    sampled = order.gather(-1, choice).squeeze(-1)
    return torch.where(temperature == 0, greedy, sampled)
