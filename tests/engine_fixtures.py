"""Adapter bundles for engine tests: deterministic random LoRA weights, written like ``finetune`` writes them."""
from __future__ import annotations

import asyncio
import collections
from collections.abc import Coroutine, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from finetune.bundle import LoraInfo, Manifest, Sampling, save_bundle
from finetune.model import fingerprint, resolve

GREEDY = Sampling(temperature=0.0, repetition_penalty=1.0, max_new_tokens=24)


class CountOps(TorchDispatchMode):
    """Counts the ops dispatched inside it, by name (``aten.mm``, ``personabot.lora_add``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def make_bundle(
    model_dir: Path,
    out: Path,
    seed: int,
    name: str = "Persona",
    r: int = 4,
    alpha: int | None = None,
    target_modules: list[str] | str = "all-linear",
    sampling: Sampling = GREEDY,
    system_prompt: str = "You are a test persona.",
) -> Path:
    """A bundle whose LoRA A and B are both random (``init_lora_weights=False``), so it changes outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha or 4 * r, target_modules=target_modules, init_lora_weights=False,
                        task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    ref = resolve(str(model_dir))
    manifest = Manifest(
        name=name,
        base_model=ref.name,
        base_model_spec=str(model_dir),
        base_fingerprint=fingerprint(base.config),
        chat_template=tokenizer.chat_template,
        system_prompt=system_prompt,
        sampling=sampling,
        lora=LoraInfo(r=r, alpha=alpha or 4 * r, dropout=0.0, target_modules=target_modules),
        data_hash="0" * 64,
    )
    return save_bundle(model, tokenizer, manifest, out)


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run one test coroutine on a fresh event loop (no pytest-asyncio needed)."""
    return asyncio.run(coro)


def assert_decode_alike(runtimes: Sequence[Any], bundles: Sequence[Path], tol: float) -> None:
    """Two runtimes of one base with ``bundles`` loaded in each (the same slots): a batch mixing two adapters
    and none, then the second adapter alone, each prefilled and decoded 4 steps on the same tokens, give
    logits within ``tol`` of each other."""
    from bot.engine.local.adapters import prepare_adapter
    from bot.engine.local.kvbatch import DecodeBatch

    slots = [[rt.add_adapter(prepare_adapter(b.name, b, rt.info)) for b in bundles] for rt in runtimes]
    assert slots[0] == slots[1]
    gen = torch.Generator().manual_seed(0)
    for rows in ([slots[0][0], slots[0][1], 0], [slots[0][1]] * 2):
        prompts = torch.randint(5, 200, (len(rows), 6), generator=gen).tolist()
        with torch.inference_mode():
            batches = [DecodeBatch.prefill(partial(rt.forward, slots=rows), prompts, {}, rt.pad_id, rt.device)
                       for rt in runtimes]
            logits = [out for _, out in batches]
            for _ in range(4):
                torch.testing.assert_close(logits[0], logits[1], atol=tol, rtol=tol)
                tokens = logits[1].argmax(-1)
                logits = [rt.decode(batch, rows, tokens) for rt, (batch, _) in zip(runtimes, batches)]
