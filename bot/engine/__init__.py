"""Generation backends behind one async streaming interface (see ``base.Engine``)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from .base import Engine, EngineError

if TYPE_CHECKING:  # importing torch is slow; only the local engine needs it
    import torch

    from finetune.model import Quantization

__all__ = ["Engine", "EngineError", "create_engine"]


def create_engine(
    kind: Literal["local", "openai"] = "local",
    base_model: str | None = None,
    url: str | None = None,
    api_key: str | None = None,
    quantization: Quantization = "auto",
    max_batch: int = 8,
    max_context: int | None = None,
    dtype: torch.dtype | None = None,
    prefix_cache_mb: int = 1024,
    cuda_graphs: bool = True,
    fused_kernels: bool | Literal["auto"] = "auto",
) -> Engine:
    """The engine the bot talks to. ``local``: the base model (default: the embedded SmolLM2) runs in
    this process. ``openai``: ``url`` (API root with ``/v1``) serves the adapters; ``base_model``, when
    given, is the identity bundles must have been trained on."""
    if kind == "local":
        from finetune.model import EMBEDDED_DEFAULT

        from .local import LocalEngine

        return LocalEngine(base_model or EMBEDDED_DEFAULT, quantization, dtype, max_batch, max_context,
                           prefix_cache_mb, cuda_graphs, fused_kernels)
    if kind == "openai":
        if not url:
            raise EngineError("engine 'openai' needs the server's url, e.g. http://127.0.0.1:8000/v1")
        from .openai import OpenAIEngine

        return OpenAIEngine(url, api_key=api_key, base_model=base_model, max_context=max_context)
    raise EngineError(f"unknown engine kind '{kind}' (choose 'local' or 'openai')")
