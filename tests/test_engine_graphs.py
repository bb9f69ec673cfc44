"""Decode steps as captured graphs: same logits as eager steps, recaptured exactly when they go stale.

On a CPU, ``Reruns`` stands in for a CUDA graph (it replays by running the recorded step again on the
same static tensors); the meta-device test checks what CUDA capture needs and a CPU cannot show: the
step never reads a tensor's value on the host. The real CUDA graph runs in the GPU-only tests.
"""
from __future__ import annotations

import asyncio
from functools import partial
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from bot.engine import EngineConfig
from bot.engine.local import kvbatch
from bot.engine.local.adapters import linear_shapes, prepare_adapter
from bot.engine.local.graphs import CudaGraphs, DecodeGraphs, Reruns
from bot.engine.local.kvbatch import DecodeBatch, GrowingCache, GrowingLayer
from bot.engine.local.engine import LocalEngine
from bot.engine.local.lora import LoraSlots
from bot.engine.local.projections import fuse_projections
from bot.engine.local.runtime import Runtime
from engine_fixtures import make_bundle, run
from finetune.bundle import Sampling

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22]]
JOINER = [30, 31, 32, 33, 34]


@pytest.fixture(scope="module")
def bundles(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("graph-bundles")
    return {
        "one": make_bundle(tiny_model_dir, root / "one", seed=1, r=4),
        "two": make_bundle(tiny_model_dir, root / "two", seed=2, r=8, target_modules=["q_proj", "v_proj"]),
        "wide": make_bundle(tiny_model_dir, root / "wide", seed=3, r=16),  # grows every slot stack's rank
    }


def _runtime(model_dir: Path, bundles: dict[str, Path], dtype: torch.dtype = torch.float32
             ) -> tuple[Runtime, dict[str, int]]:
    """The tiny model where the engine would put it (CUDA if there is one), graphs off until a test sets them."""
    rt = Runtime.load(EngineConfig(base_model=str(model_dir), quantization="none", dtype=dtype, cuda_graphs=False))
    slots = {name: rt.add_adapter(prepare_adapter(name, bundles[name], rt.info)) for name in ("one", "two")}
    return rt, slots


def _scenario(rt: Runtime, bundles: dict[str, Path], slots: dict[str, int]) -> tuple[list[torch.Tensor], list[int]]:
    """Twelve decode steps through joins, leaves, a full KV buffer and an adapter load; logits and which
    steps started a new graph epoch."""
    gen = torch.Generator().manual_seed(0)
    device = rt.device
    rows = [slots["one"], slots["two"]]
    epochs: list[int] = []
    out: list[torch.Tensor] = []
    with torch.inference_mode():
        batch, _ = DecodeBatch.prefill(partial(rt.forward, slots=rows), PROMPTS, {}, rt.pad_id, device)
        for step in range(12):
            if step == 3:  # a request without adapter joins
                other, _ = DecodeBatch.prefill(partial(rt.forward, slots=[0]), [JOINER], {}, rt.pad_id, device)
                batch.extend(other)
                rows = rows + [0]
            if step == 6:  # the second request leaves
                batch.keep([0, 2])
                rows = [rows[0], rows[2]]
            if step == 8:  # an adapter load reallocates every LoRA stack
                rt.add_adapter(prepare_adapter("wide", bundles["wide"], rt.info))
            if step == 9:  # one request left: the single-adapter path
                batch.keep([0])
                rows = rows[:1]
            before = rt.graphs._epoch if rt.graphs else None
            tokens = torch.randint(40, 200, (batch.size,), generator=gen).to(device)
            out.append(rt.decode(batch, rows, tokens).clone())
            if rt.graphs and rt.graphs._epoch is not before:
                epochs.append(step)
    return out, epochs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: the fused projections, on a CPU too
def test_graph_steps_match_eager_steps_and_recapture_when_stale(tiny_model_dir, bundles, monkeypatch, dtype):
    monkeypatch.setattr(kvbatch, "GROW", 2)  # the buffers fill every other step
    rt, slots = _runtime(tiny_model_dir, bundles, dtype)
    eager, _ = _scenario(rt, bundles, slots)

    rt, slots = _runtime(tiny_model_dir, bundles, dtype)
    assert bool(rt.projections) == (dtype == torch.bfloat16 or rt.device.type == "cuda")
    captured = []

    class Counted(Reruns):
        def capture(self, fn):
            captured.append(fn)
            return super().capture(fn)

    rt.graphs = DecodeGraphs(rt.forward, lambda: rt.lora.version, Counted())
    # a graph attends over the buffers' unused columns too (masked): fresh memory holding NaN must not leak
    new_empty = torch.Tensor.new_empty
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda t, *a, **k: new_empty(t, *a, **k).fill_(float("nan")))
    graphed, epochs = _scenario(rt, bundles, slots)

    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    for step, (a, b) in enumerate(zip(eager, graphed)):
        torch.testing.assert_close(b, a, atol=tolerance, rtol=tolerance, msg=lambda m: f"step {step}: {m}")
    assert rt.graphs.enabled and rt.graphs.checked == {(2, "mixed"), (3, "mixed"), (1, "one")}
    assert {0, 3, 6, 8, 9} <= set(epochs), f"a join, leave or adapter load must start a new graph: {epochs}"
    assert len(captured) == len(epochs) < 12, "steps within an epoch replay its graph"
    assert epochs != sorted({0, 3, 6, 8, 9}), "a full KV buffer must start a new graph too"


def test_a_graph_that_disagrees_with_the_eager_step_turns_graphs_off(tiny_model_dir, bundles):
    rt, slots = _runtime(tiny_model_dir, bundles)

    class Wrong(Reruns):
        def capture(self, fn):
            return super().capture(lambda: fn() + 1.0)

    rt.graphs = DecodeGraphs(rt.forward, lambda: rt.lora.version, Wrong())
    reference, _ = _runtime(tiny_model_dir, bundles)
    with torch.inference_mode():
        batches = [DecodeBatch.prefill(partial(r.forward, slots=[slots["one"]]), PROMPTS[:1], {}, r.pad_id,
                                       r.device)[0] for r in (rt, reference)]
        for token in (50, 60, 70):
            tokens = torch.tensor([token])
            got, want = (r.decode(b, [slots["one"]], tokens) for r, b in zip((rt, reference), batches))
            torch.testing.assert_close(got, want)
    assert not rt.graphs.enabled and rt.graphs._epoch is None


@pytest.mark.parametrize("error, stays_on", [(RuntimeError("operation not permitted when stream is capturing"), False),
                                             (torch.OutOfMemoryError("CUDA out of memory"), True)])
def test_a_failing_capture_keeps_the_step_and_decodes_eagerly(tiny_model_dir, bundles, error, stays_on):
    """Any capture error but out-of-memory turns graphs off for good; out of memory only for that epoch."""
    rt, slots = _runtime(tiny_model_dir, bundles)
    reference, _ = _runtime(tiny_model_dir, bundles)
    attempts = []

    class Failing(Reruns):
        def capture(self, fn):
            attempts.append(fn)
            raise error

    rt.graphs = DecodeGraphs(rt.forward, lambda: rt.lora.version, Failing())
    with torch.inference_mode():
        batches = [DecodeBatch.prefill(partial(r.forward, slots=[0]), PROMPTS[:1], {}, r.pad_id, r.device)[0]
                   for r in (rt, reference)]
        for token in (50, 60, 70):
            tokens = torch.tensor([token])
            got, want = (r.decode(b, [0], tokens) for r, b in zip((rt, reference), batches))
            torch.testing.assert_close(got, want)
        assert batches[0].length == batches[1].length == len(PROMPTS[0]) + 3
        assert rt.graphs.enabled == stays_on and len(attempts) == 1
        if stays_on:  # the next batch tries again
            batches[0].keep([0])
            rt.decode(batches[0], [0], torch.tensor([80]))
            assert len(attempts) == 2


class _OnDevice(TorchDispatchMode):
    """Notes every op that touches a tensor off ``device`` (0-dim host scalars are kernel arguments: allowed)."""

    def __init__(self, device: torch.device, strays: list[str]) -> None:
        super().__init__()
        self.device, self.strays = device, strays

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves((args, kwargs, out)):
            if isinstance(t, torch.Tensor) and t.device != self.device and t.dim() > 0:
                self.strays.append(str(func))
        return out


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused-projections"])
@pytest.mark.parametrize("slots", [[1, 2], [1, 1]], ids=["mixed", "single"])
def test_a_captured_step_never_reads_a_value_on_the_host(tiny_model_dir, slots, fused):
    """CUDA capture fails on any host sync (``.item()``, ``bool(t)``, data-dependent shapes). On the meta
    device those raise too, so the whole static step runs there; the eager step does sync (its mask). And
    no tensor of the step may come from the host (a copy in the middle of a capture is not allowed)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    meta = torch.device("meta")
    config = AutoConfig.from_pretrained(tiny_model_dir)
    with meta:
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    if fused:
        assert fuse_projections(model)
    lora = LoraSlots(model, torch.float32, meta)
    shapes = {n: shape for n, shape in linear_shapes(model).items() if n != "lm_head"}
    for _ in range(2):
        lora.add({n: (torch.zeros(4, fan_in, device=meta), torch.zeros(fan_out, 4, device=meta))
                  for n, (fan_in, fan_out) in shapes.items()})

    def forward(ids, mask, positions, cache, slots, rows=None):
        with lora.route(slots, rows):
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                        logits_to_keep=1)
        return out.logits[:, -1, :].float()

    def batch() -> DecodeBatch:
        cache = GrowingCache()
        head_dim = config.hidden_size // config.num_attention_heads
        for _ in range(config.num_hidden_layers):
            keys, values = (torch.zeros(2, config.num_key_value_heads, 7, head_dim, device=meta) for _ in range(2))
            layer = GrowingLayer()
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
            cache.layers.append(layer)
        return DecodeBatch(cache, torch.ones(2, 7, dtype=torch.long, device=meta), {})

    strays: list[str] = []

    class Watched(Reruns):  # the recorded step, run and replayed with every op's tensors watched
        def run(self, fn):
            with _OnDevice(meta, strays):
                return fn()

        def capture(self, fn):
            return super().capture(partial(self.run, fn))

    graphs = DecodeGraphs(forward, lambda: lora.version, Watched(), check=False)  # the check reads on the host
    tokens = torch.zeros(2, dtype=torch.long, device=meta)
    with torch.inference_mode():
        b = batch()
        for _ in range(3):
            assert graphs.step(b, slots, tokens).shape == (2, config.vocab_size)
        assert b.length == 10 and strays == []
        with _OnDevice(meta, strays):
            torch.tensor([1, 2]).to(meta)
        assert strays, "the watch sees a tensor coming from the host"
        with pytest.raises(RuntimeError, match="meta"):
            batch().step(partial(forward, slots=slots), tokens)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_cuda_graph_steps_match_eager_steps(tiny_model_dir, bundles, monkeypatch, dtype):
    monkeypatch.setattr(kvbatch, "GROW", 2)
    rt, slots = _runtime(tiny_model_dir, bundles, dtype)
    assert rt.device.type == "cuda"
    eager, _ = _scenario(rt, bundles, slots)
    rt, slots = _runtime(tiny_model_dir, bundles, dtype)
    rt.graphs = DecodeGraphs(rt.forward, lambda: rt.lora.version, CudaGraphs())
    graphed, epochs = _scenario(rt, bundles, slots)
    assert rt.graphs.enabled and rt.graphs.checked == {(2, "mixed"), (3, "mixed"), (1, "one")} and len(epochs) < 12
    tolerance = 1e-3 if dtype == torch.float32 else 5e-2
    for a, b in zip(eager, graphed):
        torch.testing.assert_close(b, a, atol=tolerance, rtol=tolerance)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_capturing_again_after_every_graph_is_gone():
    """Out of memory can leave an epoch without a graph, so every graph of the shared pool may be freed; the
    next capture must still work (PyTorch refuses a pool whose graphs are all gone, until empty_cache)."""
    import gc

    capturer = CudaGraphs()
    x = torch.ones(8, device="cuda")
    for factor in (2.0, 3.0, 4.0):
        capturer.run(lambda: x * factor)  # the warm-up DecodeGraphs runs before each capture
        graph = capturer.capture(lambda: x * factor)
        x.fill_(1.5)
        assert graph.replay().tolist() == [1.5 * factor] * 8
        del graph
        gc.collect()


async def _conversations(engine: LocalEngine, bundles: dict[str, Path]) -> list[str]:
    """Three replies decoded together (rows leave at different steps), then the next turn of one of them,
    which resumes from the prefix cache."""
    sampling = Sampling(temperature=0.0, repetition_penalty=1.3, max_new_tokens=40)
    hello = [{"role": "user", "content": "hello there, how are you today?"}]
    for name in ("one", "two"):
        await engine.load_adapter(name, bundles[name])
    jobs = [("one", hello, sampling), ("two", hello, sampling.model_copy(update={"max_new_tokens": 9})),
            ("one", hello[:0] + [{"role": "user", "content": "storm?"}], sampling)]
    replies = await asyncio.gather(*[engine.complete(a, m, s) for a, m, s in jobs])
    follow = hello + [{"role": "assistant", "content": replies[0]}, {"role": "user", "content": "and then?"}]
    return [*replies, await engine.complete("one", follow, sampling)]


def test_engine_with_graph_steps_writes_what_it_writes_without(tiny_model_dir, bundles):
    async def replies(graphs: bool) -> list[str]:
        engine = LocalEngine(EngineConfig(base_model=str(tiny_model_dir), quantization="none", dtype=torch.float32,
                                          cuda_graphs=False))
        rt = await engine._runtime()
        if graphs:
            rt.graphs = DecodeGraphs(rt.forward, lambda: rt.lora.version, Reruns())
        try:
            return await _conversations(engine, bundles)
        finally:
            await engine.close()

    eager = run(replies(False))
    assert all(eager) and len(set(eager)) > 1
    assert run(replies(True)) == eager


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_engine_with_cuda_graphs_writes_what_it_writes_without(tiny_model_dir, bundles):
    async def replies(graphs: bool) -> tuple[list[str], bool]:
        engine = LocalEngine(EngineConfig(base_model=str(tiny_model_dir), quantization="none", dtype=torch.float32,
                                          cuda_graphs=graphs))
        rt = await engine._runtime()
        try:
            return await _conversations(engine, bundles), rt.graphs is not None and rt.graphs.enabled
        finally:
            await engine.close()

    (with_graphs, stayed_on), (without, _) = run(replies(True)), run(replies(False))
    assert stayed_on and with_graphs == without
