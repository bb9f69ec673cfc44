"""The rows that decode together: one KV cache, left-padded so every row's newest token is in the last column.

Rows join (``extend``) and leave (``keep``) between steps. Joining pads the shorter side on the left;
leaving trims columns that no remaining row uses, so the cache is never longer than the longest active
conversation. Each row carries its real position, so rotary embeddings see the same positions as when
the request runs alone, and the attention mask hides the padding.

Each layer keeps its keys and values at the front of a buffer with room for ``GROW`` more tokens, so a
decode step writes one column in place; transformers' ``DynamicLayer`` concatenates instead, copying every
layer's whole cache on every step. Costs: a join or leave copies the cache once (old and new both exist
for a moment), and padding costs memory when a long conversation runs beside short ones.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

GROW = 256
"""Spare token columns a layer's buffer gets whenever it has to be reallocated."""

Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Cache], torch.Tensor]
"""(input_ids [B, Q], attention_mask [B, T+Q], position_ids [B, Q], cache) -> last-position logits [B, V]."""


def _pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _room(old: torch.Tensor | None, like: torch.Tensor, length: int, capacity: int) -> torch.Tensor:
    """A buffer of ``capacity`` columns: ``old``'s first ``length``, then zeros (a captured step attends over
    the unused columns, masked, and masking does not stop uninitialized NaN garbage from spreading: 0 x NaN)."""
    grown = like.new_empty((*like.shape[:2], capacity, like.shape[-1]))
    if length:
        grown[:, :, :length] = old[:, :, :length]
    grown[:, :, length:].zero_()
    return grown


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose ``keys``/``values`` are views of buffers that grow ``GROW`` columns at a time.

    Assigning ``keys`` or ``values`` (as joins and leaves do) adopts the tensor as a full buffer; the next
    ``update`` reallocates it with spare room.

    While ``write_at`` holds a one-element position tensor (a decode step being captured as a graph, see
    ``graphs``), ``update`` writes there in place and returns the whole buffers: no shape depends on the
    length, so the same kernels serve every step until the buffer is full.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor | None] = {"keys": None, "values": None}
        self._lengths = {"keys": 0, "values": 0}
        self.write_at: torch.Tensor | None = None
        super().__init__()

    keys = property(lambda self: self._view("keys"), lambda self, t: self._adopt("keys", t))
    values = property(lambda self: self._view("values"), lambda self, t: self._adopt("values", t))

    def _view(self, name: str) -> torch.Tensor | None:
        buffer = self._buffers[name]
        return None if buffer is None else buffer[:, :, : self._lengths[name]]

    def _adopt(self, name: str, tensor: torch.Tensor | None) -> None:
        self._buffers[name] = tensor
        self._lengths[name] = 0 if tensor is None or tensor.dim() < 3 else tensor.shape[-2]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.write_at is not None:
            for name, new in (("keys", key_states), ("values", value_states)):
                self._buffers[name].index_copy_(2, self.write_at, new)
            return self._buffers["keys"], self._buffers["values"]
        for name, new in (("keys", key_states), ("values", value_states)):
            buffer, start = self._buffers[name], self._lengths[name]
            end = start + new.shape[-2]
            if buffer is None or end > buffer.shape[-2]:
                self._buffers[name] = buffer = _room(buffer, new, start, end + GROW)
            buffer[:, :, start:end] = new
            self._lengths[name] = end
        return self.keys, self.values

    def truncate(self, length: int) -> None:
        """Forget every column from ``length`` on (the buffers keep their room)."""
        self._lengths = {name: min(n, length) for name, n in self._lengths.items()}

    @property
    def capacity(self) -> int:
        """Columns the buffers hold, used or not."""
        return self._buffers["keys"].shape[-2]

    def addresses(self) -> tuple[int, int]:
        """Where the key and value buffers are (a reallocation moves them)."""
        return self._buffers["keys"].data_ptr(), self._buffers["values"].data_ptr()

    def make_room(self) -> None:
        """Reallocate with ``GROW`` spare columns unless at least one is free."""
        for name, buffer in self._buffers.items():
            length = self._lengths[name]
            if length == buffer.shape[-2]:
                self._buffers[name] = _room(buffer, buffer, length, length + GROW)

    def advance(self) -> None:
        """Count the column a captured step wrote at ``write_at`` as used."""
        self._lengths = {name: n + 1 for name, n in self._lengths.items()}


class GrowingCache(DynamicCache):
    """A ``DynamicCache`` made of ``GrowingLayer``s."""

    def __init__(self) -> None:
        Cache.__init__(self, layer_class_to_replicate=GrowingLayer)


class DecodeBatch:
    """KV cache [B, heads, T, dim] per layer, attention mask [B, T] and per-row tensors (first dim B)."""

    def __init__(self, cache: GrowingCache, mask: torch.Tensor, rows: dict[str, torch.Tensor]) -> None:
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
        cache = GrowingCache()
        logits = forward(ids, mask, positions, cache)
        return cls(cache, mask, rows), logits

    @classmethod
    def resume(
        cls, forward: Forward, prompt: list[int], cached: int, kv: list[tuple[torch.Tensor, torch.Tensor]],
        rows: dict[str, torch.Tensor], device: torch.device,
    ) -> tuple[DecodeBatch, torch.Tensor]:
        """One prompt whose first ``cached`` tokens' keys and values are ``kv``: only the rest runs."""
        cache = GrowingCache()
        for keys, values in kv:  # adopted as full buffers: the first update copies, never writes into them
            layer = GrowingLayer()
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
            cache.layers.append(layer)
        ids = torch.tensor([prompt[cached:]], dtype=torch.long, device=device)
        mask = torch.ones(1, len(prompt), dtype=torch.long, device=device)
        positions = torch.arange(cached, len(prompt), device=device)[None]
        logits = forward(ids, mask, positions, cache)
        return cls(cache, mask, rows), logits

    def row_kv(self, index: int) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Row ``index``'s own tokens count and a copy of their keys and values (its padding left out)."""
        start = self.length - int(self.mask[index].sum())
        kv = [(layer.keys[index : index + 1, :, start:].clone(), layer.values[index : index + 1, :, start:].clone())
              for layer in self.cache.layers]
        return self.length - start, kv

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

    def buffers(self) -> tuple[int, ...]:
        """Where every layer's KV buffers are, and how large: a captured step stays valid while this holds."""
        layers = self.cache.layers
        return (self.size, layers[0].capacity, *(a for layer in layers for a in layer.addresses()))

    def make_room(self) -> None:
        """At least one free column in every layer, for a step that writes in place."""
        for layer in self.cache.layers:
            layer.make_room()

    def advance(self) -> None:
        """Book the step a captured graph just ran: one more column, visible to every row."""
        mask = F.pad(self.mask, (0, 1), value=1)  # first: running out of memory here must leave both as they were
        for layer in self.cache.layers:
            layer.advance()
        self.mask = mask

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
            layer.truncate(length)
