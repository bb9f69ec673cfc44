"""Decode attention on a CPU: grouped query heads are packed per key/value head, never SDPA's enable_gqa."""
from __future__ import annotations

from functools import partial

import pytest
import torch
from transformers import AutoModelForCausalLM

from bot.engine import EngineConfig
from bot.engine.local.kvbatch import DecodeBatch
from bot.engine.local.runtime import Runtime


@pytest.mark.parametrize("prompts", [[[5, 9, 14, 3, 22]], [[5, 9, 14, 3, 22], [7, 7, 30, 2, 11]]],
                         ids=["one row", "rows of one length"])
def test_a_decode_step_without_a_padding_mask_packs_grouped_heads_and_matches_stock_sdpa(
        tiny_model_dir, monkeypatch, prompts):
    """Without a mask transformers' SDPA path passes enable_gqa=True, which torch's CPU kernel ran 2.7-7.4x
    slower than the same heads packed (``bot.engine.local.attention``)."""
    runtime = Runtime.load(EngineConfig(base_model=str(tiny_model_dir), quantization="none", dtype=torch.float32,
                                        cuda_graphs=False))
    assert runtime.model.config.num_attention_heads > runtime.model.config.num_key_value_heads, "a GQA model"
    slots = [0] * len(prompts)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls: list[tuple[int, bool]] = []

    def spy(query, key, value, **kwargs):
        calls.append((query.shape[-2], kwargs.get("enable_gqa", False)))
        return sdpa(query, key, value, **kwargs)

    with torch.inference_mode():
        batch, logits = DecodeBatch.prefill(partial(runtime.forward, slots=slots), prompts, {}, runtime.pad_id,
                                            runtime.device)
        tokens = logits.argmax(-1)
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        stepped = runtime.decode(batch, slots, tokens)
        monkeypatch.undo()
        stock = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                     attn_implementation="sdpa").eval()
        ids = torch.cat([torch.tensor(prompts), tokens[:, None]], dim=1)
        want = stock(input_ids=ids).logits[:, -1].float()

    layers = runtime.model.config.num_hidden_layers
    assert len(calls) == layers and not any(gqa for _, gqa in calls), calls
    assert all(queries == runtime.model.config.num_attention_heads // runtime.model.config.num_key_value_heads
               for queries, _ in calls), "each key/value head's query heads ride as its queries"
    torch.testing.assert_close(stepped, want, rtol=1e-4, atol=1e-4)
