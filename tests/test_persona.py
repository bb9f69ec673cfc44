"""load_persona: persona.toml validation, sources, card prompts and the data hash."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from cards import write_card_png

from finetune.conversation import DataError
from finetune.persona import Sampling, load_persona

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
