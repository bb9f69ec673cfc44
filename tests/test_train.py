"""The training recipe end to end on the tiny model: bundle contents, learning, resume, atomic save, NF4."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from finetune.bundle import ADAPTER_FILES, MANIFEST, BundleError, check_compatible, load_manifest, write_atomically
from finetune.config import load_config
from finetune.evaluate import evaluate_bundle
from finetune.inference import load_bundle_model, reply
from finetune.train import train


def _config(persona: Path, model: Path, out: Path, *extra: str):
    return load_config(None, [
        f"persona={persona}", f"base_model={model}", f"output_dir={out}", "quantization=none",
        "data.max_seq_len=128", "train.batch_size=8", "train.learning_rate=5e-3", "train.logging_steps=1",
        "train.eval_steps=5", "train.save_steps=5", "train.gradient_checkpointing=false", *extra,
    ])


def test_train_writes_a_bundle_that_learned_the_persona(tiny_persona, tiny_model_dir, tmp_path):
    out = tmp_path / "bundle"
    train(_config(tiny_persona, tiny_model_dir, out, "train.epochs=6"))
    for name in (*ADAPTER_FILES, MANIFEST, "tokenizer.json"):
        assert (out / name).is_file(), name
    manifest = load_manifest(out)
    assert manifest.name == "Brine" and manifest.system_prompt == "You are Brine."
    assert manifest.base_model == "model" and manifest.base_fingerprint["hidden_size"] == 64
    assert manifest.chat_template.startswith("{% for message in messages %}")
    assert manifest.sampling.max_new_tokens == 12
    assert manifest.training.steps > 0 and len(manifest.data_hash) == 64
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    wrapped = {name.rsplit(".", 1)[-1] for name in adapter_cfg["target_modules"]}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not list(tmp_path.glob(".bundle.*")), "no temp folders left behind"

    model, tok, manifest = load_bundle_model(out, "none")
    report = evaluate_bundle(model, tok, manifest, samples=2)
    assert report.adapter_loss < report.base_loss - 0.5
    assert (report.base_style, report.adapter_style) == (0.0, 1.0)
    assert reply(model, tok, manifest, [{"role": "user", "content": "tell me about the storm"}]).startswith("Arr,")


def test_train_without_packing_pads_each_batch_and_learns(tiny_persona, tiny_model_dir, tmp_path):
    out = tmp_path / "bundle"
    train(_config(tiny_persona, tiny_model_dir, out, "train.epochs=6", "data.packing=false"))
    report = evaluate_bundle(*load_bundle_model(out, "none"), samples=0)
    assert report.adapter_loss < report.base_loss - 0.5


class _Crash(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 7:
            raise KeyboardInterrupt("simulated crash")


def test_resume_after_interrupted_run(tiny_persona, tiny_model_dir, tmp_path):
    out = tmp_path / "bundle"
    cfg = _config(tiny_persona, tiny_model_dir, out, "train.max_steps=10")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, callbacks=[_Crash()])
    assert not out.exists(), "a crashed run must not leave a bundle"
    assert (cfg.checkpoints / "checkpoint-5").is_dir()
    train(cfg, resume=True)
    training = load_manifest(out).training
    assert training.steps == 10
    state = json.loads((cfg.checkpoints / "checkpoint-10" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e][:1] == [1]  # history carried over


def test_resume_without_checkpoint_is_a_clear_error(tiny_persona, tiny_model_dir, tmp_path):
    from finetune.config import ConfigError

    cfg = _config(tiny_persona, tiny_model_dir, tmp_path / "b", "train.max_steps=1")
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(cfg, resume=True)


def test_fused_kernels_setting(tiny_persona, tiny_model_dir, tmp_path):
    """'auto' turns Liger on only where it runs (CUDA + liger-kernel); forcing it without CUDA says why."""
    from finetune.config import ConfigError
    from finetune.train import training_args

    cfg = _config(tiny_persona, tiny_model_dir, tmp_path / "b")
    expected = torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None
    assert training_args(cfg, has_eval=True).use_liger_kernel is expected
    assert training_args(cfg.model_copy(update={"train": cfg.train.model_copy(update={"fused_kernels": False})}),
                         has_eval=True).use_liger_kernel is False
    if not torch.cuda.is_available():
        forced = load_config(None, [f"persona={tiny_persona}", "output_dir=x", "train.fused_kernels=true"])
        with pytest.raises(ConfigError, match="train.fused_kernels: true needs"):
            training_args(forced, has_eval=True)


@pytest.mark.parametrize("setting, recomputed", [("true", [True, True]), ("2", [True, False]),
                                                  ("false", [False, False])])
def test_gradient_checkpointing_every_nth_layer(tiny_persona, tiny_model_dir, tmp_path, setting, recomputed):
    """A checkpointed layer runs its forward again in the backward pass; gradients reach every layer's LoRA."""
    from finetune.model import load_model, resolve
    from finetune.train import add_lora

    cfg = _config(tiny_persona, tiny_model_dir, tmp_path, f"train.gradient_checkpointing={setting}")
    model = add_lora(load_model(resolve(str(tiny_model_dir)), "none"), cfg).train()
    layers = model.base_model.model.model.layers
    calls = [0] * len(layers)
    for i, layer in enumerate(layers):  # the recompute calls the layer's forward, which calls its norm again
        layer.input_layernorm.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    model(input_ids=ids, labels=ids).loss.backward()
    assert [n == 2 for n in calls] == recomputed and all(n in (1, 2) for n in calls)
    for layer in layers:
        assert layer.self_attn.q_proj.lora_B["default"].weight.grad.abs().sum() > 0  # (A's is 0 while B is 0)


def test_atomic_save_keeps_the_old_bundle_on_crash(tmp_path):
    out = tmp_path / "bundle"
    write_atomically(out, lambda d: (d / "adapter_model.safetensors").write_text("v1"))

    def crash(d: Path) -> None:
        (d / "adapter_model.safetensors").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomically(out, crash)
    assert (out / "adapter_model.safetensors").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    write_atomically(out, lambda d: (d / "adapter_model.safetensors").write_text("v2"))
    assert (out / "adapter_model.safetensors").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_nf4_qlora_path_on_cpu(tiny_persona, tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    from finetune.model import load_model, resolve

    base = load_model(resolve(str(tiny_model_dir)), "nf4")
    assert base.is_loaded_in_4bit
    q = base.model.layers[0].self_attn.q_proj
    assert isinstance(q, bnb.nn.Linear4bit) and q.weight.quant_type == "nf4"
    assert q.weight.quant_state.nested  # double quantization
    out = tmp_path / "bundle"
    seen = _SeesModel()
    train(_config(tiny_persona, tiny_model_dir, out, "quantization=nf4", "train.max_steps=3",
                  "train.gradient_checkpointing=true"), callbacks=[seen])
    assert seen.checkpointing
    assert seen.trainable == {torch.float32} and torch.float32 not in seen.frozen  # no fp32 upcast of frozen weights
    manifest = load_manifest(out)
    assert manifest.training.quantization == "nf4"
    from safetensors.torch import load_file

    lora_b = [w for name, w in load_file(out / "adapter_model.safetensors").items() if "lora_B" in name]
    assert lora_b and all(w.abs().sum() > 0 for w in lora_b)  # B starts at zero: gradients reached every layer
    model, tok, manifest = load_bundle_model(out, "nf4")
    assert isinstance(reply(model, tok, manifest, [{"role": "user", "content": "hi"}]), str)


class _SeesModel(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.checkpointing = model.is_activation_checkpointing
        self.trainable = {p.dtype for p in model.parameters() if p.requires_grad}
        self.frozen = {p.dtype for p in model.parameters() if not p.requires_grad}


def test_bundle_for_another_base_is_refused(tiny_persona, tiny_model_dir, tmp_path):
    out = tmp_path / "bundle"
    train(_config(tiny_persona, tiny_model_dir, out, "train.max_steps=1"))
    manifest = load_manifest(out)
    with pytest.raises(BundleError, match="trained on base model 'model'"):
        check_compatible(manifest, out, "other-model", manifest.base_fingerprint)
    with pytest.raises(BundleError, match="hidden_size: bundle 64 vs served 128"):
        check_compatible(manifest, out, "model", manifest.base_fingerprint | {"hidden_size": 128})
    (out / MANIFEST).write_text(json.dumps({"name": "x"}))
    with pytest.raises(BundleError, match="persona.json: field 'base_model'"):
        load_manifest(out)


def test_train_from_a_png_character_card(tiny_model_dir, tmp_path):
    from cards import write_card_png

    examples = "\n".join(
        f"<START>\n{{{{user}}}}: what about the {w}?\n{{{{char}}}}: Arr, the {w} be fine, lad." for w in
        ["tide", "storm", "fish", "boat", "sea", "salt", "wave", "gull", "deck", "mast", "sail"]
    )
    card = {"spec": "chara_card_v2", "spec_version": "2.0", "data": {
        "name": "Brine", "description": "{{char}} keeps a lighthouse.", "personality": "gruff",
        "scenario": "", "first_mes": "Arr, who goes there?", "mes_example": examples,
        "alternate_greetings": ["Harrumph. Visitors."],
    }}
    write_card_png(card, tmp_path / "brine.png")
    out = tmp_path / "bundle"
    train(_config(tmp_path / "brine.png", tiny_model_dir, out, "train.max_steps=2", "data.max_seq_len=256"))
    manifest = load_manifest(out)
    assert manifest.name == "Brine"
    assert "Brine keeps a lighthouse." in manifest.system_prompt and "gruff" in manifest.system_prompt
    assert manifest.training.data["conversations"] == 13  # 11 examples + 2 greetings


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_qlora_on_cuda(tiny_persona, tiny_model_dir, tmp_path):
    out = tmp_path / "bundle"
    train(_config(tiny_persona, tiny_model_dir, out, "quantization=nf4", "train.max_steps=3",
                  "train.gradient_checkpointing=true"))
    training = load_manifest(out).training
    assert training.quantization == "nf4"
    assert training.fused_kernels is (importlib.util.find_spec("liger_kernel") is not None)
    model, tok, manifest = load_bundle_model(out, "nf4")
    assert model.device.type == "cuda"
    assert isinstance(reply(model, tok, manifest, [{"role": "user", "content": "hi"}]), str)
