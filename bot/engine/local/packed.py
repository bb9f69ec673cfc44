"""bf16 linear layers on a CPU, served from weights laid out once for oneDNN instead of at every call.

A plain bf16 ``F.linear`` on a CPU hands oneDNN a row-major weight, which it re-blocks for its bf16 kernels
at each call: for the 120 projections of a SmolLM2-135M decode step (2 threads, AMX) that took 22-24 ms a
step, the same weights pre-blocked (``torch.ops.mkldnn._reorder_linear_weight``, what inductor's freezing
does) 15-17 ms, at batch 1, 8 and 256 tokens alike, and the outputs are the same bits. fp32 weights stay
as they are: MKL's fp32 matmuls were already faster (20 ms at batch 1, against 33 ms pre-blocked).

A packed weight replaces the original, which is freed, except where another module holds it too: a tied
output embedding, which the input lookup reads row by row, is packed as a copy. For SmolLM2-135M that copy
is 56 MB and took 5.7 ms off every decode step (52.5 -> 46.8 ms at batch 1, 60.2 -> 54.5 at batch 8), the
head's row-major GEMV being the slowest of all. LoRA hooks on a packed layer work as on the original.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)


def available() -> bool:
    """Whether this CPU build can run oneDNN's bf16 linear kernels."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` for a packed weight or a plain one."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return nn.functional.linear(x, weight, bias)


class PackedLinear(nn.Module):
    """An ``nn.Linear`` with its weight pre-blocked for oneDNN."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.weight = pack(layer.weight)
        self.bias = layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def pack_linears(model: nn.Module, fused: Sequence[nn.Module] = ()) -> int:
    """Pack, in place, every bf16 CPU weight of ``model``'s plain linear layers and of the ``fused``
    projections (whose forward calls ``linear``); returns how many were packed."""
    packed = 0
    fused_ids = {id(layer) for layer in fused}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not _packable(child):
                continue
            if id(child) in fused_ids:
                child.weight = pack(child.weight)
            elif type(child) is nn.Linear:  # bitsandbytes' 4-bit layers are subclasses
                setattr(parent, name, PackedLinear(child))
            else:
                continue
            packed += 1
    if packed:
        log.info("serving %d bf16 linear layers with oneDNN-packed weights", packed)
    return packed


def _packable(layer: nn.Module) -> bool:
    weight = getattr(layer, "weight", None)
    return (
        isinstance(weight, torch.Tensor) and not weight.is_mkldnn and weight.dtype == torch.bfloat16
        and weight.device.type == "cpu" and not layer._forward_pre_hooks and not hasattr(layer, "_hf_hook")
    )


def pack(weight: torch.Tensor) -> nn.Parameter:
    """A bf16 weight [out, in], pre-blocked for oneDNN (``to_dense()`` gives it back)."""
    # the batch-size hint only picks a block layout; 1 served batches of 8 and prefills of 256 as well
    return nn.Parameter(torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1), requires_grad=False)
