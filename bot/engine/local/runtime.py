"""The served model: one base, its tokenizer, the LoRA slots every loaded adapter lives in, and the
prefix cache of finished replies' KV.

Only the scheduler's worker thread calls ``add_adapter``, ``delete_adapter`` and ``forward`` and touches
``prefixes``; the other attributes are fixed after loading and safe to read from any thread.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from functools import partial
from typing import Any, Literal

import torch

from finetune.model import (
    EMBEDDED_DEFAULT, BaseModelRef, compute_dtype, fingerprint, load_model, load_tokenizer, materialize, resolve,
)
from finetune.prompt import stop_token_ids

from ..config import EngineConfig
from . import cpu_kernels, packed
from .adapters import BaseInfo, PreparedAdapter, linear_shapes
from .attention import DECODE, KERNEL
from .graphs import CudaGraphs, DecodeGraphs
from .kvbatch import DecodeBatch
from .liger import apply_liger
from .lora import LoraSlots
from .merged import MergedAdapter
from .norm import fuse_rms_norms
from .prefix import PrefixCache
from .projections import FusedLinear, fuse_projections

log = logging.getLogger(__name__)

WEIGHT_SHARE = 0.6
"""Serve the 16-bit base when its weights take at most this share of free memory; the rest is for the KV cache."""


class Runtime:
    def __init__(
        self, model: Any, tokenizer: Any, info: BaseInfo, prefix_cache_bytes: int = 0, cuda_graphs: bool = False,
        fused_kernels: bool = False, projections: Sequence[FusedLinear] = (), merge: bool = False,
        lora_kernel: cpu_kernels.LoraAdd | None = None,
    ) -> None:
        """``fused_kernels``: whether ``fused.fuse`` put Liger's kernels in the model (for reports).
        ``projections``: the model's fused projections (``projections.fuse_projections``). ``merge``: fold
        an adapter that has the batch to itself into the weights (``merged``; packed CPU weights only).
        ``lora_kernel``: the CPU kernel for decode steps' LoRA terms (``cpu_kernels``)."""
        self.model = model
        self.fused_kernels = fused_kernels
        self.projections = list(projections)
        self.tokenizer = tokenizer
        self.info = info
        self.device = info.device
        self.lora = LoraSlots(model, info.dtype, info.device, MergedAdapter(free_memory) if merge else None,
                              lora_kernel)
        self.context: int = model.config.get_text_config().max_position_embeddings
        self.stop_ids: frozenset[int] = frozenset(stop_token_ids(tokenizer, model.generation_config))
        self.pad_id: int = tokenizer.pad_token_id
        self.prefixes = PrefixCache(prefix_cache_bytes)
        self.graphs: DecodeGraphs | None = None
        if cuda_graphs and self.device.type == "cuda":
            self.graphs = DecodeGraphs(self.forward, lambda: self.lora.version, CudaGraphs())

    @classmethod
    def load(cls, config: EngineConfig, fused_projections: bool = True, packed_weights: bool = True,
             merge: bool = True, decode_attention: bool = True, lora_kernel: bool = True,
             attention_kernel: bool = True, norm_kernel: bool = True) -> Runtime:
        """The base ``config`` names, with its local options. ``fused_projections``: q/k/v and gate/up as one
        matmul each where that is faster (``projections``); ``packed_weights``: bf16 weights on a CPU laid out
        for oneDNN (``packed``); ``merge``: one adapter folded into packed weights (``merged``);
        ``decode_attention``: a CPU decode step's grouped heads packed (``attention``); ``lora_kernel``: CPU
        decode steps add their LoRA terms with ``cpu_kernels``' kernel; ``attention_kernel``: CPU bf16 attention
        by ``cpu_kernels``' kernels (``attention.KERNEL``); ``norm_kernel``: CPU bf16 RMSNorms as one op each
        (``norm``). All seven are off only to compare."""
        dtype = None if config.dtype == "auto" else getattr(torch, config.dtype)
        quantization, fused_kernels = config.quantization, config.fused_kernels
        ref = resolve(config.base_model or EMBEDDED_DEFAULT)
        tokenizer = load_tokenizer(ref)
        if quantization == "auto":
            quantization = serving_quantization(ref, dtype or compute_dtype())
        model = load_model(ref, quantization, dtype, attention=DECODE if decode_attention else "sdpa")
        model.eval()
        fused = apply_liger(model, fused_kernels, tokenizer)
        compute = lora_dtype = model.get_input_embeddings().weight.dtype  # NF4 keeps embeddings in it
        # fp32 on a CPU: MKL's small-batch fp32 matmuls ran slower on the wider fused weights (0.91x per step
        # at batch 8); 16-bit ones ran faster (1.05x); a GPU gains in any dtype (fewer kernels)
        if fused_projections and (model.device.type != "cpu" or lora_dtype != torch.float32):
            projections = fuse_projections(model)
        else:
            projections = []
        if model.device.type == "cpu":
            # rank-16 matmuls take ~20 us in bf16 on a CPU and 2-3 us in fp32: 11% faster decode at batch 1
            lora_dtype = torch.float32
        info = BaseInfo(ref.name, fingerprint(model.config), linear_shapes(model), model.device, lora_dtype)
        packs = packed_weights and model.device.type == "cpu" and packed.available()
        packs = packs and packed.pack_linears(model, projections) > 0
        kernels = None
        if (lora_kernel or attention_kernel or norm_kernel) and model.device.type == "cpu" and compute in (
                torch.bfloat16, torch.float32):
            kernels = cpu_kernels.load()
        kernel = kernels.lora_add if kernels is not None and lora_kernel else None
        if attention_kernel and decode_attention and kernels is not None and kernels.attention:
            model.set_attn_implementation(KERNEL)
        if norm_kernel and kernels is not None:
            fuse_rms_norms(model)
        return cls(model, tokenizer, info, config.prefix_cache_mb * 2**20, config.cuda_graphs, fused, projections,
                   merge=merge and packs, lora_kernel=kernel)

    def add_adapter(self, adapter: PreparedAdapter) -> int:
        """Put the adapter's weights in a free slot; returns the slot requests name it by."""
        return self.lora.add(adapter.weights)

    def delete_adapter(self, slot: int) -> None:
        """Free the slot; its cached prefixes go with it, since a later adapter may reuse the slot."""
        self.lora.remove(slot)
        self.prefixes.drop(slot)

    def forward(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any, slots: list[int],
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Last-position logits [B, V] in fp32; row i runs with the adapter in slot ``slots[i]``.

        ``mask``: [B, T] with 1 for real tokens, or a ready [B, 1, Q, T] boolean one (see ``graphs``)."""
        try:
            with self.lora.route(slots, rows):
                out = self.model(
                    input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                    logits_to_keep=1,
                )
        except BaseException:
            for layer in self.projections:  # one may hold the output it computed for parts never asked
                layer.release()
            raise
        return out.logits[:, -1, :].float()

    def decode(self, batch: DecodeBatch, slots: list[int], tokens: torch.Tensor) -> torch.Tensor:
        """One decode step of ``batch`` (see ``DecodeBatch.step``), as a graph replay where graphs are on."""
        if self.graphs is not None and self.graphs.enabled:
            return self.graphs.step(batch, slots, tokens)
        return batch.step(partial(self.forward, slots=slots), tokens)


def serving_quantization(ref: BaseModelRef, dtype: torch.dtype) -> Literal["none", "auto"]:
    """What 'auto' means for serving: the 16-bit base whenever it fits, else 4-bit where bitsandbytes works.

    Training wants NF4 (QLoRA) for memory, but serving decode reads every weight per token and bitsandbytes
    dequantizes them on the fly: an 8B base decodes ~2.7x faster in bf16 than in NF4 on an H100 (35 vs 13
    tokens/s, plain generate). So 4-bit is only worth it when the 16-bit weights would crowd out the KV cache.
    """
    need = parameter_count(materialize(ref)) * torch.finfo(dtype).bits // 8
    free = free_memory()
    choice = "none" if need <= WEIGHT_SHARE * free else "auto"
    log.info("serving '%s': 16-bit weights %.1f GiB, free memory %.1f GiB -> %s", ref.spec, need / 2**30,
             free / 2**30, "16-bit base" if choice == "none" else "4-bit NF4 base where possible")
    return choice


def parameter_count(path: str) -> int:
    """Parameters of the model at ``path``, counted on the meta device (nothing is allocated or read)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    model.tie_weights()  # tied input/output embeddings are one tensor once loaded
    return sum(p.numel() for p in model.parameters())


def free_memory() -> int:
    """Bytes free where the model will live: the current CUDA device, else the machine's available RAM."""
    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
