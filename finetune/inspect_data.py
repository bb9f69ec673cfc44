"""`finetune data check|preview`: what the trainer will see, before spending any compute on it."""
from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .dataset import IGNORE, DataStats, build_datasets, encode_conversation
from .persona import PersonaData
from .prompt import with_default_system_prompt


def check(persona: PersonaData, tokenizer: Any, chat_template: str | None, max_seq_len: int,
          eval_fraction: float, seed: int, console: Console) -> DataStats:
    """Print counts and every problem as ``file:line: what``; returns the stats (problems included)."""
    _, _, stats = build_datasets(persona.conversations, tokenizer, persona.system_prompt, chat_template,
                                 max_seq_len, eval_fraction, seed)
    stats.problems[:0] = persona.problems
    turns = sum(1 for c in persona.conversations for m in c.messages if m["role"] == "assistant")
    table = Table(title=f"{persona.name}: {', '.join(str(f) for f in persona.files)}", show_header=False)
    for label, value in [
        ("conversations", stats.conversations), ("character turns", turns),
        ("train / eval examples", f"{stats.train_examples} / {stats.eval_examples}"),
        ("tokens (trained)", f"{stats.tokens} ({stats.trained_tokens})"),
        ("longest example", f"{stats.max_len} tokens (max_seq_len {max_seq_len})"),
        ("truncated", stats.truncated), ("problems", len(stats.problems)),
    ]:
        table.add_row(label, str(value))
    console.print(table)
    for problem in stats.problems:
        console.print(Text(problem, style="yellow"), soft_wrap=True)
    return stats


def preview(persona: PersonaData, tokenizer: Any, chat_template: str | None, max_seq_len: int, count: int,
            console: Console) -> None:
    """Show rendered examples token by token: trained (character) tokens highlighted, the rest dim."""
    console.print(Text.assemble(("trained tokens", "bold green"), " / ", ("context (not trained)", "dim")))
    for conversation in persona.conversations[:count]:
        messages = with_default_system_prompt(persona.system_prompt, conversation.messages)
        enc = encode_conversation(tokenizer, messages, chat_template, max_seq_len)
        text = Text()
        for token, label in zip(enc.input_ids, enc.labels):
            piece = tokenizer.decode([token])
            text.append(piece, style="bold green" if label != IGNORE else "dim")
        console.rule(conversation.origin + ("  [truncated]" if enc.truncated else ""))
        console.print(text)
