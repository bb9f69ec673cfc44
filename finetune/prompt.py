"""Prompt rendering shared by training and serving, so both see byte-identical prompts."""
from __future__ import annotations

from typing import Any


def with_system_prompt(system_prompt: str, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Serving: the persona's system prompt, then any system context the messages start with (memories,
    lorebook entries), as one system message, so added context never replaces the character."""
    if not system_prompt:
        return list(messages)
    if messages and messages[0]["role"] == "system":
        extra = messages[0]["content"]
        merged = f"{system_prompt}\n\n{extra}" if extra else system_prompt
        return [{"role": "system", "content": merged}, *messages[1:]]
    return [{"role": "system", "content": system_prompt}, *messages]


def with_default_system_prompt(system_prompt: str, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Training: a conversation that brings its own system prompt (ShareGPT's ``system``, a JSONL system turn)
    trains with that prompt alone, as the data's author wrote it; the others get the persona's."""
    if not system_prompt or (messages and messages[0]["role"] == "system"):
        return list(messages)
    return [{"role": "system", "content": system_prompt}, *messages]


def render(
    tokenizer: Any,
    messages: list[dict[str, str]],
    chat_template: str | None = None,
    add_generation_prompt: bool = False,
) -> str:
    """Render chat messages to text through the tokenizer's (or the bundle's) chat template."""
    return tokenizer.apply_chat_template(
        messages,
        chat_template=chat_template,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )


def encode_prompt(
    tokenizer: Any,
    system_prompt: str,
    messages: list[dict[str, str]],
    chat_template: str | None = None,
) -> list[int]:
    """Token ids of the prompt a model continues with the character's next reply (serving side)."""
    text = render(tokenizer, with_system_prompt(system_prompt, messages), chat_template, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def stop_token_ids(tokenizer: Any, generation_config: Any = None) -> set[int]:
    """Ids that end a reply: the tokenizer's EOS plus any extra EOS ids the model's generation config names."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    extra = getattr(generation_config, "eos_token_id", None)
    ids.update(extra if isinstance(extra, list) else [extra] if extra is not None else [])
    return ids
