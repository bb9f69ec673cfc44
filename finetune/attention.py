"""Attention for packed training rows: each conversation attends only to itself, with no [T, T] mask.

A packed row holds a batch's conversations back to back (``dataset.make_collator``). Under SDPA,
transformers turns the restarting position ids into a dense block-diagonal [T, T] mask, so attention
does the whole row's T^2 work (8 conversations in a row: ~8x the useful work) in a masked kernel that
is not flash attention. PyTorch's variable-length flash attention (``torch.nn.attention.varlen``, CUDA)
takes the conversations' boundaries instead (``cu_seq_lens``, which the collator then returns) and does
only the useful work. ``packed_attention`` picks it where it runs, after checking it once against SDPA
on this device, forward and backward; everywhere else training keeps SDPA.
"""
from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from .config import ConfigError

log = logging.getLogger(__name__)

VARLEN = "personabot_varlen"
"""The ``attn_implementation`` name this module registers with transformers."""

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, float], torch.Tensor]
"""(q [T, Hq, D], k [T, Hkv, D], v, cu_seq_lens [N+1] int32, longest length, scale) -> causal output [T, Hq, D]."""

kernel: Kernel | None = None
"""The kernel ``varlen_attention`` calls: set by ``packed_attention`` once it has passed the check."""


def torch_varlen() -> Kernel | None:
    """``torch.nn.attention.varlen.varlen_attn`` as a ``Kernel``, for the signature this torch has; None without it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:  # torch >= 2.10
        causal: dict[str, Any] = {"window_size": (-1, 0)}
    elif "is_causal" in params:  # torch 2.9
        causal = {"is_causal": True}
    else:
        return None
    if "scale" not in params:
        return None

    def run(q, k, v, cu, longest, scale):
        gqa = {"enable_gqa": True} if "enable_gqa" in params and k.shape[1] != q.shape[1] else {}
        return varlen_attn(q, k, v, cu, cu, longest, longest, scale=scale, **causal, **gqa)

    return run


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention function: packed rows through ``kernel``, anything else through SDPA."""
    cu = kwargs.get("cu_seq_lens_q")
    if kernel is None or cu is None or query.shape[0] != 1 or (module.training and dropout):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))  # [T, heads, dim]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return kernel(q, k, v, cu, kwargs["max_length_q"], scale)[None], None


def register() -> None:
    """Make ``attn_implementation=VARLEN`` loadable (masks, where still needed, are SDPA's)."""
    AttentionInterface.register(VARLEN, varlen_attention)
    AttentionMaskInterface.register(VARLEN, sdpa_mask)


def packed_attention(setting: bool | Literal["auto"]) -> str:
    """The ``attn_implementation`` for packed training (``train.varlen_attention``): VARLEN or 'sdpa'."""
    global kernel
    if setting is False:
        return "sdpa"
    found = torch_varlen() if torch.cuda.is_available() else None
    if found is None:
        if setting is True:
            raise ConfigError("train.varlen_attention: true needs a CUDA GPU and torch >= 2.9 "
                              "(torch.nn.attention.varlen)")
        return "sdpa"
    try:
        error = check_kernel(found, torch.device("cuda"), torch.bfloat16)
    except Exception as exc:  # e.g. no flash kernel for this GPU, or no backward in this torch
        error, reason = float("inf"), repr(exc)
    else:
        reason = f"max error {error:.3g} against SDPA"
    if error > 0.02:
        if setting is True:
            raise ConfigError(f"train.varlen_attention: true, but varlen attention fails its check here: {reason}")
        log.warning("varlen attention failed its check (%s); packed rows use SDPA with a block mask", reason)
        return "sdpa"
    kernel = found
    register()
    return VARLEN


def check_kernel(candidate: Kernel, device: torch.device, dtype: torch.dtype) -> float:
    """Largest error of ``candidate``'s output and input gradients against SDPA run per sequence, relative to
    the largest reference value; three sequences, grouped-query heads."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    lengths, heads, kv_heads, dim = [5, 17, 9], 4, 2, 64
    total = sum(lengths)
    q, k, v = (torch.randn(total, h, dim, generator=gen).to(device, dtype).requires_grad_()
               for h in (heads, kv_heads, kv_heads))
    weight = torch.randn(total, heads, dim, generator=gen).to(device, dtype)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    scale = dim ** -0.5

    out = candidate(q, k, v, cu, max(lengths), scale)
    grads = torch.autograd.grad((out.float() * weight).sum(), (q, k, v))
    ref = reference_kernel(q, k, v, cu, max(lengths), scale)
    ref_grads = torch.autograd.grad((ref.float() * weight).sum(), (q, k, v))
    pairs = [(a.detach().float(), b.detach().float()) for a, b in zip((out, *grads), (ref, *ref_grads))]
    return max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-6)) for a, b in pairs)


def reference_kernel(q, k, v, cu, longest, scale):
    """The same computation as a loop of causal SDPA calls, one per sequence (slow; for checks)."""
    bounds = cu.tolist()
    repeat = q.shape[1] // k.shape[1]
    parts = []
    for start, end in zip(bounds, bounds[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # [heads, len, dim]
        ks, vs = ks.repeat_interleave(repeat, 0), vs.repeat_interleave(repeat, 0)
        parts.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1))
    return torch.cat(parts)
