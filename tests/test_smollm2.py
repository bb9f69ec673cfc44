"""The real pipeline on the embedded SmolLM2-135M-Instruct: a short QLoRA run lowers held-out loss."""
from __future__ import annotations

import pytest

from finetune.config import load_config
from finetune.evaluate import evaluate_bundle
from finetune.inference import load_bundle_model
from finetune.train import train

from conftest import REPO

pytestmark = pytest.mark.slow


def test_short_training_on_captain_brine_lowers_heldout_loss(tmp_path):
    out = tmp_path / "brine"
    cfg = load_config(REPO / "finetune/recipes/demo.yaml", [
        f"persona={REPO / 'persona_data/captain_brine'}", f"output_dir={out}",
        "train.max_steps=10", "train.batch_size=4", "train.learning_rate=5e-4", "train.eval_steps=100",
        "train.save_steps=100", "data.max_seq_len=256",
    ])
    train(cfg)
    model, tokenizer, manifest = load_bundle_model(out, cfg.quantization)
    assert manifest.base_model == "smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"
    report = evaluate_bundle(model, tokenizer, manifest, samples=0, max_seq_len=256)
    assert report.examples >= 25
    assert report.adapter_loss < report.base_loss - 0.2, (report.base_loss, report.adapter_loss)
