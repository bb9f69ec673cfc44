"""Load a bundle onto its base model and generate replies exactly as the bot renders prompts."""
from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .bundle import Manifest, Sampling, check_compatible, load_manifest
from .model import Quantization, fingerprint, load_model, load_tokenizer, resolve
from .prompt import encode_prompt, stop_token_ids


def load_bundle_model(
    bundle_dir: str | Path, quantization: Quantization = "auto", base_model: str | None = None
) -> tuple[Any, Any, Manifest]:
    """(peft model in eval mode, tokenizer, manifest); the base comes from the manifest unless overridden."""
    from peft import PeftModel

    manifest = load_manifest(bundle_dir)
    ref = resolve(base_model or manifest.base_model_spec)
    tokenizer = load_tokenizer(ref)
    base = load_model(ref, quantization)
    check_compatible(manifest, bundle_dir, ref.name, fingerprint(base.config))
    model = PeftModel.from_pretrained(base, str(bundle_dir), adapter_name="default")
    model.eval()
    return model, tokenizer, manifest


def sampling_kwargs(sampling: Sampling, tokenizer: Any, model: Any) -> dict[str, Any]:
    """``generate`` keyword arguments for a persona's sampling defaults (temperature 0 = greedy)."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": sampling.max_new_tokens,
        "repetition_penalty": sampling.repetition_penalty,
        "eos_token_id": sorted(stop_token_ids(tokenizer, model.generation_config)),
        "pad_token_id": tokenizer.pad_token_id,
    }
    if sampling.stop:
        kwargs |= {"stop_strings": sampling.stop, "tokenizer": tokenizer}
    if sampling.temperature > 0:
        kwargs |= {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p,
                   "top_k": sampling.top_k}
    else:
        kwargs |= {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return kwargs


def stream_reply(
    model: Any,
    tokenizer: Any,
    manifest: Manifest,
    messages: list[dict[str, str]],
    sampling: Sampling | None = None,
) -> Iterator[str]:
    """Yield the character's reply text piece by piece (generation runs in a worker thread)."""
    from transformers import TextIteratorStreamer

    ids = encode_prompt(tokenizer, manifest.system_prompt, messages, manifest.chat_template)
    input_ids = torch.tensor([ids], device=model.device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = sampling or manifest.sampling
    kwargs = sampling_kwargs(sampling, tokenizer, model)
    if sampling.seed is not None:  # generate draws from torch's generator: seeded, the same prompt repeats
        torch.manual_seed(sampling.seed)
    worker = threading.Thread(
        target=model.generate,
        kwargs={"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "streamer": streamer, **kwargs},
        daemon=True,
    )
    worker.start()
    yield from streamer
    worker.join()


def reply(model: Any, tokenizer: Any, manifest: Manifest, messages: list[dict[str, str]],
          sampling: Sampling | None = None) -> str:
    return "".join(stream_reply(model, tokenizer, manifest, messages, sampling)).strip()
