"""Shared fixtures: a tiny offline Llama + tokenizer and a small persona, built once per session."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tiny_model import build_tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def llama_code_as_transformers_ships_it(monkeypatch):
    """Liger's kernels (the engine's default on a GPU) rebind these for the whole process: each test starts
    from transformers' own and leaves them so."""
    from transformers.models.llama import modeling_llama

    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def run_python():
    """Run a Python snippet in a process of its own (Liger rebinds functions process-wide), with this checkout
    importable ahead of what PYTHONPATH already holds (on the GPU machine, the kit's wheels)."""
    def run(code: str, *args: str, **env: str) -> subprocess.CompletedProcess:
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        return subprocess.run([sys.executable, "-c", code, *args], env={**os.environ, "PYTHONPATH": path, **env},
                              capture_output=True, text=True, timeout=300)

    return run


@pytest.fixture(scope="session")
def built_kernels():
    """The engine's CPU kernels (``cpu_kernels``), built on this machine; skips where no C++ compiler is."""
    import shutil

    from bot.engine.local import cpu_kernels

    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the engine keeps torch ops (tested elsewhere)")
    built = cpu_kernels.load()
    assert built is not None, "a machine with a C++ compiler builds the kernels (see the log for why not)"
    return built


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def write_persona(root: Path, n: int = 40, name: str = "Brine") -> Path:
    """A persona folder whose character always answers 'Arr, <echo> ~' so learning is easy to see."""
    root.mkdir(parents=True, exist_ok=True)
    words = ["tide", "storm", "fish", "lad", "boat", "sea", "salt", "wave"]
    with open(root / "dialogue.jsonl", "w", encoding="utf-8") as fh:
        for i in range(n):
            w = words[i % len(words)]
            fh.write(json.dumps({"messages": [
                {"role": "user", "content": f"tell me about the {w}"},
                {"role": "assistant", "content": f"Arr, the {w} be fine, lad."},
            ]}) + "\n")
    (root / "persona.toml").write_text(
        f'name = "{name}"\nsystem_prompt = "You are {name}."\n'
        'style_checks = ["^Arr,"]\n'
        '[sampling]\ntemperature = 0.0\nmax_new_tokens = 12\n'
        '[[sources]]\npath = "dialogue.jsonl"\n',
        encoding="utf-8",
    )
    return root


@pytest.fixture
def tiny_persona(tmp_path) -> Path:
    return write_persona(tmp_path / "persona")
