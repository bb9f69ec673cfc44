"""Fused projections (q/k/v and gate/up as one matmul each): the same outputs, fewer matmuls, the LoRA slots
of a fused layer computing every part's adapter, nothing held between forwards."""
from __future__ import annotations

import collections
import gc
import weakref
from functools import partial

import pytest
import torch

from bot.engine import EngineConfig
from bot.engine.local.adapters import linear_shapes
from bot.engine.local.kvbatch import DecodeBatch
from bot.engine.local.lora import LoraSlots
from bot.engine.local.projections import FusedLinear, Part, fuse_projections
from bot.engine.local.runtime import Runtime
from engine_fixtures import CountOps, assert_decode_alike, make_bundle


def _tiny(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _forward(model, ids: torch.Tensor) -> tuple[torch.Tensor, collections.Counter[str]]:
    with torch.inference_mode(), CountOps() as count:
        logits = model(input_ids=ids).logits
    return logits, count.ops


def test_fused_projections_give_the_same_logits_with_fewer_matmuls_and_no_more_memory(tiny_model_dir):
    plain, fused = _tiny(tiny_model_dir), _tiny(tiny_model_dir)
    layers = plain.config.num_hidden_layers
    bytes_before = sum(p.numel() * p.element_size() for p in fused.parameters())
    shapes = linear_shapes(plain)
    replaced = weakref.ref(fused.model.layers[0].mlp.up_proj)

    groups = fuse_projections(fused)
    gc.collect()
    assert replaced() is None, "the separate layers (and their weights) are gone"

    assert len(groups) == 2 * layers
    attention = fused.model.layers[0].self_attn
    assert isinstance(attention.q_proj, Part) and isinstance(attention.qkv_proj, FusedLinear)
    assert sum(p.numel() * p.element_size() for p in fused.parameters()) == bytes_before
    assert linear_shapes(fused) == shapes, "bundles are still checked against the layers they were trained on"
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    want, plain_ops = _forward(plain, ids)
    got, fused_ops = _forward(fused, ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert plain_ops["aten.linear"] == 7 * layers + 1  # + the output layer
    assert fused_ops["aten.linear"] == 4 * layers + 1
    assert all(g._held.output is None and g._held.input is None for g in groups), "nothing is held after a forward"


def test_a_part_called_out_of_turn_or_with_another_input_is_still_right():
    torch.manual_seed(0)
    linears = [torch.nn.Linear(8, n, bias=True) for n in (6, 4, 4)]
    x, y = torch.randn(3, 8), torch.randn(3, 8)
    want = {(i, name): layer(t) for i, layer in enumerate(linears) for name, t in (("x", x), ("y", y))}
    group = FusedLinear(linears)
    q, k, v = (Part(group, i) for i in range(3))
    with torch.no_grad():
        for part, name, t in [(k, "y", y), (q, "x", x), (q, "x", x), (v, "y", y), (k, "x", x), (v, "x", x),
                               (q, "x", x)]:
            torch.testing.assert_close(part(t), want[part.index, name])
    assert group._held.output is None, "k, v and q had their shares of x: nothing is held"


def test_only_plain_linear_siblings_of_one_shape_are_fused():
    class Block(torch.nn.Module):
        def __init__(self, gate: torch.nn.Linear) -> None:
            super().__init__()
            self.gate_proj, self.up_proj = gate, torch.nn.Linear(8, 16)

    class Sub(torch.nn.Linear):  # as bitsandbytes' 4-bit layers are
        pass

    hooked = torch.nn.Linear(8, 16)
    hooked.register_forward_hook(lambda *_: None)
    model = torch.nn.ModuleList([Block(torch.nn.Linear(8, 16)), Block(Sub(8, 16)), Block(torch.nn.Linear(4, 16)),
                                 Block(hooked)])
    fuse_projections(model)
    assert [isinstance(block.up_proj, Part) for block in model] == [True, False, False, False]


def test_lora_on_a_fused_layer_adds_each_parts_adapter_and_survives_growth():
    """Each part's LoRA lands on its own columns only: adapters on some parts, of different ranks, a slot
    and rank growth after the first loads, one adapter per batch row or one for all."""
    torch.manual_seed(0)
    siblings = [torch.nn.Linear(16, n) for n in (12, 8, 8)]
    reference = torch.nn.ModuleDict({name: s for name, s in zip("qkv", siblings)})
    model = torch.nn.Module()
    for name, s in zip(("q_proj", "k_proj", "v_proj"), siblings):
        model.add_module(name, s)
    fuse_projections(model)
    lora = LoraSlots(model, torch.float32, torch.device("cpu"))
    adapters = {}
    for parts, rank in [("qv", 4), ("k", 2), ("qkv", 12), ("v", 4), ("q", 8), ("kv", 16)]:  # 5+ slots, rank 8 -> 16
        weights = {p: (torch.randn(rank, 16), torch.randn(reference[p].out_features, rank) / 4) for p in parts}
        adapters[lora.add({f"{p}_proj": w for p, w in weights.items()})] = weights
    x = torch.randn(len(adapters), 2, 16)

    def want(slot: int, row: int) -> torch.Tensor:
        outs = []
        for p, layer in reference.items():
            out = layer(x[row])
            if p in adapters.get(slot, {}):
                a, b = adapters[slot][p]
                out = out + x[row] @ a.T @ b.T
            outs.append(out)
        return torch.cat(outs, -1)

    with torch.inference_mode():
        for slots in ([3] * len(adapters), [*adapters][::-1], [0, *[*adapters][1:]]):
            with lora.route(slots):
                got = torch.cat([model.q_proj(x), model.k_proj(x), model.v_proj(x)], -1)
            expected = torch.stack([want(slot, row) for row, slot in enumerate(slots)])
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def local(model_dir, dtype: torch.dtype) -> EngineConfig:
    """The tiny model in 16 bits or fp32, eager decode steps."""
    return EngineConfig(base_model=str(model_dir), quantization="none", dtype=dtype, cuda_graphs=False)


@pytest.fixture(scope="module")
def bundles(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("projection-bundles")
    return [make_bundle(tiny_model_dir, root / "all", seed=1, r=4),
            make_bundle(tiny_model_dir, root / "some", seed=2, r=16, target_modules=["k_proj", "v_proj", "up_proj"])]


def test_a_fused_runtime_decodes_as_the_separate_layers_do(tiny_model_dir, bundles):
    """bf16 (where the runtime fuses on a CPU): a batch mixing two adapters and none, then one adapter alone."""
    runtimes = [Runtime.load(local(tiny_model_dir, torch.bfloat16), fused_projections=f) for f in (True, False)]
    assert [len(rt.projections) for rt in runtimes] == [2 * runtimes[0].model.config.num_hidden_layers, 0]
    assert_decode_alike(runtimes, bundles, tol=2e-2)


def test_fp32_on_a_cpu_keeps_separate_layers_and_a_failed_forward_leaves_nothing_held(tiny_model_dir):
    assert Runtime.load(local(tiny_model_dir, torch.float32)).projections == []
    rt = Runtime.load(local(tiny_model_dir, torch.bfloat16))
    attention = rt.model.model.layers[1].self_attn

    def fail(*_):
        raise RuntimeError("boom")

    hook = attention.k_proj.register_forward_hook(fail)  # q and k had their share, v never asks
    with torch.inference_mode(), pytest.raises(RuntimeError, match="boom"):
        DecodeBatch.prefill(partial(rt.forward, slots=[0]), [[5, 6, 7]], {}, rt.pad_id, rt.device)
    hook.remove()
    assert rt.projections and all(group._held.output is None for group in rt.projections)
