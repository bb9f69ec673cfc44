"""The scale-out backend: a vLLM server (or another OpenAI-compatible one) streams the replies over HTTP.

The server holds the weights; this process holds each bundle's manifest and tokenizer. Every persona is
a LoRA module named ``vllm.module_name(persona)``, the name ``personabot vllm-command`` registers with
``--lora-modules``. The prompt is rendered here with the bundle's chat template, trimmed to the context
length the server reports, and sent as token ids to ``/v1/completions``: the server's own chat template
never touches it, so serving renders byte for byte as training did.

Loading a persona checks ``/v1/models``: the server must serve the bundle's base (under its name, or
from a folder of that name) and the persona's module from the bundle's folder, else startup fails
naming persona, module and server. Loading again (``/persona swap`` or ``reload``) sends the bundle to
``/v1/load_lora_adapter``, so the server's weights really change; a server started without
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` lacks that endpoint and the swap is refused with that reason.
The server reads the bundle from the path this process gives, so both must see the adapters at one path.

Sampling goes out as ``temperature``, ``top_p``, ``max_tokens``, ``stop`` and the tokenizer's end-of-turn ids,
plus vLLM's ``top_k`` and ``repetition_penalty`` when they are not neutral and ``seed`` when set (vLLM and
OpenAI take one per request); ``request_extra`` adds fields as given (``{"ignore_eos": true}`` for a
benchmark). Connect errors, 429 and 5xx are retried with exponential backoff (honouring ``Retry-After``) until
the first piece of text has been streamed; after that a failure is an error, since a retry would repeat text
the user has already seen.
"""
from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
from yarl import URL

from finetune.bundle import BundleError, Manifest, Sampling, base_manifest, check_compatible, load_manifest
from finetune.prompt import stop_token_ids, with_system_prompt

from .base import Engine, EngineError
from .config import EngineConfig
from .context import fit_messages, prompt_budget
from .vllm import SWAPS_ENV, module_name

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
MAX_DELAY_S = 30.0
HOW_TO_SERVE = "personabot vllm-command prints the server command for your personas file"


@dataclass(frozen=True)
class _Loaded:
    manifest: Manifest
    bundle_dir: Path
    tokenizer: Any
    module: str
    stop_ids: list[int]


@dataclass(frozen=True)
class _Served:
    """What ``/v1/models`` says: the base model's names and folder, its context length, the LoRA modules."""

    base_names: list[str]
    base_root: str
    max_model_len: int | None
    modules: dict[str, str]
    """module name -> the folder the server loaded it from"""


class _Retryable(Exception):
    def __init__(self, message: str, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


class OpenAIEngine(Engine):
    def __init__(self, config: EngineConfig) -> None:
        """The options are ``EngineConfig``'s openai ones: ``openai_base_url`` is the API root including
        ``/v1``; ``max_context``, a context window smaller than the server's if wanted (the server's is
        always respected); ``read_timeout_s``, the longest silence allowed while waiting for a piece."""
        assert config.openai_base_url, "EngineConfig requires openai_base_url for engine 'openai'"
        self.url = config.openai_base_url.rstrip("/")
        self.shown_url = str(URL(self.url).with_user(None))
        """the url as errors show it: without credentials, since errors are posted in Discord channels"""
        key = config.openai_api_key.get_secret_value() if config.openai_api_key else None
        if key and URL(self.url).user:
            raise EngineError(f"{self.shown_url}: the url carries credentials and an API key is set too; use one")
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._max_context = config.max_context
        self._extra = dict(config.request_extra)
        self._retries = config.request_retries
        self._backoff_s = config.request_backoff_s
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=config.connect_timeout_s,
                                              sock_read=config.read_timeout_s)
        self._read_timeout_s = config.read_timeout_s
        super().__init__()
        self._adapters: dict[str, _Loaded] = {}
        self._served: _Served | None = None
        self._session: aiohttp.ClientSession | None = None
        self.active_requests = 0

    # adapters

    def _read_bundle(self, name: str, bundle_dir: Path) -> _Loaded:
        from transformers import AutoTokenizer

        try:
            manifest = load_manifest(bundle_dir)
        except BundleError as exc:
            raise EngineError(f"adapter '{name}': {exc}") from exc
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(bundle_dir))
        except (OSError, ValueError) as exc:
            raise EngineError(
                f"adapter '{name}': {bundle_dir}: no usable tokenizer, which renders and trims the prompt "
                f"here (bundles written by finetune include one): {exc}"
            ) from exc
        module = module_name(name)
        clash = next((n for n, e in self._adapters.items() if e.module == module and n != name), None)
        if clash is not None:
            raise EngineError(f"adapter '{name}': its LoRA module name '{module}' is taken by '{clash}' (rename one)")
        return _Loaded(manifest, bundle_dir, tokenizer, module, sorted(stop_token_ids(tokenizer)))

    async def load_adapter(self, name: str, bundle_dir: str | Path) -> Manifest:
        """First load: check the server serves the bundle. Later loads (swap, reload): load it there."""
        loaded = await asyncio.to_thread(self._read_bundle, name, Path(bundle_dir).resolve())
        served = await self._models(f"adapter '{name}'")
        self._check_base(name, loaded, served)
        if name in self._adapters:
            await self._load_on_server(name, loaded)
            served = await self._models(f"adapter '{name}'")
        self._check_module(name, loaded, served)
        self._served = served
        self._adapters[name] = loaded
        return loaded.manifest

    async def serve_base(self, name: str, system_prompt: str = "", sampling: Sampling | None = None) -> Manifest:
        """``name`` is a model the server serves (a synth teacher, maybe larger than any base here): no tokenizer
        of it is kept, so its requests go to ``/chat/completions`` and the server renders its own template."""
        manifest = base_manifest(name, name, {}, "", system_prompt, sampling)
        self._adapters[name] = _Loaded(manifest, Path(name), None, name, [])
        return manifest

    async def unload_adapter(self, name: str) -> None:
        """Forget the persona here; the server keeps the module its command line gave it."""
        self._entry(name)
        del self._adapters[name]

    def _check_base(self, name: str, entry: _Loaded, served: _Served) -> None:
        base = entry.manifest.base_model
        root = served.base_root
        if base not in (*served.base_names, root, Path(root).name):
            raise EngineError(
                f"adapter '{name}': {entry.bundle_dir}: trained on base model '{base}', but {self.shown_url} "
                f"serves '{served.base_names[0]}' ({root}); serve that base under the bundle's name "
                f"(--served-model-name '{base}'; {HOW_TO_SERVE})"
            )
        config = Path(root) / "config.json"
        if config.is_file():  # the server's folder is readable here: its shape must be the bundle's too
            from finetune.model import fingerprint

            try:
                shape = fingerprint(SimpleNamespace(**json.loads(config.read_text(encoding="utf-8"))))
                check_compatible(entry.manifest, entry.bundle_dir, base, shape)
            except (BundleError, json.JSONDecodeError) as exc:
                raise EngineError(f"adapter '{name}': against {self.shown_url}'s {config}: {exc}") from exc

    def _check_module(self, name: str, entry: _Loaded, served: _Served) -> None:
        root = served.modules.get(entry.module)
        if root is None:
            offered = ", ".join(sorted(served.modules)) or "none"
            raise EngineError(
                f"adapter '{name}': {self.shown_url} serves no LoRA module '{entry.module}' (it serves: {offered}); "
                f"start vLLM with --enable-lora --lora-modules {entry.module}={entry.bundle_dir} ({HOW_TO_SERVE})"
            )
        if os.path.realpath(root) != str(entry.bundle_dir):
            raise EngineError(
                f"adapter '{name}': {self.shown_url} serves LoRA module '{entry.module}' from {root}, not from "
                f"{entry.bundle_dir}; restart vLLM with --lora-modules {entry.module}={entry.bundle_dir} "
                f"({HOW_TO_SERVE})"
            )

    async def _load_on_server(self, name: str, entry: _Loaded) -> None:
        where = f"{self.shown_url}/load_lora_adapter"
        body = {"lora_name": entry.module, "lora_path": str(entry.bundle_dir), "load_inplace": True}
        try:
            async with self._http().post(f"{self.url}/load_lora_adapter", json=body, headers=self._headers) as resp:
                text = await resp.text()
                status = resp.status
        except aiohttp.ClientError as exc:
            raise EngineError(f"adapter '{name}': {where}: {exc}; the server keeps the old weights") from exc
        if status == 404 and _error_detail(text) == "Not Found":  # the route itself is missing
            raise EngineError(
                f"adapter '{name}': swap refused: {self.shown_url} does not load adapters at run time, so its "
                f"weights would not change; start vLLM with {SWAPS_ENV}=True, or restart it with "
                f"--lora-modules {entry.module}={entry.bundle_dir}"
            )
        if status != 200:
            raise EngineError(f"adapter '{name}': {where} refused {entry.bundle_dir}: HTTP {status}: "
                              f"{_error_detail(text)}; the old weights keep serving")

    async def _models(self, who: str) -> _Served:
        """``GET /v1/models``, retried like a request while the server is starting or busy."""
        where = f"{self.shown_url}/models"
        for attempt in range(self._retries + 1):
            try:
                async with self._http().get(f"{self.url}/models", headers=self._headers) as resp:
                    await _check_status(resp, where)
                    data = await resp.json(content_type=None)
                break
            except (_Retryable, aiohttp.ClientConnectionError) as exc:
                if attempt == self._retries:
                    raise EngineError(f"{who}: {where}: {exc} (gave up after {attempt + 1} attempts; is the server "
                                      f"running? {HOW_TO_SERVE})") from exc
                await asyncio.sleep(min(getattr(exc, "delay", None) or self._backoff_s * 2**attempt, MAX_DELAY_S))
            except (aiohttp.ContentTypeError, json.JSONDecodeError) as exc:
                raise EngineError(f"{who}: {where}: not a model list: {exc}") from exc
            except EngineError as exc:  # a client error, e.g. 401 for a wrong OPENAI_API_KEY
                raise EngineError(f"{who}: {exc}") from exc
        cards = [c for c in data.get("data", []) if isinstance(c, dict) and "id" in c]
        bases = [c for c in cards if not c.get("parent")]
        if not bases:
            raise EngineError(f"{who}: {where} lists no base model")
        return _Served(
            base_names=[c["id"] for c in bases],
            base_root=str(bases[0].get("root") or bases[0]["id"]),
            max_model_len=bases[0].get("max_model_len"),
            modules={c["id"]: str(c.get("root") or "") for c in cards if c.get("parent")},
        )

    # requests

    def _context(self, adapter: str) -> int:
        limits = [n for n in (self._max_context, self._served.max_model_len if self._served else None) if n]
        if not limits:
            raise EngineError(f"adapter '{adapter}': {self.shown_url}/models reports no max_model_len; "
                              "set MAX_CONTEXT to the server's context length")
        return min(limits)

    async def _prompt(self, adapter: str, entry: _Loaded, messages: list[dict[str, str]],
                      sampling: Sampling) -> list[int]:
        budget = prompt_budget(self._context(adapter), sampling.max_new_tokens, adapter)
        _, ids = await asyncio.to_thread(fit_messages, entry.tokenizer, entry.manifest, messages, budget, adapter)
        return ids

    async def _request(self, adapter: str, entry: _Loaded, messages: list[dict[str, str]],
                       sampling: Sampling) -> tuple[str, dict[str, Any]]:
        """(endpoint, body): a bundle's prompt rendered here as token ids for ``/completions``; a base served by
        name (``serve_base``) as chat messages for ``/chat/completions``."""
        if entry.tokenizer is None:
            messages = with_system_prompt(entry.manifest.system_prompt, messages)
            return "chat/completions", self._body(entry, sampling, messages=messages)
        prompt = await self._prompt(adapter, entry, messages, sampling)
        return "completions", self._body(entry, sampling, prompt=prompt, stop_token_ids=entry.stop_ids)

    def _body(self, entry: _Loaded, sampling: Sampling, **request: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": entry.module,
            **request,
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
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        return body | self._extra

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def stream(
        self, adapter: str, messages: list[dict[str, str]], sampling: Sampling | None = None
    ) -> AsyncIterator[str]:
        entry = self._entry(adapter)
        params = sampling or entry.manifest.sampling
        endpoint, body = await self._request(adapter, entry, messages, params)
        where = f"{self.shown_url}/{endpoint} (model '{entry.module}')"
        self.active_requests += 1
        try:
            for attempt in range(self._retries + 1):
                streamed = False
                try:
                    async with self._http().post(f"{self.url}/{endpoint}", json=body, headers=self._headers) as resp:
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
    """The server's own error message (OpenAI's ``{"error": {"message": ...}}``, FastAPI's ``{"detail": ...}``)
    or the raw body, short."""
    try:
        data = json.loads(text)
        error = data.get("error", data.get("detail", text))
    except (json.JSONDecodeError, AttributeError):
        error = text
    message = error.get("message", error) if isinstance(error, dict) else error
    return str(message).strip()[:300] or "(empty response)"


async def _pieces(resp: aiohttp.ClientResponse, where: str) -> AsyncIterator[str]:
    """Text deltas from a server-sent-events stream of completion (or chat completion) chunks, up to
    ``data: [DONE]``."""
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
            piece = choice.get("text") or (choice.get("delta") or {}).get("content")
            if piece:
                yield piece
    raise aiohttp.ClientPayloadError("stream ended without data: [DONE]")
