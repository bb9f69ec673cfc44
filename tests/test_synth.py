"""`finetune data synth`: filters, the user simulator, the teacher's prompt, resumable and reproducible runs,
persona.toml updates, and one end-to-end run on the tiny model through the local engine."""
from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fake_engine import FakeEngine
from finetune.cli import app
from finetune.cards.lorebook import LoreEntry
from finetune.conversation import DataError
from finetune.persona import load_persona
from finetune.synth import SynthOptions, synthesize
from finetune.synth import filters
from finetune.synth.filters import ReplyFilter, clean_reply, clean_user_line
from finetune.synth.persona_file import add_source
from finetune.synth.sheet import sheet_from_persona
from finetune.synth.teacher import character_messages
from finetune.synth.usersim import TOPICS, USER_PROMPT, plan, user_messages

NETTLE = Path(__file__).parent.parent / "persona_data" / "nettle"
CHECKS = [r"\AOi oi,", r"\*slurp\*\s*\Z"]
VOCABULARY = ("broth noodle rain canal lantern pepper onion ladle stool bowl egg ginger barge ferry rat hat apron "
              "thumb steam pot spoon market coin night tide bean garlic chili moon roof tin rope crowd song").split()


def test_reply_filter_names_each_reason():
    f = ReplyFilter("Nettle", CHECKS)
    ok = "Oi oi, the broth is ready, lovey, grab a stool. *slurp*"
    assert f.reason(ok) is None
    assert f.reason("The broth is ready, lovey, grab a stool. *slurp*") == filters.STYLE
    assert f.reason("Oi oi, *slurp*") == filters.SHORT
    assert f.reason("Oi oi, " + "very " * 200 + "*slurp*") == filters.LONG
    assert f.reason("Oi oi, as an AI language model I cannot cook. *slurp*") == filters.OUT_OF_CHARACTER
    assert f.reason("Oi oi, I'm sorry, but I can't help with that. *slurp*") == filters.OUT_OF_CHARACTER
    assert f.reason("Oi oi, I am a chatbot, but ask me about soup. *slurp*") == filters.OUT_OF_CHARACTER
    assert f.reason("Oi oi, I'm not a bot, lovey, I'm a goblin. *slurp*") is None, "a deflection stays"
    assert f.reason("Oi oi, here you go.\nUser: thanks!\n*slurp*") == filters.OTHER_TURNS
    assert f.reason("Oi oi, hi.\nNettle: and another thing *slurp*") == filters.OTHER_TURNS
    f.keep(ok)
    assert f.reason("Oi oi, the broth is ready, lovey, grab a stool! *slurp*") == filters.DUPLICATE
    assert f.reason("Oi oi, Dumpling ate the last onion again, the little thief. *slurp*") is None
    seeded = ReplyFilter("Nettle", CHECKS, seen=[ok])
    assert seeded.reason(ok) == filters.DUPLICATE, "copies of the teacher's examples are duplicates too"


def test_clean_reply_and_user_line():
    assert clean_reply("  Nettle: Oi oi, hi. *slurp* \n", "Nettle") == "Oi oi, hi. *slurp*"
    assert clean_user_line("User: what's in the pot?\nNettle: noodles", "Nettle") == "what's in the pot?"
    assert clean_user_line("Nettle: Oi oi, noodles", "Nettle") is None
    assert clean_user_line("   \n", "Nettle") is None
    assert clean_user_line("as an AI I would say hi", "Nettle") is None
    assert clean_user_line("x" * 300, "Nettle") is None


@pytest.fixture
def nettle(tmp_path) -> Path:
    import shutil

    folder = tmp_path / "nettle"
    shutil.copytree(NETTLE, folder)
    return folder


def test_sheet_uses_the_card_and_its_lorebook(nettle):
    out = nettle / "synth.jsonl"
    out.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": "Oi oi, hi. *slurp*"}]}) + "\n")
    add_source(nettle / "persona.toml", "synth.jsonl")
    persona = load_persona(nettle)
    sheet = sheet_from_persona(persona, out)
    assert len(sheet.examples) == 4, "the card's four mes_example dialogues; greetings and the output are not"
    assert {"Glowmarket", "Dumpling", "Brassbeak"} <= set(sheet.world)
    assert "Nettle" not in sheet.world and sheet.style_checks == CHECKS
    assert "lantern coin" in sheet.world, "a lorebook entry's first key is something the user talks about"
    assert len(sheet.lore) == 5 and any("Rusty Ladle" in text for text in sheet.lore), "every enabled entry"
    lore = [LoreEntry("On Flood Night the canal rises.", ("Flood Night",))]
    with_lore = sheet_from_persona(persona, out, lore)
    assert with_lore.world[0] == "Flood Night"
    messages = character_messages(with_lore, (0, 2), [{"role": "user", "content": "hey"}])
    assert messages[0]["role"] == "system" and "On Flood Night the canal rises." in messages[0]["content"]
    assert persona.system_prompt in messages[0]["content"]
    assert messages[1:-1] == sheet.examples[0].messages + sheet.examples[2].messages
    assert messages[-1] == {"role": "user", "content": "hey"}


def test_plans_are_seeded_varied_and_cover_every_topic(nettle):
    sheet = sheet_from_persona(load_persona(nettle), nettle / "synth.jsonl")
    plans = [plan(sheet, 7, i, 3) for i in range(300)]
    assert plans == [plan(sheet, 7, i, 3) for i in range(300)]
    assert plans != [plan(sheet, 8, i, 3) for i in range(300)]
    assert {p.topic for p in plans} == set(TOPICS)
    assert len({p.opener for p in plans}) > 100
    assert all(2 <= p.turns <= 3 and len(p.fallbacks) == p.turns - 1 and len(p.examples) == 2 for p in plans)
    world = [p.opener for p in plans if p.topic == "world"]
    assert any(thing.casefold() in o.casefold() for o in world for thing in sheet.world)
    convo = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Oi oi"}]
    assert user_messages(sheet, convo) == [
        {"role": "system", "content": USER_PROMPT.format(char="Nettle")},
        {"role": "assistant", "content": "hi"}, {"role": "user", "content": "Oi oi"}]


def test_add_source_once_and_keeps_the_file(nettle):
    toml = nettle / "persona.toml"
    before = toml.read_text()
    assert add_source(toml, "synth.jsonl") is True
    assert add_source(toml, "./synth.jsonl") is False
    after = toml.read_text()
    assert after.startswith(before) and after.count("[[sources]]") == 2
    (nettle / "synth.jsonl").write_text("")
    assert [s.name for s in load_persona(nettle).files] == ["persona.toml", "nettle.card.json", "synth.jsonl"]


def scripted_teacher(fail_every: int = 3):
    """A teacher that passes Nettle's checks except every ``fail_every``-th reply, and answers as the user
    when prompted as one; replies draw their words at random, so none is a near-duplicate."""
    counter = {"n": 0}

    def script(manifest, messages):
        if messages[0]["content"].startswith(USER_PROMPT[:20]):
            return "User: and what else is in the pot?"
        counter["n"] += 1
        n = counter["n"]
        if n % fail_every == 0:
            return f"I am an AI language model, reply {n}."
        words = random.Random(n).sample(VOCABULARY, 8)
        return f"Nettle: Oi oi, {' '.join(words)}. *slurp*"

    return FakeEngine(script, piece=50, delay=0)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _run(folder: Path, engine, **options):
    return asyncio.run(synthesize(folder, engine, "teacher", "fake", SynthOptions(**options)))


def test_synth_run_filters_writes_provenance_and_updates_persona(nettle):
    engine = scripted_teacher()
    report = _run(nettle, engine, count=6, max_turns=2, seed=3, tries=2)
    out = nettle / "synth.jsonl"
    records = _records(out)
    assert report.kept == len(records) == 6 and report.dropped == 0
    assert report.rejected == {filters.OUT_OF_CHARACTER: sum(1 for r in _records(out.with_suffix(".rejected.jsonl")))}
    assert report.rejected[filters.OUT_OF_CHARACTER] > 0 and report.source_added
    for record in records:
        meta = record["meta"]
        assert meta["seed"] == 3 and meta["teacher"] == "fake" and meta["prompts"]["character"]
        assert len(meta["examples"]) == 3 and len(meta["tries"]) == len(record["messages"]) // 2
        assert all(m["content"].startswith("Oi oi,") for m in record["messages"] if m["role"] == "assistant")
        later = [m["content"] for m in record["messages"][2::2]]
        assert all(u == "and what else is in the pot?" for u in later), "the user's tag is cut off"
    assert sorted(r["meta"]["index"] for r in records) == list(range(6))
    persona = load_persona(nettle)
    assert sum(c.origin.startswith(str(out)) for c in persona.conversations) == 6
    assert engine.served[0].messages[0]["role"] == "system"


def test_synth_resumes_after_the_last_complete_conversation(nettle):
    _run(nettle, scripted_teacher(), count=3, max_turns=1, seed=5)
    out = nettle / "synth.jsonl"
    with open(out, "a") as fh:
        fh.write('{"messages": [{"role": "user"')  # killed mid-write
    engine = scripted_teacher()
    report = _run(nettle, engine, count=5, max_turns=1, seed=5)
    assert report.resumed == 3 and report.kept == 2 and not report.source_added, "listed by the first run"
    assert sorted(r["meta"]["index"] for r in _records(out)) == list(range(5))
    assert (nettle / "persona.toml").read_text().count("synth.jsonl") == 1
    assert _run(nettle, scripted_teacher(), count=5, max_turns=1, seed=5).kept == 0
    with pytest.raises(DataError, match=r"synth.jsonl: made with --seed 5, this run has --seed 6"):
        _run(nettle, scripted_teacher(), count=5, seed=6)


def test_dropped_conversations_are_logged_and_not_retried(nettle):
    engine = scripted_teacher(fail_every=1)
    report = _run(nettle, engine, count=2, max_turns=1, tries=3)
    assert report.kept == 0 and report.dropped == 2 and report.rejected[filters.OUT_OF_CHARACTER] == 6
    assert not report.source_added and "synth.jsonl" not in (nettle / "persona.toml").read_text()
    assert _run(nettle, engine, count=2, max_turns=1).resumed == 2


def test_same_seed_same_conversations(tmp_path, nettle):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(nettle, other)
    _run(nettle, scripted_teacher(fail_every=1000), count=5, seed=9, concurrency=1)
    _run(other, scripted_teacher(fail_every=1000), count=5, seed=9, concurrency=1)
    first, second = _records(nettle / "synth.jsonl"), _records(other / "synth.jsonl")
    strip = lambda rs: [(r["messages"], {k: v for k, v in r["meta"].items() if k != "examples"}) for r in rs]
    assert strip(first) == strip(second)


def _tiny_persona(folder: Path) -> Path:
    folder.mkdir()
    (folder / "examples.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"tell me about the {w}"},
        {"role": "assistant", "content": f"Arr, the {w} be fine, lad."}]}) + "\n" for w in ("tide", "storm")))
    (folder / "persona.toml").write_text('name = "Brine"\nsystem_prompt = "You are Brine."\n'
                                         '[[sources]]\npath = "examples.jsonl"\n')
    return folder


def test_synth_end_to_end_on_the_tiny_model_through_the_local_engine(tiny_model_dir, tmp_path):
    folder = _tiny_persona(tmp_path / "tiny")
    result = CliRunner().invoke(app, ["data", "synth", str(folder), "--base-model", str(tiny_model_dir), "-n", "3",
                                      "--turns", "2", "--tries", "2", "--max-new-tokens", "12"])
    assert result.exit_code == 0, result.output
    assert "conversations kept" in result.output
    records = _records(folder / "synth.jsonl")
    assert records and all(r["meta"]["teacher"] == f"local:{tiny_model_dir}" for r in records)
    assert "synth.jsonl" in (folder / "persona.toml").read_text()
    assert len(load_persona(folder).conversations) == 2 + len(records)


def test_same_seed_same_sampled_conversations_on_the_local_engine(tiny_model_dir, tmp_path):
    """The teacher's and the user simulator's sampled text too: every request carries its own seed, so two runs
    agree however their concurrent requests happened to batch."""
    import torch

    from bot.engine import EngineConfig
    from bot.engine.local.engine import LocalEngine
    from finetune.bundle import Sampling

    hot = Sampling(temperature=1.0, top_p=0.95, max_new_tokens=8)

    async def synth(folder: Path, seed: int) -> tuple[list, list]:
        engine = LocalEngine(EngineConfig(base_model=str(tiny_model_dir), quantization="none", dtype=torch.float32,
                                          max_batch=4))
        try:
            await synthesize(folder, engine, "teacher", "local", SynthOptions(
                count=3, max_turns=2, tries=2, concurrency=3, seed=seed, sampling=hot, user_sampling=hot))
        finally:
            await engine.close()
        kept = sorted(_records(folder / "synth.jsonl"), key=lambda r: r["meta"]["index"])
        rejected = sorted(_records(folder / "synth.rejected.jsonl"), key=lambda r: r["index"])  # stable: in turn
        return [(r["messages"], r["meta"]["tries"], r["meta"]["user_turns"]) for r in kept], rejected

    (kept, rejected), again = (asyncio.run(synth(_tiny_persona(tmp_path / name), seed=4)) for name in ("a", "b"))
    assert kept and rejected and (kept, rejected) == again
    assert "generated" in {kind for _, _, kinds in kept for kind in kinds}, "the user simulator's text is seeded too"


def test_synth_with_an_openai_compatible_teacher(nettle):
    """The same run against a server: the fake one always says the same line, so after the first
    conversation every reply is a near-duplicate (Nettle's style checks are off here)."""
    from bot.engine import EngineConfig
    from bot.engine.openai import OpenAIEngine
    from test_engine_openai import FakeVLLM, _serve

    toml = nettle / "persona.toml"
    toml.write_text("\n".join(line for line in toml.read_text().splitlines() if not line.startswith("style_checks")))

    async def main():
        server = FakeVLLM("base", "base", {"big": Path("big")})
        server.piece_delay_s = 0
        runner = await _serve(server)
        engine = OpenAIEngine(EngineConfig(engine="openai", openai_base_url=server.url))
        try:
            report = await synthesize(nettle, engine, "big", f"openai:{server.url}:big",
                                      SynthOptions(count=3, max_turns=1, tries=2, concurrency=1))
        finally:
            await engine.close()
            await runner.cleanup()
        return report, server.requests

    report, requests = asyncio.run(main())
    assert report.kept == 1 and report.dropped == 2 and report.rejected == {filters.DUPLICATE: 4}
    assert {body["model"] for body, _ in requests} == {"big"}
    assert requests[0][0]["messages"][0]["content"].startswith(load_persona(nettle).system_prompt)
    assert _records(nettle / "synth.jsonl")[0]["meta"]["teacher"].startswith("openai:http://127.0.0.1")


def test_eval_data_may_be_a_lone_dialogue_file(nettle, tmp_path):
    from finetune.bundle import base_manifest
    from finetune.evaluate import heldout

    manifest = base_manifest("Nettle", "tiny", {}, "")
    manifest = manifest.model_copy(update={"training": _summary(nettle)})
    conversations, checks = heldout(manifest, nettle / "heldout.jsonl")
    assert len(conversations) == 20 and checks == CHECKS
    with pytest.raises(DataError, match=r"empty.jsonl: no usable conversations"):
        (tmp_path / "empty.jsonl").write_text("\n")
        heldout(manifest, tmp_path / "empty.jsonl")


def _summary(persona: Path):
    from finetune.bundle import TrainingSummary

    return TrainingSummary(steps=1, epochs=1, train_loss=1.0, quantization="none", fused_kernels=False,
                           attention="sdpa", data={}, persona=str(persona), seed=0, eval_fraction=0.1,
                           max_seq_len=256)


def test_demo_persona_folder_for_a_card_folder_or_a_lone_card(nettle, tmp_path):
    from finetune.synth.persona_file import persona_folder_for

    work = persona_folder_for(nettle, tmp_path / "work")
    add_source(work / "persona.toml", "synth.jsonl")
    (work / "synth.jsonl").write_text("")
    again = persona_folder_for(nettle, tmp_path / "work")
    assert "synth.jsonl" in (again / "persona.toml").read_text(), "a rerun keeps what synth added"
    lone = persona_folder_for(nettle / "nettle.card.json", tmp_path / "lone")
    persona = load_persona(lone)
    assert persona.name == "Nettle" and len(persona.conversations) == 6
