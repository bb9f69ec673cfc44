"""Decode attention on a CPU: a step's one query per row runs with the query heads that share a key/value
head packed as that head's queries, never through SDPA's ``enable_gqa``.

transformers' SDPA attention packs them so only where a padding mask is passed; without one (a batch of
one, or rows of one length) it passes ``enable_gqa=True``, and torch's CPU kernel for that ran 2.7-7.4x
slower per layer (SmolLM2's 9 query heads on 3, bf16, 2 threads: batch 1 at 100 tokens 78 vs 29 us, at
1000 tokens 607 vs 102 us; batch 8 at 100 tokens 499 vs 98 us, at 1000 tokens 4459 vs 603 us), the same
bits at batch 1. Prefill (no difference measured) and GPUs (where ``enable_gqa`` reaches native kernels)
keep transformers' function as it is.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

DECODE = "personabot_decode"
"""The ``attn_implementation`` name the runtime loads its base with (masks are SDPA's)."""


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


AttentionInterface.register(DECODE, decode_attention)
AttentionMaskInterface.register(DECODE, sdpa_mask)
