"""The local engine on the tiny model: batching across adapters, streaming, cancellation, hot reload, errors."""
from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bot.engine import EngineConfig, EngineError, create_engine
from bot.engine.local import runtime
from bot.engine.local.engine import LocalEngine
from bot.engine.local.prefix import PrefixCache
from engine_fixtures import make_bundle, run
from finetune.bundle import Sampling, load_manifest
from finetune.inference import sampling_kwargs
from finetune.prompt import encode_prompt

SAMPLING = Sampling(temperature=0.0, repetition_penalty=1.3, max_new_tokens=24)
LONG = SAMPLING.model_copy(update={"max_new_tokens": 150})
HELLO = [{"role": "user", "content": "hello there, how are you today?"}]
STORM = [
    {"role": "user", "content": "tell me about the storm"},
    {"role": "assistant", "content": "Arr, the storm be fine."},
    {"role": "user", "content": "and the sea?"},
]


@pytest.fixture(scope="module")
def bundles(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    return {
        "one": make_bundle(tiny_model_dir, root / "one", seed=1, name="One"),
        "two": make_bundle(tiny_model_dir, root / "two", seed=3, name="Two", r=8,
                           target_modules=["v_proj", "o_proj", "up_proj"]),
    }


def _engine(model_dir: Path, **kwargs) -> LocalEngine:
    return LocalEngine(EngineConfig(base_model=str(model_dir), quantization="none", dtype=torch.float32, **kwargs))


@pytest.fixture(scope="module")
def engine(tiny_model_dir, bundles):
    eng = _engine(tiny_model_dir)

    async def load() -> None:
        for name, path in bundles.items():
            await eng.load_adapter(name, path)

    run(load())
    yield eng
    run(eng.close())


def hf_tokens(model_dir: Path, bundle: Path, messages, sampling: Sampling) -> list[int]:
    """The reply plain ``transformers.generate`` gives for one request on its own."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), bundle)
    manifest = load_manifest(bundle)
    ids = encode_prompt(tok, manifest.system_prompt, messages, manifest.chat_template)
    out = model.eval().generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                **sampling_kwargs(sampling, tok, model))
    return [t for t in out[0, len(ids):].tolist() if t != tok.eos_token_id]


async def _collect(engine, name: str, adapter: str, messages, sampling, events: list) -> str:
    pieces = []
    async for piece in engine.stream(adapter, messages, sampling):
        pieces.append(piece)
        events.append((name, piece))
    events.append((name, None))
    return "".join(pieces)


async def _first_piece(events: list, name: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(n == name for n, _ in events):
        assert time.monotonic() < deadline, f"no text from {name}"
        await asyncio.sleep(0.002)


async def _until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.002)


async def _arrive_together(engine, chats) -> list[str]:
    """``chats`` answered on adapter "one", all queued, in order, before the worker admits any of them."""
    waiting, gate = threading.Event(), threading.Event()

    def pause() -> None:
        waiting.set()
        gate.wait()

    paused = engine._scheduler.call(pause)
    await _until(waiting.is_set)  # the worker is held: nothing it was doing can admit a request early
    replies = []
    for queued, chat in enumerate(chats, 1):  # one at a time: they queue in this order
        replies.append(asyncio.create_task(engine.complete("one", chat, SAMPLING)))
        await _until(lambda: engine._scheduler._inbox.qsize() == queued)
    gate.set()
    await asyncio.wrap_future(paused)
    return await asyncio.gather(*replies)


def test_mixed_adapter_batch_matches_each_request_alone_and_plain_generate(engine, bundles, tiny_model_dir,
                                                                          tiny_tokenizer):
    jobs = [("one", HELLO), ("two", STORM), ("one", STORM), ("two", HELLO)]

    async def main():
        alone = [await engine.complete(a, m, SAMPLING) for a, m in jobs]
        together = await asyncio.gather(*[engine.complete(a, m, SAMPLING) for a, m in jobs])
        return alone, together

    alone, together = run(main())
    assert together == alone
    assert len(set(alone)) == 4, "each adapter (and prompt) gives its own reply"
    assert alone[0] != run(engine.complete("two", HELLO, SAMPLING))
    for (adapter, messages), text in zip(jobs[:2], alone):
        reference = hf_tokens(tiny_model_dir, bundles[adapter], messages, SAMPLING)
        assert text == tiny_tokenizer.decode(reference, skip_special_tokens=True)


def test_a_seeded_sampled_reply_is_the_same_alone_and_in_any_batch(engine):
    """Each seeded request draws from its own generator: other sampled requests around it (started before it,
    beside it, unseeded) change nothing; another seed gives another reply."""
    hot = Sampling(temperature=1.0, top_p=0.95, top_k=50, repetition_penalty=1.1, max_new_tokens=24)
    seeded = {n: hot.model_copy(update={"seed": n}) for n in (1, 2)}

    async def main():
        alone = await engine.complete("one", HELLO, seeded[1])
        together = await asyncio.gather(
            engine.complete("two", STORM, hot.model_copy(update={"max_new_tokens": 40})),
            engine.complete("one", STORM, hot), engine.complete("one", HELLO, seeded[2]),
            engine.complete("one", HELLO, seeded[1]), engine.complete("two", HELLO, hot))
        return alone, together, await engine.complete("one", HELLO, seeded[2])

    alone, together, other_alone = run(main())
    assert together[3] == alone and together[2] == other_alone
    assert alone != other_alone


def test_slots_grow_for_more_adapters_and_higher_ranks(engine, tiny_model_dir, tmp_path, tiny_tokenizer):
    """Past the first slots and the first rank the stacks grow; every adapter still computes as in peft."""
    specs = {"r2": (11, 2, ["q_proj"]), "r16": (12, 16, "all-linear"), "r4a": (13, 4, ["down_proj"]),
             "r4b": (14, 4, ["k_proj", "gate_proj"]), "r4c": (15, 4, "all-linear")}
    paths = {name: make_bundle(tiny_model_dir, tmp_path / name, seed=seed, r=r, target_modules=targets)
             for name, (seed, r, targets) in specs.items()}

    async def main():
        before = await engine.complete("one", HELLO, SAMPLING)
        for name, path in paths.items():
            await engine.load_adapter(name, path)
        replies = await asyncio.gather(*[engine.complete(n, HELLO, SAMPLING) for n in ["one", *paths]])
        for name in paths:
            await engine.unload_adapter(name)
        return before, replies

    before, replies = run(main())
    assert replies[0] == before
    for (name, path), text in zip(paths.items(), replies[1:]):
        assert text == tiny_tokenizer.decode(hf_tokens(tiny_model_dir, path, HELLO, SAMPLING)), name


def test_a_short_reply_started_later_finishes_first_and_pieces_add_up(engine):
    events: list = []

    async def main():
        long = asyncio.create_task(_collect(engine, "long", "one", HELLO, LONG, events))
        await _first_piece(events, "long")
        short = await _collect(engine, "short", "two", STORM, SAMPLING, events)
        return await long, short, await engine.complete("one", HELLO, LONG)

    long, short, long_alone = run(main())
    assert long == long_alone and short == run(engine.complete("two", STORM, SAMPLING))
    order = [n for n, _ in events]
    shorts = [i for i, n in enumerate(order) if n == "short"]
    assert events[shorts[-1]] == ("short", None) and events[-1] == ("long", None)
    assert order.index("long") < shorts[0]
    assert "long" in order[shorts[0]:shorts[-1]], "the long reply kept streaming while the short one ran"
    assert "long" in order[shorts[-1]:-1], "and went on after the short one finished"
    assert engine.active_requests == 0


def test_stop_strings_and_stop_tokens_end_the_reply(engine, bundles, tiny_model_dir, tiny_tokenizer, monkeypatch):
    text = run(engine.complete("one", HELLO, SAMPLING))
    start = next(i for i in range(4, len(text) - 3) if "\ufffd" not in text[i:i + 3] and text.find(text[i:i + 3]) == i)
    stop = text[start:start + 3]
    stopped = SAMPLING.model_copy(update={"stop": ["never appears", stop]})
    assert run(engine.complete("one", HELLO, stopped)) == text[:start]

    tokens = hf_tokens(tiny_model_dir, bundles["one"], HELLO, SAMPLING)
    cut = next(i for i in range(3, len(tokens)) if tokens[i] not in tokens[:i])
    rt = run(engine._runtime())
    monkeypatch.setattr(rt, "stop_ids", rt.stop_ids | {tokens[cut]})
    assert run(engine.complete("one", HELLO, SAMPLING)) == tiny_tokenizer.decode(tokens[:cut])


def test_cancelled_request_frees_its_slot_at_once(tiny_model_dir, bundles):
    endless = SAMPLING.model_copy(update={"max_new_tokens": 400})

    async def main():
        engine = _engine(tiny_model_dir, max_batch=1)
        await engine.load_adapter("one", bundles["one"])
        events: list = []
        first = asyncio.create_task(_collect(engine, "first", "one", HELLO, endless, events))
        await _first_piece(events, "first")
        second = asyncio.create_task(engine.complete("one", STORM, SAMPLING))
        await _until(lambda: engine.active_requests == 2)
        assert not second.done(), "one slot: the second request waits"
        first.cancel()
        reply = await second
        with pytest.raises(asyncio.CancelledError):
            await first
        await _until(lambda: engine.active_requests == 0)
        alone = await engine.complete("one", STORM, SAMPLING)
        await engine.close()
        with pytest.raises(EngineError, match="engine closed"):
            await engine.complete("one", STORM, SAMPLING)
        return reply, alone, events

    reply, alone, events = run(main())
    assert reply == alone
    assert ("first", None) not in events, "the cancelled reply never ran to its end"


def test_waiting_prompts_share_a_prefill_up_to_its_token_budget(tiny_model_dir, bundles, monkeypatch):
    """Prompts that arrive together prefill together only while their padded tokens fit ``PREFILL_TOKENS``;
    the rest wait a decode step, so the first replies stream while later prompts are read."""
    from bot.engine.local import scheduler
    from bot.engine.local.kvbatch import DecodeBatch

    groups: list[int] = []
    longest: list[int] = []
    real = DecodeBatch.prefill.__func__

    def prefill(cls, forward, prompts, *args):
        groups.append(len(prompts))
        longest.append(max(len(p) for p in prompts))
        return real(cls, forward, prompts, *args)

    monkeypatch.setattr(DecodeBatch, "prefill", classmethod(prefill))

    async def main():
        engine = _engine(tiny_model_dir, prefix_cache_mb=0)
        await engine.load_adapter("one", bundles["one"])
        alone = await engine.complete("one", HELLO, SAMPLING)
        monkeypatch.setattr(scheduler, "PREFILL_TOKENS", 2 * longest[0] + 1)
        groups.clear()
        got = await _arrive_together(engine, [HELLO] * 4)
        await engine.close()
        return alone, got

    alone, got = run(main())
    assert groups == [2, 2], "two prompts' padded tokens fit the budget, not three"
    assert got == [alone] * 4


def test_on_a_cpu_prompts_of_unlike_lengths_prefill_apart(tiny_model_dir, bundles, monkeypatch):
    """A short prompt padded to a long one's length costs the long one's compute on a CPU (SmolLM2: 1000 and
    50 tokens together 2.48 s, apart 1.05 s): a later prompt joins the oldest's prefill only while the group's
    padding stays within ``CPU_PADDING_TOKENS``, so like prompts share one whatever order they came in."""
    from bot.engine.local import scheduler
    from bot.engine.local.kvbatch import DecodeBatch

    groups: list[list[int]] = []
    real = DecodeBatch.prefill.__func__

    def prefill(cls, forward, prompts, *args):
        groups.append([len(p) for p in prompts])
        return real(cls, forward, prompts, *args)

    monkeypatch.setattr(DecodeBatch, "prefill", classmethod(prefill))
    long = [{"role": "user", "content": "tell me about the storm " * 12}]

    async def main():
        engine = _engine(tiny_model_dir, prefix_cache_mb=0)
        await engine.load_adapter("one", bundles["one"])
        alone = [await engine.complete("one", chat, SAMPLING) for chat in (HELLO, long)]
        groups.clear()
        apart = await _arrive_together(engine, [HELLO, long, HELLO, long])
        split = list(groups)
        groups.clear()
        monkeypatch.setattr(scheduler, "CPU_PADDING_TOKENS", 10_000)
        together = await _arrive_together(engine, [HELLO, long, HELLO, long])
        await engine.close()
        return alone, apart, split, together

    alone, apart, split, together = run(main())
    short, long_ = split[0][0], split[1][0]
    assert long_ - short > 64, "the fixture's prompts must differ by more than the padding allowed"
    assert split == [[short, short], [long_, long_]], "the later short prompt joins the first; the longs follow"
    assert groups == [[short, long_, short, long_]], "with padding allowed, one prefill in arrival order"
    assert apart == together == [alone[0], alone[1]] * 2


def test_a_first_token_streams_before_the_batchs_next_decode_step(tiny_model_dir, bundles, monkeypatch):
    """A prompt's first token goes out once its prefill is done, not after the decode step that follows it (one
    SmolLM2 step on 2 CPU cores, 27-45 ms, was in every first token's time)."""
    from bot.engine.local.runtime import Runtime

    gate = threading.Event()
    real = Runtime.decode

    def decode(self, *args):
        gate.wait(10)  # the worker's next decode step holds until the test has seen the first token
        return real(self, *args)

    monkeypatch.setattr(Runtime, "decode", decode)

    async def main():
        engine = _engine(tiny_model_dir)
        await engine.load_adapter("one", bundles["one"])
        events: list = []
        reply = asyncio.create_task(_collect(engine, "reply", "one", HELLO, SAMPLING, events))
        try:
            await _first_piece(events, "reply", timeout=5)
        finally:
            gate.set()
        await reply
        await engine.close()

    run(main())


def test_cancelling_one_of_many_keeps_the_others_going(engine):
    async def main():
        events: list = []
        doomed = asyncio.create_task(_collect(engine, "doomed", "two", HELLO, LONG, events))
        other = asyncio.create_task(engine.complete("one", STORM, LONG))
        await _first_piece(events, "doomed")
        assert engine.active_requests == 2
        doomed.cancel()
        await _until(lambda: engine.active_requests == 1)
        return await other

    assert run(main()) == run(engine.complete("one", STORM, LONG))


def test_hot_reload_swaps_weights_while_a_running_reply_finishes_on_the_old(engine, tiny_model_dir, tmp_path):
    hot = make_bundle(tiny_model_dir, tmp_path / "hot", seed=5, name="Hot")
    make_bundle(tiny_model_dir, tmp_path / "ref", seed=6, name="Ref")

    async def main():
        await engine.load_adapter("hot", hot)
        before = await engine.complete("hot", HELLO, SAMPLING)
        long_before = await engine.complete("hot", STORM, LONG)
        events: list = []
        running = asyncio.create_task(_collect(engine, "running", "hot", STORM, LONG, events))
        await _first_piece(events, "running")
        make_bundle(tiny_model_dir, tmp_path / "hot", seed=6, name="Hot v2")  # rewritten on disk
        manifest = await engine.reload_adapter("hot")
        after = await engine.complete("hot", HELLO, SAMPLING)
        await engine.load_adapter("ref", tmp_path / "ref")
        ref = await engine.complete("ref", HELLO, SAMPLING)
        finished = await running
        rt = await engine._runtime()
        await _until(lambda: rt.lora.loaded == len(engine._adapters))
        for name in ("hot", "ref"):
            await engine.unload_adapter(name)
        return before, after, ref, manifest, long_before, finished

    before, after, ref, manifest, long_before, finished = run(main())
    assert manifest.name == "Hot v2"
    assert after != before and after == ref
    assert finished == long_before, "the reply in flight finished on the weights it started with"


def _copy(bundle: Path, dest: Path) -> Path:
    shutil.copytree(bundle, dest)
    return dest


def _edit_manifest(bundle: Path, **changes) -> None:
    path = bundle / "persona.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        node = data
        *parents, last = key.split(".")
        for parent in parents:
            node = node[parent]
        node[last] = value
    path.write_text(json.dumps(data))


def _edit_weights(bundle: Path, edit) -> None:
    path = bundle / "adapter_model.safetensors"
    weights = load_file(path)
    save_file(edit(weights), path)


def _bad_bundles(good: Path, root: Path) -> list[tuple[Path, str]]:
    q_a = next(k for k in load_file(good / "adapter_model.safetensors") if k.endswith("q_proj.lora_A.weight"))
    cases = []
    b = _copy(good, root / "shape")
    _edit_manifest(b, **{"base_fingerprint.hidden_size": 128})
    cases.append((b, "base model shape differs"))
    b = _copy(good, root / "base")
    _edit_manifest(b, base_model="other-model")
    cases.append((b, "trained on base model 'other-model'"))
    b = _copy(good, root / "missing")
    (b / "adapter_model.safetensors").unlink()
    cases.append((b, "missing adapter_model.safetensors"))
    b = _copy(good, root / "rank")
    _edit_manifest(b, **{"lora.r": 16})
    cases.append((b, "rank r=4 but the manifest says r=16"))
    b = _copy(good, root / "width")
    _edit_weights(b, lambda w: w | {q_a: torch.zeros(4, 32)})
    cases.append((b, "q_proj: LoRA in_features 32, base layer has 64"))
    b = _copy(good, root / "target")
    _edit_weights(b, lambda w: {k.replace("q_proj", "qq_proj"): v for k, v in w.items()})
    cases.append((b, "qq_proj: no such linear layer"))
    b = _copy(good, root / "dora")
    config = json.loads((b / "adapter_config.json").read_text())
    (b / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    cases.append((b, "LoRA features the engine does not serve: use_dora"))
    b = _copy(good, root / "corrupt")
    (b / "adapter_model.safetensors").write_bytes(b"not safetensors")
    cases.append((b, "unreadable weights"))
    return cases


def test_bad_bundles_are_rejected_and_the_old_adapter_keeps_serving(engine, bundles, tmp_path):
    async def main():
        expected = await engine.complete("one", STORM, LONG)
        events: list = []
        running = asyncio.create_task(_collect(engine, "running", "one", STORM, LONG, events))
        await _first_piece(events, "running")
        errors = []
        for path, message in _bad_bundles(bundles["one"], tmp_path):
            with pytest.raises(EngineError) as info:
                await engine.load_adapter("one", path)  # replacing the serving adapter: refused
            errors.append((str(info.value), message, path))
        return expected, await running, errors, await engine.complete("one", STORM, LONG)

    expected, finished, errors, after = run(main())
    for error, message, path in errors:
        assert message in error and error.startswith("adapter 'one':"), error
        assert str(path) in error, f"the error names the bundle: {error}"
    assert finished == expected and after == expected
    assert engine.bundle_dir("one") == bundles["one"].resolve()


def test_unload_lets_running_replies_finish_and_refuses_new_ones(engine, tiny_model_dir, tmp_path):
    bundle = make_bundle(tiny_model_dir, tmp_path / "gone", seed=7)

    async def main():
        await engine.load_adapter("gone", bundle)
        expected = await engine.complete("gone", HELLO, LONG)
        events: list = []
        running = asyncio.create_task(_collect(engine, "running", "gone", HELLO, LONG, events))
        await _first_piece(events, "running")
        await engine.unload_adapter("gone")
        with pytest.raises(EngineError, match=r"adapter 'gone' is not loaded \(loaded: .*one, .*two"):
            await engine.complete("gone", HELLO)
        finished = await running
        rt = await engine._runtime()
        await _until(lambda: rt.lora.loaded == len(engine._adapters))
        return expected, finished

    expected, finished = run(main())
    assert finished == expected


def test_a_failing_request_fails_alone(engine, monkeypatch):
    """Out of memory (simulated) in a prefill blames its own request; in a decode step, one request (the
    newest) is dropped and the others go on."""
    rt = run(engine._runtime())
    forward = rt.forward
    bad = engine._adapters["two"].slot
    failures = {"decode": 0}

    def flaky(ids, mask, positions, cache, slots):
        if ids.shape[1] > 1 and bad in slots:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        if ids.shape[1] == 1 and len(slots) == 3 and not failures["decode"]:
            failures["decode"] += 1
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(ids, mask, positions, cache, slots)

    monkeypatch.setattr(rt, "prefixes", PrefixCache(0))  # every prompt takes a (batched) prefill here

    async def main():
        expected = [await engine.complete("one", m, SAMPLING) for m in (HELLO, STORM)]
        monkeypatch.setattr(rt, "forward", flaky)
        prefill = await asyncio.gather(engine.complete("one", HELLO, SAMPLING), engine.complete("two", HELLO),
                                       engine.complete("one", STORM, SAMPLING), return_exceptions=True)
        decode = await asyncio.gather(*[engine.complete("one", m, SAMPLING) for m in (HELLO, STORM, HELLO)],
                                      return_exceptions=True)
        return expected, prefill, decode

    expected, prefill, decode = run(main())
    assert [prefill[0], prefill[2]] == expected
    assert isinstance(prefill[1], EngineError) and "out of memory while reading the prompt" in str(prefill[1])
    failed = [i for i, r in enumerate(decode) if isinstance(r, EngineError)]
    assert len(failed) == 1 and "out of memory while decoding" in str(decode[failed[0]])
    wanted = [expected[0], expected[1], expected[0]]
    assert all(decode[i] == wanted[i] for i in range(3) if i not in failed)


def test_long_history_is_trimmed_to_the_context(engine, tiny_tokenizer):
    from bot.engine.context import fit_messages

    history = []
    for i in range(40):
        history += [{"role": "user", "content": f"tell me about the storm number {i}"},
                    {"role": "assistant", "content": f"Arr, storm {i} be fine, lad."}]
    history.append({"role": "user", "content": "and the sea?"})
    manifest = engine.manifest("one")
    sent, ids = fit_messages(tiny_tokenizer, manifest, history, 512 - LONG.max_new_tokens, "one")
    assert len(sent) < len(history)
    assert run(engine.complete("one", history, LONG)) == run(engine.complete("one", sent[1:], LONG))


def test_unknown_adapter_and_failed_base_load_are_clear_errors(engine, tmp_path):
    with pytest.raises(EngineError, match=r"adapter 'nobody' is not loaded \(loaded: .*one, .*two"):
        run(engine.complete("nobody", HELLO))

    async def broken():
        eng = create_engine(EngineConfig(base_model=str(tmp_path / "no-such-model"), quantization="none"))
        try:
            await eng.load_adapter("x", tmp_path)
        finally:
            await eng.close()

    with pytest.raises(EngineError, match="no-such-model.*failed to load"):
        run(broken())


def test_event_loop_stays_responsive_while_loading_and_generating(tiny_model_dir, bundles):
    async def main():
        gaps: list[float] = []
        done = asyncio.Event()

        async def ticker():
            last = time.perf_counter()
            while not done.is_set():
                await asyncio.sleep(0.005)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        tick = asyncio.create_task(ticker())
        engine = _engine(tiny_model_dir)
        for name, path in bundles.items():
            await engine.load_adapter(name, path)
        replies = await asyncio.gather(*[engine.complete(a, m, LONG) for a in ("one", "two") for m in (HELLO, STORM)])
        await engine.close()
        done.set()
        await tick
        return gaps, replies

    gaps, replies = run(main())
    assert all(replies) and len(gaps) > 20
    assert max(gaps) < 0.1, f"event loop stalled for {max(gaps) * 1000:.0f} ms"


def test_nf4_base_serves_a_mixed_batch(tiny_model_dir, bundles):
    """The 4-bit base (bitsandbytes, here on CPU: LoRA slots in fp32 beside its bf16 compute dtype)."""
    pytest.importorskip("bitsandbytes")

    async def main():
        engine = LocalEngine(EngineConfig(base_model=str(tiny_model_dir), quantization="nf4", dtype=torch.bfloat16))
        for name, path in bundles.items():
            await engine.load_adapter(name, path)
        rt = await engine._runtime()
        alone = [await engine.complete(a, HELLO, SAMPLING) for a in ("one", "two")]
        together = await asyncio.gather(*[engine.complete(a, HELLO, SAMPLING) for a in ("one", "two")])
        await engine.close()
        return rt, alone, together

    rt, alone, together = run(main())
    assert rt.model.personabot_quantization == "nf4"
    assert rt.projections == [], "4-bit layers are not fused"
    assert all(alone) and alone[0] != alone[1] and together == alone


def test_loading_an_adapter_leaves_no_thread_behind(tiny_model_dir, bundles):
    """Reading a bundle runs torch ops; on a thread that lived on, their OpenMP team would compete with the
    engine worker's for the CPU cores (decoding at half speed), so that thread must end."""
    import threading

    async def main():
        engine = _engine(tiny_model_dir)
        await engine._runtime()
        before = set(threading.enumerate())
        await engine.load_adapter("one", bundles["one"])
        for _ in range(200):
            left = [t for t in threading.enumerate() if t not in before]
            if not left:
                break
            await asyncio.sleep(0.01)
        await engine.close()
        return left

    assert run(main()) == []


def test_parameter_count_matches_the_loaded_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert runtime.parameter_count(str(tiny_model_dir)) == sum(p.numel() for p in loaded.parameters())


@pytest.mark.parametrize("free_gib, expected", [(1024, "none"), (1e-4, "nf4")])
def test_auto_serves_the_16_bit_base_when_it_fits(tiny_model_dir, monkeypatch, free_gib, expected):
    """'auto' for serving: bf16 weights while they leave room for the KV cache, NF4 only when they would not."""
    pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(runtime, "free_memory", lambda: int(free_gib * 2**30))
    rt = runtime.Runtime.load(EngineConfig(base_model=str(tiny_model_dir), dtype=torch.bfloat16))
    assert rt.model.personabot_quantization == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quantization, dtype", [("none", torch.float32), ("nf4", torch.bfloat16)])
def test_gpu_mixed_batch(tiny_model_dir, bundles, quantization, dtype):
    async def main():
        engine = LocalEngine(EngineConfig(base_model=str(tiny_model_dir), quantization=quantization, dtype=dtype))
        for name, path in bundles.items():
            await engine.load_adapter(name, path)
        jobs = [("one", HELLO), ("two", STORM), ("one", STORM), ("two", HELLO)]
        alone = [await engine.complete(a, m, SAMPLING) for a, m in jobs]
        together = await asyncio.gather(*[engine.complete(a, m, SAMPLING) for a, m in jobs])
        await engine.close()
        return alone, together

    alone, together = run(main())
    assert all(alone) and all(together)
    if dtype == torch.float32:
        assert together == alone


def test_serve_base_answers_as_plain_generate_without_adapter_and_keeps_its_slot(engine, bundles, tiny_model_dir,
                                                                                tiny_tokenizer, tmp_path):
    """The base served by name (the synth teacher) is the model with no LoRA; the system prompt comes from the
    messages; unloading it or replacing it never frees the all-zero slot for an adapter."""
    from transformers import AutoModelForCausalLM

    system = [{"role": "system", "content": "You are the teacher."}]

    async def main():
        manifest = await engine.serve_base("teacher", sampling=SAMPLING)
        mixed = await asyncio.gather(engine.complete("teacher", system + HELLO), engine.complete("one", HELLO))
        await engine.serve_base("teacher", sampling=SAMPLING)  # replaced: must not retire slot 0
        await engine.serve_base("other")
        await engine.unload_adapter("other")
        await engine.load_adapter("three", make_bundle(tiny_model_dir, tmp_path / "three", seed=5))
        slot = engine._adapters["three"].slot
        again = await engine.complete("teacher", system + HELLO)
        await engine.unload_adapter("three")
        await engine.unload_adapter("teacher")
        return manifest, mixed, slot, again

    manifest, (base_text, adapter_text), slot, again = run(main())
    assert manifest.chat_template == tiny_tokenizer.chat_template and manifest.lora.r == 0
    assert slot != 0 and again == base_text
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = encode_prompt(tiny_tokenizer, "", system + HELLO)
    out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         **sampling_kwargs(SAMPLING, tiny_tokenizer, model))
    reference = [t for t in out[0, len(ids):].tolist() if t != tiny_tokenizer.eos_token_id]
    assert base_text == tiny_tokenizer.decode(reference, skip_special_tokens=True)
    assert adapter_text == run(engine.complete("one", HELLO))
