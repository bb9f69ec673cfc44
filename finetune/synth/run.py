"""Drive a synth run: batches of conversations, turn by turn, each reply filtered (and sampled again when
rejected), written as JSONL records with provenance. Resumable: conversations already in the output are
kept and skipped; reproducible: the same persona, teacher and seed give the same file."""
from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from finetune.cards.context import apply_card_context
from finetune.conversation import DataError
from finetune.persona import PERSONA_FILE, PersonaData
from finetune.synth.filters import ReplyFilter
from finetune.synth.teacher import Message, Teacher
from finetune.synth.users import UserSimulator

EXAMPLES_SHOWN = 4  # the persona's own conversations shown to the teacher as examples


@dataclass
class SynthReport:
    """What a run kept and rejected, and why."""

    written: int = 0  # conversations added to the output by this run
    already: int = 0  # conversations the output held before (resumed)
    replies: int = 0
    rejected: Counter[str] = field(default_factory=Counter)  # reason -> replies sampled again or dropped
    dropped: int = 0  # conversations without a single kept reply
    openers: Counter[str] = field(default_factory=Counter)  # kind of first user message -> conversations


def synthesize(
    persona: PersonaData,
    teacher: Teacher,
    out: Path,
    conversations: int,
    turns: int,
    seed: int,
    batch_size: int = 8,
    retries: int = 2,
    progress: Callable[[int], None] = lambda _: None,
) -> SynthReport:
    """Write ``conversations`` dialogues of up to ``turns`` exchanges each to ``out`` (appending to a partial
    run). ``progress(n)`` is told each time ``n`` more conversations are done."""
    report = SynthReport()
    done = _existing(out)
    report.already = len(done)
    replies = ReplyFilter(persona.style_checks, ["User"])
    replies.remember(m["content"] for record in done.values() for m in record["messages"] if m["role"] == "assistant")
    users = UserSimulator(persona.name, seed, persona.card.lorebook if persona.card else None)
    system = _teacher_system(persona, out)
    progress(len(done))
    with out.open("a", encoding="utf-8") as sink:
        for start in range(0, conversations, batch_size):
            ids = [n for n in range(start, min(start + batch_size, conversations)) if n not in done]
            if not ids:
                continue
            records = _batch(ids, turns, seed, retries, teacher, users, replies, persona, system, report)
            for record in records:
                sink.write(json.dumps(record, ensure_ascii=False) + "\n")
            sink.flush()  # a batch at a time: an interrupted run resumes at the batch it was in
            report.written += len(records)
            progress(len(ids))
    return report


def _batch(ids: list[int], turns: int, seed: int, retries: int, teacher: Teacher, users: UserSimulator,
           replies: ReplyFilter, persona: PersonaData, system: str, report: SynthReport) -> list[dict]:
    history: dict[int, list[Message]] = {n: [] for n in ids}
    kinds: dict[int, list[str]] = {n: [] for n in ids}
    alive = list(ids)
    for turn in range(turns):
        for n in alive:
            user = users.opener(n) if turn == 0 else users.follow_up(n, turn)
            history[n].append({"role": "user", "content": user.text})
            kinds[n].append(user.kind)
        pending = list(alive)
        for attempt in range(retries + 1):
            if not pending:
                break
            answers = teacher.complete([_prompt(system, history[n], persona) for n in pending],
                                       seed=_seed(seed, ids[0], turn, attempt))
            still = []
            for n, answer in zip(pending, answers):
                reason = replies.reject(answer)
                if reason is None:
                    replies.keep(answer)
                    history[n].append({"role": "assistant", "content": answer.strip()})
                    report.replies += 1
                else:
                    report.rejected[reason] += 1
                    still.append(n)
            pending = still
        for n in pending:  # no acceptable reply: the conversation ends before this user turn
            history[n].pop()
            kinds[n].pop()
        alive = [n for n in alive if n not in pending]
    records = []
    for n in ids:
        if not any(m["role"] == "assistant" for m in history[n]):
            report.dropped += 1
            continue
        report.openers[kinds[n][0]] += 1
        records.append({"messages": history[n], "synth": {"id": n, "teacher": teacher.name, "seed": seed,
                                                          "users": kinds[n]}})
    return records


def _prompt(system: str, history: list[Message], persona: PersonaData) -> list[Message]:
    """The teacher's view: the persona's prompt, examples and instruction, the lore the chat triggers, and
    the chat with the card's depth prompt and post-history instructions where the bot would put them."""
    if persona.card is None:
        return [{"role": "system", "content": system}, *history]
    added = apply_card_context(history, persona.card, lambda text: len(text) // 4 + 1)
    return [{"role": "system", "content": "\n\n".join([system, *added.blocks])}, *added.turns]


def _teacher_system(persona: PersonaData, out: Path) -> str:
    own = [c for c in persona.conversations if not c.origin.startswith(str(out))][:EXAMPLES_SHOWN]
    examples = "\n\n".join(
        "\n".join(f"{'User' if m['role'] == 'user' else persona.name}: {m['content']}" for m in c.messages
                  if m["role"] != "system")
        for c in own
    )
    parts = [persona.system_prompt]
    if examples:
        parts.append(f"Example conversations with {persona.name}:\n\n{examples}")
    parts.append(f"Write only {persona.name}'s next reply to the last message, in character and in "
                 f"{persona.name}'s style. Never say you are an AI or a model, never step out of the role, "
                 "and never write the other person's lines.")
    return "\n\n".join(parts)


def _seed(seed: int, batch: int, turn: int, attempt: int) -> int:
    return (seed * 1_000_003 + batch * 10_007 + turn * 101 + attempt) % 2**31


def _existing(out: Path) -> dict[int, dict]:
    """Records of a previous run, by conversation id; a line cut short by an interrupted run is dropped."""
    if not out.exists():
        return {}
    records, good, bad = {}, [], 0
    for line in filter(str.strip, out.read_text(encoding="utf-8").split("\n")):
        try:
            record = json.loads(line)
            records[int(record["synth"]["id"])] = record
            good.append(line)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            bad += 1
    if bad:
        out.write_text("".join(g + "\n" for g in good), encoding="utf-8")
    return records


def add_source(persona_dir: Path, out: Path, teacher: str, seed: int) -> bool:
    """Add ``out`` to persona.toml's sources (once); False when it is there already."""
    toml = persona_dir / PERSONA_FILE
    if not toml.is_file():
        raise DataError(f"{persona_dir}: no {PERSONA_FILE} to add the synthetic source to")
    relative = out.resolve().relative_to(persona_dir.resolve()).as_posix()
    text = toml.read_text(encoding="utf-8")
    if re.search(rf'^\s*path\s*=\s*"{re.escape(relative)}"', text, re.MULTILINE):
        return False
    block = (f'\n# synthetic dialogue: `finetune data synth` (teacher {teacher}, seed {seed})\n'
             f'[[sources]]\npath = "{relative}"\nformat = "jsonl"\n')
    toml.write_text(text.rstrip("\n") + "\n" + block, encoding="utf-8")
    return True
