"""Reusing finished replies' KV cache: same replies as a fresh prefill, less prefill, never stale weights."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bot.engine import EngineConfig
from bot.engine.local.engine import LocalEngine
from bot.engine.local.prefix import MIN_REUSE, PrefixCache
from engine_fixtures import make_bundle, run
from finetune.bundle import Sampling

GREEDY = Sampling(temperature=0.0, repetition_penalty=1.0, max_new_tokens=20)
FIRST = [{"role": "user", "content": "tell me about the storm and the tide and the old salt on the boat"}]


@pytest.fixture(scope="module")
def bundles(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prefix-bundles")
    return {"one": make_bundle(tiny_model_dir, root / "one", seed=1, name="One"),
            "two": make_bundle(tiny_model_dir, root / "two", seed=5, name="Two")}


def _engine(model_dir: Path, cache_mb: int) -> LocalEngine:
    return LocalEngine(EngineConfig(base_model=str(model_dir), quantization="none", dtype=torch.float32,
                                    prefix_cache_mb=cache_mb))


async def _conversation(engine: LocalEngine, adapter: str) -> list[str]:
    """Three turns, each prompt re-sending the whole history, as the Discord bot does."""
    messages, replies = list(FIRST), []
    for follow_up in ("and the fish?", "what of the sea, lad?", None):
        reply = await engine.complete(adapter, messages, GREEDY)
        replies.append(reply)
        if follow_up:
            messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": follow_up}]
    return replies


def test_follow_up_turns_reuse_the_previous_turns_cache_and_reply_the_same(tiny_model_dir, bundles):
    async def main(cache_mb: int):
        engine = _engine(tiny_model_dir, cache_mb)
        for name, path in bundles.items():
            await engine.load_adapter(name, path)
        replies = [await _conversation(engine, name) for name in ("one", "two")]
        prefixes = (await engine._runtime()).prefixes
        await engine.close()
        return replies, prefixes

    fresh, no_cache = run(main(0))
    reused, cache = run(main(64))
    assert no_cache.reused_tokens == 0 and len(no_cache) == 0
    assert reused == fresh and fresh[0] != fresh[1]
    # turns 2 and 3 of both conversations start from the previous turn: at least its whole prompt is reused
    assert cache.reused_tokens > 4 * 30
    assert len(cache) == 2, "each conversation's newest turn replaces the turn it extends"


def test_a_slot_reused_by_another_adapter_never_sees_the_old_cache(tiny_model_dir, bundles):
    async def main(cache_mb: int, first_adapter: str):
        engine = _engine(tiny_model_dir, cache_mb)
        await engine.load_adapter("x", bundles[first_adapter])
        first = await engine.complete("x", FIRST, GREEDY)
        slot = engine._adapters["x"].slot
        await engine.unload_adapter("x")
        await engine.load_adapter("y", bundles["two"])
        assert engine._adapters["y"].slot == slot, "the test needs the freed slot to be reused"
        follow = FIRST + [{"role": "assistant", "content": first}, {"role": "user", "content": "and the fish?"}]
        reply = await engine.complete("y", follow, GREEDY)
        reused = (await engine._runtime()).prefixes.reused_tokens
        await engine.close()
        return first, reply, reused

    first, reply, reused = run(main(64, "one"))
    _, expected, _ = run(main(0, "one"))
    assert reused == 0 and reply == expected


def _kv(n: int, value: float = 0.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.full((1, 2, n, 4), value), torch.full((1, 2, n, 4), value)) for _ in range(2)]


def test_prefix_cache_lookup_eviction_and_drop():
    entry_bytes = 2 * 2 * (2 * 20 * 4) * 4  # 2 layers x (keys, values) x 160 floats of 4 bytes
    cache = PrefixCache(budget_bytes=entry_bytes * 5 // 2)
    a, b = list(range(100, 120)), list(range(200, 220))
    cache.store(1, a, _kv(20, 1.0), prompt_length=15)
    cache.store(2, a, _kv(20, 2.0), prompt_length=15)
    assert cache.lookup(1, list(range(200, 230))) is None  # no common prefix on slot 1
    n, kv = cache.lookup(1, a[:12] + [7, 8, 9])
    assert n == 12 and kv[0][0].shape == (1, 2, 12, 4) and kv[0][0].max() == 1.0  # slot 1's, not slot 2's
    n, _ = cache.lookup(1, a)  # the whole prompt is cached: its last token still has to run
    assert n == len(a) - 1
    assert cache.lookup(1, a[: MIN_REUSE - 1] + [0, 0, 0]) is None  # too short to be worth it
    cache.store(1, b, _kv(20, 3.0), prompt_length=15)  # over budget: the least recently used (slot 2's) goes
    assert cache.size == 2 * entry_bytes and cache.lookup(2, a) is None and cache.lookup(1, b) is not None
    # the next turn of conversation a (a's prompt, a reply re-tokenized differently, more) replaces a's entry
    cache.store(1, a[:15] + [1, 2, 3, 4, 5, 6], _kv(21, 4.0), prompt_length=18)
    assert len(cache) == 2 and cache.lookup(1, a[:16] + [0])[1][0][0].max() == 4.0
    cache.store(1, a[:14] + [9] * 10, _kv(24, 5.0), prompt_length=20)  # shares less than a's prompt: kept
    assert len(cache) == 2 and cache.lookup(1, b) is None  # b was the least recently used
    cache.drop(1)
    assert len(cache) == 0 and cache.size == 0


@pytest.mark.parametrize("where", ["prefill", "decode"])
def test_out_of_memory_clears_the_prefix_cache_before_failing_anyone(tiny_model_dir, bundles, where):
    other = [{"role": "user", "content": "say something about fish, lad"}]

    async def main(oom: bool):
        engine = _engine(tiny_model_dir, 64)
        await engine.load_adapter("one", bundles["one"])
        rt = await engine._runtime()
        await engine.complete("one", FIRST, GREEDY)  # its KV stays in the cache
        forward, failed = rt.forward, []

        def flaky(ids, mask, positions, cache, slots):
            if oom and not failed and (ids.shape[1] == 1) == (where == "decode"):
                failed.append(where)
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return forward(ids, mask, positions, cache, slots)

        rt.forward = flaky
        reply = await engine.complete("one", other, GREEDY)
        entries = len(rt.prefixes)
        await engine.close()
        return reply, failed, entries

    expected, _, kept = run(main(False))
    reply, failed, entries = run(main(True))
    assert failed == [where] and reply == expected
    assert kept == 2 and entries == 1, "the first conversation's KV was given up; the new reply's was kept"
