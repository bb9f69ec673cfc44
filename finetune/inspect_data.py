"""`finetune data check|preview`: what the trainer will see, before spending any compute on it."""
from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .dataset import IGNORE, DataStats, build_datasets, fit_examples
from .persona import PersonaData

TRAINED_MARKS = ("⟦", "⟧")  # where colour cannot show what is trained (a pipe, a file)


def check(persona: PersonaData, tokenizer: Any, chat_template: str | None, max_seq_len: int,
          eval_fraction: float, seed: int, console: Console) -> DataStats:
    """Print counts and every problem as ``file:line: what``; returns the stats (problems included)."""
    _, _, stats = build_datasets(persona.conversations, tokenizer, persona.system_prompt, chat_template,
                                 max_seq_len, eval_fraction, seed)
    stats.problems[:0] = persona.problems
    turns = sum(1 for c in persona.conversations for m in c.messages if m["role"] == "assistant")
    table = Table(title=escape(f"{persona.name}: {', '.join(str(f) for f in persona.files)}"), show_header=False)
    for label, value in [
        ("conversations", stats.conversations), ("character turns", turns),
        ("train / eval examples", f"{stats.train_examples} / {stats.eval_examples}"),
        ("tokens (trained)", f"{stats.tokens} ({stats.trained_tokens})"),
        ("longest example", f"{stats.max_len} tokens (max_seq_len {max_seq_len})"),
        ("split to fit max_seq_len", stats.split), ("problems", len(stats.problems)),
    ]:
        table.add_row(escape(label), escape(str(value)))
    console.print(table)
    for note in persona.notes:
        console.print(Text(note, style="dim"), soft_wrap=True)
    for problem in stats.problems:
        console.print(Text(problem, style="yellow"), soft_wrap=True)
    return stats


def preview(persona: PersonaData, tokenizer: Any, chat_template: str | None, max_seq_len: int, count: int,
            console: Console) -> None:
    """Show the examples token by token as training sees them: trained (character) tokens highlighted,
    the rest dim; without a terminal, trained spans are marked ⟦ ⟧ instead. Lines are never re-wrapped."""
    marks = not console.is_terminal
    legend = (f"trained tokens {TRAINED_MARKS[0]}like this{TRAINED_MARKS[1]}" if marks
              else Text.assemble(("trained tokens", "bold green"), " / ", ("context (not trained)", "dim")))
    console.print(legend, soft_wrap=True)
    for conversation in persona.conversations[:count]:
        examples, problems = fit_examples(tokenizer, persona.system_prompt, conversation, chat_template,
                                          max_seq_len)
        for i, enc in enumerate(examples):
            title = conversation.origin + (f"  (window {i + 1} of {len(examples)})" if len(examples) > 1 else "")
            if marks:
                console.print(Text(f"── {title}"), soft_wrap=True)
            else:
                console.rule(Text(title))
            console.print(_rendered(tokenizer, enc.input_ids, enc.labels, marks), soft_wrap=True)
        for problem in problems:
            console.print(Text(problem, style="yellow"), soft_wrap=True)


def _rendered(tokenizer: Any, ids: list[int], labels: list[int], marks: bool) -> Text:
    text = Text()
    inside = False
    for token, label in zip(ids, labels):
        trained = label != IGNORE
        if marks and trained != inside:
            text.append(TRAINED_MARKS[0] if trained else TRAINED_MARKS[1])
            inside = trained
        text.append(tokenizer.decode([token]), style="bold green" if trained else "dim")
    if inside:
        text.append(TRAINED_MARKS[1])
    return text
