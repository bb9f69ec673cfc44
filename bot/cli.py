"""`personabot`: serve persona adapters as Discord bots (`run`), try them offline (`simulate`), or print the
vLLM server command that serves them to ENGINE=openai (`vllm-command`)."""
from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from functools import partial
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler

from .config import ConfigError, PersonaSpec, Settings, load_engine_config, load_personas, load_settings, select
from .engine import Engine, EngineError, create_engine
from .redact import RedactingFilter, redact

app = typer.Typer(help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False)
console = Console()

Personas = Annotated[list[str] | None, typer.Option("--persona", "-p", help="serve only this persona (repeatable)")]
PersonasFile = Annotated[Path | None, typer.Option(help="YAML/TOML personas file (default: PERSONAS_FILE)")]


@app.callback()
def _setup(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False) -> None:
    handler = RichHandler(console=console, show_path=False)
    handler.addFilter(RedactingFilter())
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", handlers=[handler])
    logging.getLogger("discord").setLevel(logging.INFO if verbose else logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@contextmanager
def _errors() -> Iterator[None]:
    """Configuration and startup problems become one clear line and exit code 2."""
    from .app import StartupError

    try:
        yield
    except (ConfigError, StartupError) as exc:
        console.print(f"[bold red]error:[/bold red] {redact(str(exc))}", highlight=False)
        raise typer.Exit(2) from None


def _config(
    personas_file: Path | None, names: list[str] | None
) -> tuple[Settings, list[PersonaSpec], Callable[[], Engine]]:
    """Settings, the selected personas, and the configured engine's factory: the engine is created later,
    after the Discord logins are checked, off the event loop."""
    settings = load_settings()
    personas = select(load_personas(personas_file or settings.personas_file), names)
    return settings, personas, partial(create_engine, load_engine_config())


@app.command()
def run(persona: Personas = None, personas_file: PersonasFile = None) -> None:
    """Connect every persona to Discord: one bot account per token, or webhooks on DISCORD_TOKEN's bot."""
    from .app import PersonaBot

    async def serve(settings: Settings, personas: list[PersonaSpec], engine: Callable[[], Engine]) -> None:
        bot = PersonaBot(settings, personas, engine)
        try:
            await bot.run()
        finally:
            await bot.close()

    with _errors(), suppress(KeyboardInterrupt):
        asyncio.run(serve(*_config(personas_file, persona)))


@app.command()
def simulate(
    persona: Personas = None, personas_file: PersonasFile = None,
    port: Annotated[int, typer.Option(help="fake Discord port on 127.0.0.1 (0: any free port)")] = 0,
) -> None:
    """Chat with your personas offline: a local fake Discord, the real bot, and this terminal as the user."""
    from .simulate import simulate as run_simulation

    with _errors(), suppress(KeyboardInterrupt):
        settings, personas, engine = _config(personas_file, persona)
        asyncio.run(run_simulation(settings, personas, engine, port=port, console=console))


@app.command("vllm-command")
def vllm_command(
    persona: Personas = None, personas_file: PersonasFile = None,
    model: Annotated[str | None, typer.Option(help="what vLLM serves as the base (default: the bundles' base; "
                                                   "a GGUF is converted to safetensors once)")] = None,
    host: Annotated[str, typer.Option(help="address the server listens on")] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    max_model_len: Annotated[int | None, typer.Option(help="context length (default: MAX_CONTEXT, else the "
                                                           "base's own)")] = None,
    dtype: Annotated[str, typer.Option(help="vLLM's --dtype")] = "bfloat16",
    min_lora_rank: Annotated[int, typer.Option(help="room for larger bundles swapped in later")] = 0,
    swaps: Annotated[bool, typer.Option(help="let /persona swap and reload load weights on the server")] = True,
    python: Annotated[str, typer.Option(help="the interpreter vLLM is installed in")] = "python",
) -> None:
    """Print the vLLM command that serves your personas to ENGINE=openai: one LoRA module per persona."""
    from .engine.vllm import base_for, served_personas
    from .engine.vllm import vllm_command as command

    with _errors():
        personas = select(load_personas(personas_file or load_settings().personas_file), persona)
        try:
            pairs = [(p.name, p.adapter) for p in personas]
            base_path, base_len = base_for(served_personas(pairs)[0].manifest, model)
            length = max_model_len or load_engine_config().max_context or base_len
            if not length:
                raise ConfigError(f"{base_path}: its context length is unknown here; pass --max-model-len")
            cmd = command(pairs, base_path, python=python, host=host, port=port, max_model_len=length,
                          dtype=dtype, min_lora_rank=min_lora_rank, swaps=swaps)
        except EngineError as exc:
            raise ConfigError(str(exc)) from exc
    print(cmd.shell())
    for note in cmd.notes:
        print(f"# note: {note}")
    print(f"# then: ENGINE=openai OPENAI_BASE_URL=http://{host}:{port}/v1 personabot run")
