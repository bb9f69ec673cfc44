"""`finetune`: train, inspect data, evaluate, chat with and export persona adapters."""
from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from .bundle import BundleError
from .config import ConfigError
from .conversation import DataError
from .model import ModelError

app = typer.Typer(help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Inspect persona data before training.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console()
RECIPES = Path(__file__).parent / "recipes"


@app.callback()
def _setup(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=True)],
    )
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", module="bitsandbytes")


@contextmanager
def _errors() -> Iterator[None]:
    """Known input errors become one clear line and exit code 2; anything else keeps its traceback."""
    try:
        yield
    except (ConfigError, DataError, ModelError, BundleError) as exc:
        console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _recipe(config: str) -> Path:
    """A config path, or the name of a built-in recipe (see finetune/recipes/)."""
    path = Path(config)
    if path.exists() or path.suffix in (".yaml", ".yml"):
        return path
    builtin = RECIPES / f"{config}.yaml"
    if builtin.is_file():
        return builtin
    names = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
    raise ConfigError(f"{config}: no such config file or built-in recipe ({names})")


@app.command()
def train(
    config: Annotated[str, typer.Argument(help="YAML config, or a built-in recipe name (e.g. demo)")],
    set_: Annotated[list[str], typer.Option("--set", "-s", help="override, e.g. --set train.epochs=1")] = [],
    resume: Annotated[bool, typer.Option(help="continue from the latest checkpoint")] = False,
    resume_from: Annotated[Optional[Path], typer.Option(help="continue from this checkpoint folder")] = None,
) -> None:
    """Train a LoRA adapter and write an adapter bundle (QLoRA where bitsandbytes can run it)."""
    from .config import load_config
    from .train import train as run_training

    with _errors():
        cfg = load_config(_recipe(config), set_)
        out = run_training(cfg, resume=str(resume_from) if resume_from else resume)
    console.print(f"[bold green]done:[/bold green] adapter bundle at {escape(str(out))}")


def _data_inputs(path: Path, base_model: str):
    from .model import load_tokenizer, resolve
    from .persona import load_persona

    persona = load_persona(path)
    tokenizer = load_tokenizer(resolve(base_model))
    return persona, tokenizer


@data_app.command("check")
def data_check(
    path: Annotated[Path, typer.Argument(help="persona folder or character card")],
    base_model: Annotated[str, typer.Option(help="tokenizer + chat template to render with")] = "smollm2",
    max_seq_len: int = 1024,
    eval_fraction: float = 0.1,
    seed: int = 42,
) -> None:
    """Counts, truncation, and every bad line as file:line: what is wrong. Exit 1 if anything was skipped."""
    from .inspect_data import check

    with _errors():
        persona, tokenizer = _data_inputs(path, base_model)
        stats = check(persona, tokenizer, None, max_seq_len, eval_fraction, seed, console)
    if stats.problems:
        raise typer.Exit(1)


@data_app.command("preview")
def data_preview(
    path: Annotated[Path, typer.Argument(help="persona folder or character card")],
    base_model: str = "smollm2",
    count: Annotated[int, typer.Option("--count", "-n")] = 3,
    max_seq_len: int = 1024,
) -> None:
    """Show rendered examples with the trained (character) tokens highlighted."""
    from .inspect_data import preview

    with _errors():
        persona, tokenizer = _data_inputs(path, base_model)
        preview(persona, tokenizer, None, max_seq_len, count, console)


@data_app.command("synth")
def data_synth(
    persona: Annotated[Path, typer.Argument(help="persona folder (its persona.toml gets the new source)")],
    count: Annotated[int, typer.Option("--count", "-n", help="conversations to attempt, resumed ones included")] = 80,
    turns: Annotated[int, typer.Option(help="most exchanges per conversation")] = 3,
    seed: Annotated[int, typer.Option(help="the same seed gives the same conversations (on the local "
                                           "teacher, the sampled text too)")] = 42,
    tries: Annotated[int, typer.Option(help="samples of a reply before giving up on it")] = 6,
    out: Annotated[str, typer.Option(help="output JSONL, relative to the persona folder")] = "synth.jsonl",
    teacher_url: Annotated[Optional[str], typer.Option(help="OpenAI-compatible API root with /v1 (key: "
                                                       "$OPENAI_API_KEY); default: the local base")] = None,
    teacher_model: Annotated[Optional[str], typer.Option(help="the model the server serves")] = None,
    base_model: Annotated[str, typer.Option(help="local teacher: the base model to run")] = "smollm2",
    concurrency: Annotated[int, typer.Option(help="conversations generated at once (the engine batches them)")] = 8,
    examples: Annotated[int, typer.Option(help="example dialogues the teacher sees per conversation")] = 3,
    max_new_tokens: Annotated[int, typer.Option(help="longest reply, in tokens")] = 48,
    temperature: float = 0.7,
) -> None:
    """Synthetic dialogue for a persona with only a card or a description: a teacher plays the character, a
    simulated Discord user talks to it, the persona's style checks and other filters pick the replies."""
    from .synth import SynthOptions
    from .synth.cli import run_synth

    options = SynthOptions(count=count, max_turns=turns, seed=seed, tries=tries, out=out, concurrency=concurrency,
                           examples=examples, sampling=SynthOptions().sampling.model_copy(
                               update={"max_new_tokens": max_new_tokens, "temperature": temperature}))
    with _errors():
        report = run_synth(persona, options, teacher_url, teacher_model, base_model, console)
    if not report.kept and not report.resumed:
        raise typer.Exit(1)


def _print_report(name: str, report) -> None:
    table = Table(title=escape(f"{name}: {report.examples} held-out conversations"))
    for col in ("", "base + system prompt", "adapter"):
        table.add_column(col)
    table.add_row("loss", f"{report.base_loss:.4f}", f"{report.adapter_loss:.4f}")
    table.add_row("perplexity", f"{report.base_perplexity:.2f}", f"{report.adapter_perplexity:.2f}")
    if report.style_checks:
        table.add_row("style checks passed", f"{report.base_style:.0%}", f"{report.adapter_style:.0%}")
    console.print(table)
    for s in report.samples:
        console.rule(escape(f"user: {s.prompt}"))
        console.print(f"[dim]base:[/dim] {escape(s.base)}", highlight=False)
        console.print(f"[bold]adapter:[/bold] {escape(s.adapter)}", highlight=False)


@app.command("eval")
def evaluate(
    bundle: Annotated[Path, typer.Argument(help="adapter bundle folder")],
    data: Annotated[Optional[Path], typer.Option(help="dialogue to score instead of the held-out split")] = None,
    samples: Annotated[int, typer.Option(help="sample replies (also used for the style check)")] = 5,
    quantization: str = "auto",
) -> None:
    """Held-out loss and perplexity, base vs adapter, plus sample replies side by side."""
    from .evaluate import evaluate_bundle
    from .inference import load_bundle_model

    with _errors():
        model, tokenizer, manifest = load_bundle_model(bundle, quantization)  # type: ignore[arg-type]
        report = evaluate_bundle(model, tokenizer, manifest, data, samples)
    _print_report(manifest.name, report)


@app.command()
def chat(
    bundle: Annotated[Path, typer.Argument(help="adapter bundle folder")],
    quantization: str = "auto",
) -> None:
    """Chat with a persona in the terminal; replies stream as they are generated."""
    from .chat import chat_loop
    from .inference import load_bundle_model

    with _errors():
        model, tokenizer, manifest = load_bundle_model(bundle, quantization)  # type: ignore[arg-type]
    chat_loop(model, tokenizer, manifest, console)


@app.command()
def export(
    bundle: Annotated[Path, typer.Argument(help="adapter bundle folder")],
    out: Annotated[Path, typer.Argument(help="where to write the merged model")],
) -> None:
    """Merge the adapter into its base and save a full model (for vLLM, llama.cpp conversion, ...)."""
    from .export import export_merged

    with _errors():
        path = export_merged(bundle, out)
    console.print(f"[bold green]done:[/bold green] merged model at {escape(str(path))}")


@app.command()
def demo(
    persona: Annotated[str, typer.Option(help="persona folder")] = "persona_data/captain_brine",
    output_dir: Annotated[Optional[str], typer.Option(help="where the bundle goes (default: adapters/NAME)")] = None,
    card: Annotated[Optional[Path], typer.Option(help="a card-only persona folder or a lone card: synthesize "
                                                 "dialogue for it first (`data synth`), then train on that")] = None,
    synth_count: Annotated[int, typer.Option(help="with --card: synthetic conversations to attempt")] = 144,
    synth_turns: Annotated[int, typer.Option(help="with --card: most exchanges per conversation")] = 1,
    set_: Annotated[list[str], typer.Option("--set", "-s", help="override the demo recipe")] = [],
    samples: int = 5,
    chat_after: Annotated[Optional[bool], typer.Option("--chat/--no-chat", help="default: chat if a terminal")] = None,
) -> None:
    """The offline demo: fine-tune the embedded SmolLM2-135M on an example persona, compare, then chat.

    With --card the persona is a character card only: the base model plays it to write the training dialogue
    (into adapters/NAME-persona/, resumed on a rerun), and the comparison uses the folder's heldout.jsonl."""
    import sys

    from .chat import chat_loop
    from .config import load_config
    from .evaluate import evaluate_bundle
    from .inference import load_bundle_model
    from .train import train as run_training

    heldout = None
    overrides = []
    with _errors():
        if card is not None:
            from .synth import SynthOptions
            from .synth.cli import run_synth
            from .synth.persona_file import persona_folder_for

            name = (card.stem if card.is_file() else card.name).removesuffix(".card")
            output_dir = output_dir or f"adapters/{name}"
            folder = persona_folder_for(card, Path(f"{output_dir}-persona"))
            options = SynthOptions(count=synth_count, max_turns=synth_turns, concurrency=16)
            run_synth(folder, options, None, None, "smollm2", console)
            persona = str(folder)
            heldout = folder / "heldout.jsonl" if (folder / "heldout.jsonl").is_file() else None
            overrides = ["train.epochs=2"]  # little data: a second pass is what teaches the style
        output_dir = output_dir or f"adapters/{Path(persona).name}"
        cfg = load_config(RECIPES / "demo.yaml", [f"persona={persona}", f"output_dir={output_dir}", *overrides,
                                                  *set_])
        run_training(cfg)
        model, tokenizer, manifest = load_bundle_model(output_dir, cfg.quantization)
        report = evaluate_bundle(model, tokenizer, manifest, heldout, samples=samples)
    _print_report(manifest.name, report)
    if chat_after or (chat_after is None and sys.stdin.isatty()):
        chat_loop(model, tokenizer, manifest, console)


if __name__ == "__main__":  # `accelerate launch -m finetune.cli ...`
    app()
