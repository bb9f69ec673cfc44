"""Training recipe config: a YAML file plus ``--set key=value`` overrides, validated field by field."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .validation import describe


class ConfigError(ValueError):
    """A training setting that is wrong or cannot run here: the recipe YAML, a --set override, --resume, or a
    setting this machine lacks the hardware or packages for. The message names the file or the setting."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoraSettings(_Strict):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class DataSettings(_Strict):
    max_seq_len: int = Field(1024, gt=8)
    eval_fraction: float = Field(0.1, ge=0, lt=1)
    packing: bool = True
    chat_template: str | None = Field(None, description="Jinja template; default: the base tokenizer's own")


class TrainSettings(_Strict):
    epochs: float = Field(3.0, gt=0)
    max_steps: int = -1
    batch_size: int = Field(8, gt=0, description="conversations per device per step (packed into one row)")
    grad_accum: int = Field(1, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: str = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool | Annotated[int, Field(ge=1)] = Field(
        True, description="recompute activations in the backward pass: true = every decoder layer, N = every Nth "
        "(less recompute for more memory), false = none"
    )
    fused_kernels: bool | Literal["auto"] = Field(
        "auto", description="Liger kernels; auto = on with CUDA and liger-kernel (pip install 'personabot[gpu]')"
    )
    varlen_attention: bool | Literal["auto"] = Field(
        "auto", description="packed rows attend per conversation (torch varlen flash attention); auto = where it "
        "runs and passes its check (CUDA)"
    )
    logging_steps: int = Field(5, gt=0)
    eval_steps: int = Field(50, gt=0)
    save_steps: int = Field(50, gt=0)
    save_total_limit: int = Field(2, gt=0)
    early_stopping_patience: int = Field(3, ge=0, description="evals without improvement; 0 disables")
    report_to: list[Literal["tensorboard", "wandb"]] = []
    seed: int = 42


class TrainConfig(_Strict):
    persona: str = Field(description="persona folder (persona.toml) or a character card file")
    base_model: str = Field("smollm2", description="'smollm2' (embedded), a hub id, a local folder or a .gguf")
    output_dir: str = Field(description="where the adapter bundle is written (atomically)")
    checkpoint_dir: str | None = Field(None, description="trainer checkpoints; default OUTPUT_DIR-checkpoints")
    quantization: Literal["auto", "nf4", "none"] = "auto"
    lora: LoraSettings = LoraSettings()
    data: DataSettings = DataSettings()
    train: TrainSettings = TrainSettings()

    @model_validator(mode="after")
    def _best_checkpoint_is_saved(self) -> TrainConfig:
        # early stopping restores the best evaluated checkpoint, so every evaluation must have one saved
        t = self.train
        if t.early_stopping_patience and self.data.eval_fraction and t.save_steps % t.eval_steps:
            raise ValueError(
                f"train.save_steps ({t.save_steps}) must be a multiple of train.eval_steps ({t.eval_steps}) "
                "while early stopping is on (train.early_stopping_patience > 0)"
            )
        return self

    @property
    def checkpoints(self) -> Path:
        return Path(self.checkpoint_dir or f"{self.output_dir.rstrip('/')}-checkpoints")


def _set(tree: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{key}' is not a section")
    node[keys[-1]] = yaml.safe_load(raw) if raw != "" else ""


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read YAML (optional), apply ``key.sub=value`` overrides (YAML-typed), validate."""
    tree: dict = {}
    where = "config"
    if path is not None:
        where = str(path)
        try:
            tree = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError as exc:
            raise ConfigError(f"{path}: config file not found") from exc
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{line}: invalid YAML: {getattr(exc, 'problem', exc)}") from exc
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.learning_rate=1e-4")
        _set(tree, key.strip(), value)
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {describe(exc)}") from exc
