"""Errors shared by the app and its commands (kept apart so neither imports the other for them)."""
from __future__ import annotations


class CommandError(ValueError):
    """A command cannot be carried out; the message is shown to the user who ran it."""
