"""Decode-step time: the engine's in-place growing KV cache vs transformers' DynamicCache, side by side.

Same base, same left-padded batch of random prompts, same forward (last-position logits only); the only
difference is the cache: ``DynamicCache`` concatenates every layer's keys and values on every step (a
copy of the whole cache per token), the engine's ``GrowingCache`` writes one column into spare room.

    python bench/kvcache.py                                   # CPU: SmolLM2, batch 8, 512 and 1500 tokens
    python bench/kvcache.py --random-shape llama-8b --dtype bf16 --context 512 2048 4096   # GPU
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import DTYPES, add_base_args, device_name, random_base, sync  # noqa: E402
from bot.engine.local.kvbatch import GrowingCache  # noqa: E402
from finetune.model import load_model, resolve  # noqa: E402


def step_ms(model, cache_cls: type, batch: int, context: int, steps: int) -> float:
    """Mean milliseconds per decode step after a ``context``-token prefill of ``batch`` rows."""
    device = model.device
    ids = torch.randint(10, model.config.vocab_size, (batch, context), device=device)
    mask = torch.ones_like(ids)
    cache = cache_cls()

    def forward(tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=tokens, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                    logits_to_keep=1)
        return out.logits[:, -1].argmax(-1)

    tokens = forward(ids, mask, (mask.cumsum(-1) - 1))
    times = []
    for i in range(steps + 2):  # 2 warm-up steps
        positions = mask.sum(-1, keepdim=True)
        mask = F.pad(mask, (0, 1), value=1)
        sync()
        start = time.perf_counter()
        tokens = forward(tokens[:, None], mask, positions)
        sync()
        times.append(time.perf_counter() - start)
    return 1000 * sum(times[2:]) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_base_args(parser)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, nargs="+", default=[512, 1500])
    parser.add_argument("--steps", type=int, default=24)
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    spec = args.base_model
    if args.random_shape:
        spec = random_base(args.random_shape, args.base_model, dtype, Path(args.work_dir))
    model = load_model(resolve(spec), args.quantization, dtype).eval()
    print(f"# bench/kvcache.py {args.random_shape or spec} {args.dtype} batch {args.batch}, {args.steps} steps, "
          f"{device_name()}")
    print("| context tokens | DynamicCache ms/step | GrowingCache ms/step | speedup |")
    print("|---|---|---|---|")
    with torch.inference_mode():
        for context in args.context:
            plain, ours = (step_ms(model, cls, args.batch, context, args.steps) for cls in (DynamicCache, GrowingCache))
            print(f"| {context} | {plain:.1f} | {ours:.1f} | {plain / ours:.2f}x |")


if __name__ == "__main__":
    main()
