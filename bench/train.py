"""Training throughput: personabot's `finetune` path vs the plain transformers+peft+bitsandbytes recipe.

Same base, same LoRA (r=16, all linear layers), same examples (a persona-like length mix: most
conversations 100-800 tokens, the character's turns ~1/3 of the tokens), same optimizer, same run.
Each variant runs in its own subprocess so peak memory is measured cleanly. Prints useful (non-pad)
tokens/s and peak memory for both, and their ratios.

    python bench/train.py                                  # CPU: embedded SmolLM2-135M, a few steps
    python bench/train.py --shape llama-8b --steps 20      # GPU: Llama-3.1-8B shapes, random weights
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import SHAPES, random_base, sync  # noqa: E402  (random-weight stand-ins with real shapes)
from finetune.dataset import IGNORE  # noqa: E402


def examples(n: int, vocab: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """Persona-like conversations: lognormal lengths clipped to 64..1024, alternating user/character turns."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = int(min(1024, max(64, rng.lognormvariate(5.6, 0.6))))
        ids = [rng.randrange(10, vocab) for _ in range(length)]
        labels, pos, trained = [IGNORE] * length, 0, False
        while pos < length:
            turn = rng.randint(15, 60)
            if trained:
                labels[pos : pos + turn] = ids[pos : pos + turn]
            pos, trained = pos + turn, not trained
        out.append({"input_ids": ids, "labels": labels})
    return out


def load_base(args: argparse.Namespace, attention: str):
    """The base both variants train, loaded as ``finetune`` loads it (the random-shape one written once)."""
    from finetune.model import compute_dtype, load_model, resolve

    spec = "smollm2"
    if args.shape != "smollm2":  # the tokenizer only lends its special token ids
        root = Path(os.environ.get("BENCH_CACHE", "/tmp/personabot-bench"))
        spec = random_base(args.shape, args.tokenizer, compute_dtype(), root)
    return load_model(resolve(spec), args.quantization, attention=attention)


def run_variant(args: argparse.Namespace) -> dict:
    """One variant, in this process: build the trainer, time ``args.steps`` steps after 2 warm-up steps."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from finetune.attention import VARLEN, packed_attention
    from finetune.config import load_config
    from finetune.dataset import make_collator
    from finetune.train import PersonaTrainer, add_lora, use_fused_kernels

    # our default: per-conversation (varlen) attention where it passes its check (--no-varlen-attention: off)
    attention = packed_attention("auto" if args.varlen_attention else False) if args.variant == "personabot" else "sdpa"
    model = load_base(args, attention)
    vocab = model.config.vocab_size
    data = examples(args.batch_size * (args.steps + 2), vocab)
    gc = args.gradient_checkpointing
    if args.variant == "plain":
        if getattr(model, "is_loaded_in_4bit", False):
            # non-reentrant checkpointing, as transformers' own default (peft's would be the older reentrant one)
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc,
                                                    gradient_checkpointing_kwargs={"use_reentrant": False})
        elif gc:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
        trainer_cls, collator = Trainer, _pad_collator
    else:
        checkpointing = args.checkpoint_every if gc else False
        cfg = load_config(None, ["persona=bench", "output_dir=bench", f"train.gradient_checkpointing={checkpointing}"])
        model = add_lora(model, cfg)
        trainer_cls, collator = PersonaTrainer, make_collator(None, packing=True, boundaries=attention == VARLEN)

    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            sync()
            marks.append(time.perf_counter())

    targs = TrainingArguments(
        output_dir="/tmp/personabot-bench-out", per_device_train_batch_size=args.batch_size,
        max_steps=args.steps + 2, learning_rate=1e-4, logging_steps=10_000, save_strategy="no",
        report_to="none", bf16=torch.cuda.is_available(), remove_unused_columns=False, optim="adamw_torch",
        disable_tqdm=True, dataloader_pin_memory=False,
        # our default: Liger's kernels on CUDA (--no-fused-kernels measures ours without them)
        use_liger_kernel=args.variant == "personabot" and args.fused_kernels and use_fused_kernels("auto"),
    )
    batches: list[int] = []  # useful tokens of each batch, in the order the Trainer (shuffling) takes them

    def counted(rows: list[dict]) -> dict[str, torch.Tensor]:
        batches.append(sum(len(r["input_ids"]) for r in rows))
        return collator(rows)

    trainer = trainer_cls(model=model, args=targs, train_dataset=_ListDataset(data), data_collator=counted,
                          callbacks=[Clock()])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    useful = sum(batches[2 : args.steps + 2])  # the batches of the timed steps
    seconds = marks[-1] - marks[1]
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"variant": args.variant, "tokens_per_s": useful / seconds, "peak_gib": peak / 2**30,
            "steps": args.steps, "useful_tokens": useful, "fused_kernels": targs.use_liger_kernel,
            "attention": attention}


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def _pad_collator(rows: list[dict]) -> dict[str, torch.Tensor]:
    """What the plain recipe does: right-pad every batch to its longest conversation."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smollm2", choices=["smollm2", *SHAPES])
    parser.add_argument("--quantization", default="nf4", choices=["nf4", "none"])
    parser.add_argument("--tokenizer", default="smollm2",
                        help="a random --shape takes its special token ids (on the GPU machine, which lacks the "
                             "embedded GGUF: .gpu-kit/smollm2-tokenizer)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--checkpoint-every", type=int, default=1,
                        help="with --gradient-checkpointing, our variant checkpoints every Nth layer "
                             "(train.gradient_checkpointing: N); the plain recipe checkpoints every layer")
    parser.add_argument("--no-fused-kernels", dest="fused_kernels", action="store_false",
                        help="our variant without Liger's kernels (they are on by default with CUDA)")
    parser.add_argument("--no-varlen-attention", dest="varlen_attention", action="store_false",
                        help="our variant with SDPA's block mask instead of varlen attention (on by default with CUDA)")
    parser.add_argument("--variant", choices=["plain", "personabot"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    results = {}
    for variant in ("plain", "personabot"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--variant", variant]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results[variant] = json.loads(out)
    plain, ours = results["plain"], results["personabot"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x{os.cpu_count()}"
    print(f"# bench/train.py {args.shape} {args.quantization} batch {args.batch_size} x {args.steps} steps on {device}")
    for r in (plain, ours):
        print(f"{r['variant']:>10}: {r['tokens_per_s']:8.1f} useful tokens/s   peak {r['peak_gib']:.2f} GiB"
              f"   attention {r['attention']}{'   (Liger kernels)' if r['fused_kernels'] else ''}")
    print(f"     ratio: {ours['tokens_per_s'] / plain['tokens_per_s']:.2f}x tokens/s, "
          f"{ours['peak_gib'] / plain['peak_gib']:.2f}x peak memory")


if __name__ == "__main__":
    main()
