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
_WHY_NOT = "a tag must be in capitals, open a paragraph, or be used on two or more lines"


@dataclass
class _Utterance:
    speaker: str
    line: int
    text: list[str] = field(default_factory=list)


def read_script(path: str | Path, character: str) -> ReadResult:
    """One conversation per scene in which ``character`` speaks; other scenes are not the character's.

    Comments (#), stage directions on their own line and blank lines are skipped; a line without a
    speaker tag continues the previous utterance; ---, === or *** starts a new scene (two blank lines do
    too in a file without them). A "Words:" line is a speaker tag only when it looks like one used as a
    tag: in capitals, opening a paragraph, or on two or more lines; so verse with a colon stays verse.
    """
    path = Path(path)
    result = ReadResult()
    lines = read_text(path).split("\n")
    wanted = character.strip().casefold()
    scenes = _parse(path, lines, _speakers(lines, wanted), result.problems)
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
    if len(scenes) == 1:  # a hint, not a problem: a short script may well be one scene
        result.notes.append(
            f"{path}: no scene breaks, so the whole file is one conversation; put a line of --- between "
            "scenes (or two blank lines) so that each scene trains on its own"
        )
    return result


def _tag(line: str) -> re.Match[str] | None:
    match = _SPEAKER.match(line)
    return match if match and any(c.isalpha() for c in match[1]) else None  # "10:30 ..." is no speaker


def _speakers(lines: list[str], wanted: str) -> set[str]:
    """Tags (casefolded) that name speakers: in capitals, opening a paragraph, used twice, or the character."""
    uses: Counter[str] = Counter()
    speakers = {wanted}
    previous = ""
    for raw in lines:
        line = raw.strip()
        match = _tag(line)
        if match:
            name = match[1].strip()
            uses[name.casefold()] += 1
            if name.isupper() or not previous or _SCENE_BREAK.match(previous):
                speakers.add(name.casefold())
        if not line.startswith("#"):
            previous = line
    return speakers | {name for name, n in uses.items() if n >= 2}


def _parse(path: Path, lines: list[str], speakers: set[str], problems: list[str]) -> list[list[_Utterance]]:
    breaks = any(_SCENE_BREAK.match(line.strip()) for line in lines)
    scenes: list[list[_Utterance]] = [[]]
    current: _Utterance | None = None
    blanks = 0
    for lineno, raw in enumerate(lines, 1):
        line = raw.strip()
        blanks = blanks + 1 if not line else 0
        if blanks == 2 and not breaks and scenes[-1]:
            scenes.append([])
            current = None
        if not line or line.startswith("#") or _STAGE_DIRECTION.match(line):
            continue
        if _SCENE_BREAK.match(line):
            scenes.append([])
            current = None
            continue
        match = _tag(line)
        if match and match[1].strip().casefold() in speakers:
            current = _Utterance(match[1].strip(), lineno, [match[2]])
            scenes[-1].append(current)
            continue
        if match:
            problems.append(f"{path}:{lineno}: '{match[1].strip()}:' read as part of the speech, "
                            f"not a new speaker ({_WHY_NOT})")
        if current is not None:
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
