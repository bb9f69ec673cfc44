"""The CPU attention kernels (``attention_cpu.cpp``): causal attention past each row's left padding, for
prefills and decode steps, as fp32 attention gives it within bf16 rounding, and the engine runs through them."""
from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from bot.engine import EngineConfig
from bot.engine.local.attention import KERNEL
from bot.engine.local.kvbatch import DecodeBatch
from bot.engine.local.runtime import Runtime
from engine_fixtures import CountOps
from tiny_model import build_tiny_model


@pytest.fixture(scope="module")
def kernel(built_kernels):
    if not built_kernels.attention:
        pytest.skip("this CPU has no AVX512-BF16: the attention kernels are left out and SDPA runs")
    return torch.ops.personabot


def reference(q, k, v, starts, scale):
    """fp32 SDPA with the mask spelled out: query i at key position T - Q + i sees keys starts[b] .. its own;
    a query that sees none gives zeros. [B, Q, H, D]."""
    batch, heads, queries, _ = q.shape
    keys = k.shape[2]
    groups = heads // k.shape[1]
    k, v = k.repeat_interleave(groups, 1).float(), v.repeat_interleave(groups, 1).float()
    j = torch.arange(keys)
    position = torch.arange(queries) + keys - queries
    mask = (j[None, None, :] <= position[None, :, None]) & (j[None, None, :] >= starts[:, None, None])
    out = F.scaled_dot_product_attention(q.float(), k, v, attn_mask=mask[:, None], scale=scale)
    seeing = mask.any(-1)  # [B, Q]
    return torch.where(seeing[:, None, :, None], out, 0).transpose(1, 2)


PREFILLS = {  # batch, query heads, key/value heads, queries, keys, head size, starts
    "one long prompt": (1, 9, 3, 300, 300, 64, [0]),
    "left padding, a row all padding": (3, 4, 4, 37, 37, 128, [0, 5, 37]),
    "after cached keys, padded": (2, 8, 2, 50, 200, 64, [0, 170]),
    "blocks not filled": (2, 6, 2, 129, 129, 64, [1, 128]),
    "one query": (2, 4, 2, 1, 70, 64, [3, 0]),
}
DECODES = {
    "8 rows, padded, chunks merged": (8, 9, 3, 1, 700, 64, [0, 37, 5, 300, 0, 0, 1, 699]),
    "a row all padding, heads of 256": (2, 4, 1, 1, 40, 256, [40, 2]),
    "16 query heads a key/value head, a chunk past the padding": (1, 16, 1, 1, 600, 64, [520]),
}


@pytest.mark.parametrize("op, case", [("prefill_attention", c) for c in PREFILLS.values()]
                         + [("decode_attention", c) for c in DECODES.values()],
                         ids=[*PREFILLS, *DECODES])
def test_the_kernels_give_fp32_attention_within_bf16_rounding(kernel, op, case):
    batch, heads, kv_heads, queries, keys, dim, starts = case
    torch.manual_seed(0)
    q = torch.randn(batch, queries, heads, dim).bfloat16().transpose(1, 2)  # strided, as transformers hands it
    k, v = (torch.randn(batch, kv_heads, keys, dim).bfloat16() for _ in range(2))
    starts = torch.tensor(starts)
    want = reference(q, k, v, starts, dim**-0.5)
    got = getattr(kernel, op)(q, k, v, starts, dim**-0.5)
    assert got.shape == (batch, queries, heads, dim) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=2**-6, atol=2**-6)
    padded = torch.arange(queries) + keys - queries < starts[:, None]
    assert got[padded].eq(0).all(), "a query that sees no key is zeros"


@pytest.mark.parametrize("op", ["prefill_attention", "decode_attention"])
def test_the_kernels_refuse_what_they_cannot_read(kernel, op):
    attention = getattr(kernel, op)
    q, k = torch.zeros(1, 2, 1, 64, dtype=torch.bfloat16), torch.zeros(1, 2, 4, 64, dtype=torch.bfloat16)
    start = torch.zeros(1, dtype=torch.long)
    with pytest.raises(RuntimeError, match="bf16 q, k, v"):
        attention(q.float(), k.float(), k.float(), start, 0.125)
    with pytest.raises(RuntimeError, match="multiple of 64"):
        attention(q[..., :32], k[..., :32], k[..., :32], start, 0.125)
    with pytest.raises(RuntimeError, match="one int64 start per row"):
        attention(q, k, k, torch.zeros(2, dtype=torch.long), 0.125)
    with pytest.raises(RuntimeError, match="Q <= T"):
        attention(torch.zeros(1, 2, 5, 64, dtype=torch.bfloat16), k, k, start, 0.125)
    if op == "decode_attention":
        with pytest.raises(RuntimeError, match="one query per row"):
            attention(torch.zeros(1, 2, 2, 64, dtype=torch.bfloat16), k, k, start, 0.125)


@pytest.fixture(scope="module")
def heads_of_64(tmp_path_factory):
    """The tiny Llama with heads of 64 (SmolLM2's), which the kernel reads."""
    return build_tiny_model(tmp_path_factory.mktemp("heads64") / "model", head_dim=64)


def test_the_engines_cpu_prefills_and_decode_steps_run_their_attention_through_the_kernels(kernel, heads_of_64):
    """Two prompts of unlike lengths (a padding mask) and a decode step: each layer calls a kernel and no SDPA,
    and the logits are as near fp32's as SDPA's are."""
    config = EngineConfig(base_model=str(heads_of_64), quantization="none")
    runtimes = {name: Runtime.load(config.model_copy(update={"dtype": dtype}), attention_kernel=on)
                for name, dtype, on in (("kernel", "bfloat16", True), ("sdpa", "bfloat16", False),
                                        ("fp32", "float32", False))}
    assert runtimes["kernel"].model.config._attn_implementation == KERNEL
    assert runtimes["sdpa"].model.config._attn_implementation != KERNEL
    torch.manual_seed(0)
    vocab = runtimes["fp32"].tokenizer.vocab_size
    prompts = [torch.randint(10, vocab, (n,)).tolist() for n in (9, 70)]
    layers = runtimes["fp32"].model.config.num_hidden_layers
    logits = {}
    with torch.inference_mode():
        for name, rt in runtimes.items():
            forward = partial(rt.forward, slots=[0, 0])
            with CountOps() as prefill:
                batch, first = DecodeBatch.prefill(forward, prompts, {}, rt.pad_id, rt.device)
            with CountOps() as step:
                second = batch.step(forward, first.argmax(-1))
            logits[name] = first, second
            for count, op in ((prefill, "personabot.prefill_attention"), (step, "personabot.decode_attention")):
                sdpa = {name for name in count.ops if "scaled_dot_product" in name}
                if name == "kernel":
                    assert count.ops[op] == layers and not sdpa
                else:
                    assert op not in count.ops and sdpa
    for at in range(2):  # the prefill's logits, then the decode step's, which read the prefill's keys and values
        exact = logits["fp32"][at]
        kernel_error = float((logits["kernel"][at] - exact).abs().max())
        sdpa_error = float((logits["sdpa"][at] - exact).abs().max())
        assert kernel_error <= 2 * sdpa_error + 1e-3 * float(exact.abs().max()), (kernel_error, sdpa_error)


@pytest.mark.parametrize("why", ["nothing", "fp32", "sliding window", "softcap", "heads of 32"])
def test_attention_the_kernels_cannot_give_stays_with_sdpa(kernel, why):
    """The kernels know left padding and causal masks of bf16 heads of 64-256 only: the rest keeps SDPA's path
    (with "nothing" in the way, the kernel runs)."""
    from types import SimpleNamespace

    from bot.engine.local.attention import kernel_attention

    window = 4 if why == "sliding window" else None
    module = SimpleNamespace(num_key_value_groups=2, is_causal=True, sliding_window=window)
    dim = 32 if why == "heads of 32" else 64
    dtype = torch.float32 if why == "fp32" else torch.bfloat16
    q = torch.randn(1, 4, 6, dim).to(dtype)
    k, v = torch.randn(1, 2, 6, dim).to(dtype), torch.randn(1, 2, 6, dim).to(dtype)
    extra = {"softcap": 30.0} if why == "softcap" else {}
    with CountOps() as count:
        try:
            kernel_attention(module, q, k, v, None, scaling=dim**-0.5, **extra)
        except ValueError as e:  # transformers' SDPA refuses softcap outright: what it would do without the kernels
            assert "softcap" in str(e)
    kernels = {op for op in count.ops if op.startswith("personabot.")}
    assert kernels == ({"personabot.prefill_attention"} if why == "nothing" else set())
