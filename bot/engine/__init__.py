"""Generation backends behind one async streaming interface (``base.Engine``), built from one ``EngineConfig``.

A new backend is a module here implementing ``Engine`` plus a branch in ``create_engine``; ``local/`` is the
embedded engine.
"""
from __future__ import annotations

from .base import Engine, EngineError
from .config import EngineConfig

__all__ = ["Engine", "EngineConfig", "EngineError", "create_engine"]


def create_engine(config: EngineConfig) -> Engine:
    """The engine the bot talks to. ``local``: the base model runs in this process (torch is imported only
    then). ``openai``: an OpenAI-compatible server serves the adapters."""
    if config.engine == "local":
        from .local import LocalEngine

        return LocalEngine(config)
    from .openai import OpenAIEngine

    return OpenAIEngine(config)
