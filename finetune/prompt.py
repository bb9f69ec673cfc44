"""Prompt rendering shared by training and serving, so both see byte-identical prompts."""
from __future__ import annotations

from typing import Any


def with_system_prompt(system_prompt: str, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Prepend the persona's system prompt unless the conversation already starts with its own."""
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
