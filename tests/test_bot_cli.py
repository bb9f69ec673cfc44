"""`personabot simulate` driven like a terminal, and `personabot run`'s start-up errors."""
from __future__ import annotations

import asyncio
import io

from fake_discord_harness import async_test
from fake_engine import FakeEngine, write_bundle
from rich.console import Console
from typer.testing import CliRunner

from bot.cli import app
from bot.config import PersonaSpec, Settings
from bot.simulate import simulate


@async_test
async def test_simulate_chats_streams_and_runs_commands(tmp_path):
    personas = [PersonaSpec(name=n, adapter=write_bundle(tmp_path / n, f"{n.split()[-1].lower()}-v1"),
                            token_env=f"{n.split()[-1].upper()}_TOKEN") for n in ("Brine", "Old Coral")]
    personas.append(PersonaSpec(name="Reef", adapter=write_bundle(tmp_path / "Reef", "reef-v1")))
    settings = Settings(_env_file=None, edit_interval=0.02, edits_per_second=500, converse_cooldown=0.01)
    out = io.StringIO()
    lines: asyncio.Queue[str | None] = asyncio.Queue()
    run = asyncio.create_task(simulate(settings, personas, FakeEngine(), console=Console(file=out, width=200),
                                       lines=lines))

    async def shows(text: str) -> None:
        while text not in out.getvalue():
            assert not run.done(), out.getvalue()
            await asyncio.sleep(0.02)

    await asyncio.wait_for(shows("you are 'you'"), 10)
    for line, expected in [
        ("@Brine ahoy", "Brine: [brine-v1] you: @Brine ahoy"),
        ("@reef hello", "Reef: [reef-v1] you: @reef hello"),
        ("/dm old coral secret", "Old Coral: [coral-v1] you: secret"),
        ("/converse Brine Old Coral 2 the tides", "Old Coral: [coral-v1] Brine: [brine-v1] you: Let's talk about "
                                                  "the tides."),
        ("/persona list", "(only you) **Brine** (own account): `brine-v1`"),
        ("/persona swap nowhere Brine", "(only you) ❌ no bundle named `nowhere`"),
        ("#deep", "#deep"),
        ("@Old Coral down here?", "Old Coral: [coral-v1] you: @Old Coral down here?"),
        ("/reply and?", "Old Coral: [coral-v1] you: and?"),
        ('/converse "Old Coral", brine 1 shells', "**Old Coral** and **Brine** talk about *shells*"),
    ]:
        await lines.put(line)
        await asyncio.wait_for(shows(expected), 10)
    await lines.put("/quit")
    await asyncio.wait_for(run, 10)


def test_run_reports_configuration_errors_clearly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BRINE_TOKEN", raising=False)
    runner = CliRunner()
    result = runner.invoke(app, ["run"])
    assert result.exit_code == 2 and "personas.yaml: personas file not found" in result.output
    (tmp_path / "personas.yaml").write_text("personas:\n  - {name: Brine, adapter: a, token_env: BRINE_TOKEN}\n")
    result = runner.invoke(app, ["run", "--persona", "Coral"])
    assert result.exit_code == 2 and "unknown persona 'Coral'" in result.output
    result = runner.invoke(app, ["run"])
    assert result.exit_code == 2 and "'Brine': environment variable BRINE_TOKEN" in result.output
