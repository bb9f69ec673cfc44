"""Screenplay-style text: "NAME: line" per utterance, one character's lines become the assistant's."""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from finetune.conversation import Conversation, DataError, ReadResult, read_text, tidy_messages

_SPEAKER = re.compile(r"^([^\W_][\w .'\-]{0,39}?)\s*:(?!//)\s*(.*)$")  # (?!//): "http://..." is no speaker
_SCENE_BREAK = re.compile(r"^(-{3,}|={3,}|\*{3,})$")
_STAGE_DIRECTION = re.compile(r"^(\(.*\)|\[.*\])$")


@dataclass
class _Utterance:
    speaker: str
    line: int
    text: list[str] = field(default_factory=list)


def read_script(path: str | Path, character: str) -> ReadResult:
    """One conversation per scene in which ``character`` speaks; other scenes are not the character's.

    Comments (#), stage directions on their own line and blank lines are skipped; a line without a
    speaker tag continues the previous utterance; ---, === or *** starts a new scene.
    """
    path = Path(path)
    result = ReadResult()
    scenes = _parse(path, read_text(path), result.problems)
    wanted = character.strip().casefold()
    counts: Counter[str] = Counter()
    shown: dict[str, str] = {}  # each speaker as first written
    for utterance in (u for scene in scenes for u in scene):
        counts[utterance.speaker.casefold()] += 1
        shown.setdefault(utterance.speaker.casefold(), utterance.speaker)
    if wanted not in counts:
        found = ", ".join(f"{shown[s]} ({n})" for s, n in counts.most_common(10)) or "none"
        raise DataError(f"{path}: character {character!r} never speaks; speakers found: {found}")
    for scene in scenes:
        if any(u.speaker.casefold() == wanted for u in scene):
            _add_scene(result, scene, wanted, f"{path}:{scene[0].line}")
    return result


def _parse(path: Path, text: str, problems: list[str]) -> list[list[_Utterance]]:
    scenes: list[list[_Utterance]] = [[]]
    current: _Utterance | None = None
    for lineno, raw in enumerate(text.split("\n"), 1):
        line = raw.strip()
        if not line or line.startswith("#") or _STAGE_DIRECTION.match(line):
            continue
        if _SCENE_BREAK.match(line):
            scenes.append([])
            current = None
            continue
        match = _SPEAKER.match(line)
        if match and any(c.isalpha() for c in match[1]):  # "10:30 ..." is not a speaker
            current = _Utterance(match[1].strip(), lineno, [match[2]])
            scenes[-1].append(current)
        elif current is not None:
            current.text.append(line)
        else:
            problems.append(f"{path}:{lineno}: text before the first speaker tag of the scene: {line[:60]!r}")
    return [scene for scene in scenes if scene]


def _add_scene(result: ReadResult, scene: list[_Utterance], wanted: str, where: str) -> None:
    others = {u.speaker.casefold() for u in scene} - {wanted}
    messages = []
    for utterance in scene:
        content = "\n".join(utterance.text).strip()
        if not content:
            continue
        if utterance.speaker.casefold() == wanted:
            messages.append({"role": "assistant", "content": content})
        else:  # with several people talking, the model has to know who said what
            labelled = f"{utterance.speaker}: {content}" if len(others) > 1 else content
            messages.append({"role": "user", "content": labelled})
    try:
        result.conversations.append(Conversation(tidy_messages(messages), where))
    except ValueError as e:
        result.problems.append(f"{where}: {e}")
