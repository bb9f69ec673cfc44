"""Read and check an adapter bundle before it goes near the served model.

All of this runs on a helper thread beside the decode loop: reading and checking a bundle never
pauses generation, and a bad bundle is rejected before the model is touched, so the adapter already
serving under that name keeps serving.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors import SafetensorError
from safetensors.torch import load_file

from finetune.bundle import ADAPTER_FILES, BundleError, Manifest, check_compatible, load_manifest

from ..base import EngineError
from .lora import LoraWeights
from .projections import Part

_PREFIX = "base_model.model."


@dataclass(frozen=True)
class BaseInfo:
    """What a bundle is checked against: the served base's identity, shape and linear layers."""

    name: str
    fingerprint: dict[str, int | str]
    linear_shapes: dict[str, tuple[int, int]]
    """module path -> (in_features, out_features) of every linear layer a LoRA could target."""
    device: torch.device
    dtype: torch.dtype
    """what LoRA weights are kept and computed in: the base's compute dtype on a GPU, fp32 on a CPU."""


@dataclass(frozen=True)
class PreparedAdapter:
    """A checked bundle with its LoRA weights scaled, cast and already on the model's device."""

    bundle_dir: Path
    manifest: Manifest
    weights: LoraWeights


def linear_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """The layers a bundle may target: the model's linear layers (a fused projection's parts, not the fused
    layer, since bundles name the layers they were trained on)."""
    return {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, Part))
    }


def prepare_adapter(name: str, bundle_dir: Path, base: BaseInfo) -> PreparedAdapter:
    """Load a bundle's manifest, LoRA config and weights, or raise an EngineError naming what is wrong."""
    try:
        manifest = load_manifest(bundle_dir)
        check_compatible(manifest, bundle_dir, base.name, base.fingerprint)
    except BundleError as exc:
        raise EngineError(f"adapter '{name}': {exc}") from exc
    config = _lora_config(name, bundle_dir, manifest)
    path = bundle_dir / ADAPTER_FILES[1]
    try:
        tensors = load_file(path, device=str(base.device))
    except (SafetensorError, OSError) as exc:
        raise EngineError(f"adapter '{name}': {path}: unreadable weights: {exc}") from exc
    pairs = _pairs(name, path, tensors)
    _check_shapes(name, bundle_dir, pairs, base.linear_shapes)
    scale = config.lora_alpha / (config.r**0.5 if config.use_rslora else config.r)
    weights = {m: (a.to(base.dtype), (b * scale).to(base.dtype)) for m, (a, b) in pairs.items()}
    return PreparedAdapter(bundle_dir, manifest, weights)


def _lora_config(name: str, bundle_dir: Path, manifest: Manifest) -> LoraConfig:
    path = bundle_dir / ADAPTER_FILES[0]
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise EngineError(f"adapter '{name}': {path}: unreadable: {exc}") from exc
    if raw.get("peft_type") != "LORA":
        raise EngineError(f"adapter '{name}': {path}: peft_type {raw.get('peft_type')!r}, only LORA is served")
    try:
        config = LoraConfig.from_pretrained(str(bundle_dir))
    except (TypeError, ValueError) as exc:
        raise EngineError(f"adapter '{name}': {path}: invalid LoRA config: {exc}") from exc
    unsupported = [key for key in _UNSUPPORTED if getattr(config, key, None) not in (None, False, {}, [], "none")]
    if unsupported:
        raise EngineError(f"adapter '{name}': {path}: LoRA features the engine does not serve: "
                          f"{', '.join(unsupported)} (plain LoRA on linear layers only)")
    if config.r != manifest.lora.r:
        raise EngineError(
            f"adapter '{name}': {path}: rank r={config.r} but the manifest says r={manifest.lora.r} "
            "(the bundle's files come from different trainings)"
        )
    return config


_UNSUPPORTED = ("use_dora", "modules_to_save", "bias", "lora_bias", "fan_in_fan_out", "rank_pattern",
                "alpha_pattern", "target_parameters", "trainable_token_indices", "layer_replication", "use_qalora")


def _pairs(name: str, path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """module path -> [A, B] from peft's key names; anything else in the file is an error."""
    pairs: dict[str, list] = {}
    for key, tensor in tensors.items():
        for i, suffix in enumerate((".lora_A.weight", ".lora_B.weight")):
            if key.startswith(_PREFIX) and key.endswith(suffix):
                pairs.setdefault(key.removeprefix(_PREFIX).removesuffix(suffix), [None, None])[i] = tensor
                break
        else:
            raise EngineError(f"adapter '{name}': {path}: unsupported tensor '{key}' (plain LoRA only)")
    halves = [m for m, (a, b) in pairs.items() if a is None or b is None]
    if halves:
        raise EngineError(f"adapter '{name}': {path}: LoRA A or B missing for {halves[0]}")
    if not pairs:
        raise EngineError(f"adapter '{name}': {path}: no LoRA weights in the file")
    return pairs


def _check_shapes(
    name: str, bundle_dir: Path, pairs: dict[str, list[torch.Tensor]], shapes: dict[str, tuple[int, int]]
) -> None:
    """Every LoRA pair must sit on an existing linear layer of the served base, with matching sizes."""
    problems = []
    for module, (a, b) in pairs.items():
        if module not in shapes:
            problems.append(f"{module}: no such linear layer in the base model")
            continue
        fan_in, fan_out = shapes[module]
        if a.shape[1] != fan_in:
            problems.append(f"{module}: LoRA in_features {a.shape[1]}, base layer has {fan_in}")
        if b.shape[0] != fan_out:
            problems.append(f"{module}: LoRA out_features {b.shape[0]}, base layer has {fan_out}")
        if a.shape[0] != b.shape[1]:
            problems.append(f"{module}: LoRA A has rank {a.shape[0]} but B has {b.shape[1]}")
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise EngineError(f"adapter '{name}': {bundle_dir}: does not fit the served base model: {shown}")
