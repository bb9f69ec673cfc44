"""JSONL chat data: one conversation per line, in OpenAI "messages" or ShareGPT "conversations" shape."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune.conversation import ROLES, Conversation, DataError, ReadResult, read_text, tidy_messages
from finetune.readers.sharegpt import sharegpt_messages

Converter = Callable[[Any], list[dict[str, str]]]


def record_messages(record: Any) -> list[dict[str, str]]:
    """Tidy messages of one record of either shape; a ValueError names the bad field."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {json.dumps(record)[:40]}")
    if "messages" not in record:
        if "conversations" in record:
            return sharegpt_messages(record)
        raise ValueError("missing 'messages' (or ShareGPT 'conversations')")
    items = record["messages"]
    if not isinstance(items, list):
        raise ValueError("'messages' must be a list")
    messages = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"messages[{i}]: expected an object with 'role' and 'content'")
        role, content = item.get("role"), item.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}]: unknown role {role!r} (expected system, user or assistant)")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}]: content must be a string, got {json.dumps(content)[:40]}")
        messages.append({"role": role, "content": content})
    return tidy_messages(messages)


def read_jsonl(path: str | Path, convert: Converter = record_messages) -> ReadResult:
    """Read JSONL (or a JSON array of records: people mix them up); a bad record is reported, not fatal."""
    path = Path(path)
    text = read_text(path)
    if text.lstrip().startswith("["):
        return _read_array(path, text, convert)
    result = ReadResult()
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            result.problems.append(f"{where}: invalid JSON at column {e.colno}: {e.msg}")
            continue
        _add(result, record, where, convert)
    return result


def _read_array(path: Path, text: str, convert: Converter) -> ReadResult:
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from e
    result = ReadResult()
    for i, record in enumerate(records):
        _add(result, record, f"{path}: [{i}]", convert)
    return result


def _add(result: ReadResult, record: Any, where: str, convert: Converter) -> None:
    try:
        result.conversations.append(Conversation(convert(record), where))
    except ValueError as e:
        result.problems.append(f"{where}: {e}")
