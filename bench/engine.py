"""Local engine throughput: N concurrent requests on N different adapters vs the same requests one at a time.

Also measures adapter load time (bundle on disk -> serving) and what switching adapters costs. Adapters
get random LoRA weights (the speed does not depend on what they learned). End-of-sequence is ignored so
every reply is exactly --tokens long, like ``vllm bench``'s ``--ignore-eos``.

CPU (a minute or two):  python bench/engine.py --quick
GPU, 8B-shaped random model (tokenizer and chat template from SmolLM2):
    python bench/engine.py --random-shape llama-8b --dtype bf16 --quantization none
    python bench/engine.py --random-shape llama-8b --dtype bf16 --quantization nf4
"""
from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from datetime import date
from importlib import metadata
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bot.engine import EngineConfig  # noqa: E402
from bot.engine.local.adapters import linear_shapes  # noqa: E402
from bot.engine.local.engine import LocalEngine, on_own_thread  # noqa: E402
from finetune.bundle import MANIFEST, LoraInfo, Manifest, Sampling  # noqa: E402
from finetune.model import fingerprint, load_tokenizer, materialize, resolve  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHAPES = {  # Llama-3.1-8B without the weights; the template and the prompts' ids come from --base-model's
    # tokenizer, the ids past its end are never typed but weigh in the embeddings and output layer as in Llama
    "llama-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                     rope_theta=500000.0),
}
PROMPTS = [
    "tell me about the sea, and the storms you have seen out there",
    "what do you think of the weather today?",
    "who taught you to sail, and was it hard?",
    "say something about fish",
]


def random_base(shape: str, tokenizer_spec: str, dtype: torch.dtype, root: Path) -> str:
    """Write (once) a randomly initialised model of a known shape, so no download is needed."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    out = root / f"random-{shape}-{str(dtype).removeprefix('torch.')}"
    if (out / "config.json").is_file():
        return str(out)
    tokenizer = load_tokenizer(resolve(tokenizer_spec))
    shape_config = SHAPES[shape] | {"vocab_size": max(len(tokenizer), SHAPES[shape]["vocab_size"])}
    config = LlamaConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, **shape_config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def random_bundle(base_spec: str, out: Path, seed: int, rank: int) -> Path:
    """An adapter bundle with random LoRA weights on every attention and MLP projection, and the base's
    tokenizer (the openai engine renders and trims prompts with the bundle's)."""
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    ref = resolve(base_spec)
    config = AutoConfig.from_pretrained(materialize(ref))
    with torch.device("meta"):
        shapes = linear_shapes(AutoModelForCausalLM.from_config(config))
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, (fan_in, fan_out) in shapes.items():
        if name.rsplit(".", 1)[-1] in TARGETS:
            prefix = f"base_model.model.{name}"
            weights[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) / fan_in**0.5
            weights[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * 0.01
    out.mkdir(parents=True, exist_ok=True)
    LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(TARGETS), task_type="CAUSAL_LM").save_pretrained(out)
    save_file(weights, out / "adapter_model.safetensors")
    tokenizer = load_tokenizer(ref)
    tokenizer.save_pretrained(out)
    manifest = Manifest(
        name=out.name, base_model=ref.name, base_model_spec=base_spec, base_fingerprint=fingerprint(config),
        chat_template=tokenizer.chat_template, system_prompt="You are a salty old sailor.", sampling=Sampling(),
        lora=LoraInfo(r=rank, alpha=2 * rank, dropout=0.0, target_modules=list(TARGETS)), data_hash="random",
    )
    (out / MANIFEST).write_text(manifest.model_dump_json(indent=2), encoding="utf-8")
    return out


async def timed(engine: LocalEngine, adapter: str, prompt: str, sampling: Sampling) -> tuple[float, float]:
    """(seconds to the first piece, seconds to the end) of one request."""
    start = time.perf_counter()
    first = None
    async for _ in engine.stream(adapter, [{"role": "user", "content": prompt}], sampling):
        first = first or time.perf_counter() - start
    return first or 0.0, time.perf_counter() - start


async def bench(args: argparse.Namespace) -> dict:
    work = Path(args.work_dir)
    base = args.base_model
    if args.random_shape:
        base = await on_own_thread(random_base, args.random_shape, args.base_model, DTYPES[args.dtype], work)
    n_adapters = max(args.concurrency)
    bundles = await on_own_thread(lambda: [random_bundle(base, work / f"adapter-{i}", seed=i, rank=args.rank)
                                           for i in range(n_adapters + 1)])

    started = time.perf_counter()
    engine = LocalEngine(EngineConfig(base_model=base, quantization=args.quantization, dtype=DTYPES[args.dtype],
                                      max_batch=n_adapters))
    rt = await engine._runtime()
    base_load_s = time.perf_counter() - started
    rt.stop_ids = frozenset()  # every reply runs its full length: equal work per request

    load_s = []
    for i, bundle in enumerate(bundles):
        t = time.perf_counter()
        await engine.load_adapter(f"a{i}", bundle)
        load_s.append(time.perf_counter() - t)
    t = time.perf_counter()
    await engine.reload_adapter("a0")
    reload_s = time.perf_counter() - t

    sampling = Sampling(temperature=0.8, top_p=0.9, top_k=50, repetition_penalty=1.1, max_new_tokens=args.tokens)
    await timed(engine, "a0", PROMPTS[0], sampling.model_copy(update={"max_new_tokens": 4}))  # warm-up

    rows = []
    for n in args.concurrency:
        jobs = [(f"a{i}", PROMPTS[i % len(PROMPTS)]) for i in range(n)]
        one_by_one = [await timed(engine, a, p, sampling) for a, p in jobs]
        t = time.perf_counter()
        together = await asyncio.gather(*[timed(engine, a, p, sampling) for a, p in jobs])
        wall = time.perf_counter() - t
        seq_tps = n * args.tokens / sum(total for _, total in one_by_one)
        conc_tps = n * args.tokens / wall
        rows.append({"n": n, "sequential_tok_s": round(seq_tps, 1), "concurrent_tok_s": round(conc_tps, 1),
                     "ratio": round(conc_tps / seq_tps, 2),
                     "ttft_ms": round(1000 * statistics.mean(f for f, _ in together), 1)})

    # Switching: each row names its adapter in every forward, so there is nothing to switch. What it can
    # cost is the mixed-adapter path itself: N requests on one adapter vs on N different ones.
    n = n_adapters
    same = await asyncio.gather(*[timed(engine, "a0", PROMPTS[i % len(PROMPTS)], sampling) for i in range(n)])
    mixed = await asyncio.gather(*[timed(engine, f"a{i}", PROMPTS[i % len(PROMPTS)], sampling) for i in range(n)])
    short = sampling.model_copy(update={"max_new_tokens": 8})
    alternating = [await timed(engine, f"a{i % 2}", PROMPTS[0], short) for i in range(6)]
    repeated = [await timed(engine, "a0", PROMPTS[0], short) for _ in range(6)]
    await engine.close()
    return {
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
                   + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
        "versions": {p: metadata.version(p) for p in ("torch", "transformers", "peft")},
        "base_model": args.random_shape or args.base_model, "dtype": args.dtype,
        "quantization": getattr(rt.model, "personabot_quantization", args.quantization),
        "rank": args.rank, "tokens": args.tokens, "base_load_s": round(base_load_s, 2),
        "adapter_load_s": {"mean": round(statistics.mean(load_s[1:]), 3), "max": round(max(load_s[1:]), 3),
                           "first": round(load_s[0], 3), "reload": round(reload_s, 3)},
        "throughput": rows,
        "mixed_vs_same_adapter": round(max(t for _, t in mixed) / max(t for _, t in same), 2),
        "request_ms_alternating_vs_same": [round(1000 * statistics.median(t for _, t in alternating), 1),
                                           round(1000 * statistics.median(t for _, t in repeated), 1)],
    }


def sync() -> None:
    """Wait for the GPU's queued kernels, so a wall-clock timer around a step measures the step."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def device_name() -> str:
    """What a printed figure was measured on: the GPU, or the CPU's torch threads."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x{torch.get_num_threads()} threads"


def add_base_args(parser: argparse.ArgumentParser) -> None:
    """Options the serving benchmarks share: which base, its dtype and quantization, adapter rank, work dir."""
    parser.add_argument("--base-model", default="smollm2", help="hub id, folder, .gguf or 'smollm2'")
    parser.add_argument("--random-shape", choices=sorted(SHAPES), help="random weights of this shape instead")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if torch.cuda.is_available() else "fp32")
    parser.add_argument("--quantization", choices=["auto", "nf4", "none"], default="none")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--work-dir", default=str(Path.home() / ".cache" / "personabot" / "bench"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_base_args(parser)
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per request")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--quick", action="store_true", help="32 tokens per request (CPU)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print the raw result as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.tokens = 32
    result = asyncio.run(bench(args))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['base_model']} {result['dtype']} quantization={result['quantization']} LoRA r={args.rank}, "
          f"{args.tokens} new tokens per request; {result['machine']}; {result['versions']}")
    print(f"base load {result['base_load_s']} s; adapter load {result['adapter_load_s']}")
    print("| concurrent requests (different adapters) | one at a time tok/s | concurrent tok/s | ratio "
          "| mean TTFT ms |")
    print("|---|---|---|---|---|")
    for r in result["throughput"]:
        print(f"| {r['n']} | {r['sequential_tok_s']} | {r['concurrent_tok_s']} | {r['ratio']}x | {r['ttft_ms']} |")
    print(f"{max(args.concurrency)} concurrent requests on {max(args.concurrency)} different adapters take "
          f"{result['mixed_vs_same_adapter']}x the time of the same requests on one adapter")
    alt, same = result["request_ms_alternating_vs_same"]
    print(f"8-token request, alternating 2 adapters vs always the same: {alt} ms vs {same} ms (median)")


if __name__ == "__main__":
    main()
