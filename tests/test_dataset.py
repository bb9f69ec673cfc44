"""Assistant-only labels, EOS trained, truncation, deterministic split and padding-free packing."""
from __future__ import annotations

import pytest
import torch

from finetune.conversation import Conversation, DataError
from finetune.dataset import (
    IGNORE, DataStats, build_datasets, encode_conversation, make_collator, split_conversations, tokenize,
)
from finetune.prompt import encode_prompt, render, with_default_system_prompt, with_system_prompt

CONVO = [
    {"role": "system", "content": "You are Brine."},
    {"role": "user", "content": "hello there"},
    {"role": "assistant", "content": "Arr, the tide be turning."},
    {"role": "user", "content": "what is the weather like?"},
    {"role": "assistant", "content": "Harrumph. Storms, lad."},
]


def _trained_text(tok, enc) -> str:
    return tok.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE])


def test_only_character_turns_are_labeled_and_eos_is_trained(tiny_tokenizer):
    enc = encode_conversation(tiny_tokenizer, CONVO)
    assert len(enc.input_ids) == len(enc.labels)
    assert _trained_text(tiny_tokenizer, enc) == (
        "Arr, the tide be turning.<|im_end|>\nHarrumph. Storms, lad.<|im_end|>\n"
    )
    eos = tiny_tokenizer.eos_token_id
    assert [lab for lab in enc.labels if lab == eos] == [eos, eos]
    # labels equal the input ids wherever they are set (the model shifts them itself)
    assert all(lab in (IGNORE, t) for t, lab in zip(enc.input_ids, enc.labels))
    # the tokens are exactly those of the rendered text: same as serving would produce
    assert enc.input_ids == tiny_tokenizer(render(tiny_tokenizer, CONVO), add_special_tokens=False)["input_ids"]


def test_pad_equal_to_eos_does_not_mask_eos(tiny_tokenizer):
    tiny_tokenizer = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    tiny_tokenizer.pad_token = tiny_tokenizer.eos_token
    enc = encode_conversation(tiny_tokenizer, CONVO)
    assert tiny_tokenizer.eos_token_id in enc.labels
    batch = make_collator(tiny_tokenizer, packing=False)(
        [{"input_ids": enc.input_ids, "labels": enc.labels},
         {"input_ids": enc.input_ids[:5], "labels": enc.labels[:5]}]
    )
    assert (batch["labels"][0] == tiny_tokenizer.eos_token_id).sum() == 2
    assert (batch["labels"][1, 5:] == IGNORE).all()


def test_serving_prompt_is_the_training_prefix(tiny_tokenizer):
    history = CONVO[1:4]
    prompt = encode_prompt(tiny_tokenizer, "You are Brine.", history)
    full = encode_conversation(tiny_tokenizer, CONVO).input_ids
    assert full[: len(prompt)] == prompt
    assert tiny_tokenizer.decode(full[len(prompt):]).startswith("Harrumph.")


def test_serving_adds_a_leading_system_turn_to_the_prompt_training_lets_it_win():
    msgs = [{"role": "user", "content": "hi"}]
    own = [{"role": "system", "content": "own"}, *msgs]
    for prepend in (with_system_prompt, with_default_system_prompt):
        assert prepend("S", msgs) == [{"role": "system", "content": "S"}, *msgs]
        assert prepend("", own) == own
    assert with_system_prompt("S", own) == [{"role": "system", "content": "S\n\nown"}, *msgs]
    assert with_default_system_prompt("S", own) == own


def test_weight_zero_turns_render_the_same_and_are_not_trained(tiny_tokenizer):
    plain = encode_conversation(tiny_tokenizer, CONVO)
    enc = encode_conversation(tiny_tokenizer, CONVO, context_turns=frozenset({2}))
    assert enc.input_ids == plain.input_ids  # the prompt the model sees does not change
    assert _trained_text(tiny_tokenizer, enc) == "Harrumph. Storms, lad.<|im_end|>\n"
    stats = DataStats()
    convo = Conversation(CONVO[1:], "f.jsonl:1", context_turns=frozenset({1}))  # indices without the system turn
    ds = tokenize([convo], tiny_tokenizer, "You are Brine.", None, 256, stats)
    assert ds[0]["labels"] == enc.labels


def _long_convo(turns: int) -> list[dict[str, str]]:
    convo = []
    for i in range(turns):
        convo += [{"role": "user", "content": f"question number {i} about the sea and the ships"},
                  {"role": "assistant", "content": f"Answer {i}: the sea be wide and the ships be many, lad."}]
    return convo


def test_long_conversations_drop_oldest_turns_and_never_cut_a_reply(tiny_tokenizer):
    convo = _long_convo(12)
    whole = len(encode_conversation(tiny_tokenizer, with_system_prompt("You are Brine.", convo)).input_ids)
    stats = DataStats()
    ds = tokenize([Conversation(convo, "f.jsonl:1")], tiny_tokenizer, "You are Brine.", None, whole // 3, stats)
    assert len(ds) >= 3 and stats.split == 1 and stats.problems == []
    eos = tiny_tokenizer.eos_token_id
    trained = []
    for row in ds:
        assert len(row["input_ids"]) <= whole // 3
        text = tiny_tokenizer.decode(row["input_ids"])
        assert text.startswith("<|im_start|>system\nYou are Brine.")  # the system prompt always stays
        assert row["labels"][-2:] == row["input_ids"][-2:] and eos in row["labels"][-2:]  # reply ends whole
        trained.append(tiny_tokenizer.decode([t for t in row["labels"] if t != IGNORE]))
    # every reply is trained exactly once; earlier replies in a window are context
    answers = "".join(trained)
    assert [answers.count(f"Answer {i}:") for i in range(12)] == [1] * 12


def test_windows_keep_a_conversations_own_system_prompt(tiny_tokenizer):
    convo = [{"role": "system", "content": "Storm tonight."}, *_long_convo(12)]
    stats = DataStats()
    ds = tokenize([Conversation(convo, "f.jsonl:1", context_turns=frozenset({2}))], tiny_tokenizer,
                  "You are Brine.", None, 120, stats)
    assert len(ds) > 1 and stats.problems == []
    for row in ds:
        assert tiny_tokenizer.decode(row["input_ids"]).startswith("<|im_start|>system\nStorm tonight.")
    answers = "".join(tiny_tokenizer.decode([t for t in row["labels"] if t != IGNORE]) for row in ds)
    assert [answers.count(f"Answer {i}:") for i in range(12)] == [0] + [1] * 11  # weight 0 stays untrained


def test_a_reply_too_long_for_max_seq_len_is_refused_by_name(tiny_tokenizer):
    convo = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 60},
             {"role": "user", "content": "again"}, {"role": "assistant", "content": "Aye."}]
    stats = DataStats()
    ds = tokenize([Conversation(convo, "f.jsonl:1")], tiny_tokenizer, "S", None, 40, stats)
    assert len(ds) == 1 and stats.problems == [
        "f.jsonl:1: the character's reply (message 2) does not fit max_seq_len=40 even with no earlier turns; "
        "it is not trained (raise max_seq_len or split the reply)"
    ]


def test_a_system_prompt_longer_than_max_seq_len_is_one_clear_error(tiny_tokenizer):
    with pytest.raises(DataError, match=(
        r"the system prompt alone is \d+ tokens: max_seq_len=32 leaves no room for any reply; "
        r"raise max_seq_len \(data.max_seq_len in the training config, --max-seq-len for `finetune data`\) "
        r"to at least \d+, or shorten the prompt \(for a card: description, personality, scenario\)")):
        build_datasets([Conversation(CONVO[1:], "f:1")], tiny_tokenizer, "word " * 40, None, 32, 0.0, 0)


def test_split_is_deterministic_and_disjoint():
    convos = [Conversation([{"role": "assistant", "content": str(i)}], f"f:{i}") for i in range(50)]
    a_train, a_eval = split_conversations(convos, 0.1, seed=3)
    b_train, b_eval = split_conversations(convos, 0.1, seed=3)
    assert [c.origin for c in a_eval] == [c.origin for c in b_eval] and len(a_eval) == 5
    assert not {c.origin for c in a_train} & {c.origin for c in a_eval}
    assert len(a_train) + len(a_eval) == 50
    assert split_conversations(convos[:5], 0.1, seed=3)[1] == []


def test_build_datasets_counts(tiny_tokenizer):
    convos = [Conversation(CONVO[1:], f"f.jsonl:{i}") for i in range(20)]
    train, evals, stats = build_datasets(convos, tiny_tokenizer, "You are Brine.", None, 256, 0.1, 0)
    assert (stats.train_examples, stats.eval_examples) == (18, 2)
    assert len(train) == 18 and evals is not None and len(evals) == 2
    assert stats.trained_tokens < stats.tokens and stats.split == 0


def test_packing_keeps_conversations_independent(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    a = encode_conversation(tiny_tokenizer, CONVO)
    b = encode_conversation(tiny_tokenizer, CONVO[:3])
    rows = [{"input_ids": a.input_ids, "labels": a.labels}, {"input_ids": b.input_ids, "labels": b.labels}]
    packed = make_collator(tiny_tokenizer, packing=True)(rows)
    n_a = len(a.input_ids)
    assert packed["input_ids"].shape == (1, n_a + len(b.input_ids))
    assert packed["position_ids"][0, n_a].item() == 0  # positions restart at the boundary
    assert packed["labels"][0, n_a].item() == IGNORE  # no loss across the boundary
    with torch.no_grad():
        joint = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        alone_b = model(input_ids=torch.tensor([b.input_ids]), use_cache=False).logits
    torch.testing.assert_close(joint[0, n_a:], alone_b[0], atol=1e-4, rtol=1e-4)


def test_trainer_loss_on_kept_positions_equals_full_loss(tiny_model_dir, tiny_tokenizer, monkeypatch):
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from finetune.train import PersonaTrainer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    a = encode_conversation(tiny_tokenizer, CONVO)
    b = encode_conversation(tiny_tokenizer, CONVO[:3])
    batch = make_collator(tiny_tokenizer, packing=True)(
        [{"input_ids": a.input_ids, "labels": a.labels}, {"input_ids": b.input_ids, "labels": b.labels}]
    )
    trainer = PersonaTrainer(model=model, args=TrainingArguments(output_dir="/tmp/unused", report_to="none"))
    with torch.no_grad():
        fast = trainer.compute_loss(model, dict(batch))
        full = model(**batch, use_cache=False).loss
        torch.testing.assert_close(fast, full)
        # as in a 2-process run with the token count summed over both: scaled exactly as the stock loss
        monkeypatch.setattr(trainer.accelerator.state, "num_processes", 2)  # a process-wide singleton
        count = torch.tensor(3 * int((batch["labels"][0, 1:] != IGNORE).sum()))
        stock = Trainer.compute_loss(trainer, model, dict(batch), num_items_in_batch=count)
        torch.testing.assert_close(trainer.compute_loss(model, dict(batch), num_items_in_batch=count), stock)
        assert stock.item() == pytest.approx(full.item() * 2 / 3, rel=1e-4)



def test_evaluation_loss_takes_the_kept_positions_path_and_equals_the_stock_one(tiny_model_dir, tiny_tokenizer,
                                                                                 tmp_path):
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from finetune.train import PersonaTrainer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    rows = [{"input_ids": e.input_ids, "labels": e.labels}
            for e in (encode_conversation(tiny_tokenizer, CONVO[:n]) for n in (2, 3, 4, 4))]
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", per_device_eval_batch_size=2,
                             remove_unused_columns=False)
    collator = make_collator(tiny_tokenizer, packing=True)
    kept, forward = [], model.forward

    def spy(*a, **kw):
        kept.append(type(kw.get("logits_to_keep")).__name__)
        return forward(*a, **kw)

    model.forward = spy
    fast = PersonaTrainer(model=model, args=args, eval_dataset=rows, data_collator=collator).evaluate()
    fast_calls, kept[:] = list(kept), []
    stock = Trainer(model=model, args=args, eval_dataset=rows, data_collator=collator).evaluate()
    assert fast["eval_loss"] == pytest.approx(stock["eval_loss"], rel=1e-5)
    assert fast_calls == ["Tensor", "Tensor"] and kept == ["NoneType", "NoneType"]

_FUSED_CHECK = """
import sys, torch
import liger_kernel.transformers.model.llama as liger_llama
from transformers import AutoModelForCausalLM, TrainingArguments
from transformers.integrations.liger import apply_liger_kernel
from finetune.dataset import make_collator
from finetune.train import PersonaTrainer

torch.manual_seed(0)
rows = []
for n in (40, 25, 60):
    ids = torch.randint(5, 200, (n,)).tolist()
    rows.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:]})
batch = make_collator(None, packing=True)(rows)
fused_calls = []
loss_fn = liger_llama.lce_maybe_trainable_lm_head
liger_llama.lce_maybe_trainable_lm_head = lambda *a, **k: fused_calls.append(k) or loss_fn(*a, **k)
device = "cuda" if torch.cuda.is_available() else "cpu"
batch = {key: value.to(device) for key, value in batch.items()}
for fused in (False, True):
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).to(device)
    args = TrainingArguments(output_dir=sys.argv[2], report_to="none", use_liger_kernel=fused)
    trainer = PersonaTrainer(model=model, args=args)
    if fused:  # the loss kernel only: the Triton interpreter cannot run Liger's RMSNorm
        apply_liger_kernel(model, {"rope": False, "rms_norm": False, "swiglu": False})
        assert model.forward.__func__.__module__.startswith("liger_kernel"), model.forward
    loss = trainer.compute_loss(model.train(), batch)
    loss.backward()
    print(fused, loss.item(), model.model.layers[0].mlp.up_proj.weight.grad.norm().item(), len(fused_calls),
          flush=True)
"""


def test_fused_linear_cross_entropy_gives_the_same_loss_and_gradients(tiny_model_dir, tmp_path, run_python):
    """With Liger on, the loss on kept positions runs through its fused kernel (on a GPU; without one under
    Triton's CPU interpreter, which Triton 3.6's cannot run) and must match the plain cross-entropy exactly
    enough to train the same."""
    pytest.importorskip("liger_kernel")
    interpret = {} if torch.cuda.is_available() else {"TRITON_INTERPRET": "1"}
    out = run_python(_FUSED_CHECK, str(tiny_model_dir), str(tmp_path), **interpret)
    assert out.returncode == 0, out.stderr[-3000:]
    plain, fused = [line.split() for line in out.stdout.splitlines()[-2:]]
    assert (plain[0], plain[3], fused[0], fused[3]) == ("False", "0", "True", "1")  # the fused kernel ran once
    assert float(fused[1]) == pytest.approx(float(plain[1]), rel=1e-5)
    assert float(fused[2]) == pytest.approx(float(plain[2]), rel=1e-4)
