"""Synthetic training dialogue for a persona that has only a card or a description.

A teacher model plays the character from its sheet (``sheet``), a user simulator talks to it (``usersim``),
every reply goes through ``filters`` (rejection sampling on the persona's style checks, length, duplicates,
out-of-character text) and the kept conversations become a JSONL source of the persona (``run``). The
teacher is any ``bot.engine.Engine`` serving a base model by name: by default the embedded base itself.
"""
from .run import SynthOptions, SynthReport, synthesize

__all__ = ["SynthOptions", "SynthReport", "synthesize"]
