"""The embedded engine: one base model in this process decodes every persona's replies in one batch.

``engine`` is the ``Engine`` implementation; ``scheduler`` batches requests on the worker thread that owns
the model (``runtime``); ``adapters`` checks bundles and ``lora`` serves them as per-row LoRA slots;
``kvbatch``, ``prefix`` and ``graphs`` keep decode steps cheap; ``projections`` fuses q/k/v and gate/up
matmuls, ``packed`` lays bf16 weights out for oneDNN on a CPU and ``merged`` folds an adapter that has the
batch to itself into them; ``liger`` puts Liger's fused kernels in the model on a GPU; ``sampling`` and
``detokenize`` turn logits into streamed text.
"""
from .engine import LocalEngine

__all__ = ["LocalEngine"]
