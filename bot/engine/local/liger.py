"""Liger's fused Triton kernels (RMSNorm, SwiGLU, RoPE) in the served model, on a GPU.

A batch-1 decode step of an 8B Llama is ~1,000 small kernels: Hugging Face's RMSNorm is ~8 per call (casts,
square, mean, add, rsqrt, two multiplies), RoPE ~10 per layer, SwiGLU 2, and inside a CUDA graph each still
takes a few microseconds of GPU time. Liger does each in one kernel, ~750 fewer per step. Training turns on
the same kernels (``train.fused_kernels``); their loss kernels stay out, serving computes no loss.

Liger patches the model's modules in place and, for the whole process, functions of the model's modeling
file (RoPE). So the logits of a short prompt are compared before and after, and everything is put back if
they differ or the kernels fail to build or run (Triton needs a C compiler on the machine, for one).
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any, Literal

import torch

from finetune.model import liger_unavailable

from ..base import EngineError

log = logging.getLogger(__name__)

TOLERANCE = 0.05
"""Largest relative (L2) difference allowed between the logits with and without the fused kernels. On
SmolLM2 in bf16, computing RMSNorm another way moves them by 0.003 and bf16 instead of fp32 by 0.02; one
RMSNorm off by 5% moves them by 0.04, a wrong RoPE by 0.4."""

Patch = Callable[[Any], None]


def liger_patch(model: Any) -> None:
    """Liger's kernels for this model's architecture (none, if Liger has none for it)."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance  # what transformers' Trainer calls

    _apply_liger_kernel_to_instance(
        model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
    )


CHECK_TEXT = "The storm had passed, and the old captain climbed back on deck to count what the sea had left him."
"""What the check runs: ordinary text (an odd id sequence can make even bf16 rounding move the logits by 20%)."""


def apply_liger(model: Any, setting: bool | Literal["auto"], tokenizer: Any) -> bool:
    """Put the fused kernels in ``model`` per the ``FUSED_KERNELS`` setting; True if they are on.

    'auto': where they run (CUDA, liger-kernel installed) and pass the check, else the model stays as it is.
    True: the same, but anything that keeps them off is an error."""
    if setting is False:
        return False
    why_not = liger_unavailable()
    if why_not is not None:
        if setting is True:
            raise EngineError(f"FUSED_KERNELS=true {why_not}")
        return False
    ids = tokenizer(CHECK_TEXT, return_tensors="pt").input_ids
    why_not = apply_checked(model, liger_patch, ids)
    if why_not is None:
        log.info("serving with Liger's fused kernels (RMSNorm, SwiGLU, RoPE)")
        return True
    if setting is True:
        raise EngineError(f"FUSED_KERNELS=true, but {why_not}")
    log.warning("serving without fused kernels: %s", why_not)
    return False


def apply_checked(model: Any, patch: Patch, ids: torch.Tensor) -> str | None:
    """Patch ``model``; keep the patch if the model's logits for ``ids`` [1, T] stay the same (within
    ``TOLERANCE``), else undo it. Returns why it was not kept (a phrase), or None."""
    ids = ids.to(model.device)
    with torch.inference_mode():
        before = _logits(model, ids)
        saved = _Snapshot(model)
        try:
            patch(model)
            if not saved.changed():
                return f"there are no fused kernels for model type '{model.config.model_type}'"
            after = _logits(model, ids)
        except Exception as exc:
            saved.restore()
            return f"the fused kernels failed: {exc!r}"
        error = float((after - before).norm() / before.norm())
        if not error <= TOLERANCE:
            saved.restore()
            return f"the fused kernels change the logits by {error:.3g} (relative; at most {TOLERANCE} allowed)"
    return None


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits.float()


_MISSING = object()


class _Snapshot:
    """The attributes of every module of a model and of the Python modules their classes come from, to put
    back exactly: a patch adds instance attributes (bound ``forward``s) and rebinds module-level names."""

    def __init__(self, model: Any) -> None:
        layers = list(model.modules())
        code = {sys.modules[type(layer).__module__] for layer in layers}
        self._saved = {obj: dict(vars(obj)) for obj in [*layers, *code]}

    def changed(self) -> bool:
        return any(_differs(vars(obj), saved) for obj, saved in self._saved.items())

    def restore(self) -> None:
        for obj, saved in self._saved.items():
            current = vars(obj)
            for key in set(current) - set(saved):
                del current[key]
            for key, value in saved.items():
                if current.get(key, _MISSING) is not value:
                    current[key] = value


def _differs(current: dict[str, Any], saved: dict[str, Any]) -> bool:
    return current.keys() != saved.keys() or any(current[k] is not v for k, v in saved.items())
