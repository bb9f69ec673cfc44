"""Many LoRA adapters on one base model, a different one per batch row, in fixed weight slots.

Every targeted linear layer keeps the LoRA weights of all loaded adapters stacked:
A ``[slots, rank, in]`` and B ``[slots, out, rank]`` (the LoRA scale folded into B, smaller ranks
zero-padded). A forward hook adds ``x @ A[s].T @ B[s].T`` for each row's slot ``s`` into the layer's
output: two matmuls when the whole batch uses one adapter, else a gather of the rows' slices and two
batched matmuls. Slot 0 stays all zeros (no adapter).

Why not peft's ``adapter_names``: it loops over the distinct adapters of a batch inside every layer
(an index, two matmuls and a scatter each), so the work grows with the number of personas in a batch,
and adding an adapter re-scans every module of the model (about half a second). Here loading is a copy
into a free slot, unloading zeroes it, switching is a different index, and a mixed batch costs the
same few kernels per layer whatever the mix.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

LoraWeights = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""module path -> (A [r, in], B [out, r] already multiplied by the LoRA scale)."""


class _Stack:
    """One linear layer's LoRA weights for every slot."""

    def __init__(self, capacity: int, rank: int, fan_in: int, fan_out: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.a = torch.zeros(capacity, rank, fan_in, dtype=dtype, device=device)
        self.b = torch.zeros(capacity, fan_out, rank, dtype=dtype, device=device)


class LoraSlots:
    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> None:
        self._modules = dict(model.named_modules())
        self._dtype = dtype
        self._device = device
        self._stacks: dict[str, _Stack] = {}
        self._capacity = 4
        self._rank = 8
        self._used = {0}
        self._single: int | None = 0
        self._rows: torch.Tensor | None = None
        self.version = 0
        """Changes whenever a forward's LoRA work changes shape: a captured graph of the old one is stale."""

    @property
    def loaded(self) -> int:
        """Adapters in slots."""
        return len(self._used) - 1

    def add(self, weights: LoraWeights) -> int:
        """Copy an adapter into a free slot and return the slot; on failure nothing is left behind."""
        slot = next((s for s in range(self._capacity) if s not in self._used), None)
        if slot is None:
            slot = self._capacity
            self._grow(capacity=2 * self._capacity)
        self._grow(rank=max(a.shape[0] for a, _ in weights.values()))
        self._used.add(slot)
        try:
            for path, (a, b) in weights.items():
                stack = self._stacks.get(path) or self._new_stack(path)
                stack.a[slot, : a.shape[0]] = a
                stack.b[slot, :, : b.shape[1]] = b
        except BaseException:
            self.remove(slot)
            raise
        return slot

    def remove(self, slot: int) -> None:
        for stack in self._stacks.values():
            stack.a[slot].zero_()
            stack.b[slot].zero_()
        self._used.discard(slot)

    @contextmanager
    def route(self, slots: list[int], rows: torch.Tensor | None = None) -> Iterator[None]:
        """Within this block, batch row i of every forward uses adapter slot ``slots[i]``.

        ``rows``: ``slots`` as a tensor on the device, from a caller that keeps it (a captured graph reads
        it at every replay)."""
        first = slots[0]
        self._single = first if all(s == first for s in slots) else None
        if self._single is None:
            self._rows = rows if rows is not None else torch.tensor(slots, device=self._device)
        try:
            yield
        finally:
            self._single, self._rows = 0, None

    def _new_stack(self, path: str) -> _Stack:
        module = self._modules[path]
        stack = _Stack(self._capacity, self._rank, module.in_features, module.out_features, self._dtype,
                       self._device)
        module.register_forward_hook(lambda _m, args, out: self._apply(stack, args[0], out))
        self._stacks[path] = stack
        self.version += 1
        return stack

    def _grow(self, capacity: int = 0, rank: int = 0) -> None:
        """Make room for more slots or a higher rank (zero padding keeps every adapter's result)."""
        add_slots, add_rank = max(capacity - self._capacity, 0), max(rank - self._rank, 0)
        if not add_slots and not add_rank:
            return
        for stack in self._stacks.values():
            stack.a = F.pad(stack.a, (0, 0, 0, add_rank, 0, add_slots))
            stack.b = F.pad(stack.b, (0, add_rank, 0, 0, 0, add_slots))
        self._capacity += add_slots
        self._rank += add_rank
        self.version += 1

    def _apply(self, stack: _Stack, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Add the LoRA term into the layer's fresh output, in place: where both have one dtype (a GPU) the
        add rides in the second matmul (``addmm_``: one kernel fewer per layer), else it is done at the
        higher precision of the two, as peft does."""
        if self._single == 0:
            return out
        x = x.to(self._dtype)
        fused = out.dtype == self._dtype
        if self._single is not None:
            flat = out.view(-1, out.shape[-1])
            hidden = F.linear(x, stack.a[self._single]).view(flat.shape[0], -1)
            b = stack.b[self._single].t()
            if fused:
                flat.addmm_(hidden, b)
            else:
                flat.add_(hidden @ b)
        else:
            rows = x.reshape(x.shape[0], -1, x.shape[-1])
            hidden = torch.bmm(rows, stack.a.index_select(0, self._rows).transpose(1, 2))
            b = stack.b.index_select(0, self._rows).transpose(1, 2)
            per_row = out.view(rows.shape[0], rows.shape[1], -1)
            if fused:
                per_row.baddbmm_(hidden, b)
            else:
                per_row.add_(torch.bmm(hidden, b))
        return out
