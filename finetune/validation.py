"""One way to word pydantic's validation errors, so every config file reports a bad field alike."""
from __future__ import annotations

from collections.abc import Callable, Sequence

from pydantic import ValidationError
from pydantic_core import ErrorDetails

Label = Callable[[str, ErrorDetails], str]
"""How one error's location is shown: (dotted path, the error) -> text before ": message"."""


def field_path(loc: Sequence[int | str]) -> str:
    """("sources", 0, "path") -> "sources[0].path", the way the user reads their TOML or YAML."""
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        else:
            name += f".{part}" if name else part
    return name


def _field(path: str, error: ErrorDetails) -> str:
    return f"field '{path}'"


def describe(exc: ValidationError, within: Sequence[int | str] = (), label: Label = _field) -> str:
    """Every error as "field 'sources[0].path': msg", joined by "; " (a check of the whole model: just msg).

    ``within`` is where the validated data sits in its file, for a part validated on its own (a source's
    reader options); ``label`` replaces "field '...'" where the user knows the setting by another name.
    """
    parts = []
    for error in exc.errors():
        path = field_path((*within, *error["loc"]))
        # a validator's own ValueError: its text alone, without pydantic's "Value error, " in front
        message = str(error["ctx"]["error"]) if error["type"] == "value_error" else error["msg"]
        parts.append(f"{label(path, error)}: {message}" if path else message)
    return "; ".join(parts)
