"""The embedded backend: transformers in this process, one base model, any number of LoRA adapters.

The base loads on the scheduler's worker thread (4-bit NF4 where bitsandbytes works, else bf16/fp32),
so creating the engine never blocks the event loop; every call waits for it to be ready. See
``scheduler`` for how requests are batched and ``adapters`` for how bundles are checked.

Adapters live in LoRA weight slots (see ``lora``) mapped from their public names. A reload copies the
new weights into a fresh slot, then swaps the mapping: requests already streaming finish on the old
weights, whose slot is freed once the last of them ends. A bundle that fails any check never reaches
the mapping, so the old adapter keeps serving.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from finetune.bundle import Manifest, Sampling, base_manifest
from finetune.model import EMBEDDED_DEFAULT

from .adapters import prepare_adapter
from ..base import Engine, EngineError
from ..config import EngineConfig
from ..context import fit_messages, prompt_budget
from .lora import BASE_SLOT
from .runtime import Runtime
from .scheduler import DONE, ReplyQueue, Request, Scheduler


T = TypeVar("T")


@dataclass(frozen=True)
class _Loaded:
    slot: int
    manifest: Manifest
    bundle_dir: Path


class LocalEngine(Engine):
    def __init__(self, config: EngineConfig) -> None:
        """The options are ``EngineConfig``'s local ones; ``max_context`` is capped by the model's own
        ``max_position_embeddings``."""
        self._base_model = config.base_model or EMBEDDED_DEFAULT
        self._max_context = config.max_context
        super().__init__()
        self._adapters: dict[str, _Loaded] = {}
        self._scheduler = Scheduler(lambda: Runtime.load(config), config.max_batch)

    @property
    def active_requests(self) -> int:
        """Requests decoding or waiting for a batch slot."""
        return self._scheduler.active

    async def _runtime(self) -> Runtime:
        try:
            return await asyncio.wrap_future(self._scheduler.ready)
        except Exception as exc:
            raise EngineError(f"base model '{self._base_model}' failed to load: {exc}") from exc

    async def load_adapter(self, name: str, bundle_dir: str | Path) -> Manifest:
        rt = await self._runtime()
        prepared = await on_own_thread(prepare_adapter, name, Path(bundle_dir).resolve(), rt.info)
        job = self._scheduler.call(rt.add_adapter, prepared)
        try:
            slot = await asyncio.wrap_future(job)
        except asyncio.CancelledError:  # the worker may still add it: make sure it is removed again
            job.add_done_callback(lambda f: f.cancelled() or f.exception() or self._scheduler.retire(f.result()))
            raise
        except Exception as exc:  # e.g. out of memory for the weights
            raise EngineError(f"adapter '{name}': {prepared.bundle_dir}: cannot load: {exc!r}") from exc
        self._register(name, _Loaded(slot, prepared.manifest, prepared.bundle_dir))
        return prepared.manifest

    async def serve_base(self, name: str, system_prompt: str = "", sampling: Sampling | None = None) -> Manifest:
        """The base in the all-zero LoRA slot, rendered with its tokenizer's own chat template."""
        rt = await self._runtime()
        template = rt.tokenizer.chat_template
        if not isinstance(template, str) or not template:
            raise EngineError(f"base model '{self._base_model}': its tokenizer has no chat template to prompt with")
        manifest = base_manifest(name, rt.info.name, rt.info.fingerprint, template, system_prompt, sampling)
        self._register(name, _Loaded(BASE_SLOT, manifest, Path(self._base_model)))
        return manifest

    def _register(self, name: str, entry: _Loaded) -> None:
        old = self._adapters.get(name)
        self._adapters[name] = entry
        if old is not None:
            self._retire(old.slot)

    def _retire(self, slot: int) -> None:
        if slot != BASE_SLOT:  # shared by every name serving the base; never freed
            self._scheduler.retire(slot)

    async def unload_adapter(self, name: str) -> None:
        entry = self._entry(name)
        del self._adapters[name]
        self._retire(entry.slot)

    async def stream(
        self, adapter: str, messages: list[dict[str, str]], sampling: Sampling | None = None
    ) -> AsyncIterator[str]:
        rt = await self._runtime()
        context = min(self._max_context or rt.context, rt.context)
        while True:
            entry = self._entry(adapter)
            params = sampling or entry.manifest.sampling
            budget = prompt_budget(context, params.max_new_tokens, adapter)
            _, prompt = await asyncio.to_thread(fit_messages, rt.tokenizer, entry.manifest, messages, budget, adapter)
            if self._adapters.get(adapter) is entry:  # else it was reloaded meanwhile: render with the new one
                break
        request = Request(adapter, entry.slot, prompt, params, ReplyQueue())
        self._scheduler.submit(request)
        try:
            while (item := await request.out.queue.get()) is not DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            request.cancelled = True

    async def close(self) -> None:
        await asyncio.to_thread(self._scheduler.close)


async def on_own_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn`` on a thread of its own that then ends.

    On a CPU, a thread that has run a parallel torch op keeps an OpenMP team whose threads compete with the
    engine worker's for the same cores: decoding ran at half speed from then on (26 -> 13 tok/s, measured).
    The team ends with its thread; ``asyncio.to_thread``'s pooled threads live on.
    """
    pool = ThreadPoolExecutor(1, thread_name_prefix="personabot-oneshot")
    try:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
    finally:
        pool.shutdown(wait=False)
