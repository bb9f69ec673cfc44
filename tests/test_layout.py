"""The layout's promises: the serving side stands on the bundle contract alone."""
from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TRAINING_ONLY = ("finetune.readers", "finetune.persona", "finetune.dataset", "finetune.train", "PIL", "datasets")


def loaded(run_python, imports: str, modules: tuple[str, ...]) -> list[str]:
    """Which of ``modules`` a fresh interpreter has loaded after ``import {imports}``."""
    out = run_python(f"import json, sys\nimport {imports}\nprint(json.dumps([m for m in {modules!r} if m in sys.modules]))")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_the_bot_imports_only_the_contract(run_python):
    """The bot and its engine interface load none of the training side (data readers, dataset building, the
    trainer, Pillow, datasets), and not torch either: an openai-engine bot never needs it."""
    assert loaded(run_python, "bot.app, bot.cli, bot.engine, bot.engine.openai", (*TRAINING_ONLY, "torch")) == []


def test_the_local_engine_loads_no_training_code(run_python):
    """(Pillow is left out here: transformers' chat-template code imports it whenever it is installed.)"""
    ours = (*(m for m in TRAINING_ONLY if m.startswith("finetune.")), "datasets")
    assert loaded(run_python, "bot.engine.local", ours) == []


def test_the_readme_layout_names_every_module():
    """README's "How the code is laid out" lists every module and package folder of bot/ and finetune/."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## How the code is laid out", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"[\w]+(?:\.py|/)", section))
    for package in ("bot", "finetune"):
        for path in (REPO / package).rglob("*"):
            if path.name == "__init__.py" or "__pycache__" in path.parts:
                continue
            if path.suffix == ".py" or (path.is_dir() and (path / "__init__.py").exists()):
                name = path.name + ("/" if path.is_dir() else "")
                assert name in named, f"README's layout section does not mention {path.relative_to(REPO)}"
