"""Character cards as the V2/V3 specs and SillyTavern read them: macros, prompt, lorebook, files."""
from __future__ import annotations

import base64
import json
import zipfile
from pathlib import Path

import pytest
from pydantic import TypeAdapter
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from finetune.cards.card import parse_card
from finetune.cards.context import CardContext, CardTurns, apply_card_context
from finetune.cards.examples import card_conversations, lorebook_usage
from finetune.cards.files import load_card_json
from finetune.cards.lorebook import LoreEntry, Lorebook, parse_character_book, triggered_entries
from finetune.cards.macros import MacroContext, expand, fill_user
from finetune.conversation import DataError

WREN = Path(__file__).parent / "data" / "cards" / "wren.json"


def wren() -> dict:
    return json.loads(WREN.read_text())


def words(text: str) -> int:
    return len(text.split())


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def bot(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


# --- macros ----------------------------------------------------------------------------------------

def test_macros_expand_like_sillytavern() -> None:
    ctx = MacroContext("Wren", seed="s")
    problems: list[str] = []
    text = ("<BOT>/<CHAR> meets <USER> and {{user}}.{{// a note for editors}}{{newline}}x\n\n{{trim}}\n\ny"
            "{{noop}} {{reverse:abc}} {{comment: hidden}}{{random_user_2}}")
    assert expand(text, ctx, "f", problems) == "Wren/Wren meets User and User.\nxy cba User 2"
    assert problems == []


def test_random_pick_and_roll_are_reproducible_per_card_and_seed() -> None:
    text = "{{random:a,b,c,d,e,f,g,h}} {{pick::1::2::3::4::5::6::7::8}} {{roll:d20}} {{roll:2d6+1}}"
    first = expand(text, MacroContext("W", seed="one"))
    assert first == expand(text, MacroContext("W", seed="one"))
    picks = {expand(text, MacroContext("W", seed=str(i))) for i in range(12)}
    assert len(picks) > 1  # the seed matters
    a, b, roll, roll2 = first.split()
    assert a in "abcdefgh" and b in "12345678" and 1 <= int(roll) <= 20 and 3 <= int(roll2) <= 13
    assert expand("{{random:x\\,y}}", MacroContext("W")) == "x,y"  # an escaped comma is no separator


def test_unknown_macros_are_reported_not_dropped() -> None:
    problems: list[str] = []
    assert expand("It is {{time}}.", MacroContext("W"), "card: field 'data.first_mes'", problems) == "It is {{time}}."
    assert problems == ["card: field 'data.first_mes': macro {{time}} left as written (personabot cannot fill it in)"]


# --- prompt, nickname, greetings -------------------------------------------------------------------

def test_card_system_prompt_replaces_only_the_global_prompt() -> None:
    card = parse_card(wren(), "wren.json")
    assert card.name == "Wren Ashdown" and card.char == "Wren"  # V3 nickname fills {{char}}
    definition = card.definition
    assert definition.startswith("Wren keeps the lighthouse on Gull Rock. She answers User")
    assert "{{" not in definition and "<CHAR>" not in definition and "v2: shorter" not in definition
    assert card.prompt() == "You are Wren. Write only Wren's next line.\n\n" + definition
    # no {{original}}: the persona's global prompt is replaced, the definition stays
    assert card.prompt("Be helpful.") == card.prompt()
    raw = wren()
    raw["data"]["system_prompt"] = "{{original}} Never break character."
    assert parse_card(raw, "w").prompt("Be Wren.") == "Be Wren. Never break character.\n\n" + definition
    raw["data"]["system_prompt"] = ""
    assert parse_card(raw, "w").prompt("Be Wren.") == "Be Wren.\n\n" + definition


def test_serve_time_fields_are_kept() -> None:
    card = parse_card(wren(), "wren.json")
    assert card.post_history_instructions == "Stay terse."
    assert (card.depth_prompt.prompt, card.depth_prompt.depth) == ("Wren is tired and wants to sleep.", 2)
    assert card.greetings[1] == "You're dripping on my floor, {{user}}."  # whom it greets: known when serving
    assert fill_user(card.greetings[1], "Ada") == "You're dripping on my floor, Ada."
    assert card.group_greetings == ["Two of you? Then I'll need more cups."]
    assert not any("{{user}}" in p for p in card.problems), "a kept {{user}} is no unknown macro"
    context = card.context()
    as_manifest_stores_it = TypeAdapter(CardContext)  # Manifest.card: pydantic over the dataclasses
    assert as_manifest_stores_it.validate_json(as_manifest_stores_it.dump_json(context)) == context


def test_greetings_open_a_chat_with_whoever_is_greeted() -> None:
    import random

    context = parse_card(wren(), "wren.json").context()
    alone = {context.greeting("Ada", False, random.Random(i)) for i in range(40)}
    assert alone == set(context.greetings) - {"You're dripping on my floor, {{user}}."} | {
        "You're dripping on my floor, Ada."}
    assert len(alone) == 2
    in_group = {context.greeting("Ada", True, random.Random(i)) for i in range(40)}
    assert in_group == alone | {"Two of you? Then I'll need more cups."}
    assert CardContext(group_greetings=["Hi all."]).greeting("Ada", False, random.Random()) is None


def test_examples_label_other_speakers_and_know_the_nickname() -> None:
    card = parse_card(wren(), "wren.json")
    result = card_conversations(card, "wren.json")
    by_origin = {c.origin: c.messages for c in result.conversations}
    assert by_origin["wren.json: mes_example[1]"] == [
        user("Anon: Is the lamp electric?"), bot("Oil. Always oil."),
        user("User 1: Why not electric?"), bot(by_origin["wren.json: mes_example[1]"][3]["content"]),
    ]
    assert by_origin["wren.json: mes_example[1]"][3]["content"] in ("Because storms eat wires.", "Because I said so.")
    assert by_origin["wren.json: mes_example[2]"] == [user("Can I go outside?"), bot("No.")]  # "Wren:" is hers
    assert by_origin["wren.json: group_only_greetings[0]"] == [bot("Two of you? Then I'll need more cups.")]
    assert by_origin["wren.json: greetings[1]"] == [bot("You're dripping on my floor, User.")]  # as other examples
    # the lorebook entry that is a dialogue trains too; the lore entries do not
    assert by_origin["wren.json: character_book.entries[4]"] == [
        user('"Did your father keep the light?"'), bot('*She nods once.* "Forty years. Then me."'),
        user('"Do you miss him?"'), bot('"Every dusk."'),
    ]
    assert not any("entries[0]" in origin for origin in by_origin)


def test_lore_written_as_notes_is_not_taken_for_a_dialogue() -> None:
    raw = wren()
    raw["data"]["character_book"]["entries"][0]["content"] = "Note: the lamp is old.\nHistory: built in 1820."
    result = card_conversations(parse_card(raw, "wren.json"), "wren.json")
    assert not any("entries[0]" in c.origin for c in result.conversations)
    assert not any("entries[0]" in p for p in result.problems)


def test_ignored_fields_are_named() -> None:
    raw = wren()
    raw["data"]["extensions"]["regex_scripts"] = [{"scriptName": "x"}]
    raw["data"]["mood"] = "grumpy"
    problems = parse_card(raw, "wren.json").problems
    assert "wren.json: field 'data.extensions.regex_scripts' ignored (an application's own data)" in problems
    assert "wren.json: field 'data.mood' ignored (not part of the V2/V3 card spec)" in problems
    assert any("'data.extensions.world' ignored: world book 'Coastal Legends'" in p for p in problems)
    assert ("wren.json: data.character_book.entries[4]: field 'extensions.probability' ignored "
            "(triggered entries always apply)") in problems
    assert not any("creator_notes" in p or "'data.tags'" in p for p in problems)  # not for prompts, by the spec


def test_lorebook_usage_report_counts_entries() -> None:
    lines = lorebook_usage(parse_card(wren(), "wren.json"), "wren.json")
    assert lines[0] == "wren.json: character_book: 6 entries"
    assert "always in the prompt" in lines[4] and "also a training conversation" in lines[5]
    assert "disabled" in lines[6]


# --- lorebook activation ---------------------------------------------------------------------------

def book() -> Lorebook:
    return parse_card(wren(), "wren.json").lorebook


def names(entries: list[LoreEntry]) -> list[str]:
    return [e.content.split()[0] for e in entries]


def test_constant_entries_always_and_keys_case_insensitive() -> None:
    assert names(triggered_entries(book(), ["Hello there."], words)) == ["Gull"]
    got = triggered_entries(book(), ["The LAMP is lit."], words)
    assert names(got) == ["Gull", "The"]  # insertion order: constant (5) before the lamp (20)


def test_selective_secondary_keys_and_logic() -> None:
    assert "The Marigold" not in " ".join(e.content for e in triggered_entries(book(), ["a ship"], words))
    hit = triggered_entries(book(), ["a ship", "it sank"], words)
    assert any(e.content.startswith("The Marigold") for e in hit)

    def entry(logic: str) -> Lorebook:
        return Lorebook((LoreEntry("X", ("ship",), ("wreck", "sank"), selective=True, logic=logic),))
    cases = {"and_any": ["ship sank"], "and_all": ["ship wreck sank"], "not_any": ["ship"],
             "not_all": ["ship sank"]}
    for logic, hits in cases.items():
        assert triggered_entries(entry(logic), hits, words), logic
    assert not triggered_entries(entry("and_all"), ["ship sank"], words)
    assert not triggered_entries(entry("not_any"), ["ship sank"], words)
    assert not triggered_entries(entry("not_all"), ["ship wreck sank"], words)


def test_regex_keys_case_sensitivity_and_whole_words() -> None:
    assert any(e.content.startswith("Winter") for e in triggered_entries(book(), ["A STORMY night"], words))
    assert not any(e.content.startswith("Winter") for e in triggered_entries(book(), ["brainstorming"], words))
    sensitive = Lorebook((LoreEntry("X", ("Rock",), case_sensitive=True),))
    assert triggered_entries(sensitive, ["Gull Rock"], words)
    assert not triggered_entries(sensitive, ["gull rock"], words)
    whole = Lorebook((LoreEntry("X", ("tea",), whole_words=True),))
    assert not triggered_entries(whole, ["steam"], words)
    assert triggered_entries(whole, ["some tea?"], words)
    broken = Lorebook((LoreEntry("X", ("/([/",)),))
    assert not triggered_entries(broken, ["([ anything"], words)


def test_scan_depth_budget_and_disabled() -> None:
    lore = book()  # scan_depth 3
    assert not any(e.content.startswith("The lamp") for e in triggered_entries(lore, ["lamp", "a", "b", "c"], words))
    assert any(e.content.startswith("The lamp") for e in triggered_entries(lore, ["lamp", "a", "b"], words))
    assert not any("Disabled" in e.content for e in triggered_entries(lore, ["tea"], words))
    # a budget keeps the highest-priority entries (insertion_order as priority), in insertion order
    many = Lorebook(tuple(LoreEntry(f"e{i} " + "w " * 9, ("k",), insertion_order=i) for i in range(5)))
    assert names(triggered_entries(many, ["k"], words, token_budget=25)) == ["e3", "e4"]
    assert names(triggered_entries(many, ["k"], words)) == ["e0", "e1", "e2", "e3", "e4"]


def test_recursion_and_decorators() -> None:
    problems: list[str] = []
    raw = {"recursive_scanning": True, "entries": [
        {"keys": ["lamp"], "content": "The lamp needs oil.", "insertion_order": 1},
        {"keys": ["oil"], "content": "Oil comes by boat.", "insertion_order": 2},
        {"keys": ["never"], "content": "@@activate\nAlways here.", "insertion_order": 3},
        {"keys": ["lamp"], "content": "@@dont_activate\nNever here.", "insertion_order": 4},
        {"keys": ["lamp"], "content": "@@risu_only 3\n@@@depth 1\nDeep.", "insertion_order": 5},
    ]}
    lore = parse_character_book(raw, "book", lambda text, _: text, problems)
    got = triggered_entries(lore, ["the lamp"], words)
    assert [e.content for e in got] == ["The lamp needs oil.", "Oil comes by boat.", "Always here.", "Deep."]
    assert got[3].position == "at_depth" and got[3].depth == 1
    assert problems == ["book.entries[4]: decorator @@risu_only ignored (not supported)"]


def test_lorebook_problems_name_the_entry() -> None:
    problems: list[str] = []
    raw = {"entries": [{"keys": "a,b", "content": 5}, {"keys": ["/(/"], "content": "x", "use_regex": True},
                       {"keys": [], "content": "orphan"}]}
    lore = parse_character_book(raw, "c: data.character_book", lambda t, _: t, problems)
    assert len(lore.entries) == 2
    assert problems[0] == "c: data.character_book.entries[0]: field 'content' must be a string; entry ignored"
    assert problems[1].startswith("c: data.character_book.entries[1]: key '/(/' is not a valid regex")
    assert problems[2] == "c: data.character_book.entries[2]: no keys and not constant, so it never triggers"


def test_apply_card_context_places_lore_depth_prompt_and_post_history() -> None:
    context = parse_card(wren(), "wren.json").context()
    history = [user("hi"), bot("Hm."), user("Did your father keep the lamp?")]
    added = apply_card_context(history, context, words)
    # before_char lore first, in insertion order, then after_char (the dialogue entry about the father)
    assert [b.split()[0] for b in added.blocks] == ["Gull", "The", "User:"]
    assert added.turns == [
        user("hi"), {"role": "system", "content": "Wren is tired and wants to sleep."}, bot("Hm."),
        user("Did your father keep the lamp?"), {"role": "system", "content": "Stay terse."},
    ]
    assert history == [user("hi"), bot("Hm."), user("Did your father keep the lamp?")]  # not modified
    assert apply_card_context([user("x")], CardContext(), words) == CardTurns([], [user("x")])


# --- files -----------------------------------------------------------------------------------------

def png(path: Path, **chunks: str) -> Path:
    info = PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    Image.new("RGB", (4, 4)).save(path, pnginfo=info)
    return path


def b64(card: dict) -> str:
    return base64.b64encode(json.dumps(card).encode()).decode()


def test_broken_ccv3_chunk_falls_back_to_chara(tmp_path: Path) -> None:
    path = png(tmp_path / "w.png", ccv3="%%% broken", chara=b64({"name": "Old", "first_mes": "v2"}))
    raw, problems = load_card_json(path)
    assert raw["name"] == "Old"
    assert len(problems) == 1 and problems[0].startswith(f"{path}: 'ccv3' text chunk is not base64-encoded JSON")
    assert problems[0].endswith("using the 'chara' chunk instead")
    with pytest.raises(DataError, match="'ccv3' text chunk is not base64.*'chara' text chunk is not base64"):
        load_card_json(png(tmp_path / "b.png", ccv3="%%%", chara="%%%"))


def test_charx_reads_card_json(tmp_path: Path) -> None:
    path = tmp_path / "wren.charx"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("card.json", WREN.read_text())
        archive.writestr("assets/icon/images/main.png", b"\x89PNG")
    raw, problems = load_card_json(path)
    assert (parse_card(raw, str(path)).char, problems) == ("Wren", [])
    empty = tmp_path / "empty.charx"
    with zipfile.ZipFile(empty, "w") as archive:
        archive.writestr("x.json", "{}")
    with pytest.raises(DataError, match="empty.charx: CHARX archive has no card.json at its root"):
        load_card_json(empty)
    (tmp_path / "bad.charx").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="bad.charx: not a readable CHARX"):
        load_card_json(tmp_path / "bad.charx")


def test_the_card_only_example_persona_is_in_character_everywhere() -> None:
    """persona_data/tinker_vell: a card (with a lorebook) and held-out dialogue it never saw."""
    import re

    from finetune.persona import load_persona
    from finetune.readers import read_source

    folder = Path(__file__).resolve().parents[1] / "persona_data" / "tinker_vell"
    persona = load_persona(folder)
    assert persona.problems == [] and persona.card is not None and len(persona.card.lorebook.entries) == 6
    assert persona.notes[0].endswith("character_book: 6 entries")
    held_out = read_source(folder / "heldout.jsonl")
    assert held_out.problems == [] and len(held_out.conversations) == 12
    replies = [m["content"] for c in [*persona.conversations, *held_out.conversations]
               for m in c.messages if m["role"] == "assistant"]
    assert all(re.search(check, r) for r in replies for check in persona.style_checks)
    card_text = (folder / "card.json").read_text(encoding="utf-8")
    assert not any(m["content"] in card_text for c in held_out.conversations for m in c.messages)
