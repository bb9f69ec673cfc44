"""Merge an adapter into a full-precision copy of its base, for vLLM / llama.cpp users."""
from __future__ import annotations

from pathlib import Path

import torch

from .bundle import check_compatible, load_manifest, save_bundle
from .model import fingerprint, load_model, load_tokenizer, resolve


def export_merged(bundle_dir: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Load the base unquantized (merging into 4-bit weights would lose precision), merge, save atomically.

    The output keeps ``persona.json`` so the merged model still carries its system prompt and sampling.
    """
    from peft import PeftModel

    manifest = load_manifest(bundle_dir)
    ref = resolve(manifest.base_model_spec)
    base = load_model(ref, quantization="none", dtype=dtype, device_map="cpu")
    check_compatible(manifest, bundle_dir, ref.name, fingerprint(base.config))
    merged = PeftModel.from_pretrained(base, str(bundle_dir)).merge_and_unload()
    tokenizer = load_tokenizer(ref)
    tokenizer.chat_template = manifest.chat_template
    return save_bundle(merged, tokenizer, manifest, out_dir)  # full weights instead of adapter files
