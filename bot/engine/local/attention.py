"""CPU attention for the served model, as transformers attention implementations (masks are SDPA's).

``DECODE``: a decode step's one query per row runs with the query heads that share a key/value head packed
as that head's queries, never through SDPA's ``enable_gqa``. transformers' SDPA attention packs them so only
where a padding mask is passed; without one (a batch of one, or rows of one length) it passes
``enable_gqa=True``, and torch's CPU kernel for that ran 2.7-7.4x slower per layer (SmolLM2's 9 query heads
on 3, bf16, 2 threads: batch 1 at 100 tokens 78 vs 29 us, at 1000 tokens 607 vs 102 us; batch 8 at 100
tokens 499 vs 98 us, at 1000 tokens 4459 vs 603 us), the same bits at batch 1. GPUs (where ``enable_gqa``
reaches native kernels) keep transformers' function as it is.

``KERNEL``: bf16 attention on a CPU through ``cpu_kernels``' kernels (``attention_cpu.cpp``) where they are
built, prefills and decode steps alike; else ``DECODE``. Per layer (2 threads), torch's flash kernel took
14-15 ms for one 1014-token prompt, 34 ms for two with a padding mask, and 0.8-1.2 ms for a decode step of 8
rows at 1000 tokens (0.09-0.13 at 64); the kernels 5.2, 9.4, 0.2-0.4 (0.02-0.03). They read each row's padding
from the mask's last query row, which sees every real key: the engine's masks are left padding, then causal
(``kvbatch``); a layer with a sliding window or other extras keeps SDPA.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

DECODE = "personabot_decode"
KERNEL = "personabot_kernel"
"""The ``attn_implementation`` names the runtime loads its base with."""


def decode_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: SDPA's, with a CPU decode step's grouped heads always packed."""
    groups = getattr(module, "num_key_value_groups", 1)
    if (query.shape[2] != 1 or groups == 1 or attention_mask is not None or query.device.type != "cpu"
            or kwargs.get("dropout") or kwargs.get("position_bias") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    batch, heads, _, dim = query.shape
    packed = query.reshape(batch, heads // groups, groups, dim)  # head h reads key/value head h // groups
    out = F.scaled_dot_product_attention(packed, key, value, scale=scaling)
    return out.reshape(batch, 1, heads, dim), None  # [B, Q, H, D], as transformers' functions return it


def kernel_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: ``cpu_kernels``' causal attention where it applies, else
    ``decode_attention``."""
    dim, groups = query.shape[-1], getattr(module, "num_key_value_groups", 1)
    if (not hasattr(torch.ops.personabot, "decode_attention") or query.device.type != "cpu"
            or query.dtype != torch.bfloat16 or dim % 64 or dim > 256 or groups > 16
            or not getattr(module, "is_causal", True) or getattr(module, "sliding_window", None) is not None
            or kwargs.get("dropout")
            or any(kwargs.get(extra) is not None for extra in ("sliding_window", "softcap", "s_aux", "position_bias"))
            or (attention_mask is not None and attention_mask.dtype != torch.bool)):
        return decode_attention(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    if attention_mask is None:
        starts = torch.zeros(query.shape[0], dtype=torch.long)
    else:  # the last query sees every real key: the keys it does not see are the row's left padding
        starts = attention_mask[:, 0, -1, :key.shape[2]].logical_not().sum(-1).expand(query.shape[0])
    scale = dim**-0.5 if scaling is None else scaling
    ops = torch.ops.personabot
    kernel = ops.decode_attention if query.shape[2] == 1 else ops.prefill_attention
    return kernel(query, key, value, starts, scale), None


AttentionInterface.register(DECODE, decode_attention)
AttentionMaskInterface.register(DECODE, sdpa_mask)
AttentionInterface.register(KERNEL, kernel_attention)
AttentionMaskInterface.register(KERNEL, sdpa_mask)
