"""The rows that decode together: one KV cache, left-padded so every row's newest token is in the last column.

Rows join (``extend``) and leave (``keep``) between steps. Joining pads the shorter side on the left;
leaving trims columns that no remaining row uses, so the cache is never longer than the longest active
conversation. Each row carries its real position, so rotary embeddings see the same positions as when
the request runs alone, and the attention mask hides the padding.

Costs: a join copies the cache once (the old and the new both exist for a moment), padding costs memory
when a long conversation runs beside short ones, and transformers' ``DynamicCache`` appends by
concatenation, copying each layer's cache every step (a preallocated cache would avoid that).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import DynamicCache

Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, DynamicCache], torch.Tensor]
"""(input_ids [B, Q], attention_mask [B, T+Q], position_ids [B, Q], cache) -> last-position logits [B, V]."""


def _pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class DecodeBatch:
    """KV cache [B, heads, T, dim] per layer, attention mask [B, T] and per-row tensors (first dim B)."""

    def __init__(self, cache: DynamicCache, mask: torch.Tensor, rows: dict[str, torch.Tensor]) -> None:
        self.cache = cache
        self.mask = mask
        self.rows = rows

    @property
    def size(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    @classmethod
    def prefill(
        cls, forward: Forward, prompts: list[list[int]], rows: dict[str, torch.Tensor], pad_id: int,
        device: torch.device,
    ) -> tuple[DecodeBatch, torch.Tensor]:
        """Run the prompts as one left-padded batch; returns the batch and the logits of each next token."""
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], dtype=torch.long, device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long,
                            device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = forward(ids, mask, positions, cache)
        return cls(cache, mask, rows), logits

    def step(self, forward: Forward, tokens: torch.Tensor) -> torch.Tensor:
        """Feed each row its latest token [B]; returns logits [B, V] for the token after it."""
        positions = self.mask.sum(-1, keepdim=True)
        mask = F.pad(self.mask, (0, 1), value=1)
        length = self.length
        try:
            logits = forward(tokens[:, None], mask, positions, self.cache)
        except BaseException:
            self._crop(length)  # layers that already appended this step's keys would disagree with the mask
            raise
        self.mask = mask
        return logits

    def extend(self, other: DecodeBatch) -> None:
        """Append ``other``'s rows (pad whichever cache is shorter on the left)."""
        width = max(self.length, other.length)
        grow, other_grow = width - self.length, width - other.length

        def join(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
            return torch.cat([_pad_left(a, grow, dim), _pad_left(b, other_grow, dim)])

        # build everything first, so running out of memory halfway leaves this batch as it was
        kv = [(join(a.keys, b.keys, 2), join(a.values, b.values, 2))
              for a, b in zip(self.cache.layers, other.cache.layers)]
        mask = join(self.mask, other.mask, 1)
        rows = {k: torch.cat([v, other.rows[k]]) for k, v in self.rows.items()}
        for layer, (keys, values) in zip(self.cache.layers, kv):
            layer.keys, layer.values = keys, values
        self.mask, self.rows = mask, rows

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows (at least one), then drop leading columns that are padding in all of them."""
        index = torch.tensor(indices, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        start = int(mask.any(0).int().argmax())
        self.mask = mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
        self.rows = {k: v.index_select(0, index) for k, v in self.rows.items()}

    def _crop(self, length: int) -> None:
        for layer in self.cache.layers:
            if layer.is_initialized:
                layer.keys = layer.keys[:, :, :length]
                layer.values = layer.values[:, :, :length]
