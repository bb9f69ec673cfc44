"""JSONL chat data: one conversation per line, in OpenAI "messages" or ShareGPT "conversations" shape."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune.conversation import ROLES, Conversation, DataError, ReadResult, read_text, tidy_messages
from finetune.readers.sharegpt import sharegpt_messages

Converter = Callable[[Any], list[dict[str, Any]]]


_TOOL_KEYS = ("tools", "functions", "parallel_tool_calls")
_TOOL_MESSAGE_KEYS = ("tool_calls", "function_call", "tool_call_id")


def record_messages(record: Any) -> list[dict[str, Any]]:
    """Tidy messages of one record of either shape; a ValueError names the bad field.

    OpenAI fine-tuning records: ``weight: 0`` marks an assistant message as context (kept, not trained);
    a user's ``name`` labels their turn ("name: text"). Preference (DPO), multimodal and tool-calling
    records are refused whole: half of such a record would train something it does not say."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {json.dumps(record)[:40]}")
    if "messages" not in record:
        if "conversations" in record:
            return sharegpt_messages(record)
        for key in ("preferred_output", "non_preferred_output"):
            if key in record:
                raise ValueError(f"a preference (DPO) record ({key!r}); personabot trains on conversations: "
                                 "put the preferred answer in a 'messages' record")
        raise ValueError("missing 'messages' (or ShareGPT 'conversations')")
    for key in _TOOL_KEYS:
        if record.get(key):
            raise ValueError(f"a tool-calling record ({key!r}); tool calls cannot train a character, "
                             "so the record is skipped")
    items = record["messages"]
    if not isinstance(items, list):
        raise ValueError("'messages' must be a list")
    return tidy_messages([_message(i, item) for i, item in enumerate(items)])


def _message(i: int, item: Any) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise ValueError(f"messages[{i}]: expected an object with 'role' and 'content'")
    role, content = item.get("role"), item.get("content")
    tool = next((repr(k) for k in _TOOL_MESSAGE_KEYS if item.get(k)), None)
    if tool or role in ("tool", "function"):
        raise ValueError(f"messages[{i}]: a tool call or result ({tool or repr(role)}); "
                         "tool calls cannot train a character, so the record is skipped")
    if role not in ROLES:
        raise ValueError(f"messages[{i}]: unknown role {role!r} (expected system, user or assistant)")
    if isinstance(content, list):  # content parts: text only
        kinds = [p.get("type") if isinstance(p, dict) else type(p).__name__ for p in content]
        other = next((k for k in kinds if k != "text"), None)
        if other is not None:
            raise ValueError(f"messages[{i}]: content part of type {other!r}; only text trains, "
                             "so the record is skipped")
        content = "".join(p.get("text", "") for p in content)
    if not isinstance(content, str):
        raise ValueError(f"messages[{i}]: content must be a string, got {json.dumps(content)[:40]}")
    message: dict[str, Any] = {"role": role, "content": content}
    name = item.get("name")
    if role == "user" and isinstance(name, str) and name.strip() and content.strip():
        message["content"] = f"{name.strip()}: {content.strip()}"
    if "weight" in item:
        if item["weight"] not in (0, 1) or isinstance(item["weight"], bool):
            raise ValueError(f"messages[{i}]: weight must be 0 or 1, got {item['weight']!r}")
        if role == "assistant":
            message["weight"] = item["weight"]
    return message


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
        result.conversations.append(Conversation.weighted(convert(record), where))
    except ValueError as e:
        result.problems.append(f"{where}: {e}")
