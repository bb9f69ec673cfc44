"""ShareGPT records ({"conversations": [{"from": "human", "value": ...}]}), as a JSON array or JSONL."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finetune.conversation import ReadResult, tidy_messages

# Speaker names seen in the wild; every model-side name is the character.
SPEAKER_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
}


def sharegpt_messages(record: Any) -> list[dict[str, str]]:
    """Tidy chat messages of one ShareGPT record; a ValueError names the bad turn."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {json.dumps(record)[:40]}")
    turns = record.get("conversations")
    if not isinstance(turns, list):
        raise ValueError("missing 'conversations' list")
    messages = []
    system = record.get("system")  # LLaMA-Factory style top-level system prompt
    if isinstance(system, str):
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"conversations[{i}]: expected an object with 'from' and 'value'")
        speaker, value = turn.get("from"), turn.get("value")
        role = SPEAKER_ROLES.get(speaker.lower()) if isinstance(speaker, str) else None
        if role is None:
            known = ", ".join(SPEAKER_ROLES)
            raise ValueError(f"conversations[{i}]: unknown speaker {speaker!r} (expected one of {known})")
        if not isinstance(value, str):
            raise ValueError(f"conversations[{i}]: value must be a string, got {json.dumps(value)[:40]}")
        messages.append({"role": role, "content": value})
    return tidy_messages(messages)


def read_sharegpt(path: str | Path) -> ReadResult:
    """Read a ShareGPT JSON array or JSONL file, reporting bad records by index or line."""
    from finetune.readers.jsonl import read_jsonl  # here, not on top: jsonl imports this module

    return read_jsonl(path, convert=sharegpt_messages)
