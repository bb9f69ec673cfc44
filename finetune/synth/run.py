"""Drive the teacher and the user simulator over many conversations at once, filter, write, resume.

Every conversation is its own task, so the engine sees up to ``concurrency`` requests together and batches
them. Each finished conversation is one appended line: kept ones to the output JSONL (OpenAI ``messages``
plus a ``meta`` record of provenance), rejected replies and dropped conversations to ``<out>.rejected.jsonl``.
A rerun skips every index found in either file, so an interrupted run continues where it stopped.

Reproducible with the same seed: which conversations exist, their topics, openers, lengths, example choice
and templated follow-ups, and on the local engine the sampled text too: every teacher and user-simulator
request carries a seed of its own, fixed by (run seed, conversation, turn, try) and not by when it runs, and
the engine draws each seeded reply from its own generator, the same in whatever batch it lands (barring a
draw within rounding error of a token's boundary, see ``bot.engine.local.sampling``). A server
(``--teacher-url``) gets the same seeds; whether it honours them is up to it (vLLM does, per request). Not
promised: the same text from another engine, device, dtype or library version, whose logits differ; nor
which of two near-identical replies written at once by concurrent conversations the near-duplicate filter
keeps (it compares with the replies kept so far; ``--concurrency 1`` fixes that order too).
"""
from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.bundle import Sampling
from finetune.cards.lorebook import LoreEntry
from finetune.conversation import DataError
from finetune.persona import PERSONA_FILE, load_persona

from .filters import ReplyFilter, clean_reply, clean_user_line
from .persona_file import add_source
from .sheet import CharacterSheet, sheet_from_persona
from .teacher import character_messages, character_prompt
from .usersim import USER_PROMPT, Plan, plan, user_messages

USER_TRIES = 2
"""generated follow-ups tried before the templated one is used"""


@dataclass(frozen=True)
class SynthOptions:
    count: int = 80
    """conversations to attempt in all (those already in the output count)"""
    max_turns: int = 3
    seed: int = 42
    tries: int = 6
    """samples of a reply before the conversation ends at the previous exchange"""
    concurrency: int = 8
    examples: int = 3
    """example dialogues shown to the teacher per conversation"""
    out: str = "synth.jsonl"
    """relative to the persona folder"""
    sampling: Sampling = field(default_factory=lambda: Sampling(temperature=0.7, top_p=0.95, max_new_tokens=48))
    user_sampling: Sampling = field(default_factory=lambda: Sampling(temperature=0.9, top_p=0.95, max_new_tokens=32))


@dataclass
class SynthReport:
    out: Path
    resumed: int = 0
    """conversations already done by an earlier run (kept or dropped)"""
    kept: int = 0
    dropped: int = 0
    exchanges: int = 0
    rejected: Counter = field(default_factory=Counter)
    """rejected replies by reason"""
    user_fallbacks: int = 0
    """follow-ups that came from the templates because every generated one failed"""
    errors: list[str] = field(default_factory=list)
    source_added: bool = False
    seconds: float = 0.0


@dataclass
class _Outcome:
    plan: Plan
    messages: list[dict[str, str]]
    tries: list[int]
    user_turns: list[str]
    rejected: list[dict[str, Any]]


async def synthesize(
    persona_dir: str | Path, engine: Any, teacher: str, label: str, options: SynthOptions = SynthOptions(),
    lore: Sequence[LoreEntry] | None = None, on_done: Callable[[bool], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> SynthReport:
    """Write up to ``options.count`` conversations for the persona and list the output in its persona.toml.

    ``engine`` serves the teacher as ``teacher`` (``Engine.serve_base`` is called here); ``label`` is how
    the teacher is recorded in each record's provenance. ``on_start(n)`` once the n conversations still to do
    are known, ``on_done(kept)`` after each of them."""
    start = time.monotonic()
    folder = Path(persona_dir)
    toml_path = folder / PERSONA_FILE
    if not toml_path.is_file():
        raise DataError(f"{folder}: no {PERSONA_FILE} to add the synthetic source to (synth needs a persona "
                        "folder; put a lone card in one with a persona.toml that lists it)")
    out = folder / options.out
    log = out.with_suffix(".rejected.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.touch()
    done = _done_indices(out, options.seed) | _done_indices(log, options.seed)
    sheet = sheet_from_persona(load_persona(folder), out, lore)
    if not sheet.examples:
        raise DataError(f"{folder}: no example dialogue (a user line answered by {sheet.name}) for the teacher "
                        "to copy the voice from; add mes_example to the card or a few lines of dialogue")
    report = SynthReport(out, resumed=len(done))
    seen = [m["content"] for c in sheet.examples for m in c.messages if m["role"] == "assistant"]
    seen += _kept_replies(out)
    reply_filter = ReplyFilter(sheet.name, sheet.style_checks, seen=seen)
    await engine.serve_base(teacher, "", options.sampling)
    gate = asyncio.Semaphore(options.concurrency)

    async def one(index: int) -> None:
        conversation = plan(sheet, options.seed, index, options.max_turns, options.examples)
        async with gate:
            try:
                outcome = await _converse(engine, teacher, sheet, conversation, options, reply_filter, report)
            except Exception as exc:  # EngineError, a dropped connection: not recorded, so a rerun retries it
                report.errors.append(f"conversation {index}: {exc}")
                if on_done:
                    on_done(False)
                return
        kept = _record(outcome, sheet, options, label, out, log, report)
        if on_done:
            on_done(kept)

    todo = [i for i in range(options.count) if i not in done]
    if on_start:
        on_start(len(todo))
    await asyncio.gather(*(one(i) for i in todo))
    if _count_records(out) and add_source(toml_path, options.out):
        report.source_added = True
    report.seconds = time.monotonic() - start
    return report


async def _converse(engine: Any, teacher: str, sheet: CharacterSheet, conversation: Plan, options: SynthOptions,
                    reply_filter: ReplyFilter, report: SynthReport) -> _Outcome:
    outcome = _Outcome(conversation, [], [], [], [])
    user = conversation.opener
    for turn in range(conversation.turns):
        kind = "template"
        if turn:
            user, kind = await _follow_up(engine, teacher, sheet, outcome.messages, options, conversation, turn)
            report.user_fallbacks += kind == "template"
        outcome.messages.append({"role": "user", "content": user})
        reply = None
        for attempt in range(1, options.tries + 1):
            prompt = character_messages(sheet, conversation.examples, outcome.messages)
            sampling = _seeded(options.sampling, options.seed, conversation.index, turn, "character", attempt)
            text = clean_reply(await engine.complete(teacher, prompt, sampling), sheet.name)
            reason = reply_filter.reason(text)
            if reason is None:
                reply = text
                break
            report.rejected[reason] += 1
            outcome.rejected.append({"turn": turn, "reason": reason, "text": text})
        if reply is None:
            outcome.messages.pop()
            break
        reply_filter.keep(reply)
        outcome.messages.append({"role": "assistant", "content": reply})
        outcome.tries.append(attempt)
        outcome.user_turns.append(kind)
    return outcome


async def _follow_up(engine: Any, teacher: str, sheet: CharacterSheet, messages: list[dict[str, str]],
                     options: SynthOptions, conversation: Plan, turn: int) -> tuple[str, str]:
    """(the user's next line, "generated" or "template")."""
    for attempt in range(1, USER_TRIES + 1):
        sampling = _seeded(options.user_sampling, options.seed, conversation.index, turn, "user", attempt)
        text = await engine.complete(teacher, user_messages(sheet, messages), sampling)
        line = clean_user_line(text, sheet.name)
        if line and line.casefold() not in (m["content"].casefold() for m in messages):
            return line, "generated"
    return conversation.fallbacks[turn - 1], "template"


def _seeded(sampling: Sampling, seed: int, index: int, turn: int, role: str, attempt: int) -> Sampling:
    """``sampling`` with this request's own seed: set by its place in the run, so a rerun draws alike. 31 bits,
    which every server's seed field holds."""
    own = random.Random(f"{seed}:{index}:{turn}:{role}:{attempt}").getrandbits(31)
    return sampling.model_copy(update={"seed": own})


def _record(outcome: _Outcome, sheet: CharacterSheet, options: SynthOptions, label: str, out: Path, log: Path,
            report: SynthReport) -> bool:
    """Append the conversation (or its drop) to the files, each as one write; True if it was kept."""
    index = outcome.plan.index
    rejected = [{"index": index, "seed": options.seed, **r} for r in outcome.rejected]
    kept = bool(outcome.messages)
    if kept:
        meta = {
            "index": index, "seed": options.seed, "teacher": label, "topic": outcome.plan.topic,
            "tries": outcome.tries, "user_turns": outcome.user_turns,
            "examples": [sheet.examples[i].origin for i in outcome.plan.examples],
            "sampling": options.sampling.model_dump(),
            "prompts": {"character": character_prompt(sheet), "user": USER_PROMPT.format(char=sheet.name)},
        }
        _append(out, [{"messages": outcome.messages, "meta": meta}])
        report.kept += 1
        report.exchanges += len(outcome.tries)
    else:
        rejected.append({"index": index, "seed": options.seed, "dropped": True})
        report.dropped += 1
    if rejected:
        _append(log, rejected)
    return kept


def _append(path: Path, records: list[dict]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()


def _lines(path: Path) -> list[dict]:
    """The file's complete records; a partial last line (a run killed mid-write) is cut off the file."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        path.write_text(text, encoding="utf-8")
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid JSON: {exc.msg} (fix or delete the line)") from exc
    return records


def _done_indices(path: Path, seed: int) -> set[int]:
    done = set()
    for record in _lines(path):
        meta = record.get("meta", record)
        if "index" not in meta:
            continue  # a line written by hand: nothing to resume
        if meta.get("seed") != seed:
            raise DataError(f"{path}: made with --seed {meta.get('seed')}, this run has --seed {seed} (pass "
                            "the same seed to continue it, or --out another file)")
        if "meta" in record or record.get("dropped"):
            done.add(meta["index"])
    return done


def _kept_replies(path: Path) -> list[str]:
    return [m["content"] for r in _lines(path) for m in r.get("messages", []) if m.get("role") == "assistant"]


def _count_records(path: Path) -> int:
    return sum(1 for r in _lines(path) if "messages" in r)
