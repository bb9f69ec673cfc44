"""Decoded card JSON (V1 flat, V2 ``chara_card_v2``, V3 ``chara_card_v3``) -> a ``Card``, as the specs say.

- ``{{char}}`` is the V3 ``nickname`` when set, else ``name``.
- The card's ``system_prompt`` replaces the *global* system prompt only (``{{original}}`` inserts that);
  description, personality and scenario are always kept (V2 spec, "system_prompt").
- ``post_history_instructions`` and ``extensions.depth_prompt`` are kept for the prompt seam at serve time.
- Fields the spec keeps out of prompts (creator notes, tags, ...) are not used; any other field personabot
  does not use is named in ``problems``, so nothing is dropped without a word."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from finetune.cards.context import CardContext
from finetune.cards.lorebook import Lorebook, parse_character_book
from finetune.cards.macros import MacroContext, expand

_START = "<start>"
# fields the specs say are not for prompts, or that personabot has nothing to do with
_NOT_FOR_PROMPTS = {
    "creator_notes", "creator_notes_multilingual", "tags", "creator", "character_version", "source",
    "creation_date", "modification_date", "assets", "avatar", "spec", "spec_version", "chat", "create_date",
    "talkativeness", "fav",
}
_USED = {
    "name", "nickname", "description", "personality", "scenario", "first_mes", "alternate_greetings",
    "group_only_greetings", "mes_example", "system_prompt", "post_history_instructions", "character_book",
    "extensions",
}
# extensions SillyTavern writes that carry nothing for a prompt
_QUIET_EXTENSIONS = {"talkativeness", "fav", "chub", "risuai", "depth_prompt", "world"}


@dataclass(frozen=True)
class DepthPrompt:
    """``extensions.depth_prompt`` (SillyTavern's "character's note"): text inserted ``depth`` messages
    from the end of the chat, as ``role``."""

    prompt: str
    depth: int = 4
    role: Literal["system", "user", "assistant"] = "system"


@dataclass(frozen=True)
class Card:
    """What training and serving need from a card, macros expanded (``{{original}}`` waits for ``prompt``)."""

    name: str
    nickname: str
    description: str
    personality: str
    scenario: str
    card_system_prompt: str  # may still hold {{original}}
    post_history_instructions: str
    depth_prompt: DepthPrompt | None
    greetings: list[str]  # first_mes, then alternate_greetings; {{user}} kept (``macros.fill_user``)
    group_greetings: list[str]  # V3 group_only_greetings: more greetings, for group chats only
    examples: list[str]  # mes_example blocks, one example dialogue each
    lorebook: Lorebook | None
    problems: list[str] = field(default_factory=list)

    @property
    def char(self) -> str:
        """What ``{{char}}`` became: the V3 nickname when the card has one."""
        return self.nickname or self.name

    @property
    def definition(self) -> str:
        """Description, personality and scenario: kept whatever the card's system prompt says."""
        return "\n\n".join(
            part
            for part in (
                self.description,
                f"{self.char}'s personality: {self.personality}" if self.personality else "",
                f"Scenario: {self.scenario}" if self.scenario else "",
            )
            if part
        )

    def prompt(self, original: str = "") -> str:
        """The system prompt: the card's own (with ``{{original}}`` = ``original``) or else ``original``,
        then the definition. ``original`` is the persona's global prompt (persona.toml), empty by default."""
        head = original.strip()
        if self.card_system_prompt:
            head = expand(self.card_system_prompt, MacroContext(self.char, original=head)).strip()
        return "\n\n".join(p for p in (head, self.definition) if p)

    @property
    def system_prompt(self) -> str:
        return self.prompt()

    def context(self) -> CardContext:
        """The serve-time part: lorebook, post-history instructions, depth prompt, greetings."""
        depth = self.depth_prompt or DepthPrompt("")
        return CardContext(self.lorebook, self.post_history_instructions, depth.prompt, depth.depth, depth.role,
                           list(self.greetings), list(self.group_greetings))


def parse_card(raw: Any, where: str, seed: str = "") -> Card:
    """Build a Card from decoded card JSON. Raises ValueError naming the field for a card that cannot be used.

    ``where`` names the file in problems; ``seed`` varies ``{{random}}``/``{{pick}}``/``{{roll}}`` choices."""
    if not isinstance(raw, dict):
        raise ValueError("a character card must be a JSON object")
    nested = isinstance(raw.get("data"), dict)  # V2/V3 keep fields under "data"; V1 is flat
    fields_ = raw["data"] if nested else raw
    prefix = "data." if nested else ""
    problems: list[str] = []

    def text(key: str) -> str:
        value = fields_.get(key)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise ValueError(f"field '{prefix}{key}' must be a string")
        return value.replace("\r\n", "\n").strip()

    def strings(key: str) -> list[str]:
        value = fields_.get(key) or []
        if not isinstance(value, list) or not all(isinstance(g, str) for g in value):
            raise ValueError(f"field '{prefix}{key}' must be a list of strings")
        return [g for g in value if g.strip()]

    name = text("name")
    if not name:
        raise ValueError(f"card has no '{prefix}name'")
    nickname = text("nickname")
    ctx = MacroContext(nickname or name, seed=f"{name}\0{seed}")
    greeting = MacroContext(ctx.char, user=None, seed=ctx.seed)  # {{user}}: whoever the bot greets

    def fill(value: str, key: str, context: MacroContext = ctx) -> str:
        return expand(value, context, f"{where}: field '{prefix}{key}'", problems).strip()

    extensions = fields_.get("extensions") if isinstance(fields_.get("extensions"), dict) else {}
    lorebook = None
    if fields_.get("character_book") is not None:
        lorebook = parse_character_book(
            fields_["character_book"], f"{where}: {prefix}character_book",
            lambda value, at: expand(value, ctx, at, problems), problems,
        )
    card = Card(
        name=name,
        nickname=nickname,
        description=fill(text("description"), "description"),
        personality=fill(text("personality"), "personality"),
        scenario=fill(text("scenario"), "scenario"),
        card_system_prompt=fill(text("system_prompt"), "system_prompt"),
        # {{original}} here is the global post-history prompt, which personabot does not have
        post_history_instructions=fill(text("post_history_instructions"), "post_history_instructions",
                                       MacroContext(ctx.char, original="", seed=ctx.seed)),
        depth_prompt=_depth_prompt(extensions.get("depth_prompt"), fill, f"{where}: {prefix}extensions",
                                   problems),
        greetings=[fill(g, key, greeting) for key, g in [
            ("first_mes", text("first_mes")),
            *((f"alternate_greetings[{i}]", g) for i, g in enumerate(strings("alternate_greetings"))),
        ] if g.strip()],
        group_greetings=[fill(g, f"group_only_greetings[{i}]", greeting)
                         for i, g in enumerate(strings("group_only_greetings"))],
        examples=[b.strip() for b in _split_examples(fill(text("mes_example"), "mes_example")) if b.strip()],
        lorebook=lorebook,
        problems=problems,
    )
    for key in sorted(set(fields_) - _USED - _NOT_FOR_PROMPTS):
        if fields_[key] not in (None, "", [], {}):
            problems.append(f"{where}: field '{prefix}{key}' ignored (not part of the V2/V3 card spec)")
    for key in sorted(set(extensions) - _QUIET_EXTENSIONS):
        if extensions[key] not in (None, "", [], {}, False):
            problems.append(f"{where}: field '{prefix}extensions.{key}' ignored (an application's own data)")
    if extensions.get("world") and (lorebook is None or lorebook.name != extensions["world"]):
        problems.append(
            f"{where}: field '{prefix}extensions.world' ignored: world book {extensions['world']!r} lives "
            "outside the card (only the card's own character_book is used)"
        )
    return card


def _split_examples(text: str) -> list[str]:
    lowered = text.lower()
    blocks, start = [], 0
    while (at := lowered.find(_START, start)) != -1:
        blocks.append(text[start:at])
        start = at + len(_START)
    return [*blocks, text[start:]]


def _depth_prompt(raw: Any, fill, where: str, problems: list[str]) -> DepthPrompt | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("prompt", ""), str):
        problems.append(f"{where}.depth_prompt: expected {{prompt, depth, role}}; ignored")
        return None
    prompt = fill(raw.get("prompt", "").replace("\r\n", "\n"), "extensions.depth_prompt.prompt")
    if not prompt:
        return None
    depth = raw.get("depth", 4)
    role = raw.get("role", "system")
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
        problems.append(f"{where}.depth_prompt.depth: {depth!r} is not a whole number >= 0; using 4")
        depth = 4
    if role not in ("system", "user", "assistant"):
        problems.append(f"{where}.depth_prompt.role: {role!r} unknown; using system")
        role = "system"
    return DepthPrompt(prompt, depth, role)


