"""Decode steps with the engine's layout of the projections vs without it, side by side in one run:
``--compare fused`` (default): q/k/v and gate/up fused into one matmul each vs the model's own separate layers;
``--compare packed``: bf16 weights packed for oneDNN on a CPU (``packed``) vs row-major ones;
``--compare merge``: a batch's one adapter folded into the packed weights (``merged``, once it has held the
batch long enough) vs its LoRA term added at every layer;
``--compare attention``: a CPU decode step's grouped query heads packed per key/value head (``attention``)
vs transformers' SDPA call, which passes ``enable_gqa`` where there is no padding mask;
``--compare kernel``: a CPU decode step's LoRA terms added by ``cpu_kernels``' kernel vs torch's matmuls;
``--compare attention-kernel``: CPU bf16 attention by ``cpu_kernels``' kernels vs SDPA;
``--compare norm-kernel``: CPU bf16 RMSNorms as one op each (``norm``) vs transformers' module.
``--prefills`` times whole prefills instead of decode steps; ``--shorter-by N`` makes each row N tokens shorter
than the one before (left padding: SDPA gets a mask).

Two engine runtimes on the same base and the same random LoRA bundles (r=16 on all seven projections), one
with the compared option off; the same batch of prompts is prefilled in each, then their decode steps
alternate (each runtime's own greedy tokens), through ``Runtime.decode``, so on a GPU the steps are CUDA
graph replays. On a CPU the runtime loaded second ran 5-8% faster than the other with the same code (the
no-adapter rows of ``--compare merge``, where both sides do the same work, show it), so run both
``--load-first`` orders. Printed: ms per step (median), the ratio, the ops one eager step dispatches (a
proxy for a graph's kernels), and how far the two runtimes' logits are apart.

    python bench/projections.py                              # CPU: SmolLM2, batch 1 and 8
    python bench/projections.py --compare packed --dtype bf16
    python bench/projections.py --compare attention --dtype bf16 --prompt-tokens 64 1000
    python bench/projections.py --compare attention-kernel --dtype bf16 --batch 1 8 --prompt-tokens 64 1000
    python bench/projections.py --compare attention-kernel --dtype bf16 --batch 1 2 --prompt-tokens 256 1014 \
        --steps 5 --prefills
    python bench/projections.py --random-shape llama-8b --dtype bf16 --base-model .gpu-kit/smollm2-tokenizer
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import DTYPES, add_base_args, device_name, random_base, random_bundle, sync  # noqa: E402
from bot.engine import EngineConfig  # noqa: E402
from bot.engine.local.adapters import prepare_adapter  # noqa: E402
from bot.engine.local.kvbatch import DecodeBatch  # noqa: E402
from bot.engine.local.runtime import Runtime  # noqa: E402


OPTIONS = {"fused": "fused_projections", "packed": "packed_weights", "merge": "merge",
           "attention": "decode_attention", "kernel": "lora_kernel",
           "attention-kernel": "attention_kernel", "norm-kernel": "norm_kernel"}
"""--compare -> the ``Runtime.load`` option it turns off on one side."""


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


class Side:
    """One runtime decoding one batch; its prefills and steps are timed one at a time."""

    def __init__(self, rt: Runtime, slots: list[int], prompts: list[list[int]]) -> None:
        self.rt, self.slots, self.prompts, self.times = rt, slots, prompts, []
        self.prefill()

    def prefill(self) -> None:
        start = time.perf_counter()
        self.batch, self.logits = DecodeBatch.prefill(partial(self.rt.forward, slots=self.slots), self.prompts, {},
                                                      self.rt.pad_id, self.rt.device)
        sync()
        self.times.append(time.perf_counter() - start)
        self.tokens = self.logits.argmax(-1)

    def step(self) -> None:
        sync()
        start = time.perf_counter()
        self.logits = self.rt.decode(self.batch, self.slots, self.tokens)
        self.tokens = self.logits.argmax(-1)
        sync()
        self.times.append(time.perf_counter() - start)

    def ops_per_step(self) -> int:
        """Ops one eager step dispatches (a real step: the batch gets one more column)."""
        with CountOps() as counted:
            self.tokens = self.batch.step(partial(self.rt.forward, slots=self.slots), self.tokens).argmax(-1)
        return counted.count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_base_args(parser)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[64], help="each row's prompt length")
    parser.add_argument("--steps", type=int, default=40, help="timed steps (prefills) per side and case")
    parser.add_argument("--shorter-by", type=int, default=0, help="each row this many tokens shorter (left padding)")
    parser.add_argument("--prefills", action="store_true", help="time whole prefills instead of decode steps")
    parser.add_argument("--compare", choices=OPTIONS, default="fused", help="the layout option compared")
    parser.add_argument("--load-first", choices=["on", "off"], default="on",
                        help="which side is loaded first (on a CPU the one loaded second ran 5-8%% faster)")
    args = parser.parse_args()
    order = (True, False) if args.load_first == "on" else (False, True)
    dtype = DTYPES[args.dtype]
    work = Path(args.work_dir)
    spec = random_base(args.random_shape, args.base_model, dtype, work) if args.random_shape else args.base_model
    sides = {on: Runtime.load(EngineConfig(base_model=spec, quantization=args.quantization, dtype=dtype),
                              **{OPTIONS[args.compare]: on}) for on in order}
    with tempfile.TemporaryDirectory() as tmp:
        bundles = [random_bundle(spec, Path(tmp) / f"p{i}", seed=i, rank=args.rank) for i in range(max(args.batch))]
        slots = {on: [rt.add_adapter(prepare_adapter(b.name, b, rt.info)) for b in bundles]
                 for on, rt in sides.items()}
    print(f"# bench/projections.py --compare {args.compare} --load-first {args.load_first} "
          f"{args.random_shape or spec} {args.dtype} "
          f"quantization={args.quantization}, LoRA r={args.rank}, {args.steps} steps per case, {device_name()}; "
          f"fused groups: {len(sides[True].projections)} / {len(sides[False].projections)}")
    unit = "prefill" if args.prefills else "step"
    print(f"| batch | prompt tokens | adapters | {args.compare} off ms/{unit} | {args.compare} on ms/{unit} | speedup "
          "| ops per eager step off / on | logits max rel. diff |")
    print("|---|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for size, length in itertools.product(args.batch, args.prompt_tokens):
            prompts = torch.randint(10, sides[True].tokenizer.vocab_size, (size, length), generator=gen).tolist()
            prompts = [row[i * args.shorter_by:] for i, row in enumerate(prompts)]
            cases = {"none": lambda on: [0] * size, "one": lambda on: slots[on][:1] * size}
            if size > 1:
                cases["one per row"] = lambda on: slots[on][:size]
            for case, rows in cases.items():
                runs = {on: Side(rt, rows(on), prompts) for on, rt in sides.items()}
                diff = float((runs[True].logits - runs[False].logits).abs().max() / runs[False].logits.abs().max())
                for step in range(args.steps + 2):  # the first two: warm-up (and graph capture on a GPU)
                    # each goes first every other step, so the order of steps favours neither side (the 5-8%
                    # bias seen on a CPU came from the load order: --load-first)
                    for side in list(runs.values())[:: 1 if step % 2 else -1]:
                        side.prefill() if unit == "prefill" else side.step()
                ms = {on: 1000 * statistics.median(side.times[3:]) for on, side in runs.items()}
                ops = {on: side.ops_per_step() for on, side in runs.items()}
                lengths = "/".join(str(n) for n in sorted({len(p) for p in prompts}, reverse=True))
                print(f"| {size} | {lengths} | {case} | {ms[False]:.2f} | {ms[True]:.2f} "
                      f"| {ms[False] / ms[True]:.2f}x | {ops[False]} / {ops[True]} | {diff:.2g} |")


if __name__ == "__main__":
    main()
