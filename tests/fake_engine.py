"""A deterministic Engine for bot tests: scripted replies streamed in small pieces, every request recorded."""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from bot.engine.base import Engine, EngineError
from finetune.bundle import (
    ADAPTER_FILES, MANIFEST, BundleError, LoraInfo, Manifest, Sampling, base_manifest, load_manifest,
)
from finetune.cards.context import CardContext

Script = Callable[[Manifest, list[dict[str, str]]], str]


def echo(manifest: Manifest, messages: list[dict[str, str]]) -> str:
    """'[<bundle name>] <last line said to it>': shows which adapter answered what."""
    last = messages[-1]["content"].splitlines()[-1] if messages else ""
    return f"[{manifest.name}] {last}"


@dataclass
class Served:
    adapter: str
    bundle: str  # the manifest name of the bundle that served it: changes on swap
    messages: list[dict[str, str]]
    sampling: Sampling | None = None


class FakeEngine(Engine):
    """Streams ``script(manifest, messages)`` ``piece`` chars at a time, ``delay`` seconds apart.

    ``first_delay`` makes it slow to start (time to first token); ``fail`` makes every request raise.
    """

    def __init__(self, script: Script = echo, *, piece: int = 3, delay: float = 0.002, first_delay: float = 0.0):
        self.script = script
        self.piece = piece
        self.delay = delay
        self.first_delay = first_delay
        self.fail: str | None = None
        self.served: list[Served] = []
        self.active = 0
        self.cancelled = 0
        self._adapters: dict[str, tuple[Manifest, Path]] = {}

    async def load_adapter(self, name: str, bundle_dir: str | Path) -> Manifest:
        await asyncio.sleep(0)
        try:
            manifest = load_manifest(bundle_dir)
        except BundleError as exc:
            raise EngineError(f"adapter '{name}': {exc}") from exc
        self._adapters[name] = (manifest, Path(bundle_dir))
        return manifest

    async def serve_base(self, name: str, system_prompt: str = "", sampling: Sampling | None = None) -> Manifest:
        manifest = base_manifest(name, "tiny", {"hidden_size": 64}, "{{ messages }}", system_prompt, sampling)
        self._adapters[name] = (manifest, Path(name))
        return manifest

    async def unload_adapter(self, name: str) -> None:
        self._adapters.pop(name, None)

    def adapters(self) -> list[str]:
        return list(self._adapters)

    def manifest(self, name: str) -> Manifest:
        if name not in self._adapters:
            raise EngineError(f"adapter '{name}' is not loaded")
        return self._adapters[name][0]

    def bundle_dir(self, name: str) -> Path:
        if name not in self._adapters:
            raise EngineError(f"adapter '{name}' is not loaded")
        return self._adapters[name][1]

    def stream(
        self, adapter: str, messages: list[dict[str, str]], sampling: Sampling | None = None
    ) -> AsyncIterator[str]:
        return self._stream(adapter, [dict(m) for m in messages], sampling)

    async def _stream(
        self, adapter: str, messages: list[dict[str, str]], sampling: Sampling | None = None
    ) -> AsyncIterator[str]:
        manifest = self.manifest(adapter)
        self.served.append(Served(adapter, manifest.name, messages, sampling))
        self.active += 1
        try:
            await asyncio.sleep(self.first_delay)
            if self.fail:
                raise EngineError(self.fail)
            text = self.script(manifest, messages)
            for start in range(0, len(text), self.piece):
                yield text[start:start + self.piece]
                await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.active -= 1


def write_bundle(folder: Path, name: str, base_model: str = "tiny", card: CardContext | None = None) -> Path:
    """A bundle folder the FakeEngine (and load_manifest) accepts; the adapter weights are placeholders.
    ``card`` is what a card persona's bundle carries for serving (lorebook, greetings, ...)."""
    folder.mkdir(parents=True, exist_ok=True)
    for file in ADAPTER_FILES:
        (folder / file).write_text("{}")
    manifest = Manifest(
        name=name, base_model=base_model, base_model_spec=base_model, base_fingerprint={"hidden_size": 64},
        chat_template="{{ messages }}", system_prompt=f"You are {name}.", sampling=Sampling(),
        lora=LoraInfo(r=8, alpha=16, dropout=0.0, target_modules="all-linear"), data_hash="0" * 64, card=card,
    )
    (folder / MANIFEST).write_text(json.dumps(manifest.model_dump(), indent=2))
    return folder
