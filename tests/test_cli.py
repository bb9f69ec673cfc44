"""The `finetune` command line: config errors name the field, data check lists bad lines, train via CLI."""
from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from finetune.cli import app
from finetune.config import ConfigError, load_config

runner = CliRunner()


def test_config_overrides_are_typed_and_validated(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("persona: p\noutput_dir: out\ntrain:\n  epochs: 2\n")
    cfg = load_config(path, ["train.learning_rate=1e-4", "lora.target_modules=[q_proj, v_proj]", "data.packing=false"])
    assert cfg.train.learning_rate == 1e-4 and cfg.train.epochs == 2
    assert cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.data.packing is False
    assert str(cfg.checkpoints) == "out-checkpoints"
    with pytest.raises(ConfigError, match=r"c.yaml: field 'train.lerning_rate': Extra inputs are not permitted"):
        load_config(path, ["train.lerning_rate=1"])
    with pytest.raises(ConfigError, match=r"field 'lora.r': Input should be greater than 0"):
        load_config(path, ["lora.r=0"])
    with pytest.raises(ConfigError, match=r"c.yaml: train.save_steps \(20\) must be a multiple of "
                                          r"train.eval_steps \(15\)"):
        load_config(path, ["train.save_steps=20", "train.eval_steps=15"])
    with pytest.raises(ConfigError, match=r"expected key=value"):
        load_config(path, ["train.epochs"])
    path.write_text("persona: [unclosed\n")
    with pytest.raises(ConfigError, match=r"c.yaml:2: invalid YAML"):
        load_config(path)


def test_builtin_recipes_validate():
    from finetune.cli import RECIPES

    for recipe in RECIPES.glob("*.yaml"):
        load_config(recipe)


def test_data_check_reports_bad_lines_and_counts(tiny_persona, tiny_model_dir):
    with open(tiny_persona / "dialogue.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"messages": [{"role": "narrator", "content": "x"}]}\n')
        fh.write("{not json\n")
    result = runner.invoke(app, ["data", "check", str(tiny_persona), "--base-model", str(tiny_model_dir)])
    assert result.exit_code == 1, result.output
    out = " ".join(result.output.split())
    assert "dialogue.jsonl:41:" in out and "narrator" in out
    assert "dialogue.jsonl:42:" in out
    assert re.search(r"conversations\W+40\W", out) and re.search(r"train / eval examples\W+36 / 4", out)


def test_data_preview_renders_template(tiny_persona, tiny_model_dir):
    result = runner.invoke(app, ["data", "preview", str(tiny_persona), "--base-model", str(tiny_model_dir), "-n", "1"])
    assert result.exit_code == 0, result.output
    assert "<|im_start|>system" in result.output and "Arr, the tide be fine, lad." in result.output


def test_piped_preview_marks_trained_spans_and_does_not_wrap(tiny_persona, tiny_model_dir):
    long_question = "tell me [draft] about " + "the wide and the windy " * 6 + "sea"
    with open(tiny_persona / "dialogue.jsonl", "w", encoding="utf-8") as fh:
        fh.write(json.dumps({"messages": [{"role": "user", "content": long_question},
                                          {"role": "assistant", "content": "Arr, [truncated] lad."}]}) + "\n")
    result = runner.invoke(app, ["data", "preview", str(tiny_persona), "--base-model", str(tiny_model_dir)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert long_question + "<|im_end|>" in lines  # one line, brackets and all: no markup, no wrap at 80
    assert f"── {tiny_persona / 'dialogue.jsonl'}:1" in lines  # the origin in full, not cut to 80 columns
    assert "⟦Arr, [truncated] lad.<|im_end|>" in result.output  # trained span marked without colour
    assert result.output.count("⟦") == 2  # the legend and the one reply: the prompt is not marked


def test_errors_keep_bracketed_text(tmp_path):
    card = tmp_path / "card [draft].json"
    card.write_text("{not json", encoding="utf-8")
    result = runner.invoke(app, ["data", "check", str(card)])
    assert result.exit_code == 2 and "card [draft].json" in result.output


def test_data_check_on_a_card_says_how_each_lorebook_entry_is_used(tiny_model_dir):
    from pathlib import Path

    card = Path(__file__).parent / "data" / "cards" / "wren.json"
    result = runner.invoke(app, ["data", "check", str(card), "--base-model", str(tiny_model_dir)])
    assert result.exit_code == 1, result.output  # the card has fields personabot ignores: named, so exit 1
    lines = result.output.splitlines()
    assert f"{card}: character_book: 6 entries" in lines
    assert "  entries[3] (no keys): always in the prompt when serving" in lines
    assert any(line.startswith("  entries[4] father dialogue: ") and line.endswith(
        "its dialogue is also a training conversation") for line in lines)
    assert f"{card}: data.character_book.entries[4]: field 'extensions.probability' ignored " \
           "(triggered entries always apply)" in lines


def test_train_cli_and_clear_errors(tiny_persona, tiny_model_dir, tmp_path):
    out = tmp_path / "bundle"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"persona: {tiny_persona}\nbase_model: {tiny_model_dir}\noutput_dir: {out}\nquantization: none\n")
    result = runner.invoke(app, ["train", str(cfg), "--set", "train.max_steps=2", "--set", "data.max_seq_len=128"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "persona.json").read_text())["training"]["steps"] == 2

    result = runner.invoke(app, ["train", str(cfg), "--set", "persona=/nonexistent"])
    assert result.exit_code == 2 and "/nonexistent" in result.output
    result = runner.invoke(app, ["train", "no-such-recipe"])
    assert result.exit_code == 2 and "built-in recipe (demo, qlora)" in result.output
    result = runner.invoke(app, ["eval", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "adapter bundle folder not found" in result.output
