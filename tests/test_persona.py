"""load_persona: persona.toml validation, sources, card prompts and the data hash."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from cards import write_card_png

from finetune.bundle import Sampling
from finetune.conversation import DataError
from finetune.persona import load_persona

CARD = {
    "spec": "chara_card_v2",
    "data": {
        "name": "Brine",
        "description": "{{char}} is an old sailor.",
        "first_mes": "Ahoy.",
        "mes_example": "<START>\n{{user}}: Hi\n{{char}}: Arr.",
    },
}
TOML = '''\
name = "Brine"
description = "A salty sailor."
system_prompt = """You are Brine."""

[sampling]
temperature = 0.7
stop = ["\\nUser:"]

[[sources]]
path = "dialogue.jsonl"

[[sources]]
path = "scenes/play.txt"
'''


def make_persona(folder: Path, toml: str = TOML) -> Path:
    (folder / "scenes").mkdir(parents=True)
    lines = [
        {
            "messages": [
                {"role": "system", "content": "Storm tonight."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Arr."},
            ]
        },
        {"messages": [{"role": "user", "content": "nobody answers"}]},
    ]
    (folder / "dialogue.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    (folder / "scenes" / "play.txt").write_text("SAM: Evening.\nBRINE: Evening.\n")
    (folder / "persona.toml").write_text(toml)
    return folder


def test_load_persona_happy_path(tmp_path: Path) -> None:
    folder = make_persona(tmp_path / "brine")
    persona = load_persona(folder)
    assert persona.name == "Brine"
    assert persona.system_prompt == "You are Brine."
    assert persona.description == "A salty sailor."
    assert persona.sampling == Sampling(temperature=0.7, stop=["\nUser:"])
    assert (persona.sampling.top_p, persona.sampling.top_k, persona.sampling.max_new_tokens) == (0.9, 50, 200)
    assert [c.messages for c in persona.conversations] == [
        # a system message inside the data is kept; the persona prompt is never added here
        [
            {"role": "system", "content": "Storm tonight."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Arr."},
        ],
        # script speaker defaults to the persona name, case-insensitively
        [{"role": "user", "content": "Evening."}, {"role": "assistant", "content": "Evening."}],
    ]
    assert persona.problems == [f"{folder / 'dialogue.jsonl'}:2: no turns by the character"]
    assert persona.files == [
        folder / "persona.toml",
        folder / "dialogue.jsonl",
        folder / "scenes" / "play.txt",
    ]
    assert len(persona.data_hash) == 64
    assert load_persona(folder / "persona.toml").data_hash == persona.data_hash


def test_data_hash_follows_content_and_names_not_location(tmp_path: Path) -> None:
    first = load_persona(make_persona(tmp_path / "a")).data_hash
    assert load_persona(make_persona(tmp_path / "b")).data_hash == first
    with (tmp_path / "b" / "scenes" / "play.txt").open("a") as f:
        f.write("SAM: Goodnight.\n")
    assert load_persona(tmp_path / "b").data_hash != first


def test_missing_field_error_names_the_field(tmp_path: Path) -> None:
    folder = make_persona(tmp_path / "p", TOML.replace('name = "Brine"\n', ""))
    with pytest.raises(DataError, match=r"persona.toml: field 'name': Field required"):
        load_persona(folder)


def test_bad_nested_fields_are_named(tmp_path: Path) -> None:
    toml = TOML.replace("temperature = 0.7", "temperature = -1\ntemprature = 2").replace(
        'path = "scenes/play.txt"', 'path = "scenes/play.txt"\nformat = "csv"'
    )
    with pytest.raises(DataError) as excinfo:
        load_persona(make_persona(tmp_path / "p", toml))
    message = str(excinfo.value)
    assert "field 'sampling.temperature': Input should be greater than or equal to 0" in message
    assert "field 'sampling.temprature': Extra inputs are not permitted" in message
    assert (
        "field 'sources[1].format': Input should be 'jsonl', 'sharegpt', 'card', 'script' or 'discord'"
        in message
    )


def test_missing_source_file_names_toml_and_source(tmp_path: Path) -> None:
    folder = make_persona(tmp_path / "p", TOML.replace("scenes/play.txt", "scenes/gone.txt"))
    with pytest.raises(DataError, match=r"p/persona.toml: sources\[1\]: file not found: .*scenes/gone.txt"):
        load_persona(folder)


def test_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"persona.toml: invalid TOML: .*line 1"):
        load_persona(make_persona(tmp_path / "p", "name = \n"))


def test_system_prompt_required_without_card(tmp_path: Path) -> None:
    folder = make_persona(tmp_path / "p", TOML.replace('system_prompt = """You are Brine."""\n', ""))
    with pytest.raises(DataError, match="field 'system_prompt': required when no character card"):
        load_persona(folder)


def test_card_source_supplies_prompt_and_conversations(tmp_path: Path) -> None:
    folder = make_persona(
        tmp_path / "p",
        TOML.replace('system_prompt = """You are Brine."""\n', "") + '\n[[sources]]\npath = "brine.png"\n',
    )
    write_card_png(CARD, folder / "brine.png")
    persona = load_persona(folder)
    assert persona.system_prompt == "Brine is an old sailor."
    assert [c.messages for c in persona.conversations[-2:]] == [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr."}],
        [{"role": "assistant", "content": "Ahoy."}],
    ]
    assert persona.files[-1] == folder / "brine.png"


def test_persona_prompt_is_the_cards_global_prompt(tmp_path: Path) -> None:
    """persona.toml's system_prompt is the global prompt of the V2 spec: the card's own system_prompt
    replaces it (inserting it at {{original}}), and the card's description is kept either way."""
    folder = make_persona(tmp_path / "p", TOML + '\n[[sources]]\npath = "brine.json"\n')
    card = json.loads(json.dumps(CARD))
    (folder / "brine.json").write_text(json.dumps(card))
    assert load_persona(folder).system_prompt == "You are Brine.\n\nBrine is an old sailor."
    card["data"]["system_prompt"] = "{{original}} Never break character."
    (folder / "brine.json").write_text(json.dumps(card))
    persona = load_persona(folder)
    assert persona.system_prompt == "You are Brine. Never break character.\n\nBrine is an old sailor."
    card["data"]["system_prompt"] = "Write only {{char}}'s lines."
    (folder / "brine.json").write_text(json.dumps(card))
    persona = load_persona(folder)
    assert persona.system_prompt == "Write only Brine's lines.\n\nBrine is an old sailor."
    assert f"{folder / 'persona.toml'}: field 'system_prompt' not used: the card's own system_prompt " \
           f"replaces it (write {{{{original}}}} in the card's system_prompt to insert it there)" in persona.problems


def test_single_card_is_a_persona(tmp_path: Path) -> None:
    path = tmp_path / "brine.json"
    path.write_text(json.dumps(CARD))
    persona = load_persona(path)
    assert (persona.name, persona.system_prompt, persona.files) == (
        "Brine",
        "Brine is an old sailor.",
        [path],
    )
    assert persona.sampling == Sampling()
    assert len(persona.conversations) == 2


def test_no_conversations_lists_problems(tmp_path: Path) -> None:
    folder = make_persona(tmp_path / "p", TOML.replace('[[sources]]\npath = "scenes/play.txt"\n', ""))
    (folder / "dialogue.jsonl").write_text('{"messages": [{"role": "user", "content": "hello?"}]}\n')
    with pytest.raises(
        DataError,
        match=r"no usable conversations in any source; first problems:\n  .*dialogue.jsonl:1: no turns",
    ):
        load_persona(folder)


def test_not_a_persona(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no persona.toml in this folder"):
        load_persona(tmp_path)
    with pytest.raises(DataError, match="gone: no such persona folder or file"):
        load_persona(tmp_path / "gone")
    (tmp_path / "notes.md").write_text("hi")
    with pytest.raises(DataError, match="notes.md: not a persona folder"):
        load_persona(tmp_path / "notes.md")


def _discord_post(minute: int, author: str, content: str) -> dict:
    return {
        "id": str(minute), "type": "Default", "timestamp": f"2024-01-01T12:{minute:02d}:00+00:00",
        "content": content, "author": {"id": author, "name": author},
    }


DISCORD = {"messages": [
    _discord_post(0, "sam", "ahoy"), _discord_post(1, "brine", "Arr."),
    _discord_post(20, "sam", "still there?"), _discord_post(21, "brine", "Aye."),
]}
# one file per registered format, each holding one conversation or more
SAMPLES = {
    "jsonl": ("d.jsonl", json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                                  {"role": "assistant", "content": "Arr."}]})),
    "sharegpt": ("sg.json", json.dumps([{"conversations": [{"from": "human", "value": "Hi"},
                                                           {"from": "gpt", "value": "Arr."}]}])),
    "card": ("card.json", json.dumps(CARD)),
    "script": ("play.txt", "SAM: Evening.\nBRINE: Evening.\n"),
    "discord": ("export.json", json.dumps(DISCORD)),
}


def test_every_registered_format_is_a_valid_source_format(tmp_path: Path) -> None:
    from finetune.readers import READERS

    assert set(SAMPLES) == set(READERS), "add a sample file for the new format"
    sources = ""
    for kind, (name, text) in SAMPLES.items():
        (tmp_path / name).write_text(text)
        sources += f'[[sources]]\npath = "{name}"\nformat = "{kind}"\n'
    (tmp_path / "persona.toml").write_text(f'name = "Brine"\nsystem_prompt = "You are Brine."\n{sources}')
    persona = load_persona(tmp_path)
    read_from = {c.origin.split(":")[0] for c in persona.conversations}
    assert read_from == {str(tmp_path / name) for name, _ in SAMPLES.values()}


def _discord_persona(folder: Path, options: str = "") -> Path:
    folder.mkdir()
    (folder / "export.json").write_text(json.dumps(DISCORD))
    (folder / "persona.toml").write_text(
        f'name = "Brine"\nsystem_prompt = "You are Brine."\n[[sources]]\npath = "export.json"\n{options}'
    )
    return folder


def test_reader_options_come_from_persona_toml(tmp_path: Path) -> None:
    assert len(load_persona(_discord_persona(tmp_path / "default")).conversations) == 1  # 30-minute gap
    persona = load_persona(_discord_persona(tmp_path / "short", "gap_minutes = 10\n"))
    assert [c.messages for c in persona.conversations] == [
        [{"role": "user", "content": "sam: ahoy"}, {"role": "assistant", "content": "Arr."}],
        [{"role": "user", "content": "sam: still there?"}, {"role": "assistant", "content": "Aye."}],
    ]


@pytest.mark.parametrize("options, error", [
    ("gap_minute = 10\n", "field 'sources[0].gap_minute': Extra inputs are not permitted "
                          "(options of discord sources: gap_minutes)"),
    ("gap_minutes = 0\n", "field 'sources[0].gap_minutes': Input should be greater than 0 "
                           "(options of discord sources: gap_minutes)"),
    ('format = "jsonl"\ngap_minutes = 10\n', "field 'sources[0].gap_minutes': Extra inputs are not permitted "
                                             "(options of jsonl sources: none)"),
])
def test_bad_reader_options_name_the_field(tmp_path: Path, options: str, error: str) -> None:
    with pytest.raises(DataError) as excinfo:
        load_persona(_discord_persona(tmp_path / "p", options))
    assert str(excinfo.value) == f"{tmp_path / 'p' / 'persona.toml'}: {error}"


def test_any_reader_can_supply_the_system_prompt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from finetune.conversation import Conversation, ReadResult
    from finetune.readers import READERS, Reader

    def read_notes(path: Path, character: str, options: object) -> ReadResult:
        said = [{"role": "assistant", "content": path.read_text()}]
        return ReadResult([Conversation(said, str(path))], system_prompt=f"You are {character}, from notes.")

    monkeypatch.setitem(READERS, "notes", Reader(read_notes, suffixes=(".notes",)))
    folder = make_persona(tmp_path / "p", TOML.replace('system_prompt = """You are Brine."""\n', "")
                          .replace("dialogue.jsonl", "brine.notes"))
    (folder / "brine.notes").write_text("Arr.")
    persona = load_persona(folder)
    assert persona.system_prompt == "You are Brine, from notes."
    assert persona.conversations[0].messages == [{"role": "assistant", "content": "Arr."}]
    # the persona.toml's own prompt wins over any source's
    (folder / "persona.toml").write_text(TOML.replace("dialogue.jsonl", "brine.notes"))
    assert load_persona(folder).system_prompt == "You are Brine."
