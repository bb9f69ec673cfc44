"""Variable-length attention for packed rows: same loss and gradients as SDPA's block mask, used only
where it passed its check. On a CPU torch's flash kernel cannot run, so its stand-in is the same
computation as a loop of causal SDPA calls (``reference_kernel``); the real kernel runs in the GPU test."""
from __future__ import annotations

import pytest
import torch

from finetune import attention
from finetune.attention import VARLEN, check_kernel, packed_attention, reference_kernel, torch_varlen
from finetune.config import ConfigError
from finetune.dataset import IGNORE, make_collator

CONVERSATIONS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17, 18, 19, 20, 21, 22]]


def _batch(boundaries: bool) -> dict:
    rows = [{"input_ids": ids, "labels": [IGNORE] * 2 + ids[2:]} for ids in CONVERSATIONS]
    return make_collator(None, packing=True, boundaries=boundaries)(rows)


def test_the_collator_marks_where_each_conversation_starts():
    batch = _batch(boundaries=True)
    assert batch["cu_seq_lens_q"].tolist() == [0, 6, 9, 18] and batch["max_length_q"] == 9
    assert batch["position_ids"][0, 6].item() == 0 and "cu_seq_lens_q" not in _batch(boundaries=False)


def _loss_and_grads(model_dir, implementation: str) -> tuple[float, list[torch.Tensor]]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=implementation)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    batch = _batch(boundaries=implementation == VARLEN)
    loss = model(**batch, use_cache=False).loss  # as PersonaTrainer calls it (a cache hides the packing)
    loss.backward()
    return loss.item(), [p.grad for p in model.parameters() if p.requires_grad]


def test_varlen_attention_trains_exactly_like_sdpa_with_its_block_mask(tiny_model_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(attention, "kernel", lambda *a: calls.append(a[3].tolist()) or reference_kernel(*a))
    attention.register()
    loss, grads = _loss_and_grads(tiny_model_dir, VARLEN)
    assert calls == [[0, 6, 9, 18]] * 2, "every layer attends per conversation through the kernel"
    sdpa_loss, sdpa_grads = _loss_and_grads(tiny_model_dir, "sdpa")
    assert loss == pytest.approx(sdpa_loss, rel=1e-5)
    for a, b in zip(grads, sdpa_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_the_check_accepts_the_computation_and_rejects_attention_across_conversations():
    assert check_kernel(reference_kernel, torch.device("cpu"), torch.float32) < 1e-5

    def whole_row(q, k, v, cu, longest, scale):  # ignores the boundaries: one causal sequence
        everything = torch.tensor([0, q.shape[0]], dtype=torch.int32)
        return reference_kernel(q, k, v, everything, q.shape[0], scale)

    assert check_kernel(whole_row, torch.device("cpu"), torch.float32) > 0.1


@pytest.mark.skipif(torch.cuda.is_available(), reason="what a machine without CUDA does")
def test_without_cuda_packed_rows_keep_sdpa_and_asking_for_varlen_is_a_clear_error():
    assert packed_attention("auto") == packed_attention(False) == "sdpa"
    with pytest.raises(ConfigError, match="train.varlen_attention: true needs a CUDA GPU"):
        packed_attention(True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_torch_varlen_kernel_passes_its_check():
    kernel = torch_varlen()
    assert kernel is not None, "this torch has no torch.nn.attention.varlen"
    assert check_kernel(kernel, torch.device("cuda"), torch.bfloat16) < 0.02
    assert packed_attention("auto") == VARLEN


def test_training_uses_varlen_attention_where_it_passed_its_check(tiny_persona, tiny_model_dir, tmp_path, monkeypatch):
    """The recipe end to end with the kernel stand-in: the collator's boundaries reach every layer."""
    from finetune import train as recipe
    from finetune.bundle import load_manifest
    from test_train import _config

    calls = []

    def checked(setting):
        assert setting == "auto"
        monkeypatch.setattr(attention, "kernel", lambda *a: calls.append(a[3].shape) or reference_kernel(*a))
        attention.register()
        return VARLEN

    monkeypatch.setattr(recipe, "packed_attention", checked)
    out = tmp_path / "bundle"
    recipe.train(_config(tiny_persona, tiny_model_dir, out, "train.max_steps=2"))
    assert load_manifest(out).training.attention == VARLEN
    assert len(calls) >= 2 * 2 * 2 and all(shape[0] == 8 + 1 for shape in calls[:4]), "8 conversations a row"
