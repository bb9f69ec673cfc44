"""The adapter bundle: PEFT adapter files + ``persona.json``. The one contract between finetune and bot."""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .cards.context import CardContext
from .validation import describe

MANIFEST = "persona.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
FORMAT_VERSION = 1


class BundleError(ValueError):
    """A bundle is missing, malformed or built for another base model; the message names the path."""


class Sampling(BaseModel):
    """Generation settings the bot uses for this persona."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(0.8, ge=0)
    top_p: float = Field(0.9, gt=0, le=1)
    top_k: int = Field(50, ge=0)
    repetition_penalty: float = Field(1.1, gt=0)
    max_new_tokens: int = Field(200, ge=1)
    stop: list[str] = []
    seed: int | None = Field(None, ge=0, description=(
        "a reply's draws come from its own generator seeded with this, so the same seed, prompt and settings "
        "give the same reply whatever else is batched with it; none: torch's shared generator (local engine) "
        "or the server's choice"))


class LoraInfo(BaseModel):
    r: int
    alpha: int
    dropout: float
    target_modules: list[str] | str


class TrainingSummary(BaseModel):
    """How the adapter was trained, and enough to rebuild its held-out split for ``finetune eval``."""

    steps: int
    epochs: float
    train_loss: float
    quantization: str = Field(description="what the frozen base was trained in: nf4 or none (16-bit)")
    fused_kernels: bool = Field(description="whether Liger's kernels were on")
    attention: str
    data: dict[str, int] = Field(description="data prep counts: conversations, examples, tokens, truncated")
    persona: str = Field(description="absolute path of the persona data trained on")
    seed: int
    eval_fraction: float
    max_seq_len: int
    eval_loss: float | None = None
    eval_perplexity: float | None = None


class Manifest(BaseModel):
    """What the bot needs to serve an adapter exactly as it was trained."""

    format_version: int = FORMAT_VERSION
    name: str
    description: str = ""
    base_model: str = Field(description="portable identity of the base, e.g. a hub id or GGUF file name")
    base_model_spec: str = Field(description="what the trainer was given: hub id, folder or .gguf path")
    base_fingerprint: dict[str, int | str]
    chat_template: str
    system_prompt: str
    sampling: Sampling
    lora: LoraInfo
    data_hash: str
    card: CardContext | None = Field(None, description="a card persona's lorebook, depth prompt, post-history "
                                     "instructions and greetings, for the bot's prompt seam")
    training: TrainingSummary | None = Field(None, description="None for bundles not made by `finetune train`")
    versions: dict[str, str] = {}
    created: str = ""

    @field_validator("training", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return value or None  # bundles written before the summary was typed stored {} when there was none


NO_LORA = LoraInfo(r=0, alpha=0, dropout=0.0, target_modules=[])
"""The ``lora`` of a manifest that serves the base model itself (``base_manifest``)."""


def base_manifest(
    name: str, base_model: str, fingerprint: dict[str, int | str], chat_template: str, system_prompt: str = "",
    sampling: Sampling | None = None,
) -> Manifest:
    """A manifest for serving the base model with no adapter (a teacher for synthetic dialogue, a baseline):
    what an engine needs to render prompts for it, with ``NO_LORA`` and no training data."""
    return Manifest(
        name=name, base_model=base_model, base_model_spec=base_model, base_fingerprint=fingerprint,
        chat_template=chat_template, system_prompt=system_prompt, sampling=sampling or Sampling(), lora=NO_LORA,
        data_hash="",
    )


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("personabot", "torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def write_atomically(out_dir: str | Path, write: Callable[[Path], None]) -> Path:
    """Let ``write`` fill a sibling temp folder, then swap it in with renames.

    A crash at any point leaves either the previous bundle or the new one at ``out_dir``, never a mix;
    leftovers are ``.NAME.tmp-*`` / ``.NAME.old-*`` siblings the bot never looks at.
    """
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def save_bundle(model: Any, tokenizer: Any, manifest: Manifest, out_dir: str | Path) -> Path:
    """Write the model's files (PEFT adapter, or full weights once merged), tokenizer and manifest atomically."""
    manifest = manifest.model_copy(
        update={"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": versions()}
    )

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")

    return write_atomically(out_dir, write)


def load_manifest(bundle_dir: str | Path) -> Manifest:
    """Read and validate a bundle's manifest; errors name the file and the field."""
    root = Path(bundle_dir)
    if not root.is_dir():
        raise BundleError(f"{root}: adapter bundle folder not found")
    missing = [f for f in (*ADAPTER_FILES, MANIFEST) if not (root / f).is_file()]
    if missing:
        raise BundleError(f"{root}: not an adapter bundle, missing {', '.join(missing)}")
    path = root / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from exc
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        raise BundleError(f"{path}: {describe(exc)}") from exc
    if manifest.format_version > FORMAT_VERSION:
        raise BundleError(f"{path}: format_version {manifest.format_version} is newer than this personabot")
    return manifest


def check_compatible(manifest: Manifest, bundle_dir: str | Path, base_name: str, fingerprint: dict) -> None:
    """Refuse a bundle trained on another base model: same identity and the same shape are required."""
    if manifest.base_model != base_name:
        raise BundleError(
            f"{bundle_dir}: trained on base model '{manifest.base_model}', but this engine serves '{base_name}'"
        )
    diff = {k: (v, fingerprint.get(k)) for k, v in manifest.base_fingerprint.items() if fingerprint.get(k) != v}
    if diff:
        shown = ", ".join(f"{k}: bundle {a} vs served {b}" for k, (a, b) in diff.items())
        raise BundleError(f"{bundle_dir}: base model shape differs ({shown})")
