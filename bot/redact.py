"""Credentials out of anything the bot writes: URL user:password, bearer tokens, API keys.

An engine's base URL may carry credentials (``http://user:pass@host/v1``) and its errors quote it; the log
and Discord must never show them. ``RedactingFilter`` on a handler covers every record, tracebacks included.
"""
from __future__ import annotations

import logging
import re

HIDDEN = "***"
_PATTERNS = (
    (re.compile(r"(?<=://)[^/\s:@]+:[^/\s@]*@"), f"{HIDDEN}@"),  # scheme://user:pass@host
    (re.compile(r"(?i)\b(bearer\s+)[\w.~+/=-]+"), rf"\g<1>{HIDDEN}"),
    (re.compile(r"\b((?:sk|rk|pk)-)[\w-]{6,}"), rf"\g<1>{HIDDEN}"),  # OpenAI-style API keys
    (re.compile(r"(?i)\b((?:api[_-]?key|access[_-]?token|token|password|secret)=)[^&\s]+"), rf"\g<1>{HIDDEN}"),
)


def redact(text: str) -> str:
    """``text`` with every credential it contains replaced by ``***``."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFilter(logging.Filter):
    """Rewrites each record (message and traceback) with its credentials redacted before any handler
    formats it; the traceback becomes plain text in the message."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + logging.Formatter().formatException(record.exc_info)
            record.exc_info = record.exc_text = None
        record.msg, record.args = redact(message), None
        return True
