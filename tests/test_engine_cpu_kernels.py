"""The CPU kernels (``cpu_kernels``): built here, the LoRA kernel adds the same terms the torch ops do, in one call.

The attention kernels have their own tests (``test_engine_attention_cpu``)."""
from __future__ import annotations

import logging

import pytest
import torch

from bot.engine.local import cpu_kernels
from bot.engine.local.lora import LoraSlots
from bot.engine.local.projections import fuse_projections
from engine_fixtures import CountOps


@pytest.fixture(scope="module")
def kernel(built_kernels):
    return built_kernels.lora_add


def reference(out, x, slots, a, b, splits):
    """out + x A[s].T B[s] in fp32 (B transposed: [slots, parts*r, out]), rounded once to out's dtype."""
    rank = a.shape[1] // len(splits)
    term = torch.zeros(out.shape, dtype=torch.float32)
    start = 0
    for part, size in enumerate(splits):
        ranks = slice(part * rank, (part + 1) * rank)
        for row, slot in enumerate(slots.tolist()):
            hidden = a[slot, ranks].float() @ x[row].float()
            term[row, start:start + size] = hidden @ b[slot, ranks, start:start + size].float()
        start += size
    return (out.float() + term).to(out.dtype)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5])
def test_the_kernel_adds_each_rows_adapter_term_for_every_part(kernel, out_dtype, weight_dtype, rows):
    """Parts of several widths (one wider than a chunk of 128 columns, one not a multiple of it), a zero slot,
    odd sizes, and rows sharing an adapter."""
    torch.manual_seed(0)
    splits, rank, fan_in, slots_n = [200, 24, 131], 6, 37, 4
    a = torch.randn(slots_n, len(splits) * rank, fan_in).to(weight_dtype)
    b = torch.zeros(slots_n, len(splits) * rank, sum(splits))
    start = 0
    for part, size in enumerate(splits):  # block-diagonal, as the slots keep it
        b[:, part * rank:(part + 1) * rank, start:start + size] = torch.randn(slots_n, rank, size) / 4
        start += size
    b = b.to(weight_dtype)
    a[0], b[0] = 0, 0
    x = torch.randn(rows, fan_in).to(out_dtype)
    slots = torch.tensor([3, 0, 1, 3, 2][:rows])
    out = torch.randn(rows, sum(splits)).to(out_dtype)
    want = reference(out, x, slots, a, b, splits)
    kernel(out, x, slots, a, b, splits)
    if out_dtype == torch.float32:
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    else:  # fp32 sums in another order: at most one bf16 step apart
        assert (out.float() - want.float()).abs().le(want.float().abs() * 2**-7 + 1e-6).all()
        assert torch.equal(out[1], want[1]) if rows > 1 else True, "a row on slot 0 is left as it was"


def test_the_kernel_refuses_shapes_it_cannot_read(kernel):
    a, b = torch.zeros(2, 4, 8), torch.zeros(2, 4, 6)
    with pytest.raises(RuntimeError, match="splits must sum"):
        kernel(torch.zeros(1, 6), torch.zeros(1, 8), torch.tensor([1]), a, b, [5])
    with pytest.raises(RuntimeError, match="of one dtype"):
        kernel(torch.zeros(1, 6), torch.zeros(1, 8, dtype=torch.bfloat16), torch.tensor([1]), a, b, [6])
    with pytest.raises(RuntimeError, match="one int64 slot per row"):
        kernel(torch.zeros(1, 6), torch.zeros(1, 8), torch.tensor([1], dtype=torch.int32), a, b, [6])


@pytest.mark.parametrize("mixed", [True, False], ids=["one adapter per row", "one adapter"])
def test_a_decode_step_adds_its_lora_terms_with_the_kernel(kernel, tiny_model_dir, mixed):
    """The slots route a decode step's fused q/k/v, o, gate/up and down layers through the kernel (no matmul of
    the LoRA's own), and the logits match the torch ops' path; a prefill keeps the torch ops."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    targets = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    shapes = {name: (module.in_features, module.out_features) for name, module in model.named_modules()
              if name.split(".")[-1] in targets}
    fuse_projections(model)
    torch.manual_seed(1)
    adapters = [{path: (torch.randn(4, fan_in) / 8, torch.randn(fan_out, 4) / 8)
                 for path, (fan_in, fan_out) in shapes.items()} for _ in range(2)]
    lora = LoraSlots(model, torch.float32, torch.device("cpu"), kernel=kernel)
    slots = [lora.add(a) for a in adapters]
    ids = torch.randint(0, model.config.vocab_size, (3, 1))
    rows = [slots[0], 0, slots[1]] if mixed else [slots[1]] * 3
    with torch.inference_mode():
        base = model(ids).logits
        with lora.route(rows), CountOps() as count:
            fast = model(ids).logits
        layers = model.config.num_hidden_layers
        assert count.ops["personabot.lora_add"] == 4 * layers
        assert count.ops["aten.linear"] == 4 * layers + 1, "the base's fused layers and the head only"
        assert not {"aten.bmm", "aten.baddbmm_", "aten.addmm_", "aten.mm", "aten.matmul"} & set(count.ops)
        lora._kernel = None  # the same slots through the torch ops
        with lora.route(rows):
            slow = model(ids).logits
        lora._kernel = kernel
        with lora.route(rows), CountOps() as count:
            model(torch.randint(0, model.config.vocab_size, (3, 5)))
        assert "personabot.lora_add" not in count.ops, "a prefill's rows read their weights once, as matmuls"
    assert not torch.equal(fast[0], base[0])
    if mixed:
        assert torch.equal(fast[1], base[1]), "the row on slot 0 runs the base alone"
    torch.testing.assert_close(fast, slow, rtol=0, atol=2 * float(slow.abs().max()) * 2**-8)


def test_where_the_kernel_cannot_be_built_the_engine_says_why_and_keeps_torch_ops(monkeypatch, caplog):
    import torch.utils.cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension\nc++: command not found")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    cpu_kernels.build.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            assert cpu_kernels.load() is None
    finally:
        cpu_kernels.build.cache_clear()
    assert ("lora_cpu.cpp, attention_cpu.cpp, norm_cpu.cpp: the CPU kernels could not be built (c++: command not "
            "found)" in caplog.text)
    assert "apt-get install g++" in caplog.text


def test_a_build_lock_left_by_a_killed_build_is_removed_and_a_live_one_kept(tmp_path):
    """torch's builder waits on an existing lock forever: a bot killed while compiling would hang every start."""
    import os
    import time

    lock = tmp_path / "lock"
    lock.touch()
    cpu_kernels.clear_stale_lock(tmp_path)
    assert lock.exists(), "a build in progress holds it"
    old = time.time() - cpu_kernels.STALE_LOCK_S - 1
    os.utime(lock, (old, old))
    cpu_kernels.clear_stale_lock(tmp_path)
    assert not lock.exists()
    cpu_kernels.clear_stale_lock(tmp_path)  # nothing there: nothing to do
