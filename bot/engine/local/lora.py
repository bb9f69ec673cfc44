"""Many LoRA adapters on one base model, a different one per batch row, in fixed weight slots.

Every targeted linear layer keeps the LoRA weights of all loaded adapters stacked:
A ``[slots, rank, in]`` and B transposed, ``[slots, rank, out]`` (the LoRA scale folded into B, smaller ranks
zero-padded). A forward hook adds ``x @ A[s].T @ B[s].T`` for each row's slot ``s`` into the layer's
output: on a CPU with its kernel built (``cpu_kernels``), a decode step's in one call per layer that reads each
row's weights in place; else two matmuls when the whole batch uses one adapter, or a gather of the rows'
slices and two batched matmuls (a CPU decode step keeps the rows' gathered weights for the next step with
the same rows). Slot 0 stays all zeros (no adapter). A fused projection (``projections``: q/k/v as one
layer) keeps its parts' LoRA side by side: part i in rank block i of A, and of B in its own output columns
(B is block-diagonal), so one adapter's two matmuls serve all the parts; a mixed batch gathers each part's
block of B on its own.

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

from .cpu_kernels import LoraAdd
from .merged import MergedAdapter
from .projections import FusedLinear, Part

BASE_SLOT = 0
"""The slot that is always all zeros: rows routed to it run the base model alone."""

WIDE = 64
"""Tokens in a prefill from which a 16-bit base's LoRA term is computed in its 16 bits rather than the slots'
fp32 (a CPU; on a GPU the slots are in the base's dtype): per layer, one adapter, 2 threads, fp32 against
bf16 with the weights cast at each call, us: 15/58 at 1 token, 34/61 at 8, 77/75 at 32, 123/100 at 64, 386/170
at 256 (q/k/v); 22/64 at 1 token, 1098/122 at 64 (gate/up); a 1014-token prompt's 120 layers: 313 vs 78 ms."""

LoraWeights = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""module path -> (A [r, in], B [out, r] already multiplied by the LoRA scale)."""


class _Stack:
    """One linear layer's LoRA weights for every slot; a fused layer's parts each own a rank block.

    ``a``: [slots, parts * rank, in]; ``b``: B transposed, [slots, parts * rank, out], zero outside each part's
    block (its rank rows, its output columns): a row of it is what one rank adds to the outputs."""

    def __init__(self, capacity: int, rank: int, fan_in: int, splits: list[int], dtype: torch.dtype,
                 device: torch.device) -> None:
        self.splits = splits
        self.starts = [sum(splits[:i]) for i in range(len(splits))]
        self.a = torch.zeros(capacity, len(splits) * rank, fan_in, dtype=dtype, device=device)
        self._set_b(torch.zeros(capacity, len(splits) * rank, sum(splits), dtype=dtype, device=device), rank)

    def _set_b(self, b: torch.Tensor, rank: int) -> None:
        """B, and per part (view of its block of B, its rank rows, its output columns)."""
        self.b = b
        self.blocks = []
        for part, (start, size) in enumerate(zip(self.starts, self.splits)):
            ranks, columns = slice(part * rank, (part + 1) * rank), slice(start, start + size)
            self.blocks.append((b[:, ranks, columns], ranks, columns))

    def write(self, slot: int, part: int, rank: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """Part ``part``'s A [r, in] and B [out, r] into ``slot`` (``rank``: the stacks' rank, r <= rank)."""
        first, start = part * rank, self.starts[part]
        self.a[slot, first: first + a.shape[0]] = a
        self.b[slot, first: first + b.shape[1], start: start + b.shape[0]] = b.T

    def grow(self, add_slots: int, rank: int, add_rank: int) -> None:
        """Zero-pad to more slots and to each part's rank block growing from ``rank`` (keeps every result)."""
        parts = len(self.splits)
        a = self.a.unflatten(1, (parts, rank))  # [slots, parts, rank, in]
        self.a = F.pad(a, (0, 0, 0, add_rank, 0, 0, 0, add_slots)).flatten(1, 2)
        b = self.b.unflatten(1, (parts, rank))  # [slots, parts, rank, out]
        self._set_b(F.pad(b, (0, 0, 0, add_rank, 0, 0, 0, add_slots)).flatten(1, 2), rank + add_rank)


class LoraSlots:
    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, device: torch.device,
                 merged: MergedAdapter | None = None, kernel: LoraAdd | None = None) -> None:
        """``merged``: where one-adapter forwards may run on that adapter folded into the weights;
        ``kernel``: the CPU kernel (``cpu_kernels.load().lora_add``) decode steps add their LoRA terms with."""
        self._modules = dict(model.named_modules())
        self._dtype = dtype
        self._device = device
        self._stacks: dict[torch.nn.Module, _Stack] = {}
        """The layer whose output a stack's hook adds to (a fused layer for its parts) -> its stack."""
        self._capacity = 4
        self._rank = 8
        self._used = {BASE_SLOT}
        self._single: int | None = BASE_SLOT
        self._rows: torch.Tensor | None = None
        self._key: tuple = ()
        """A mixed forward's (slots, writes, version): the weights its rows' gathered copies hold."""
        self._writes = 0
        """Counts changes to any slot's weights: gathered copies of older ones are stale."""
        self._slot_writes: dict[int, int] = {}
        """Per slot, the ``_writes`` count of its last change (a folded copy of an older one is stale)."""
        self._keep_gathered = device.type == "cpu"
        # 8 decoding rows on 8 r=16 adapters (SmolLM2, 2 CPU threads): the gather copies were half the LoRA
        # time (21 -> 11.6 ms a step kept); on a GPU the copy is cheap and a captured graph does it anyway
        self._gathered: dict[_Stack, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        self._gathered_for: tuple = ()
        """The rows' gathered A and B blocks per stack, for (slots, writes, version): one decode batch's."""
        self._forwards = 0
        self._first_seen: tuple[tuple, int] = ((), 0)
        """A decode key and the forward it first came in: the rows of a batch filling up change every step,
        and keeping their copies cost fresh memory each time (8 requests arriving at once: 8% later first
        tokens), so only rows that stay a second step are kept."""
        self.version = 0
        """Changes whenever a forward's LoRA work changes shape: a captured graph of the old one is stale."""
        self._merged = merged
        self._kernel = kernel

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
        self._writes += 1
        self._slot_writes[slot] = self._writes
        try:
            for path, (a, b) in weights.items():
                layer, part = self._target(path)
                stack = self._stacks.get(layer) or self._new_stack(layer)
                stack.write(slot, part, self._rank, a, b)
        except BaseException:
            self.remove(slot)
            raise
        return slot

    def remove(self, slot: int) -> None:
        if slot == BASE_SLOT:
            raise ValueError("the base slot holds no adapter and is never freed")
        for stack in self._stacks.values():
            stack.a[slot].zero_()
            stack.b[slot].zero_()
        self._used.discard(slot)
        self._writes += 1
        self._slot_writes[slot] = self._writes

    @contextmanager
    def route(self, slots: list[int], rows: torch.Tensor | None = None) -> Iterator[None]:
        """Within this block, batch row i of every forward uses adapter slot ``slots[i]``.

        ``rows``: ``slots`` as a tensor on the device, from a caller that keeps it (a captured graph reads
        it at every replay)."""
        first = slots[0]
        self._forwards += 1
        self._single = first if all(s == first for s in slots) else None
        if self._merged is not None:
            one = None if self._single == BASE_SLOT else self._single
            if self._merged.route(one, self._slot_writes, self._stacks):
                self._single = BASE_SLOT  # the weights hold this adapter: no LoRA term to add
        if self._single is None or (self._kernel is not None and self._single != BASE_SLOT):
            self._rows = rows if rows is not None else torch.tensor(slots, device=self._device)
            self._key = (tuple(slots), self._writes, self.version)
        try:
            yield
        finally:
            self._single, self._rows = BASE_SLOT, None
            if self._merged is not None:
                self._merged.release()

    def _target(self, path: str) -> tuple[torch.nn.Module, int]:
        """The layer a LoRA on ``path`` adds to, and which of its parts ``path`` is."""
        module = self._modules[path]
        if isinstance(module, Part):
            return module.fused, module.index
        return module, 0

    def _new_stack(self, layer: torch.nn.Module) -> _Stack:
        splits = layer.splits if isinstance(layer, FusedLinear) else [layer.out_features]
        stack = _Stack(self._capacity, self._rank, layer.in_features, splits, self._dtype, self._device)
        layer.register_forward_hook(lambda _m, args, out: self._apply(stack, args[0], out))
        self._stacks[layer] = stack
        self.version += 1
        return stack

    def _grow(self, capacity: int = 0, rank: int = 0) -> None:
        """Make room for more slots or a higher rank (zero padding keeps every adapter's result)."""
        add_slots, add_rank = max(capacity - self._capacity, 0), max(rank - self._rank, 0)
        if not add_slots and not add_rank:
            return
        for stack in self._stacks.values():
            stack.grow(add_slots, self._rank, add_rank)
        self._capacity += add_slots
        self._rank += add_rank
        self.version += 1

    def _apply(self, stack: _Stack, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Add the LoRA term into the layer's fresh output, in place: by the kernel for a CPU decode step (one
        token per row); else, where both have one dtype (a GPU, or a prefill of ``WIDE`` tokens), the add rides
        in the second matmul (``addmm_``: one kernel fewer per layer), or it is done at the higher precision of
        the two, as peft does (and the kernel does)."""
        if self._single == BASE_SLOT:
            return out
        if (self._kernel is not None and x.dim() == 3 and x.shape[1] == 1 and x.dtype == out.dtype
                and out.is_contiguous()):
            self._kernel(out.view(-1, out.shape[-1]), x.reshape(-1, x.shape[-1]), self._rows, stack.a, stack.b,
                         stack.splits)
            return out
        prefill = x.dim() > 2 and x.shape[-2] > 1 and x.numel() >= WIDE * x.shape[-1]
        dtype = out.dtype if prefill else self._dtype
        x = x.to(dtype)
        fused = out.dtype == dtype
        if self._single is not None:
            flat = out.view(-1, out.shape[-1])
            hidden = F.linear(x, stack.a[self._single].to(dtype)).view(flat.shape[0], -1)
            b = stack.b[self._single].to(dtype)
            if fused:
                flat.addmm_(hidden, b)
            else:
                flat.add_(hidden @ b)
        else:
            # Each part's own block of B, gathered for the rows: the block-diagonal whole would gather and
            # multiply the zeros too (3x the bytes for q/k/v; 6-8% slower mixed batches on a CPU)
            rows = x.reshape(x.shape[0], -1, x.shape[-1])
            a, bs = self._gathered_weights(stack, keep=self._keep_gathered and rows.shape[1] == 1)
            a, bs = a.to(dtype), [b.to(dtype) for b in bs]
            hidden = torch.bmm(rows, a)
            per_row = out.view(rows.shape[0], rows.shape[1], -1)
            if len(stack.splits) == 1:
                pieces = [(bs[0], hidden, per_row)]
            else:
                pieces = [(b, hidden[..., ranks], per_row[..., columns])
                          for b, (_, ranks, columns) in zip(bs, stack.blocks)]
            for b, h, target in pieces:
                if fused:
                    target.baddbmm_(h, b)
                else:
                    target.add_(torch.bmm(h, b))
        return out

    def drop_gathered(self) -> None:
        """Free the copies kept for a decode batch (the scheduler's batch has emptied)."""
        self._gathered, self._gathered_for = {}, ()

    def _gathered_weights(self, stack: _Stack, keep: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The rows' A [rows, in, rank] and B blocks [rows, rank, out], gathered; ``keep``: reuse and keep
        them while the rows, their slots and every slot's weights stay as they are (a decode batch's steps)."""
        key = self._key
        if keep and self._gathered_for == key and stack in self._gathered:
            return self._gathered[stack]
        blocks = [stack.b] if len(stack.splits) == 1 else [b for b, _, _ in stack.blocks]
        gathered = (stack.a.index_select(0, self._rows).transpose(1, 2),
                    [b.index_select(0, self._rows) for b in blocks])
        if keep:
            if self._gathered_for != key:
                if self._first_seen[0] != key:
                    self._first_seen = (key, self._forwards)
                if self._first_seen[1] == self._forwards:  # these rows' first step: they may not stay
                    return gathered
                self._gathered, self._gathered_for = {}, key
            self._gathered[stack] = gathered
        return gathered
