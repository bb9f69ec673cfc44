"""Card macros ("curly braced syntax"): the subset of SillyTavern's and the V3 spec's that can mean
anything outside a live chat UI. Anything else is left as written and reported, never dropped quietly.

Random macros are seeded by the card, the field and the macro's offset, so the same card always yields
the same training text (and the same prompt at serve time) unless the seed changes."""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

USER_NAME = "User"  # what {{user}} becomes: the bot talks to many people, none of them known here

_LEGACY = re.compile(r"<(user|bot|char)>", re.IGNORECASE)
_ROLL = re.compile(r"\{\{roll[ :]([^}]+)\}\}", re.IGNORECASE)
_DICE = re.compile(r"^(\d*)d(\d+)\s*(?:([+-])\s*(\d+))?$", re.IGNORECASE)
_TRIM = re.compile(r"\n*\{\{trim\}\}\n*", re.IGNORECASE)
_COMMENT = re.compile(r"\{\{(?://|comment:|hidden_key:)[\s\S]*?\}\}", re.IGNORECASE)
_REVERSE = re.compile(r"\{\{reverse:([^}]*)\}\}", re.IGNORECASE)
_RANDOM = re.compile(r"\{\{(random|pick)\s?::?([^}]+)\}\}", re.IGNORECASE)
_RANDOM_USER = re.compile(r"\{\{\s*random_user_(\d+)\s*\}\}", re.IGNORECASE)
_NAMED = re.compile(r"\{\{\s*(char|user|original|newline|noop)\s*\}\}", re.IGNORECASE)
_ANY = re.compile(r"\{\{[^{}]*\}\}")
_USER = re.compile(r"\{\{\s*user\s*\}\}", re.IGNORECASE)


@dataclass(frozen=True)
class MacroContext:
    """What the macros of one card expand to. ``original=None`` keeps ``{{original}}`` for a later pass, and
    ``user=None`` keeps ``{{user}}`` (a greeting's: the bot fills in whom it greets, see ``fill_user``)."""

    char: str  # the V3 nickname when the card has one, else the name
    user: str | None = USER_NAME
    original: str | None = None
    seed: str = ""  # the card's identity (and the run's seed): picks and rolls repeat for the same card


def random_user(n: str | int) -> str:
    """The speaker name ``{{random_user_N}}`` stands for in example dialogue: another chat participant."""
    return f"{USER_NAME} {n}"


def expand(text: str, ctx: MacroContext, where: str = "", problems: list[str] | None = None) -> str:
    """``text`` with every supported macro replaced; unsupported ones stay and are named in ``problems``."""
    text = text.replace("\r\n", "\n")
    user = "{{user}}" if ctx.user is None else ctx.user
    text = _LEGACY.sub(lambda m: user if m[1].lower() == "user" else ctx.char, text)
    if "{{" not in text:
        return text
    rng_key = f"{ctx.seed}\0{text}"  # not where: moving the file must not change the text
    text = _ROLL.sub(lambda m: _roll(m[1], f"{rng_key}\0{m.start()}", where, problems), text)
    text = _RANDOM_USER.sub(lambda m: random_user(m[1]), text)

    def named(m: re.Match[str]) -> str:
        key = m[1].lower()
        if key == "original":
            return m[0] if ctx.original is None else ctx.original
        return {"char": ctx.char, "user": user, "newline": "\n", "noop": ""}[key]

    text = _NAMED.sub(named, text)
    text = _TRIM.sub("", text)  # after {{newline}}, as SillyTavern does: trim eats the newlines next to it
    text = _COMMENT.sub("", text)
    text = _REVERSE.sub(lambda m: m[1][::-1], text)
    text = _RANDOM.sub(lambda m: _choose(m[2], f"{rng_key}\0{m.start()}"), text)
    if problems is not None:
        for unknown in dict.fromkeys(m[0] for m in _ANY.finditer(text) if not _keeps(m[0], ctx)):
            problems.append(f"{where}: macro {unknown} left as written (personabot cannot fill it in)")
    return text


def _keeps(macro: str, ctx: MacroContext) -> bool:
    name = macro.replace(" ", "").lower()
    return (ctx.original is None and name == "{{original}}") or (ctx.user is None and name == "{{user}}")


def fill_user(text: str, user: str) -> str:
    """``text`` with the ``{{user}}`` that ``MacroContext(user=None)`` kept filled in."""
    return _USER.sub(lambda m: user, text)


def _choose(body: str, key: str) -> str:
    """SillyTavern's list syntax: ``a::b::c`` keeps items as written, ``a, b, c`` trims them (``\\,`` escapes)."""
    if "::" in body:
        items = body.split("::")
    else:
        items = [item.strip().replace("\0", ",") for item in body.replace("\\,", "\0").split(",")]
    return random.Random(key).choice(items) if items else ""


def _roll(formula: str, key: str, where: str, problems: list[str] | None) -> str:
    formula = formula.strip()
    if formula.isdigit():
        formula = f"1d{formula}"
    dice = _DICE.match(formula)
    if not dice or int(dice[2]) < 1:
        if problems is not None:
            problems.append(f"{where}: {{{{roll:{formula}}}}} is not a dice formula like d20 or 2d6+1; dropped")
        return ""
    rng = random.Random(key)
    total = sum(rng.randint(1, int(dice[2])) for _ in range(int(dice[1] or 1)))
    if dice[3]:
        total += int(dice[4]) if dice[3] == "+" else -int(dice[4])
    return str(total)
