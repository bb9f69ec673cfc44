"""The training recipe: persona data -> tokenized splits -> (Q)LoRA on the base -> Trainer -> adapter bundle."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import EarlyStoppingCallback, Trainer, TrainingArguments
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import get_last_checkpoint

from .attention import VARLEN, packed_attention
from .bundle import LoraInfo, Manifest, TrainingSummary, save_bundle
from .config import ConfigError, TrainConfig
from .dataset import IGNORE, build_datasets, make_collator
from .model import compute_dtype, fingerprint, liger_unavailable, load_model, load_tokenizer, resolve
from .persona import load_persona

log = logging.getLogger(__name__)


class ThroughputProgress(ProgressCallback):
    """The Trainer's progress bar, with useful (non-pad) tokens/s added to every log line."""

    def __init__(self) -> None:
        super().__init__()
        self._last = (time.perf_counter(), 0)  # (time, tokens seen) at the previous training log

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            now, seen = time.perf_counter(), int(state.num_input_tokens_seen or 0)
            if now > self._last[0]:
                logs["tokens_per_s"] = round((seen - self._last[1]) / (now - self._last[0]), 1)
            self._last = (now, seen)
            if self.training_bar is not None:
                self.training_bar.set_postfix(loss=f"{logs['loss']:.3f}", tok_s=logs.get("tokens_per_s", "-"))
        return super().on_log(args, state, control, logs=logs, **kwargs)

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = (time.perf_counter(), int(state.num_input_tokens_seen or 0))
        return super().on_train_begin(args, state, control, **kwargs)


class PersonaTrainer(Trainer):
    """Trainer whose training loss looks only at the positions where a trained token follows.

    On persona data only the character's turns are trained (about a quarter of all tokens), so asking the
    model for those positions alone (``logits_to_keep``) cuts the vocabulary projection and the logits'
    memory by ~4x: most of the cost of the loss on a large-vocabulary model. With Liger kernels on, their
    fused linear cross-entropy takes those positions' hidden states and never materializes logits at all.
    Evaluation's loss takes the same path. Packed rows only (batch of 1); padded batches, and evaluations
    with ``compute_metrics`` (they need every logit), take the stock path.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.get("labels")
        wants_logits = return_outputs and self.compute_metrics is not None  # evaluation that needs every logit
        if wants_logits or labels is None or labels.shape[0] != 1:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = {k: v for k, v in inputs.items() if k != "labels"}
        targets = labels[0, 1:]
        keep = (targets != IGNORE).nonzero().squeeze(-1)
        count = num_items_in_batch if num_items_in_batch is not None else max(keep.numel(), 1)
        fused = {"shift_labels": targets[keep][None], "num_items_in_batch": count}
        use_fused = self.args.use_liger_kernel and keep.numel() > 0
        out = model(**inputs, logits_to_keep=keep, use_cache=False, **(fused if use_fused else {}))
        if out.loss is not None:  # Liger's fused linear cross-entropy
            loss = out.loss
        else:
            loss = torch.nn.functional.cross_entropy(out.logits[0].float(), targets[keep], reduction="sum") / count
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # as the stock loss does: the count is summed over processes, and DDP averages their gradients
            scale = self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1 else self.args.n_gpu
            loss = loss * scale
        return (loss, out) if return_outputs else loss


def use_fused_kernels(setting: bool | Literal["auto"]) -> bool:
    """Liger's Triton kernels (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy) for ``train.fused_kernels``.

    They save activation and logits memory and kernel launches on a GPU; 'auto' turns them on where they
    run: CUDA with liger-kernel installed.
    """
    why_not = liger_unavailable()
    if setting == "auto":
        return why_not is None
    if setting and why_not:
        raise ConfigError(f"train.fused_kernels: true {why_not}")
    return bool(setting)


def add_lora(model: Any, cfg: TrainConfig) -> Any:
    """Wrap the base in trainable LoRA adapters (all linear layers by default).

    Unlike peft's ``prepare_model_for_kbit_training``, the frozen norms, embeddings and output layer keep the
    base's dtype (16-bit on a GPU) instead of going to fp32: they are not trained, and the fp32 upcast costs memory (~2 GB on an 8B model, its
    embeddings and output layer) plus a cast of those weights back to 16 bits by autocast at every step.
    LoRA's own weights are fp32 (peft's default)."""
    from peft import LoraConfig, get_peft_model

    every = cfg.train.gradient_checkpointing
    if every:  # non-reentrant; it also makes the embeddings' output require grad
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False},
                                              every_n_layers=1 if every is True else every)
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def training_args(cfg: TrainConfig, has_eval: bool) -> TrainingArguments:
    t = cfg.train
    early = has_eval and t.early_stopping_patience > 0
    bf16 = compute_dtype() == torch.bfloat16
    return TrainingArguments(
        output_dir=str(cfg.checkpoints),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a fraction of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        load_best_model_at_end=early,
        metric_for_best_model="eval_loss" if early else None,
        greater_is_better=False if early else None,
        bf16=bf16 and torch.cuda.is_available(),
        fp16=not bf16 and torch.cuda.is_available(),
        report_to=t.report_to or "none",
        seed=t.seed,
        data_seed=t.seed,
        # packed rows hold no padding, so every token counts; padded batches count the attention mask
        include_num_input_tokens_seen="all" if cfg.data.packing else "non_padding",
        remove_unused_columns=False,
        optim="adamw_torch",
        dataloader_pin_memory=torch.cuda.is_available(),
        ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient; scanning for unused ones is waste
        use_liger_kernel=use_fused_kernels(t.fused_kernels),
    )


def train(cfg: TrainConfig, resume: bool | str = False, callbacks: list[Any] = ()) -> Path:
    """Run the whole recipe and return the bundle path. ``resume``: True = latest checkpoint, or a path.

    ``callbacks`` are extra ``TrainerCallback`` objects (logging, custom stopping rules, tests).
    """
    checkpoint = _resume_point(cfg, resume)  # before any loading: a wrong --resume fails at once
    persona = load_persona(cfg.persona)
    for problem in persona.problems:
        log.warning("skipped: %s", problem)
    ref = resolve(cfg.base_model)
    tokenizer = load_tokenizer(ref)
    chat_template = cfg.data.chat_template or tokenizer.chat_template
    if not chat_template:
        raise ConfigError(f"base model '{cfg.base_model}' has no chat template; set data.chat_template in the config")
    train_ds, eval_ds, stats = build_datasets(
        persona.conversations, tokenizer, persona.system_prompt, chat_template,
        cfg.data.max_seq_len, cfg.data.eval_fraction, cfg.train.seed,
    )
    for problem in stats.problems:
        log.warning("data: %s", problem)
    log.info(
        "data: %d train / %d eval examples, %d tokens (%d trained), %d split to fit max_seq_len",
        stats.train_examples, stats.eval_examples, stats.tokens, stats.trained_tokens, stats.split,
    )

    attention = packed_attention(cfg.train.varlen_attention) if cfg.data.packing else "sdpa"
    model = add_lora(load_model(ref, cfg.quantization, attention=attention), cfg)
    args = training_args(cfg, has_eval=eval_ds is not None)
    early = [EarlyStoppingCallback(cfg.train.early_stopping_patience)] if args.load_best_model_at_end else []
    collator = make_collator(tokenizer, cfg.data.packing, boundaries=attention == VARLEN)
    trainer = PersonaTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
        data_collator=collator, callbacks=[*early, *callbacks],
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(ThroughputProgress())

    result = trainer.train(resume_from_checkpoint=checkpoint)
    summary = TrainingSummary(
        steps=trainer.state.global_step,
        epochs=round(trainer.state.epoch or 0, 3),
        train_loss=round(result.training_loss, 4),
        quantization=getattr(model.base_model.model, "personabot_quantization", "none"),
        fused_kernels=args.use_liger_kernel,
        attention=attention,
        data={k: v for k, v in asdict(stats).items() if k != "problems"},
        persona=str(Path(cfg.persona).resolve()),
        seed=cfg.train.seed,
        eval_fraction=cfg.data.eval_fraction,
        max_seq_len=cfg.data.max_seq_len,
    )
    if eval_ds is not None:
        eval_loss = trainer.evaluate()["eval_loss"]
        summary.eval_loss, summary.eval_perplexity = round(eval_loss, 4), round(math.exp(min(eval_loss, 50)), 3)

    manifest = Manifest(
        name=persona.name,
        description=persona.description,
        base_model=ref.name,
        base_model_spec=cfg.base_model,
        base_fingerprint=fingerprint(model.config),
        chat_template=chat_template,
        system_prompt=persona.system_prompt,
        sampling=persona.sampling,
        lora=LoraInfo(r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules),
        data_hash=persona.data_hash,
        card=persona.card,
        training=summary,
    )
    if trainer.is_world_process_zero():
        out = save_bundle(trainer.model, tokenizer, manifest, cfg.output_dir)
        log.info("adapter bundle written to %s", out)
    return Path(cfg.output_dir)


def _resume_point(cfg: TrainConfig, resume: bool | str) -> str | None:
    if not resume:
        return None
    if isinstance(resume, str):
        if not Path(resume).is_dir():
            raise ConfigError(f"--resume {resume}: checkpoint folder not found")
        return resume
    last = get_last_checkpoint(str(cfg.checkpoints)) if cfg.checkpoints.is_dir() else None
    if last is None:
        raise ConfigError(f"--resume: no checkpoint in {cfg.checkpoints} to resume from")
    return last
