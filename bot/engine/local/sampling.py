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


def next_tokens(logits: torch.Tensor, rows: dict[str, torch.Tensor], settings: Sequence[Sampling],
                generators: Sequence[torch.Generator | None] | None = None) -> torch.Tensor:
    """[B] next token ids from [B, V] float logits; the same order of steps as ``transformers.generate``.

    Repetition penalty (divide positive / multiply negative logits of seen tokens), then per row either
    greedy (temperature 0) or temperature, top-k (0 = off), top-p and one draw. ``rows`` holds the
    settings as tensors (``batch_params``), ``settings`` the same rows on the host: the branches are decided
    from those, since reading a value back from the GPU would wait for the step there to finish.

    The draw is one uniform per sampled row, from that row's ``generators`` entry (a seeded request's own CPU
    generator) or, where that is None, torch's default CPU generator, so ``torch.manual_seed`` governs the
    rest. The token is where it falls on the cumulative probabilities of the kept tokens in vocabulary order
    (inverse CDF): the last-bit differences a different batch shape makes in the logits move the boundaries
    by as much, so a seeded reply comes out the same alone or in any batch unless a draw falls within that
    rounding of a boundary (a multinomial draw over the batch promises nothing of the kind, and sorted order
    would swap near-ties).
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
    probs = sorted_logits.masked_fill(mass_before >= rows["top_p"][:, None], float("-inf")).softmax(dim=-1)
    cdf = torch.zeros_like(scaled).scatter_(-1, order, probs).cumsum(dim=-1)  # in vocabulary order
    total = cdf[:, -1:]
    # one host-to-device copy; non_blocking, since a blocking one would first wait for the step running there
    u = _uniforms(settings, generators or [None] * len(settings)).to(logits.device, non_blocking=True)[:, None]
    target = torch.minimum(u * total, total.nextafter(torch.zeros_like(total)))  # short of the last kept token's end
    sampled = torch.searchsorted(cdf, target, right=True).squeeze(-1)  # cdf only rises at kept tokens
    return torch.where(temperature == 0, greedy, sampled)


def _uniforms(settings: Sequence[Sampling], generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """[B] one draw in [0, 1) per sampled row (0 for greedy rows, which draw nothing), made on the host."""
    u = torch.zeros(len(settings))
    for i, (s, generator) in enumerate(zip(settings, generators, strict=True)):
        if s.temperature > 0:
            u[i] = torch.rand((), generator=generator)
    return u
