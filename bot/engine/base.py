"""The one async streaming interface every generation backend implements."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from finetune.bundle import Manifest, Sampling


class EngineError(RuntimeError):
    """A request or adapter operation failed; the message names the adapter (and bundle path) at fault.

    Raised into the one request (or load call) that failed; the engine keeps serving everything else.
    """


class Engine(ABC):
    """Generation backend: one base model, many named adapters, concurrent streamed requests.

    Subclasses keep their loaded adapters in ``self._adapters``: name -> an entry with at least
    ``manifest`` and ``bundle_dir`` attributes (plus whatever the backend needs to serve it).
    """

    def __init__(self) -> None:
        self._adapters: dict[str, Any] = {}

    def _entry(self, name: str) -> Any:
        try:
            return self._adapters[name]
        except KeyError:
            loaded = ", ".join(sorted(self._adapters)) or "none"
            raise EngineError(f"adapter '{name}' is not loaded (loaded: {loaded})") from None

    @abstractmethod
    async def load_adapter(self, name: str, bundle_dir: str | Path) -> Manifest:
        """Load (or replace) adapter ``name`` from a bundle. On any error the old adapter keeps serving."""

    @abstractmethod
    async def serve_base(self, name: str, system_prompt: str = "", sampling: Sampling | None = None) -> Manifest:
        """Serve the base model itself, no adapter, as ``name`` (e.g. the teacher of ``finetune data synth``).

        An empty ``system_prompt`` leaves the prompt to the messages' own leading system turn. On the openai
        backend ``name`` is the model the server serves."""

    @abstractmethod
    async def unload_adapter(self, name: str) -> None:
        """Forget adapter ``name``; requests already streaming on it finish first or fail cleanly."""

    async def reload_adapter(self, name: str) -> Manifest:
        """Re-read adapter ``name`` from the bundle folder it was loaded from."""
        return await self.load_adapter(name, self.bundle_dir(name))

    def manifest(self, name: str) -> Manifest:
        """The manifest of loaded adapter ``name`` (system prompt, sampling defaults, chat template)."""
        return self._entry(name).manifest

    def bundle_dir(self, name: str) -> Path:
        """Where adapter ``name`` was loaded from."""
        return self._entry(name).bundle_dir

    @abstractmethod
    def stream(
        self, adapter: str, messages: list[dict[str, str]], sampling: Sampling | None = None
    ) -> AsyncIterator[str]:
        """Stream the persona's reply to chat ``messages`` (user/assistant turns, no system prompt: the
        bundle's system prompt is prepended exactly as in training). History is trimmed oldest-first to fit
        the context window. Cancelling the consuming task frees the request's slot at once."""

    async def complete(
        self, adapter: str, messages: list[dict[str, str]], sampling: Sampling | None = None
    ) -> str:
        """The whole reply as one string."""
        return "".join([piece async for piece in self.stream(adapter, messages, sampling)])

    async def close(self) -> None:
        """Stop background work and free the model."""
