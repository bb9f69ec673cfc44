"""The served model: one base, its tokenizer, and the LoRA slots every loaded adapter lives in.

Only the scheduler's worker thread calls ``add_adapter``, ``delete_adapter`` and ``forward``; the other
attributes are fixed after loading and safe to read from any thread.
"""
from __future__ import annotations

from typing import Any

import torch

from finetune.dataset import stop_token_ids
from finetune.model import Quantization, fingerprint, load_model, load_tokenizer, resolve

from .adapters import BaseInfo, PreparedAdapter, linear_shapes
from .lora import LoraSlots


class Runtime:
    def __init__(self, model: Any, tokenizer: Any, info: BaseInfo) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        self.device = info.device
        self.lora = LoraSlots(model, info.dtype, info.device)
        self.context: int = model.config.get_text_config().max_position_embeddings
        self.stop_ids: frozenset[int] = frozenset(stop_token_ids(tokenizer, model.generation_config))
        self.pad_id: int = tokenizer.pad_token_id

    @classmethod
    def load(cls, base_model: str, quantization: Quantization, dtype: torch.dtype | None) -> Runtime:
        ref = resolve(base_model)
        tokenizer = load_tokenizer(ref)
        model = load_model(ref, quantization, dtype)
        model.eval()
        compute_dtype = model.get_input_embeddings().weight.dtype  # NF4 keeps embeddings in compute dtype
        info = BaseInfo(ref.name, fingerprint(model.config), linear_shapes(model), model.device, compute_dtype)
        return cls(model, tokenizer, info)

    def add_adapter(self, adapter: PreparedAdapter) -> int:
        """Put the adapter's weights in a free slot; returns the slot requests name it by."""
        return self.lora.add(adapter.weights)

    def delete_adapter(self, slot: int) -> None:
        self.lora.remove(slot)

    def forward(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any, slots: list[int]
    ) -> torch.Tensor:
        """Last-position logits [B, V] in fp32; row i runs with the adapter in slot ``slots[i]``."""
        with self.lora.route(slots):
            out = self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                logits_to_keep=1,
            )
        return out.logits[:, -1, :].float()
