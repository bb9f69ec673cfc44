"""Serving: the local engine vs plain transformers+peft ``generate``, side by side in one run.

Both load the same base (same dtype and quantization, through ``finetune.model.load_model``) and the same
random LoRA adapter bundles (r=16 by default, on every attention and MLP projection, written by ``bench/engine.py``'s
helper), and answer the same prompts, rendered with the bundle's system prompt and chat template. Decoding
is greedy and end-of-sequence is ignored by both (the engine's stop ids are cleared, ``generate`` gets
``eos_token_id=None``), so every reply is exactly --new-tokens long and both should write the same text.
peft keeps the LoRA weights where the engine does: in the base's dtype on a GPU (``autocast_adapter_dtype=False``),
in fp32 on a CPU (peft's default upcast; small bf16 matmuls are slow on a CPU), so both compute the same thing.
(Replies decoded in a batch may differ from those decoded alone: batched kernels round differently.)

Measured:
1. batch 1 with an adapter active: decode tokens/s (tokens after the first / time after the first) and
   time to the first token: one ``engine.stream`` request vs ``PeftModel.generate`` with a streamer that
   notes when the first new token arrives; median of a few alternating rounds;
2. 8 conversations on 8 different adapters, aggregate tokens/s: concurrently through the engine, vs the
   same 8 through the engine one at a time, vs plain ``generate`` one at a time with ``set_adapter``
   switching between them;
3. adapter switch time (peft ``set_adapter``; the engine has nothing to switch) and adapter load time from
   the bundle on disk (``engine.load_adapter`` vs peft ``load_adapter``), mean over several loads;
4. the next turn of a long conversation (the whole history re-sent, as the Discord bot does): time to first
   token with the engine's prefix cache (the previous turn's KV reused) vs plain ``generate`` vs the engine
   with the cache off. Sections 1-3 run with the cache off, so repeated prompts gain nothing from it.

CPU (SmolLM2-135M, 64 new tokens per reply, about 3 minutes):  python bench/serve.py --dtype bf16
(``--profile`` adds where a batch-1 reply's time goes, op by op, and on a GPU the kernels per token.)
GPU, 8B-shaped random model (tokenizer and chat template from SmolLM2):
    python bench/serve.py --random-shape llama-8b --dtype bf16 --quantization none
    python bench/serve.py --random-shape llama-8b --dtype bf16 --quantization nf4
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import date
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import DTYPES, PROMPTS, add_base_args, random_base, random_bundle  # noqa: E402
from bot.engine import EngineConfig  # noqa: E402
from bot.engine.local.engine import LocalEngine, on_own_thread  # noqa: E402
from bot.engine.local.prefix import PrefixCache  # noqa: E402
from finetune.bundle import Manifest, Sampling  # noqa: E402
from finetune.model import Quantization, load_model, load_tokenizer, resolve  # noqa: E402
from finetune.prompt import encode_prompt  # noqa: E402

CONVERSATIONS = 8
SWITCHES = 100


@dataclass(frozen=True)
class Reply:
    first_s: float
    """seconds from the request to its first new token"""
    total_s: float
    """seconds from the request to its last token"""
    text: str

    def decode_tok_s(self, tokens: int) -> float:
        return (tokens - 1) / (self.total_s - self.first_s)


def greedy(tokens: int) -> Sampling:
    return Sampling(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, max_new_tokens=tokens)


async def engine_reply(engine: LocalEngine, adapter: str, prompt: str | list[dict], tokens: int) -> Reply:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    start = time.perf_counter()
    first, pieces = None, []
    async for piece in engine.stream(adapter, messages, greedy(tokens)):
        first = first or time.perf_counter() - start
        pieces.append(piece)
    return Reply(first or 0.0, time.perf_counter() - start, "".join(pieces))


async def profile_decode(engine: LocalEngine, rt: Any, on_worker: Any, tokens: int) -> str:
    """Where a batch-1 reply's time goes, op by op: one reply with eager decode steps (a graph replay would
    hide its kernels' names) under ``torch.profiler``, started and stopped on the engine's worker thread."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    prof = profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])])
    graphs = rt.graphs
    on_worker(setattr, rt, "graphs", None)
    on_worker(prof.start)
    await engine_reply(engine, "a0", PROMPTS[0], tokens)
    on_worker(prof.stop)
    on_worker(setattr, rt, "graphs", graphs)
    table = prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                      row_limit=25)
    if cuda:
        kernels = sum(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events())
        table += f"\n{kernels / tokens:.0f} GPU kernels per token (the prompt's included)"
    return table


class FirstToken:
    """A ``generate`` streamer that notes when the first new token arrives (its first put() is the prompt)."""

    def __init__(self) -> None:
        self.puts = 0
        self.at = 0.0

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


class Plain:
    """The plain recipe: a peft ``PeftModel`` over the base, one adapter active at a time, ``generate``."""

    def __init__(self, base: str, quantization: Quantization, dtype: torch.dtype) -> None:
        ref = resolve(base)
        self.tokenizer = load_tokenizer(ref)
        self.base = load_model(ref, quantization, dtype).eval()
        self.model: Any = None

    def load_adapter(self, name: str, bundle: Path) -> None:
        from peft import PeftModel

        upcast = self.base.device.type == "cpu"  # as the engine's LoRA slots (bot/engine/runtime.py)
        if self.model is None:
            self.model = PeftModel.from_pretrained(self.base, str(bundle), adapter_name=name,
                                                   autocast_adapter_dtype=upcast)
        else:
            self.model.load_adapter(str(bundle), adapter_name=name, autocast_adapter_dtype=upcast)

    def set_adapter(self, name: str) -> None:
        self.model.set_adapter(name, inference_mode=True)

    def reply(self, manifest: Manifest, prompt: str | list[dict], tokens: int) -> Reply:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        ids = encode_prompt(self.tokenizer, manifest.system_prompt, messages, manifest.chat_template)
        input_ids = torch.tensor([ids], device=self.base.device)
        streamer = FirstToken()
        start = time.perf_counter()
        out = self.model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=tokens,
            do_sample=False, eos_token_id=None, pad_token_id=self.tokenizer.pad_token_id, streamer=streamer,
        )
        total = time.perf_counter() - start
        new = out[0, len(ids):]
        assert len(new) == tokens, f"plain generate made {len(new)} tokens, not {tokens}"
        return Reply(streamer.at - start, total, self.tokenizer.decode(new, skip_special_tokens=True))


def long_history(seed: int, turns: int) -> list[dict[str, str]]:
    """A made-up conversation of ``turns`` exchanges (different for each seed), ending with a user message."""
    messages = []
    for i in range(turns):
        answer = " ".join(PROMPTS[(seed + i + 1) % len(PROMPTS)].split()[::-1])
        messages += [{"role": "user", "content": f"({seed}.{i}) " + PROMPTS[(seed + i) % len(PROMPTS)]},
                     {"role": "assistant", "content": f"{answer}, {answer}, {answer}."}]
    return messages + [{"role": "user", "content": PROMPTS[seed % len(PROMPTS)]}]


def agreement(texts: list[str]) -> str:
    if all(t == texts[0] for t in texts):
        return "yes"
    return f"no, they agree on the first {len(os.path.commonprefix(texts))} of {len(texts[0])} characters"


def timed(fn: Any, *args: Any) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


async def bench(args: argparse.Namespace) -> None:
    work, dtype = Path(args.work_dir), DTYPES[args.dtype]
    base = args.base_model
    if args.random_shape:
        base = await on_own_thread(random_base, args.random_shape, args.base_model, dtype, work)
    names = [f"a{i}" for i in range(CONVERSATIONS)]
    bundles = await on_own_thread(lambda: [random_bundle(base, work / f"adapter-{i}", seed=i, rank=args.rank)
                                           for i in range(CONVERSATIONS)])
    n = args.new_tokens

    # The plain side is built first: with fused kernels on, the engine has Liger swap Llama's RMSNorm and MLP
    # classes, and its RoPE function, process-wide; models built before keep Hugging Face's own modules.
    plain = await on_own_thread(Plain, base, args.quantization, dtype)
    engine = LocalEngine(EngineConfig(base_model=base, quantization=args.quantization, dtype=dtype,
                                      max_batch=CONVERSATIONS, fused_kernels=args.fused_kernels))
    rt = await engine._runtime()
    rt.stop_ids = frozenset()  # end-of-sequence ignored: every reply is exactly n tokens
    rt.prefixes = PrefixCache(0)  # sections 1-3: every prompt is prefilled in full, as plain generate does
    # Every torch call of the plain side runs on the engine's worker thread, between engine steps: on a CPU a
    # second thread doing torch work gets its own OpenMP team, and two teams spinning on the same cores
    # halve the speed of both (measured: the engine alone 26 tok/s, 13 once the main thread had run generate).
    def on_worker(fn: Any, *fn_args: Any) -> Any:
        return engine._scheduler.call(fn, *fn_args).result()

    # Adapter loads, disk -> serving. The first is left out of the mean: peft's first wraps the base model.
    engine_load, plain_load, manifests = [], [], {}
    for name, bundle in zip(names, bundles):
        start = time.perf_counter()
        manifests[name] = await engine.load_adapter(name, bundle)
        engine_load.append(time.perf_counter() - start)
        plain_load.append(on_worker(timed, plain.load_adapter, name, bundle))
    engine_load, plain_load = engine_load[1:], plain_load[1:]
    switch_s = [on_worker(timed, plain.set_adapter, names[i % CONVERSATIONS]) for i in range(SWITCHES)]

    await engine_reply(engine, "a0", PROMPTS[0], 4)  # warm-up
    on_worker(plain.set_adapter, "a0")
    on_worker(plain.reply, manifests["a0"], PROMPTS[0], 4)

    graphs = rt.graphs  # CUDA only: the same engine with eager decode steps, alternating, shows what graphs add
    engine_1, eager_1, plain_1 = [], [], []
    for _ in range(args.rounds):
        engine_1.append(await engine_reply(engine, "a0", PROMPTS[0], n))
        if graphs is not None:
            on_worker(setattr, rt, "graphs", None)
            eager_1.append(await engine_reply(engine, "a0", PROMPTS[0], n))
            on_worker(setattr, rt, "graphs", graphs)
        plain_1.append(on_worker(plain.reply, manifests["a0"], PROMPTS[0], n))
    same_text = agreement([r.text for r in engine_1 + plain_1])

    jobs = [(name, PROMPTS[i % len(PROMPTS)]) for i, name in enumerate(names)]
    start = time.perf_counter()
    await asyncio.gather(*[engine_reply(engine, a, p, n) for a, p in jobs])
    concurrent_s = time.perf_counter() - start
    start = time.perf_counter()
    alone = [await engine_reply(engine, a, p, n) for a, p in jobs]
    engine_serial_s = time.perf_counter() - start
    start = time.perf_counter()
    plain_serial = []
    for a, p in jobs:
        on_worker(plain.set_adapter, a)
        plain_serial.append(on_worker(plain.reply, manifests[a], p, n))
    plain_serial_s = time.perf_counter() - start
    same_text_8 = sum(e.text == p.text for e, p in zip(alone, plain_serial))

    # 4. the next turn of a long conversation, one fresh conversation per round
    follow_cached, follow_off, follow_plain, history_tokens = [], [], [], 0
    for round_ in range(args.rounds):
        history = long_history(round_, args.history_turns)
        rt.prefixes = PrefixCache(2**30)
        first = await engine_reply(engine, "a1", history, n)  # the previous turn: its KV is kept
        follow = history + [{"role": "assistant", "content": first.text},
                            {"role": "user", "content": "and what happened after that?"}]
        follow_cached.append(await engine_reply(engine, "a1", follow, 2))
        rt.prefixes = PrefixCache(0)
        follow_off.append(await engine_reply(engine, "a1", follow, 2))
        on_worker(plain.set_adapter, "a1")
        follow_plain.append(on_worker(plain.reply, manifests["a1"], follow, 2))
        history_tokens = len(encode_prompt(plain.tokenizer, manifests["a1"].system_prompt, follow,
                                           manifests["a1"].chat_template))
    profile_table = await profile_decode(engine, rt, on_worker, n) if args.profile else None
    await engine.close()

    quantization = getattr(rt.model, "personabot_quantization", args.quantization)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads" + (
        f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("torch", "transformers", "peft"))
    print(f"{date.today().isoformat()}; {args.random_shape or args.base_model} {args.dtype} "
          f"quantization={quantization} LoRA r={args.rank}; {n} new tokens per reply, greedy, EOS ignored; "
          f"{machine}; {versions}")

    e_tps = statistics.median(r.decode_tok_s(n) for r in engine_1)
    p_tps = statistics.median(r.decode_tok_s(n) for r in plain_1)
    e_ttft = 1000 * statistics.median(r.first_s for r in engine_1)
    p_ttft = 1000 * statistics.median(r.first_s for r in plain_1)
    print(f"\nBatch 1, adapter active (median of {args.rounds} alternating rounds; "
          f"same greedy reply from both: {same_text}):")
    print("| | engine | plain generate | engine vs plain (> 1: engine better) |")
    print("|---|---|---|---|")
    print(f"| decode tok/s | {e_tps:.1f} | {p_tps:.1f} | {e_tps / p_tps:.2f}x |")
    print(f"| time to first token ms | {e_ttft:.0f} | {p_ttft:.0f} | {p_ttft / e_ttft:.2f}x |")
    if graphs is None:
        print("CUDA graphs: not used (no CUDA device)")
    else:
        g_tps = statistics.median(r.decode_tok_s(n) for r in eager_1)
        state = "on" if graphs.enabled else "TURNED OFF after a failed capture or check (see the log above)"
        print(f"CUDA graphs: {state}; the engine with eager decode steps: {g_tps:.1f} tok/s, so graphs give "
              f"{e_tps / g_tps:.2f}x")
    if rt.fused_kernels:
        print("Fused kernels (Liger RMSNorm, SwiGLU, RoPE): on in the engine; plain generate shares only Liger's "
              "RoPE, which Liger sets process-wide")
    else:
        print("Fused kernels: off" + (" (--no-fused-kernels)" if args.fused_kernels is False else ""))

    tokens = CONVERSATIONS * n
    conc, serial, plain_tps = tokens / concurrent_s, tokens / engine_serial_s, tokens / plain_serial_s
    print(f"\n{CONVERSATIONS} conversations on {CONVERSATIONS} different adapters, aggregate tok/s "
          f"(same greedy reply from the engine one at a time and plain: {same_text_8} of {CONVERSATIONS}):")
    print("| engine, concurrent | engine, one at a time | plain generate, one at a time (set_adapter) "
          "| concurrent vs engine one at a time | concurrent vs plain one at a time "
          "| engine vs plain, one at a time |")
    print("|---|---|---|---|---|---|")
    print(f"| {conc:.1f} | {serial:.1f} | {plain_tps:.1f} | {conc / serial:.2f}x | {conc / plain_tps:.2f}x "
          f"| {serial / plain_tps:.2f}x |")

    cached, off, plain_ms = (1000 * statistics.median(r.first_s for r in rs)
                             for rs in (follow_cached, follow_off, follow_plain))
    print(f"\nNext turn of a {history_tokens}-token conversation, time to first token ms (median of "
          f"{args.rounds} conversations):")
    print("| engine, prefix cache | engine, cache off | plain generate | cache vs plain | cache vs cache off |")
    print("|---|---|---|---|---|")
    print(f"| {cached:.0f} | {off:.0f} | {plain_ms:.0f} | {plain_ms / cached:.2f}x | {off / cached:.2f}x |")

    e_load, p_load = 1000 * statistics.mean(engine_load), 1000 * statistics.mean(plain_load)
    print(f"\nAdapters (load: bundle on disk -> serving, mean of {len(engine_load)} loads, max in brackets):")
    print("| | engine | peft | engine vs peft (> 1: engine better) |")
    print("|---|---|---|---|")
    print(f"| switch | nothing to switch: each batch row names its LoRA slot in every forward "
          f"| set_adapter {1000 * statistics.mean(switch_s):.3f} ms (mean of {SWITCHES}) | - |")
    print(f"| load from disk | {e_load:.1f} ms ({1000 * max(engine_load):.1f}) "
          f"| {p_load:.1f} ms ({1000 * max(plain_load):.1f}) | {p_load / e_load:.1f}x |")
    if profile_table:
        print(f"\nOne batch-1 reply of {n} tokens with eager decode steps, by op (--profile):\n{profile_table}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_base_args(parser)
    parser.add_argument("--new-tokens", type=int, default=128 if torch.cuda.is_available() else 64,
                        help="new tokens per reply")
    parser.add_argument("--rounds", type=int, default=3, help="batch-1 rounds per side")
    parser.add_argument("--history-turns", type=int, default=12, help="exchanges before the timed next turn")
    parser.add_argument("--quick", action="store_true", help="32 new tokens per reply, 2 rounds (CPU)")
    parser.add_argument("--profile", action="store_true", help="also print where a batch-1 reply's time goes")
    parser.add_argument("--no-fused-kernels", dest="fused_kernels", action="store_false", default="auto",
                        help="the engine without Liger's kernels (on by default with CUDA and liger-kernel)")
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.rounds = 32, 2
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
