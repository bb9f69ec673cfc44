"""The vLLM command a personas file needs, and the module names the bot sends."""
from __future__ import annotations

import json
import shlex

import pytest

from bot.engine import EngineError
from bot.engine.vllm import lora_rank_limit, module_name, vllm_command
from engine_fixtures import make_bundle


def test_module_names_are_what_a_shell_and_lora_modules_take():
    assert module_name("Captain Brine") == "captain-brine"
    assert module_name("  Old  Coral (v2) ") == "old-coral-v2"
    assert module_name("Zoë") == "zoë"
    with pytest.raises(EngineError, match="persona '!!': no letters or digits"):
        module_name("!!")


def test_ranks_round_up_to_what_vllm_accepts():
    assert [lora_rank_limit(r) for r in (1, 2, 8, 9, 16, 17, 33, 300, 512)] == [1, 8, 8, 16, 16, 32, 64, 320, 512]
    with pytest.raises(EngineError, match="LoRA rank 513 is larger than vLLM's largest"):
        lora_rank_limit(513)


@pytest.fixture(scope="module")
def bundles(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-cmd")
    return {"brine": make_bundle(tiny_model_dir, root / "brine", seed=1, r=4),
            "coral": make_bundle(tiny_model_dir, root / "coral", seed=2, r=24)}


def test_command_serves_every_persona_under_its_module_name(bundles, tiny_model_dir):
    cmd = vllm_command([("Captain Brine", bundles["brine"]), ("Old Coral", bundles["coral"])], str(tiny_model_dir),
                       port=8011, max_model_len=1024)
    argv = cmd.argv
    assert argv[:3] == ["python", "-m", "vllm.entrypoints.openai.api_server"]
    flags = " ".join(argv[3:])
    assert f"--lora-modules captain-brine={bundles['brine']} old-coral={bundles['coral']}" in flags
    assert "--max-loras 2 --max-lora-rank 32" in flags  # r=24 rounds up to vLLM's 32
    assert "--host 127.0.0.1 --port 8011" in flags and "--max-model-len 1024" in flags
    manifest = json.loads((bundles["brine"] / "persona.json").read_text())
    assert argv[argv.index("--served-model-name") + 1] == manifest["base_model"]
    assert argv[argv.index("--chat-template") + 1] == str(bundles["brine"] / "chat_template.jinja")
    assert cmd.env == {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"} and cmd.notes == []
    pasted = shlex.split(cmd.shell().replace("\\\n", " "))
    assert pasted == ["VLLM_ALLOW_RUNTIME_LORA_UPDATING=True", *argv]


def test_command_leaves_room_for_larger_swaps_and_can_forbid_them(bundles, tiny_model_dir):
    cmd = vllm_command([("Brine", bundles["brine"])], str(tiny_model_dir), max_model_len=512, min_lora_rank=64,
                       swaps=False)
    assert cmd.argv[cmd.argv.index("--max-lora-rank") + 1] == "64" and cmd.env == {}


def test_command_refuses_what_one_server_cannot_serve(bundles, tiny_model_dir, tmp_path):
    with pytest.raises(EngineError, match="personas 'Brine' and 'brine!' both become LoRA module 'brine'"):
        vllm_command([("Brine", bundles["brine"]), ("brine!", bundles["coral"])], str(tiny_model_dir),
                     max_model_len=512)
    other = tmp_path / "other"
    other.mkdir()
    for f in bundles["coral"].iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((other / "persona.json").read_text())
    (other / "persona.json").write_text(json.dumps({**manifest, "base_model": "another-base"}))
    with pytest.raises(EngineError, match="were trained on different base models .* run a server per base"):
        vllm_command([("Brine", bundles["brine"]), ("Coral", other)], str(tiny_model_dir), max_model_len=512)
    with pytest.raises(EngineError, match=f"persona 'Ghost': {tmp_path / 'nowhere'}: adapter bundle folder not"):
        vllm_command([("Ghost", tmp_path / "nowhere")], str(tiny_model_dir), max_model_len=512)


def test_personabot_vllm_command_prints_it_for_a_personas_file(bundles, tiny_model_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from bot.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MAX_CONTEXT", raising=False)
    (tmp_path / "personas.yaml").write_text(
        f"personas:\n  - {{name: Captain Brine, adapter: {bundles['brine']}}}\n"
        f"  - {{name: Old Coral, adapter: {bundles['coral']}}}\n")
    result = CliRunner().invoke(app, ["vllm-command", "--port", "8123", "--python", ".venv-vllm/bin/python"])
    assert result.exit_code == 0, result.output
    command, then = result.output.rstrip("\n").rsplit("\n", 1)
    argv = shlex.split(command.replace("\\\n", " "))
    assert argv[:4] == ["VLLM_ALLOW_RUNTIME_LORA_UPDATING=True", ".venv-vllm/bin/python", "-m",
                        "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--model") + 1] == str(tiny_model_dir)
    max_len = json.loads((tiny_model_dir / "config.json").read_text())["max_position_embeddings"]
    assert argv[argv.index("--max-model-len") + 1] == str(max_len)
    assert argv[argv.index("--lora-modules") + 1:][:2] == [f"captain-brine={bundles['brine']}",
                                                           f"old-coral={bundles['coral']}"]
    assert then == "# then: ENGINE=openai OPENAI_BASE_URL=http://127.0.0.1:8123/v1 personabot run"
    result = CliRunner().invoke(app, ["vllm-command", "--persona", "Captain Brine", "--model", str(tmp_path)])
    assert result.exit_code == 2
    assert f"error: {tmp_path}: its context length is unknown here; pass --max-model-len" in " ".join(
        result.output.split())
