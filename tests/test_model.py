"""Base model specs, the 16-bit fallback, chat and export of a bundle."""
from __future__ import annotations

import logging

import pytest
import torch
from typer.testing import CliRunner

from finetune import model as model_mod
from finetune.cli import app
from finetune.config import load_config
from finetune.model import EMBEDDED_DEFAULT, ModelError, load_model, resolve
from finetune.train import train


def test_resolve_specs(tmp_path, tiny_model_dir):
    ref = resolve(EMBEDDED_DEFAULT)
    assert ref.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf" and ref.name.startswith("smollm2:")
    assert resolve(str(tiny_model_dir)).name == "model"
    hub = resolve("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert hub.name == hub.path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(ModelError, match="GGUF file not found"):
        resolve(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="has no config.json"):
        resolve(str(tmp_path / "empty"))


def test_auto_falls_back_to_16bit_without_bitsandbytes(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(model_mod, "bnb_available", lambda: False)
    base = load_model(resolve(str(tiny_model_dir)), "auto")
    assert not getattr(base, "is_loaded_in_4bit", False) and base.personabot_quantization == "none"
    with pytest.raises(ModelError, match="needs a working bitsandbytes"):
        load_model(resolve(str(tiny_model_dir)), "nf4")


@pytest.fixture
def tiny_bundle(tiny_persona, tiny_model_dir, tmp_path):
    out = tmp_path / "bundle"
    train(load_config(None, [
        f"persona={tiny_persona}", f"base_model={tiny_model_dir}", f"output_dir={out}", "quantization=none",
        "data.max_seq_len=128", "train.epochs=6", "train.learning_rate=5e-3", "train.save_steps=100",
        "train.gradient_checkpointing=false",
    ]))
    return out


def test_export_merges_adapter_into_base(tiny_bundle, tmp_path):
    from transformers import AutoModelForCausalLM

    from finetune.inference import load_bundle_model

    result = CliRunner().invoke(app, ["export", str(tiny_bundle), str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    peft_model, tok, _ = load_bundle_model(tiny_bundle, "none")
    peft_model = peft_model.float()
    ids = torch.tensor([tok("Arr, the tide be fine")["input_ids"]])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        base = peft_model.get_base_model()
        with peft_model.disable_adapter():
            plain = base(input_ids=ids).logits
    assert not torch.allclose(plain, expected, atol=1e-3), "the adapter must change the outputs"
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)  # bf16 merge
    assert (tmp_path / "merged" / "persona.json").is_file()


def test_terminal_chat_streams_and_keeps_history(tiny_bundle):
    result = CliRunner().invoke(
        app, ["chat", str(tiny_bundle), "--quantization", "none"],
        input="tell me about the boat\n/reset\ntell me about the fish\n/quit\n",
    )
    assert result.exit_code == 0, result.output
    assert result.output.count("Brine>") == 2
    assert "(conversation forgotten)" in result.output
    assert "Arr," in result.output


def test_terminal_chat_serves_a_cards_greeting_and_context(tiny_bundle, monkeypatch):
    """A card bundle chats as the bot serves it: the greeting opens each chat (and is the first assistant
    turn), and the card's post-history instructions follow the last turn."""
    from finetune.bundle import MANIFEST, load_manifest
    from finetune.cards.context import CardContext

    manifest = load_manifest(tiny_bundle).model_copy(update={"card": CardContext(
        greetings=["Ahoy, {{user}}!"], post_history_instructions="Answer in one line.")})
    (tiny_bundle / MANIFEST).write_text(manifest.model_dump_json())
    seen = []

    def stream_reply(model, tokenizer, manifest, messages, sampling=None):
        seen.append(messages)
        yield "Arr."

    monkeypatch.setattr("finetune.chat.stream_reply", stream_reply)
    result = CliRunner().invoke(app, ["chat", str(tiny_bundle), "--quantization", "none"],
                                input="hello\n/reset\n/quit\n")
    assert result.exit_code == 0, result.output
    assert result.output.count("Ahoy, User!") == 2, "at the start and after /reset"
    assert seen == [[{"role": "assistant", "content": "Ahoy, User!"}, {"role": "user", "content": "hello"},
                     {"role": "system", "content": "Answer in one line."}]]


def test_eval_samples_replies_as_the_bot_serves_them(tiny_bundle, monkeypatch):
    """The style checks score replies prompted as served: with the card's lorebook, depth prompt and
    post-history instructions (the held-out loss keeps the trained rendering)."""
    from finetune.bundle import load_manifest
    from finetune.cards.context import CardContext
    from finetune.evaluate import evaluate_bundle
    from finetune.inference import load_bundle_model

    model, tokenizer, manifest = load_bundle_model(tiny_bundle, quantization="none")
    manifest = manifest.model_copy(update={"card": CardContext(post_history_instructions="Answer in one line.")})
    seen = []

    def reply(model, tokenizer, manifest, messages, sampling=None):
        seen.append(messages)
        return "Arr, aye."

    monkeypatch.setattr("finetune.evaluate.reply", reply)
    evaluate_bundle(model, tokenizer, manifest, samples=1)
    assert seen and all(m[-1] == {"role": "system", "content": "Answer in one line."} for m in seen)
    assert load_manifest(tiny_bundle).card is None, "the bundle on disk is untouched"


def test_a_seeded_sampling_repeats_its_reply(tiny_bundle):
    """finetune chat and eval honour a persona's sampling seed as the engines do."""
    from finetune.bundle import Sampling
    from finetune.inference import load_bundle_model, reply

    model, tokenizer, manifest = load_bundle_model(tiny_bundle, quantization="none")
    said = [{"role": "user", "content": "tell me about the boat"}]

    calls = iter(range(1000, 2000))

    def sampled(seed: int) -> str:
        torch.manual_seed(next(calls))  # the shared generator is somewhere else at every call
        return reply(model, tokenizer, manifest, said, Sampling(temperature=1.5, top_k=0, top_p=1.0,
                                                                  max_new_tokens=24, seed=seed))

    assert sampled(3) == sampled(3)
    assert len({sampled(seed) for seed in range(4)}) > 1, "another seed, another reply"


def test_bitsandbytes_warning_about_its_hub_kernel_is_silenced_and_its_other_warnings_are_not():
    """bitsandbytes falls back to its own CPU kernel when it cannot fetch one from the hub; nothing to warn of."""
    bnb_log = logging.getLogger("bitsandbytes.backends.cpu.ops")  # the logger bitsandbytes 0.50 warns on

    def record(msg: str, *args: object) -> logging.LogRecord:
        return bnb_log.makeRecord(bnb_log.name, logging.WARNING, "ops.py", 253, msg, args, None)

    hub = record("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
                 "`pip install kernels`", "No module named 'kernels'")
    assert not bnb_log.filter(hub)
    assert bnb_log.filter(record("something else went wrong"))
