"""Teachers: a model that plays the character. Either the base model itself, on this machine
(``LocalTeacher``, batched ``generate``: works offline on the embedded default), or any OpenAI-compatible
server (``OpenAITeacher``, e.g. vLLM serving a bigger model), requests sent in parallel."""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

Message = dict[str, str]


class TeacherError(RuntimeError):
    """The teacher could not answer; the message names the teacher and what to check."""


@dataclass(frozen=True)
class Generation:
    """How the teacher samples; part of the provenance."""

    max_new_tokens: int = 160
    temperature: float = 0.8
    top_p: float = 0.95


class Teacher(Protocol):
    name: str  # for provenance: which model played the character

    def complete(self, prompts: list[list[Message]], seed: int) -> list[str]:
        """One reply per prompt (chat messages ending with the user's turn); ``seed`` makes it repeatable."""
        ...


class OpenAITeacher:
    """``POST {url}/chat/completions`` per prompt, ``workers`` at a time; ``url`` is the API root (…/v1)."""

    def __init__(self, url: str, model: str, generation: Generation, api_key: str | None = None,
                 workers: int = 8, timeout: float = 120.0) -> None:
        self.url, self.model, self.generation = url.rstrip("/"), model, generation
        self.api_key, self.workers, self.timeout = api_key, workers, timeout
        self.name = f"openai:{model}@{self.url}"

    def complete(self, prompts: list[list[Message]], seed: int) -> list[str]:
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(lambda ip: self._one(ip[1], seed + ip[0]), enumerate(prompts)))

    def _one(self, messages: list[Message], seed: int) -> str:
        body = {"model": self.model, "messages": messages, "max_tokens": self.generation.max_new_tokens,
                "temperature": self.generation.temperature, "top_p": self.generation.top_p, "seed": seed}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(f"{self.url}/chat/completions", json.dumps(body).encode(), headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                data = json.load(response)
        except urllib.error.HTTPError as e:
            raise TeacherError(f"teacher {self.url}: HTTP {e.code}: {e.read()[:200]!r} "
                               f"(is '{self.model}' the model it serves?)") from e
        except (urllib.error.URLError, OSError, json.JSONDecodeError) as e:
            raise TeacherError(f"teacher {self.url}: {e} (is an OpenAI-compatible server running there?)") from e
        try:
            return str(data["choices"][0]["message"]["content"] or "").strip()
        except (KeyError, IndexError, TypeError) as e:
            raise TeacherError(f"teacher {self.url}: unexpected reply {str(data)[:200]}") from e


class LocalTeacher:
    """The base model on this machine, a batch of prompts per ``generate`` call (left-padded). 16-bit by
    default: NF4 saves memory, which a teacher that only generates rarely needs, and is far slower on a CPU."""

    def __init__(self, base_model: str, generation: Generation, quantization: str = "none") -> None:
        from finetune.model import load_model, load_tokenizer, resolve

        ref = resolve(base_model)
        self.tokenizer = load_tokenizer(ref)
        self.model = load_model(ref, quantization).eval()  # type: ignore[arg-type]
        self.generation = generation
        self.name = f"local:{ref.name}"

    def complete(self, prompts: list[list[Message]], seed: int) -> list[str]:
        import torch

        from finetune.prompt import render, stop_token_ids

        texts = [render(self.tokenizer, p, add_generation_prompt=True) for p in prompts]
        self.tokenizer.padding_side = "left"
        batch = self.tokenizer(texts, add_special_tokens=False, return_tensors="pt", padding=True)
        batch = {k: v.to(self.model.device) for k, v in batch.items()}
        torch.manual_seed(seed)
        g = self.generation
        kwargs: dict[str, Any] = {"max_new_tokens": g.max_new_tokens, "pad_token_id": self.tokenizer.pad_token_id,
                                  "eos_token_id": sorted(stop_token_ids(self.tokenizer, self.model.generation_config))}
        if g.temperature > 0:
            kwargs |= {"do_sample": True, "temperature": g.temperature, "top_p": g.top_p}
        else:
            kwargs |= {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        with torch.no_grad():
            out = self.model.generate(**batch, **kwargs)
        new = out[:, batch["input_ids"].shape[1]:]
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
