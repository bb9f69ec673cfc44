"""A card's lorebook (``character_book``): entries that join the prompt when their keys show up in chat.

Activation follows the V3 spec and SillyTavern's world info: primary keys (plain text, or regexes written
``/pattern/flags``, or all regexes with ``use_regex``), secondary keys with the selective logic (AND ANY,
NOT ALL, NOT ANY, AND ALL), case sensitivity, whole words, constant entries, per-entry and book scan depth,
optional recursion, and a token budget that keeps the highest-priority entries; what survives is returned
in insertion order. Pure functions of plain data, so both engines' prompt seams call the same code."""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

Logic = Literal["and_any", "not_all", "not_any", "and_all"]
Position = Literal["before_char", "after_char", "at_depth"]
LOGIC_BY_NUMBER: dict[int, Logic] = {0: "and_any", 1: "not_all", 2: "not_any", 3: "and_all"}  # ST's enum
DEFAULT_SCAN_DEPTH = 2  # SillyTavern's default: the last two messages
MAX_RECURSION = 10
_REGEX_KEY = re.compile(r"^/(.+)/([a-z]*)$", re.DOTALL)
_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "u": 0, "g": 0, "y": 0}


@dataclass(frozen=True)
class LoreEntry:
    """One lorebook entry, already validated; ``content`` has its macros expanded and decorators removed."""

    content: str
    keys: tuple[str, ...] = ()
    secondary_keys: tuple[str, ...] = ()
    selective: bool = False
    logic: Logic = "and_any"
    constant: bool = False
    enabled: bool = True
    case_sensitive: bool = False
    whole_words: bool = False
    use_regex: bool = False
    insertion_order: int = 100
    priority: float | None = None
    position: Position = "before_char"
    depth: int = 4  # for position "at_depth": messages from the end
    role: Literal["system", "user", "assistant"] = "system"
    scan_depth: int | None = None
    force: bool | None = None  # @@activate (True) / @@dont_activate (False)
    exclude_recursion: bool = False  # cannot be triggered by other entries' content
    prevent_recursion: bool = False  # its content triggers no other entry
    name: str = ""  # the entry's comment or name, for reports

    @property
    def rank(self) -> float:
        """Budget priority: the spec's ``priority`` where given, else ``insertion_order``; higher wins."""
        return self.insertion_order if self.priority is None else self.priority


@dataclass(frozen=True)
class Lorebook:
    entries: tuple[LoreEntry, ...] = ()
    scan_depth: int | None = None
    token_budget: int | None = None
    recursive: bool = False
    name: str = ""


def compile_key(key: str, entry: LoreEntry) -> re.Pattern[str] | None:
    """A key as a regex when it is one (``/p/flags``, or any key with ``use_regex``); None for plain text.

    Raises re.error for an invalid pattern: the spec says such an entry never matches."""
    match = _REGEX_KEY.match(key)
    if match and set(match[2]) <= set(_FLAGS):
        flags = 0
        for flag in match[2]:
            flags |= _FLAGS[flag]
        return re.compile(match[1], flags)
    if entry.use_regex:
        return re.compile(key, 0 if entry.case_sensitive else re.IGNORECASE)
    return None


def key_matches(key: str, text: str, entry: LoreEntry) -> bool:
    """Whether one key occurs in ``text`` under the entry's case and whole-word settings."""
    try:
        pattern = compile_key(key, entry)
    except re.error:
        return False
    if pattern is not None:
        return pattern.search(text) is not None
    if not entry.case_sensitive:
        key, text = key.casefold(), text.casefold()
    key = key.strip()
    if not key:
        return False
    if entry.whole_words and len(key.split()) == 1:
        return re.search(rf"(?:^|\W){re.escape(key)}(?:$|\W)", text) is not None
    return key in text


def entry_matches(entry: LoreEntry, text: str) -> bool:
    """Primary keys, then the selective logic over the secondary keys (only when there are any)."""
    if not any(key_matches(k, text, entry) for k in entry.keys):
        return False
    if not (entry.selective and entry.secondary_keys):
        return True
    hits = [key_matches(k, text, entry) for k in entry.secondary_keys]
    return {
        "and_any": any(hits),
        "and_all": all(hits),
        "not_any": not any(hits),
        "not_all": not all(hits),
    }[entry.logic]


def triggered_entries(
    book: Lorebook,
    recent: Sequence[str],
    count_tokens: Callable[[str], int],
    token_budget: int | None = None,
) -> list[LoreEntry]:
    """The entries ``recent`` (message texts, oldest first) activates, within the budget, in insertion order.

    ``token_budget`` (the caller's cap, e.g. a share of the context) and the book's own ``token_budget``
    both apply; entries are admitted by priority until the next one does not fit, as the spec asks
    ("remove the lowest priority entries")."""
    candidates = [e for e in book.entries if e.enabled and e.content and e.force is not False]
    active = [e for e in candidates if e.force or e.constant or entry_matches(e, _window(recent, e, book))]
    pending = [e for e in candidates if all(e is not a for a in active)]
    steps = 0
    while book.recursive and pending and steps < MAX_RECURSION:
        steps += 1
        spoken = "\n".join(e.content for e in active if not e.prevent_recursion)
        found = [e for e in pending if not e.exclude_recursion and entry_matches(e, spoken)]
        if not found:
            break
        active.extend(found)
        pending = [e for e in pending if all(e is not f for f in found)]
    budgets = [b for b in (token_budget, book.token_budget) if b is not None and b > 0]
    budget = min(budgets) if budgets else None
    order = {id(e): i for i, e in enumerate(book.entries)}
    kept: list[LoreEntry] = []
    used = 0
    for entry in sorted(active, key=lambda e: (-e.rank, order[id(e)])):
        cost = count_tokens(entry.content)
        if budget is not None and used + cost > budget:
            break
        used += cost
        kept.append(entry)
    return sorted(kept, key=lambda e: (e.insertion_order, order[id(e)]))


def _window(recent: Sequence[str], entry: LoreEntry, book: Lorebook) -> str:
    depth = entry.scan_depth if entry.scan_depth is not None else book.scan_depth
    depth = DEFAULT_SCAN_DEPTH if depth is None else max(depth, 0)
    return "\n".join(recent[max(len(recent) - depth, 0):]) if depth else ""


_ROLES = {0: "system", 1: "user", 2: "assistant", "system": "system", "user": "user", "assistant": "assistant"}
_ST_POSITIONS = {0: "before_char", 1: "after_char", 4: "at_depth"}
_ST_OTHER_POSITIONS = {2: "author's note top", 3: "author's note bottom", 5: "examples top", 6: "examples bottom",
                       7: "outlet"}
# SillyTavern entry extensions personabot cannot honour, with the value that means "off"
_UNSUPPORTED_EXTENSIONS = {
    "group": "", "sticky": None, "cooldown": None, "delay": None, "triggers": [], "automation_id": "",
    "vectorized": False, "outlet_name": "", "delay_until_recursion": False, "ignore_budget": False,
    "match_persona_description": False, "match_character_description": False,
    "match_character_personality": False, "match_character_depth_prompt": False, "match_scenario": False,
    "match_creator_notes": False,
}


def parse_character_book(
    raw: Any, where: str, expand: Callable[[str, str], str], problems: list[str]
) -> Lorebook:
    """Validate a ``character_book`` object; ``expand(text, where)`` fills in the card's macros.

    A bad entry is skipped with a problem naming it; a field personabot cannot honour is named too."""
    if not isinstance(raw, dict):
        problems.append(f"{where}: not an object; lorebook ignored")
        return Lorebook()
    entries_raw = raw.get("entries")
    if isinstance(entries_raw, dict):  # SillyTavern world files keep entries in an object keyed by uid
        entries_raw = list(entries_raw.values())
    if not isinstance(entries_raw, list):
        problems.append(f"{where}.entries: not a list; lorebook ignored")
        return Lorebook()
    entries = []
    for i, item in enumerate(entries_raw):
        try:
            entries.append(_entry(item, f"{where}.entries[{i}]", expand, problems))
        except ValueError as e:
            problems.append(f"{where}.entries[{i}]: {e}; entry ignored")
    return Lorebook(
        tuple(entries),
        scan_depth=_int_or_none(raw.get("scan_depth"), f"{where}.scan_depth", problems),
        token_budget=_int_or_none(raw.get("token_budget"), f"{where}.token_budget", problems),
        recursive=bool(raw.get("recursive_scanning", False)),
        name=str(raw.get("name") or ""),
    )


def _entry(item: Any, where: str, expand: Callable[[str, str], str], problems: list[str]) -> LoreEntry:
    if not isinstance(item, dict):
        raise ValueError("not an object")
    ext = item.get("extensions") if isinstance(item.get("extensions"), dict) else {}
    keys = _strings(item.get("keys", item.get("key", [])), "keys")
    secondary = _strings(item.get("secondary_keys", item.get("keysecondary", [])), "secondary_keys")
    content = item.get("content", "")
    if not isinstance(content, str):
        raise ValueError("field 'content' must be a string")
    content, decorators = _decorators(expand(content, f"{where}.content").strip(), where, problems)
    logic_raw = ext.get("selectiveLogic", item.get("selectiveLogic", 0))
    logic = LOGIC_BY_NUMBER.get(logic_raw) if isinstance(logic_raw, int) else None
    if logic is None:
        problems.append(f"{where}: extensions.selectiveLogic {logic_raw!r} unknown (0-3); using AND ANY")
        logic = "and_any"
    position, depth, role = _position(item, ext, where, problems)
    for name, off in _UNSUPPORTED_EXTENSIONS.items():
        if ext.get(name, off) not in (off, None, "", []):
            problems.append(f"{where}: field 'extensions.{name}' ignored (no such effect in personabot)")
    if ext.get("useProbability") and (ext.get("probability") or 100) < 100:
        problems.append(f"{where}: field 'extensions.probability' ignored (triggered entries always apply)")
    case = item.get("case_sensitive", ext.get("case_sensitive"))
    priority = item.get("priority")
    entry = LoreEntry(
        content=content,
        keys=keys,
        secondary_keys=secondary,
        selective=bool(item.get("selective", False)),
        logic=logic,
        constant=bool(item.get("constant", False)),
        enabled=bool(item.get("enabled", not item.get("disable", False))),
        case_sensitive=bool(case),
        whole_words=bool(ext.get("match_whole_words") or False),
        use_regex=bool(item.get("use_regex", False)),
        insertion_order=_int(item.get("insertion_order", item.get("order", 100)), "insertion_order"),
        priority=float(priority) if isinstance(priority, (int, float)) else None,
        position=position,
        depth=int(decorators.get("depth", depth)),
        role=decorators.get("role", role),
        scan_depth=decorators.get("scan_depth", _int_or_none(ext.get("scan_depth"), where, problems)),
        force=decorators.get("force"),
        exclude_recursion=bool(ext.get("exclude_recursion", False)),
        prevent_recursion=bool(ext.get("prevent_recursion", False)),
        name=str(item.get("comment") or item.get("name") or ""),
    )
    if "depth" in decorators:
        entry = replace(entry, position="at_depth")
    for key in entry.keys + entry.secondary_keys:
        try:
            compile_key(key, entry)
        except re.error as e:
            problems.append(f"{where}: key {key!r} is not a valid regex ({e}); it never matches")
    if not entry.keys and not entry.constant and entry.force is None and entry.enabled:
        problems.append(f"{where}: no keys and not constant, so it never triggers")
    return entry


def _position(item: dict[str, Any], ext: dict[str, Any], where: str, problems: list[str]):
    raw = ext.get("position")
    depth = ext.get("depth", 4) if isinstance(ext.get("depth", 4), int) else 4
    role = _ROLES.get(ext.get("role", 0), "system")
    if isinstance(raw, int):
        if raw in _ST_POSITIONS:
            return _ST_POSITIONS[raw], depth, role
        shown = _ST_OTHER_POSITIONS.get(raw, str(raw))
        problems.append(f"{where}: field 'extensions.position' ({shown}) ignored; added after the character")
        return "after_char", depth, role
    return ("after_char" if item.get("position") == "after_char" else "before_char"), depth, role


def _decorators(content: str, where: str, problems: list[str]) -> tuple[str, dict[str, Any]]:
    """Strip leading ``@@decorator value`` lines (V3 spec) and honour the few that mean something here.

    A ``@@@fallback`` line counts only when the decorator before it was not understood."""
    found: dict[str, Any] = {}
    lines = content.split("\n")
    understood = True
    while lines and lines[0].startswith("@@"):
        line = lines.pop(0).strip()
        if line.startswith("@@@") and understood:
            continue
        name, _, value = line.lstrip("@").partition(" ")
        understood = _decorator(name, value.strip(), found)
        if not understood:
            problems.append(f"{where}: decorator @@{name} ignored (not supported)")
    return "\n".join(lines).strip(), found


def _decorator(name: str, value: str, found: dict[str, Any]) -> bool:
    if name == "activate":
        found["force"] = True
    elif name == "dont_activate":
        found.setdefault("force", False)
    elif name in ("depth", "scan_depth") and value.lstrip("-").isdigit():
        found.setdefault(name, int(value))
    elif name == "role" and value in ("system", "user", "assistant"):
        found.setdefault("role", value)
    else:
        return False
    return True


def _strings(value: Any, name: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [k for k in value.split(",")]
    if not isinstance(value, list) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"field '{name}' must be a list of strings")
    return tuple(k.strip() for k in value if k.strip())


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"field '{name}' must be a number")
    return int(value)


def _int_or_none(value: Any, where: str, problems: list[str]) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        problems.append(f"{where}: {value!r} is not a number; ignored")
        return None
    return int(value)
