"""Fused kernels in the served model: kept only when the logits stay the same, otherwise undone exactly.

Liger's kernels need a CUDA GPU, so on a CPU stand-in patches do what Liger's does to a Llama: bind a new
``forward`` on module instances and rebind a function of the modeling file for the whole process (which
conftest puts back after each test).
"""
from __future__ import annotations

from types import MethodType

import pytest
import torch
from transformers.models.llama import modeling_llama

from bot.engine import EngineConfig, EngineError
from bot.engine.local.liger import CHECK_TEXT, apply_checked, apply_liger
from bot.engine.local.runtime import Runtime
from finetune.model import EMBEDDED_DEFAULT, load_model, load_tokenizer, resolve


@pytest.fixture
def model(tiny_model_dir):
    return load_model(resolve(str(tiny_model_dir)), "none", torch.float32).eval()


IDS = torch.tensor([[3, 7, 11, 19, 23, 5]])


def logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=IDS, use_cache=False).logits


def rms_norm(self, x: torch.Tensor) -> torch.Tensor:
    """The same computation as Llama's RMSNorm, written another way."""
    x32 = x.float()
    return self.weight * (x32 / (x32.square().mean(-1, keepdim=True) + self.variance_epsilon).sqrt()).to(x.dtype)


def attributes(model) -> dict[str, dict]:
    """Every module's instance attributes (what a patch binds or sets), by module name."""
    return {name: dict(vars(m)) for name, m in model.named_modules()}


def norms(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]


def faithful(model) -> None:
    rope = modeling_llama.apply_rotary_pos_emb
    for norm in norms(model):
        norm.forward = MethodType(rms_norm, norm)
    modeling_llama.apply_rotary_pos_emb = lambda q, k, cos, sin, unsqueeze_dim=1: rope(q, k, cos, sin, unsqueeze_dim)


def wrong(model) -> None:
    faithful(model)
    norms(model)[1].forward = MethodType(lambda self, x: 2 * rms_norm(self, x), norms(model)[1])


def failing(model) -> None:
    faithful(model)
    norms(model)[-1].forward = MethodType(lambda self, x: torch.ops.aten.nonexistent_op(x), norms(model)[-1])


def test_a_patch_that_keeps_the_logits_is_kept(model):
    before = logits(model)
    original_rope = modeling_llama.apply_rotary_pos_emb
    assert apply_checked(model, faithful, IDS) is None
    assert all("forward" in vars(norm) for norm in norms(model))
    assert modeling_llama.apply_rotary_pos_emb is not original_rope
    torch.testing.assert_close(logits(model), before)


@pytest.mark.parametrize("patch, why", [(wrong, "change the logits by"), (failing, "the fused kernels failed")])
def test_a_patch_that_changes_the_logits_or_fails_is_undone_exactly(model, patch, why):
    before = logits(model)
    instance_attrs = attributes(model)
    original_rope = modeling_llama.apply_rotary_pos_emb
    assert why in apply_checked(model, patch, IDS)
    assert modeling_llama.apply_rotary_pos_emb is original_rope
    assert attributes(model) == instance_attrs
    assert torch.equal(logits(model), before)


def test_a_patch_that_changes_nothing_says_so(model):
    assert apply_checked(model, lambda m: None, IDS) == "there are no fused kernels for model type 'llama'"


@pytest.mark.slow
def test_on_smollm2_in_bf16_the_check_keeps_a_rounding_level_change_and_undoes_a_wrong_rope():
    ref = resolve(EMBEDDED_DEFAULT)
    model = load_model(ref, "none", torch.bfloat16).eval()
    ids = load_tokenizer(ref)(CHECK_TEXT, return_tensors="pt").input_ids
    assert apply_checked(model, faithful, ids) is None
    rope = modeling_llama.apply_rotary_pos_emb

    def rope_turning_the_wrong_way(model) -> None:
        modeling_llama.apply_rotary_pos_emb = lambda q, k, cos, sin, unsqueeze_dim=1: rope(q, k, cos, -sin)

    assert "change the logits" in apply_checked(model, rope_turning_the_wrong_way, ids)
    assert modeling_llama.apply_rotary_pos_emb is rope


_LIGER_CHECK = """
import sys
import torch
from liger_kernel.transformers import apply_liger_kernel_to_llama
from transformers.models.llama import modeling_llama
from bot.engine.local.liger import CHECK_TEXT, apply_checked, liger_patch
from finetune.model import load_model, load_tokenizer, resolve

ref = resolve(sys.argv[1])
model = load_model(ref, "none", torch.float32).eval()
ids = load_tokenizer(ref)(CHECK_TEXT, return_tensors="pt").input_ids
names = {n: getattr(modeling_llama, n) for n in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP")}
attrs = {n: dict(vars(m)) for n, m in model.named_modules()}
with torch.inference_mode():
    before = model(input_ids=ids).logits

# all of the engine's kernels: the interpreter cannot run Liger's RMSNorm and SwiGLU, so the check fails
why = apply_checked(model, liger_patch, ids)
assert why.startswith("the fused kernels failed"), why
assert all(getattr(modeling_llama, n) is v for n, v in names.items())
assert {n: dict(vars(m)) for n, m in model.named_modules()} == attrs
with torch.inference_mode():
    assert torch.equal(model(input_ids=ids).logits, before)

# Liger's RoPE alone runs there, passes, and stays
rope_only = dict(rope=True, rms_norm=False, swiglu=False, cross_entropy=False, fused_linear_cross_entropy=False)
assert apply_checked(model, lambda m: apply_liger_kernel_to_llama(model=m, **rope_only), ids) is None
assert modeling_llama.apply_rotary_pos_emb.__module__.startswith("liger_kernel")
print("ok")
"""


def test_liger_under_tritons_cpu_interpreter_is_undone_when_it_fails_and_kept_when_it_passes(tiny_model_dir,
                                                                                           run_python):
    """Liger's own patch, not a stand-in: Triton's CPU interpreter runs its RoPE kernel (in a process of its
    own: Liger rebinds functions process-wide)."""
    pytest.importorskip("liger_kernel")
    out = run_python(_LIGER_CHECK, str(tiny_model_dir), TRITON_INTERPRET="1")
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="what a machine without CUDA does")
def test_without_cuda_auto_leaves_the_model_alone_and_asking_for_them_is_a_clear_error(model, tiny_tokenizer):
    instance_attrs = attributes(model)
    assert apply_liger(model, "auto", tiny_tokenizer) is False and apply_liger(model, False, tiny_tokenizer) is False
    with pytest.raises(EngineError, match="FUSED_KERNELS=true needs"):
        apply_liger(model, True, tiny_tokenizer)
    assert attributes(model) == instance_attrs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_liger_kernels_pass_their_check_in_the_served_model(tiny_model_dir, dtype):
    pytest.importorskip("liger_kernel")
    runtime = Runtime.load(EngineConfig(base_model=str(tiny_model_dir), quantization="none", dtype=dtype, fused_kernels=True))
    assert runtime.fused_kernels
    assert any(type(m).__name__ == "LlamaRMSNorm" and "forward" in vars(m) for m in runtime.model.modules())
