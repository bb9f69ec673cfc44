"""The bot's structure: every reply passes the prompt seam, every command of the table is registered and
typed the same in simulate, and the bot's modules import one another without a circle."""
from __future__ import annotations

import ast
import io
from pathlib import Path

import pytest
from fake_discord_harness import async_test, running
from rich.console import Console

import bot.app
from bot.commands import COMMANDS, Command, Param, stop
from bot.config import PersonaSpec
from bot.fake_discord import FakeDiscord
from bot.prompt import assemble
from bot.simulate import HELP, Terminal, Usage, World, parse

REPO = Path(__file__).resolve().parents[1]
SUB_COMMAND, STRING, INTEGER, BOOLEAN = 1, 3, 4, 5


@async_test
async def test_channel_replies_and_converse_turns_all_reach_the_engine_through_the_seam(tmp_path, monkeypatch):
    memory = {"role": "system", "content": "Brine owes Alice a boat."}
    monkeypatch.setattr(bot.app, "assemble",
                        lambda turns, context=(), **card: assemble(turns, [memory["content"], *context], **card))
    async with running(tmp_path) as h:
        ask = h.fake.post(h.alice, h.general, f"{h.bots['Brine'].mention} ahoy")
        await h.reply_text(ask, "[brine-v1] Alice: @Brine ahoy")
        h.fake.command(h.bots["Brine"], h.alice, h.general, "converse", persona_a="Brine", persona_b="Coral",
                       topic="boats", turns=2)
        await h.fake.wait_for(lambda: len(h.engine.served) == 3)
        await h.settled()
        assert [s.adapter for s in h.engine.served] == ["Brine", "Brine", "Coral"]
        assert all(s.messages[0] == memory and len(s.messages) > 1 for s in h.engine.served)


@async_test
async def test_every_table_command_is_in_the_synced_command_tree(tmp_path):
    async with running(tmp_path, ("Brine",), webhook=("Reef",)) as h:
        for bot in {b.id: b for b in h.bots.values()}.values():
            assert set(bot.commands) == {c.name.split()[0] for c in COMMANDS}
            for command in COMMANDS:
                top, *sub = command.name.split()
                node = bot.commands[top]
                if sub:
                    node = next(o for o in node["options"] if o["name"] == sub[0] and o["type"] == SUB_COMMAND)
                assert node["description"] == command.description
                options = {o["name"]: o for o in node.get("options", [])}
                assert list(options) == [p.name for p in sorted(command.params, key=lambda p: not p.required)]
                for param in command.params:
                    option = options[param.name]
                    assert option["description"] == param.description
                    assert option.get("required", False) == param.required
                    assert option["type"] == {"count": INTEGER, "flag": BOOLEAN}.get(param.kind, STRING)
                    assert option.get("autocomplete", False) == (param.kind == "persona")
                    if param.kind == "count":
                        assert (option["min_value"], option["max_value"]) == param.bounds


def _world(tmp_path: Path) -> World:
    personas = [PersonaSpec(name="Brine", adapter=tmp_path, token_env="BRINE_TOKEN"),
                PersonaSpec(name="Old Coral", adapter=tmp_path, token_env="CORAL_TOKEN"),
                PersonaSpec(name="Reef", adapter=tmp_path)]
    return World(FakeDiscord(owner_name="you"), personas)


def _typed(command: Command, params: list[Param]) -> tuple[str, dict[str, object]]:
    """A line typing ``params`` of ``command`` as its usage shows, and the options it should give."""
    personas = iter(["Old Coral", "brine"])
    sample = {"word": lambda: "brine-v2", "count": lambda: 3, "text": lambda: "the tides",
              "persona": lambda: next(personas), "flag": lambda: True}
    ordered = [p for p in params if p.kind != "text"] + [p for p in params if p.kind == "text"]
    values = {p.name: sample[p.kind]() for p in ordered}
    expected = {name: "Brine" if value == "brine" else value for name, value in values.items()}
    return " ".join([f"/{command.name}", *(str(v) for v in values.values())]), expected


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_simulate_dispatches_every_table_command(tmp_path, command):
    world = _world(tmp_path)
    terminal = Terminal(world, Console(file=io.StringIO()))
    sent = []
    terminal.command = lambda bot, name, **options: sent.append((bot, name, options))  # type: ignore[method-assign]
    for params in (list(command.params), [p for p in command.params if p.required]):
        line, expected = _typed(command, params)
        assert parse(line, world) == (command, expected), line
        terminal.handle(line)
        persona = next((v for p in command.params if p.kind == "persona" and (v := expected.get(p.name))), None)
        assert sent.pop() == (world.bot_for(persona), command.name, expected)
    assert command.usage in HELP


def test_simulate_explains_lines_that_fit_no_command(tmp_path):
    world = _world(tmp_path)
    for line, message in [
        ("/converse Brine", "usage: /converse PERSONA_A PERSONA_B [TURNS] TOPIC (PERSONA_A, PERSONA_B: one of Brine"),
        ("/converse Brine Nobody the tides", "usage: /converse"),
        ("/stop now", "usage: /stop"),
        ("/persona swap v2 Nobody", "usage: /persona swap ADAPTER [PERSONA]"),
        ("/persona", "usage: /persona list | /persona swap ADAPTER [PERSONA] [KEEP] | /persona reload [PERSONA] | "
                     "/persona settings [GROUP] [TEMPERATURE] [LENGTH]"),
        ("/sing", "unknown command /sing (/help)"),
    ]:
        with pytest.raises(Usage) as caught:
            parse(line, world)
        assert str(caught.value).startswith(message), line


def test_a_handler_that_does_not_take_its_options_is_refused():
    with pytest.raises(TypeError, match="command /stop: handler stop does not take the options"):
        Command("stop", "Stop", stop, (Param("when", "when to stop"),))


def _bot_imports(root: Path = REPO) -> dict[str, set[str]]:
    """bot's own modules (``bot/*.py``; the engine and fake_discord packages are worlds of their own) -> those
    of them each imports, at run time or for type checking, read from the source."""
    paths = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (root / "bot").glob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                    base = f"{anchor}.{base}" if base else anchor
                imported |= {base, *(f"{base}.{a.name}" for a in node.names)}
        graph[module] = {m for m in imported if m in paths and m != module}
    return graph


def test_bot_modules_import_one_another_without_a_circle():
    graph = _bot_imports()
    assert {"bot.client", "bot.commands"} <= graph["bot.app"], "the check reads the imports it should"
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            pytest.fail(f"import circle: {' -> '.join(path[path.index(module):] + [module])}")
        if module not in done:
            for dependency in sorted(graph[module]):
                visit(dependency, [*path, module])
            done.add(module)

    for module in sorted(graph):
        visit(module, [])


@pytest.mark.parametrize("module", ["bot.client", "bot.commands", "bot.app"])
def test_each_of_app_client_and_commands_imports_first(run_python, module):
    result = run_python(f"import {module}")
    assert result.returncode == 0, result.stderr
