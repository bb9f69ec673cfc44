"""The scale-out backend: any OpenAI-compatible server streams the replies over HTTP.

vLLM is the documented server: ``vllm serve BASE --enable-lora --lora-modules NAME=BUNDLE_DIR ...``;
each adapter is chosen by ``model=NAME``. This process loads only the bundles' manifests (system prompt,
sampling defaults) - never weights - and, when ``max_context`` is set, the tokenizer saved in the bundle
to trim history to the server's context window. The server renders the chat template itself, so serve
the base's own template (what ``finetune`` trains with by default) or pass the bundle's with
``--chat-template``.

Sampling goes out as ``temperature``, ``top_p``, ``max_tokens`` and ``stop``, plus vLLM's ``top_k`` and
``repetition_penalty`` when they are not neutral. Connect errors, 429 and 5xx are retried with
exponential backoff (honouring ``Retry-After``) until the first piece of text has been streamed; after
that a failure is an error, since a retry would repeat text the user has already seen.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from finetune.bundle import BundleError, Manifest, Sampling, load_manifest
from finetune.prompt import with_system_prompt

from ..redact import redact
from .base import Engine, EngineError
from .config import EngineConfig
from .context import fit_messages, prompt_budget

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
MAX_DELAY_S = 30.0


@dataclass(frozen=True)
class _Loaded:
    manifest: Manifest
    bundle_dir: Path
    tokenizer: Any


class _Retryable(Exception):
    def __init__(self, message: str, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


class OpenAIEngine(Engine):
    def __init__(self, config: EngineConfig) -> None:
        """The options are ``EngineConfig``'s openai ones: ``openai_base_url`` is the API root including
        ``/v1``; with ``base_model`` set, bundles trained on another base are refused."""
        assert config.openai_base_url, "EngineConfig requires openai_base_url for engine 'openai'"
        self.url = config.openai_base_url.rstrip("/")
        self._endpoint = f"{self.url}/chat/completions"
        key = config.openai_api_key.get_secret_value() if config.openai_api_key else None
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._base_model = config.base_model
        self._max_context = config.max_context
        self._retries = config.request_retries
        self._backoff_s = config.request_backoff_s
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=config.connect_timeout_s,
                                              sock_read=config.read_timeout_s)
        self._read_timeout_s = config.read_timeout_s
        super().__init__()
        self._adapters: dict[str, _Loaded] = {}
        self._session: aiohttp.ClientSession | None = None
        self.active_requests = 0

    def _read_bundle(self, name: str, bundle_dir: Path) -> _Loaded:
        try:
            manifest = load_manifest(bundle_dir)
        except BundleError as exc:
            raise EngineError(f"adapter '{name}': {exc}") from exc
        if self._base_model and self._base_model not in (manifest.base_model, manifest.base_model_spec):
            raise EngineError(
                f"adapter '{name}': {bundle_dir}: trained on base model '{manifest.base_model}', "
                f"but {redact(self.url)} serves '{self._base_model}'"
            )
        tokenizer = None
        if self._max_context:
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(str(bundle_dir))
            except (OSError, ValueError) as exc:
                raise EngineError(
                    f"adapter '{name}': {bundle_dir}: no usable tokenizer to trim history: {exc}"
                ) from exc
        return _Loaded(manifest, bundle_dir, tokenizer)

    async def load_adapter(self, name: str, bundle_dir: str | Path) -> Manifest:
        loaded = await asyncio.to_thread(self._read_bundle, name, Path(bundle_dir).resolve())
        self._adapters[name] = loaded
        return loaded.manifest

    async def unload_adapter(self, name: str) -> None:
        self._entry(name)
        del self._adapters[name]

    async def _messages(self, adapter: str, entry: _Loaded, messages: list[dict[str, str]],
                        sampling: Sampling) -> list[dict[str, str]]:
        if entry.tokenizer is None:
            return with_system_prompt(entry.manifest.system_prompt, messages)
        budget = prompt_budget(self._max_context, sampling.max_new_tokens, adapter)
        sent, _ = await asyncio.to_thread(fit_messages, entry.tokenizer, entry.manifest, messages, budget, adapter)
        return sent

    def _body(self, adapter: str, messages: list[dict[str, str]], sampling: Sampling) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": adapter,
            "messages": messages,
            "stream": True,
            "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
        }
        if sampling.stop:
            body["stop"] = sampling.stop
        if sampling.top_k > 0:
            body["top_k"] = sampling.top_k
        if sampling.repetition_penalty != 1.0:
            body["repetition_penalty"] = sampling.repetition_penalty
        return body

    async def stream(
        self, adapter: str, messages: list[dict[str, str]], sampling: Sampling | None = None
    ) -> AsyncIterator[str]:
        entry = self._entry(adapter)
        params = sampling or entry.manifest.sampling
        body = self._body(adapter, await self._messages(adapter, entry, messages, params), params)
        where = f"{redact(self._endpoint)} (model '{adapter}')"  # errors quote it: no credentials
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        self.active_requests += 1
        try:
            for attempt in range(self._retries + 1):
                streamed = False
                try:
                    async with self._session.post(self._endpoint, json=body, headers=self._headers) as resp:
                        await _check_status(resp, where)
                        async for piece in _pieces(resp, where):
                            streamed = True
                            yield piece
                    return
                except aiohttp.SocketTimeoutError as exc:
                    raise EngineError(f"{where}: no data for {self._read_timeout_s:g} s, gave up") from exc
                except (_Retryable, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
                    if streamed:
                        raise EngineError(f"{where}: connection lost mid-reply: {exc}") from exc
                    if attempt == self._retries:
                        raise EngineError(f"{where}: {exc} (gave up after {attempt + 1} attempts)") from exc
                    delay = getattr(exc, "delay", None) or self._backoff_s * 2**attempt
                    await asyncio.sleep(min(delay, MAX_DELAY_S))
        finally:
            self.active_requests -= 1

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


async def _check_status(resp: aiohttp.ClientResponse, where: str) -> None:
    if resp.status == 200:
        return
    detail = _error_detail(await resp.text())
    message = f"HTTP {resp.status}: {detail}"
    if resp.status in RETRY_STATUS:
        retry_after = resp.headers.get("Retry-After", "")
        raise _Retryable(message, float(retry_after) if retry_after.replace(".", "", 1).isdigit() else None)
    raise EngineError(f"{where}: {message}")


def _error_detail(text: str) -> str:
    """The server's own error message (OpenAI's ``{"error": {"message": ...}}``) or the raw body, short."""
    try:
        error = json.loads(text).get("error", text)
    except (json.JSONDecodeError, AttributeError):
        error = text
    message = error.get("message", error) if isinstance(error, dict) else error
    return str(message).strip()[:300] or "(empty response)"


async def _pieces(resp: aiohttp.ClientResponse, where: str) -> AsyncIterator[str]:
    """Text deltas from a server-sent-events stream of chat completion chunks, up to ``data: [DONE]``."""
    async for raw in resp.content:
        line = raw.decode("utf-8").strip()
        if not line.startswith("data:"):
            continue  # blank separators, ": keep-alive" comments, event names
        data = line.removeprefix("data:").strip()
        if data == "[DONE]":
            return
        try:
            event = json.loads(data)
        except json.JSONDecodeError as exc:
            raise EngineError(f"{where}: malformed stream event: {data[:200]}") from exc
        if "error" in event:
            raise EngineError(f"{where}: server error mid-stream: {_error_detail(json.dumps(event))}")
        for choice in event.get("choices") or []:
            piece = (choice.get("delta") or {}).get("content")
            if piece:
                yield piece
    raise aiohttp.ClientPayloadError("stream ended without data: [DONE]")
