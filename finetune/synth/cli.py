"""`finetune data synth`: build the teacher's engine, show progress, print what was kept and rejected."""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from finetune.config import ConfigError

from .run import SynthOptions, SynthReport, synthesize


def run_synth(persona: Path, options: SynthOptions, teacher_url: str | None, teacher_model: str | None,
              base_model: str, console: Console) -> SynthReport:
    from bot.engine import EngineConfig, create_engine

    if teacher_url:
        if not teacher_model:
            raise ConfigError("--teacher-url: also pass --teacher-model, the model that server serves")
        config = EngineConfig(engine="openai", openai_base_url=teacher_url,
                              openai_api_key=os.environ.get("OPENAI_API_KEY") or None)
        teacher, label = teacher_model, f"openai:{teacher_url}:{teacher_model}"
    else:
        config = EngineConfig(base_model=base_model, max_batch=options.concurrency)
        teacher, label = "teacher", f"local:{base_model}"
    engine = create_engine(config)
    progress = Progress(TextColumn("[bold]synth[/bold] {task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("kept {task.fields[kept]}"), TimeElapsedColumn(), console=console)

    async def main() -> SynthReport:
        task = progress.add_task(str(persona), total=None, kept=0)
        kept = 0

        def done(was_kept: bool) -> None:
            nonlocal kept
            kept += was_kept
            progress.update(task, advance=1, kept=kept)

        try:
            with progress:
                return await synthesize(persona, engine, teacher, label, options, on_done=done,
                                        on_start=lambda n: progress.update(task, total=n))
        finally:
            await engine.close()

    report = asyncio.run(main())
    print_report(report, console)
    return report


def print_report(report: SynthReport, console: Console) -> None:
    table = Table(title=f"synth: {report.out}", show_header=False)
    table.add_row("conversations kept", str(report.kept))
    table.add_row("exchanges kept", str(report.exchanges))
    table.add_row("dropped (no reply passed)", str(report.dropped))
    table.add_row("done by an earlier run", str(report.resumed))
    for reason, n in report.rejected.most_common():
        table.add_row(f"replies rejected: {reason}", str(n))
    table.add_row("templated follow-ups", str(report.user_fallbacks))
    table.add_row("teacher errors", str(len(report.errors)))
    table.add_row("time", f"{report.seconds:.0f} s")
    console.print(table)
    for error in report.errors[:3]:
        console.print(f"[red]error:[/red] {error}", highlight=False, markup=False)
    log = report.out.with_suffix(".rejected.jsonl")
    console.print(f"rejected replies with their reasons: {log}" if log.exists() else "", highlight=False,
                  markup=False)
    if report.source_added:
        console.print(f"added {report.out.name} to the persona's sources", highlight=False, markup=False)
