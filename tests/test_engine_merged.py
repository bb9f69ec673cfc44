"""An adapter with the batch to itself, folded into packed bf16 weights: when it is folded, what it serves,
and when it is let go."""
from __future__ import annotations

import logging
from functools import partial

import pytest
import torch
from torch import nn

from bot.engine import EngineConfig
from bot.engine.local import packed
from bot.engine.local.adapters import prepare_adapter
from bot.engine.local.kvbatch import DecodeBatch
from bot.engine.local.lora import LoraSlots
from bot.engine.local.merged import MERGE_AFTER, MergedAdapter
from bot.engine.local.packed import pack_linears
from bot.engine.local.runtime import Runtime
from engine_fixtures import make_bundle
from test_engine_projections import CountOps

pytestmark = pytest.mark.skipif(not packed.available(), reason="this CPU build has no oneDNN bf16 kernels")


def _layers(free: int, after: int = 2, rate: float = float("inf")):
    torch.manual_seed(0)
    model = nn.ModuleDict({"up": nn.Linear(32, 48), "down": nn.Linear(48, 32)}).bfloat16()
    reference = {name: layer.weight.float() for name, layer in model.items()}
    pack_linears(model)
    merged = MergedAdapter(lambda: free, after=after, fold_bytes_per_s=rate)  # inf: no wait for the payback
    lora = LoraSlots(model, torch.float32, torch.device("cpu"), merged)
    seen = []  # the weight each forward of "up" ran with
    model["up"].register_forward_pre_hook(lambda m, _: seen.append(m.weight))
    return model, reference, lora, merged, seen


def test_one_adapter_is_folded_after_its_streak_and_only_inside_a_forward():
    model, reference, lora, merged, seen = _layers(free=2**40)
    own = model["up"].weight
    a, b = torch.randn(4, 32), torch.randn(48, 4) / 4
    slot = lora.add({"up": (a, b)})
    x = torch.randn(1, 3, 32, dtype=torch.bfloat16)
    want = (x.float() @ (reference["up"] + b @ a).T + model["up"].bias.float())

    outs = []
    with torch.inference_mode():
        for _ in range(4):
            with lora.route([slot]):
                outs.append(model["up"](x))
    assert [w is own for w in seen] == [True, True, False, False], "folded once 2 forwards in a row had it"
    assert merged.slot == slot and model["up"].weight is own, "outside a forward the layer has its own weight"
    assert torch.equal(seen[2].to_dense().float(),
                       (reference["up"] + b @ a).to(torch.bfloat16).float()), "W + B A, rounded once"
    for out in outs:
        torch.testing.assert_close(out.float(), want, atol=3e-2, rtol=3e-2)
    # folded serves what the LoRA path serves, to bf16's rounding of the output (1 unit in the last place)
    torch.testing.assert_close(outs[3].float(), outs[1].float(), atol=1e-2, rtol=1e-2)

    with torch.inference_mode():
        with lora.route([slot, 0]):
            model["up"](x.expand(2, 3, 32))
        with lora.route([slot]):
            model["up"](x)
    assert seen[4] is own and seen[5] is not own, "a mixed batch runs unfolded; the fold is kept for later"

    folded = seen[5]
    lora.remove(lora.add({"down": (torch.randn(4, 48), torch.randn(32, 4))}))
    with torch.inference_mode(), lora.route([slot]):
        model["up"](x)
    assert seen[6] is folded, "loading or freeing another slot leaves the fold as it is"

    lora.remove(slot)
    assert lora.add({"up": (a, -b)}) == slot
    with torch.inference_mode(), lora.route([slot]):
        model["up"](x)
    assert merged.slot is None and seen[7] is own, "new weights in the folded slot: the old fold is let go"


def test_a_fold_waits_until_the_streak_has_lasted_its_payback_time():
    model, _, lora, merged, seen = _layers(free=2**40, rate=3 * 1024 / 60)  # this 3 KiB copy: 1 min to fold
    slot = lora.add({"up": (torch.randn(4, 32), torch.randn(48, 4))})
    with torch.inference_mode():
        for _ in range(6):
            with lora.route([slot]):
                model["up"](torch.randn(1, 1, 32, dtype=torch.bfloat16))
    assert merged.slot is None and all(w is model["up"].weight for w in seen)


def test_no_fold_where_the_copy_does_not_fit_and_it_is_not_tried_again(caplog):
    model, _, lora, merged, seen = _layers(free=1000)
    slot = lora.add({"up": (torch.randn(4, 32), torch.randn(48, 4))})
    x = torch.randn(1, 1, 32, dtype=torch.bfloat16)
    with caplog.at_level(logging.INFO, logger="bot.engine.local.merged"), torch.inference_mode():
        for _ in range(5):
            with lora.route([slot]):
                model["up"](x)
    assert merged.slot is None and all(w is model["up"].weight for w in seen)
    refusals = [r.getMessage() for r in caplog.records if "stays unfolded" in r.getMessage()]
    assert len(refusals) == 1 and "half the free memory" in refusals[0]


def test_a_runtime_folds_a_lone_persona_and_decodes_as_the_lora_path(tiny_model_dir, tmp_path):
    config = EngineConfig(base_model=str(tiny_model_dir), quantization="none", dtype=torch.bfloat16,
                          cuda_graphs=False)
    runtimes = {m: Runtime.load(config, merge=m) for m in (True, False)}
    bundles = [make_bundle(tiny_model_dir, tmp_path / "all", seed=1, r=8),
               make_bundle(tiny_model_dir, tmp_path / "some", seed=2, r=4, target_modules=["q_proj", "down_proj"])]
    slots = {m: [rt.add_adapter(prepare_adapter(b.name, b, rt.info)) for b in bundles] for m, rt in runtimes.items()}
    assert slots[True] == slots[False]
    one = slots[True][0]
    with torch.inference_mode():
        batches = {m: DecodeBatch.prefill(partial(rt.forward, slots=[one]), [[5, 6, 7, 8]], {}, rt.pad_id, rt.device)
                   for m, rt in runtimes.items()}
        logits = {m: out for m, (_, out) in batches.items()}
        ops = {}
        for step in range(MERGE_AFTER + 3):
            torch.testing.assert_close(logits[True], logits[False], atol=5e-2, rtol=5e-2)
            tokens = logits[False].argmax(-1)
            for m, rt in runtimes.items():
                with CountOps() as count:
                    logits[m] = rt.decode(batches[m][0], [one], tokens)
                ops[m] = sum(count.ops.values())
        assert runtimes[True].lora._merged.slot == one
        assert ops[True] < ops[False] - 4 * runtimes[True].model.config.num_hidden_layers, "no LoRA matmuls folded"

    rt = runtimes[True]
    rt.delete_adapter(one)
    assert rt.add_adapter(prepare_adapter(bundles[1].name, bundles[1], rt.info)) == one
    with torch.inference_mode():
        rt.decode(batches[True][0], [one], tokens)
    assert rt.lora._merged.slot is None, "another adapter in the folded slot: the fold is let go"
