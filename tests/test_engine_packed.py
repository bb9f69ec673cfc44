"""bf16 linear layers with oneDNN-packed weights on a CPU: the same outputs, LoRA on top, tied weights kept."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from bot.engine import EngineConfig
from bot.engine.local import packed
from bot.engine.local.lora import LoraSlots
from bot.engine.local.packed import PackedLinear, pack_linears
from bot.engine.local.projections import FusedLinear
from bot.engine.local.runtime import Runtime
from engine_fixtures import assert_decode_alike, make_bundle

pytestmark = pytest.mark.skipif(not packed.available(), reason="this CPU build has no oneDNN bf16 kernels")


def test_a_packed_layer_gives_the_same_bits_frees_the_original_and_takes_lora():
    torch.manual_seed(0)
    plain = nn.ModuleDict({"up": nn.Linear(32, 48), "down": nn.Linear(48, 32, bias=False)}).bfloat16()
    model = nn.ModuleDict({name: nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
                           for name, layer in plain.items()}).bfloat16()
    model.load_state_dict(plain.state_dict())
    original = weakref.ref(model["up"].weight)

    assert pack_linears(model) == 2
    gc.collect()
    assert original() is None, "the row-major weight is gone once packed"
    assert isinstance(model["up"], PackedLinear) and model["up"].weight.is_mkldnn
    assert (model["up"].in_features, model["up"].out_features) == (32, 48)
    for shape in [(1, 32), (3, 1, 32), (2, 7, 32)]:
        x = torch.randn(shape, dtype=torch.bfloat16)
        with torch.inference_mode():
            assert torch.equal(model["down"](model["up"](x)), plain["down"](plain["up"](x)))

    a, b = torch.randn(4, 32), torch.randn(48, 4) / 4
    slots = [LoraSlots(m, torch.float32, torch.device("cpu")) for m in (plain, model)]
    for lora in slots:
        lora.add({"up": (a, b)})
    x = torch.randn(2, 3, 32, dtype=torch.bfloat16)
    with torch.inference_mode():
        outs = []
        for lora, m in zip(slots, (plain, model)):
            with lora.route([1, 0]):
                outs.append(m["up"](x))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[1][0], plain["up"](x[0])), "the adapter changed row 0"


def test_bf16_weights_of_plain_or_fused_layers_are_packed_and_a_tied_one_stays_for_its_other_holder():
    tied = nn.Linear(8, 16, bias=False).bfloat16()
    embedding = nn.Embedding(16, 8).bfloat16()
    embedding.weight = tied.weight
    fused = FusedLinear([nn.Linear(8, 8).bfloat16(), nn.Linear(8, 4).bfloat16()])
    model = nn.ModuleDict({
        "embed": embedding, "head": tied, "fp32": nn.Linear(8, 8), "fused": fused,
        "subclass": type("Quantized", (nn.Linear,), {})(8, 8).bfloat16(),
    })
    x, ids = torch.randn(2, 8, dtype=torch.bfloat16), torch.tensor([3, 15])
    want, want_head, want_embedded = fused(x), tied(x), embedding(ids)

    assert pack_linears(model, [fused]) == 2
    assert model["fused"] is fused and fused.weight.is_mkldnn
    assert torch.equal(fused(x), want)
    assert isinstance(model["head"], PackedLinear) and torch.equal(model["head"](x), want_head)
    assert embedding.weight is tied.weight and torch.equal(embedding(ids), want_embedded), "the lookup keeps its weight"
    assert type(model["fp32"]) is nn.Linear and type(model["subclass"]).__name__ == "Quantized"


def test_a_bf16_runtime_serves_packed_weights_and_decodes_as_the_row_major_one(tiny_model_dir, tmp_path):
    config = EngineConfig(base_model=str(tiny_model_dir), quantization="none", dtype=torch.bfloat16,
                          cuda_graphs=False)
    runtimes = [Runtime.load(config, packed_weights=p) for p in (True, False)]
    packed_layers = [m for m in runtimes[0].model.modules() if getattr(m, "weight", None) is not None
                     and m.weight.is_mkldnn]
    layers = runtimes[0].model.config.num_hidden_layers
    assert len(packed_layers) == 4 * layers + 1, "q/k/v, o, gate/up and down of every layer, and the head"
    assert runtimes[0].info.linear_shapes == runtimes[1].info.linear_shapes
    assert not any(getattr(m, "weight", torch.empty(0)).is_mkldnn for m in runtimes[1].model.modules())

    bundles = [make_bundle(tiny_model_dir, tmp_path / "all", seed=1, r=4),
               make_bundle(tiny_model_dir, tmp_path / "some", seed=2, r=16, target_modules=["o_proj", "down_proj"])]
    assert_decode_alike(runtimes, bundles, tol=1e-3)


def test_fp32_runtime_packs_nothing(tiny_model_dir):
    rt = Runtime.load(EngineConfig(base_model=str(tiny_model_dir), quantization="none", dtype=torch.float32,
                                   cuda_graphs=False))
    assert not any(getattr(m, "weight", torch.empty(0)).is_mkldnn for m in rt.model.modules())
    assert rt.lora._merged is None, "nothing packed: nothing to fold adapters into"
