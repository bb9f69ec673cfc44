"""One adapter folded into a copy of the packed base weights, for the forwards where every row uses it.

On a CPU the LoRA term of a one-adapter batch is 120 pairs of small matmuls per SmolLM2 step, bound by
dispatch: 18 ms of a 72 ms step at batch 1. A persona that keeps the engine to itself (one conversation, or
a busy channel of one persona) is served faster from ``W + B A``: the layers then run at the base's speed
and the hooks add nothing (``bench/projections.py --compare merge``: 1.22x per step at batch 1, 1.47x for 8
rows on one adapter).

Folding costs about 0.3 s for SmolLM2 (every targeted weight unpacked, ``B A`` added in fp32, packed again)
and one copy of the targeted weights, so an adapter is folded only once it has had every row of
``MERGE_AFTER`` forwards in a row, for ``PAYBACK`` times as long as the fold should take, and only where the
copy fits in half the free memory. The fold pauses that batch once (0.3 s for SmolLM2), in the middle of a
reply. One adapter is folded at a time; it stays while its slot's weights do (loading or freeing other
slots leaves it), so the same persona's next reply starts folded.

Only bf16 weights packed for oneDNN (``packed``) are folded: the merge rounds ``W + B A`` to bf16 once,
where the LoRA path rounds ``W x`` and adds ``B A x``; the difference is of bf16's rounding, as with peft's
``merge_and_unload``. A GPU keeps the LoRA path (captured graphs hold the weights they were captured with).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from .packed import pack

if TYPE_CHECKING:
    from .lora import _Stack

log = logging.getLogger(__name__)

MERGE_AFTER = 16
"""Forwards in a row with every row on one adapter before it may be folded: a reply that reached 16 tokens
usually goes on."""

PAYBACK = 5
"""...and for at least this many times as long as the fold is expected to take: it saves about a fifth of a
SmolLM2 step, so it pays for itself when the adapter keeps the batch that much longer again. A big base
folds slowly (about 1.5 s a GiB here), so it is folded only for a persona that holds the engine for minutes."""

FOLD_BYTES_PER_S = 0.5 * 2**30
"""Folding speed assumed until a fold was timed (SmolLM2 here: 212 MiB in about 0.3 s)."""

MEMORY_SHARE = 0.5
"""Fold only when the copy takes at most this share of the free memory."""


class MergedAdapter:
    """The folded weights of at most one adapter, swapped into the layers for the forwards that use it."""

    def __init__(self, free_memory: Callable[[], int], after: int = MERGE_AFTER,
                 fold_bytes_per_s: float = FOLD_BYTES_PER_S) -> None:
        """``fold_bytes_per_s``: how fast a fold is expected to go until one was timed."""
        self._free_memory = free_memory
        self._after = after
        self.slot: int | None = None
        """The adapter folded now, if any."""
        self._writes = -1
        """The folded slot's write count when it was folded: a later write changed its weights."""
        self._layers: dict[nn.Module, tuple[nn.Parameter, nn.Parameter]] = {}
        """layer -> (its own weight, the folded one)."""
        self._holding = False
        self._streak: tuple[int | None, int, float] = (None, 0, 0.0)
        """(slot, forwards in a row every row of which used it, when the first of them began)."""
        self._rate = fold_bytes_per_s
        self._targets: tuple[tuple[int, int], list[nn.Module], int] = ((-1, -1), [], 0)
        """(slot, writes) -> the layers that slot has a LoRA on, and the bytes of their folded copy."""
        self._refused: tuple[int, int] | None = None
        """(slot, writes) a fold was refused for (no room, or an unfoldable layer): not tried again."""

    def route(self, single: int | None, writes: Mapping[int, int], stacks: dict[nn.Module, _Stack]) -> bool:
        """Called once per forward with the adapter slot every row uses (``None``: rows differ, or the base
        alone) and each slot's write count; returns whether the layers now hold that adapter folded (the
        forward adds no LoRA term)."""
        if self.slot is not None and self._writes != writes[self.slot]:
            self.drop()
        now = time.perf_counter()
        held, count, since = self._streak
        self._streak = (single, count + 1, since) if held == single else (single, 1, now)
        wanted = single is not None and (
            single == self.slot or self._fold(single, writes.get(single, 0), stacks, now))
        self._hold(wanted)
        return wanted

    def release(self) -> None:
        """Put the layers' own weights back (a forward has ended: nothing outside one sees the folded ones)."""
        self._hold(False)

    def drop(self) -> None:
        """Let go of the folded copy (its slot changed or was freed); what is in the slot now starts a streak
        of its own."""
        self._hold(False)
        self.slot, self._layers, self._streak = None, {}, (None, 0, 0.0)

    def _hold(self, folded: bool) -> None:
        if folded == self._holding:
            return
        for layer, (own, merged) in self._layers.items():  # into the parameter dict: no module bookkeeping
            layer._parameters["weight"] = merged if folded else own
        self._holding = folded

    def _fold(self, slot: int, writes: int, stacks: dict[nn.Module, _Stack], now: float) -> bool:
        """Fold ``slot`` if its streak has earned it and it can be; returns whether it is folded."""
        _, count, since = self._streak
        if count <= self._after or self._refused == (slot, writes):
            return False
        layers, size = self._targeted(slot, writes, stacks)
        if now - since < PAYBACK * size / self._rate:
            return False
        why = _unfoldable(layers)
        if why is None and size > MEMORY_SHARE * self._free_memory():
            why = f"the folded copy ({size / 2**20:.0f} MiB) would take over half the free memory"
        if why is not None:
            log.info("adapter slot %d stays unfolded: %s", slot, why)
            self._refused = (slot, writes)
            return False
        self.drop()
        start = time.perf_counter()
        folded = {}
        for layer in layers:
            own, stack = layer.weight, stacks[layer]
            weight = torch.addmm(own.to_dense().float(), stack.b[slot].T, stack.a[slot]).to(torch.bfloat16)
            folded[layer] = (own, pack(weight))
        took = time.perf_counter() - start
        self._rate = size / max(took, 1e-6)
        self.slot, self._writes, self._layers = slot, writes, folded
        log.info("adapter slot %d folded into a copy of %d layers' weights (%.0f MiB) in %.2f s", slot,
                 len(folded), size / 2**20, took)
        return True

    def _targeted(self, slot: int, writes: int, stacks: dict[nn.Module, _Stack]) -> tuple[list[nn.Module], int]:
        """The layers ``slot``'s adapter changes (a layer it has no LoRA on keeps its own weight) and the bytes
        of their bf16 copy; kept for the forwards of a streak still waiting out its payback time."""
        if self._targets[0] != (slot, writes):
            layers = [layer for layer, stack in stacks.items() if stack.a[slot].any()]
            size = sum(2 * layer.in_features * layer.out_features for layer in layers)
            self._targets = ((slot, writes), layers, size)
        return self._targets[1], self._targets[2]


def _unfoldable(layers: list[nn.Module]) -> str | None:
    """Why these layers cannot be folded, or None."""
    for layer in layers:
        weight = getattr(layer, "weight", None)
        if not (isinstance(weight, torch.Tensor) and weight.is_mkldnn and weight.dtype == torch.bfloat16):
            return f"{type(layer).__name__} has no packed bf16 weight"
    return None
