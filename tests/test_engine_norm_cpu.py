"""Llama's RMSNorm as one CPU op (``norm``, ``norm_cpu.cpp``): transformers' module's numbers, in the engine's
model wherever a norm is Llama's own code."""
from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from bot.engine.local.norm import fuse_rms_norms
from engine_fixtures import CountOps


@pytest.fixture(scope="module")
def kernels(built_kernels):
    return built_kernels


@pytest.mark.parametrize("shape", [(8, 1, 576), (3, 70, 64), (1, 1014, 576)])
def test_the_op_rounds_where_transformers_module_does(kernels, shape):
    torch.manual_seed(0)
    norm = LlamaRMSNorm(shape[-1], eps=1e-5).bfloat16()
    norm.weight.data = (torch.randn(shape[-1]) * 0.3 + 1).bfloat16()
    x = (torch.randn(*shape) * 3).bfloat16()
    with torch.inference_mode():
        want, got = norm(x), torch.ops.personabot.rms_norm(x, norm.weight, norm.variance_epsilon)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    # the fp32 sum of squares is added in another order: rarely apart at all, and then by the normalized value's
    # last bf16 bit, once more rounded after the weight's product
    assert (got.float() - want.float()).abs().le(want.float().abs() * 2**-6).all()
    assert got.ne(want).float().mean() < 1e-4


class GemmaStyleNorm(LlamaRMSNorm):
    def forward(self, hidden_states):  # another formula: must keep its own forward
        return hidden_states * (1.0 + self.weight)


def test_the_model_runs_llamas_norms_through_the_op_and_keeps_the_others(kernels, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    model.model.layers[0].post_attention_layernorm = other = GemmaStyleNorm(model.config.hidden_size).bfloat16()
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.inference_mode():
        want = model(ids).logits
        layers = model.config.num_hidden_layers
        assert fuse_rms_norms(model) == 2 * layers  # input and post-attention norms and the final one, less one
        with CountOps() as count:
            got = model(ids).logits
        assert "forward" not in vars(other)
        assert count.ops["personabot.rms_norm"] == 2 * layers
        assert count.ops["aten.rsqrt"] == 0
        torch.testing.assert_close(got, want, rtol=0, atol=2 * float(want.abs().max()) * 2**-8)
        x = torch.randn(2, 3, model.config.hidden_size)
        with CountOps() as count:  # fp32 input: the module's own code
            out = model.model.norm(x)
        assert "personabot.rms_norm" not in count.ops
        assert torch.equal(out, LlamaRMSNorm.forward(model.model.norm, x))
