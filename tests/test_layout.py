"""The layout's promises: the serving side stands on the bundle contract alone."""
from __future__ import annotations

import json

TRAINING_ONLY = ("finetune.readers", "finetune.persona", "finetune.dataset", "finetune.train", "PIL", "datasets")


def test_the_bot_imports_only_the_contract(run_python):
    """In a fresh interpreter, the bot and its engine interface load none of the training side (data readers,
    dataset building, the trainer, Pillow, datasets), and not torch either: an openai-engine bot never needs it."""
    out = run_python(
        "import json, sys\n"
        "import bot.app, bot.cli, bot.engine, bot.engine.openai\n"
        f"print(json.dumps([m for m in {TRAINING_ONLY + ('torch',)!r} if m in sys.modules]))\n"
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


def test_the_local_engine_loads_no_training_code(run_python):
    """(Pillow is left out here: transformers' chat-template code imports it whenever it is installed.)"""
    ours = tuple(m for m in TRAINING_ONLY if m.startswith("finetune.")) + ("datasets",)
    out = run_python(
        "import json, sys\n"
        "import bot.engine.local\n"
        f"print(json.dumps([m for m in {ours!r} if m in sys.modules]))\n"
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []
