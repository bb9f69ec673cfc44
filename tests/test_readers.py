"""Every persona data reader: exact messages out, bad records reported with their location, never fatal."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from cards import write_card_png
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from finetune.conversation import DataError
from finetune.readers import infer_format, read_source
from finetune.readers.card import card_conversations, read_card
from finetune.readers.discord_export import DiscordOptions, read_discord_export
from finetune.readers.jsonl import read_jsonl
from finetune.readers.script import read_script
from finetune.readers.sharegpt import read_sharegpt


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def bot(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def write_json(path: Path, data: object) -> Path:
    return write(path, json.dumps(data, indent=2))


# --- JSONL -----------------------------------------------------------------------------------------


def test_jsonl_happy_path_strips_and_merges(tmp_path: Path) -> None:
    lines = [
        {
            "messages": [
                {"role": "system", "content": "Be salty."},
                {"role": "user", "content": " Hi "},
                {"role": "assistant", "content": "Arr."},
                {"role": "assistant", "content": "Ahoy!  "},
            ]
        },
        {"messages": [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Fair winds."}]},
    ]
    path = write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in lines) + "\n")
    result = read_jsonl(path)
    assert result.problems == [] and result.notes == []
    assert [c.messages for c in result.conversations] == [
        [{"role": "system", "content": "Be salty."}, user("Hi"), bot("Arr.\nAhoy!")],
        [user("Bye"), bot("Fair winds.")],
    ]
    assert [c.origin for c in result.conversations] == [f"{path}:1", f"{path}:2"]


def test_jsonl_bad_lines_are_reported_with_line_numbers_and_good_lines_kept(tmp_path: Path) -> None:
    good = json.dumps({"messages": [user("a"), bot("b")]})
    lines = [
        good,  # 1
        "",  # 2 blank: silently skipped
        "{not json",  # 3
        json.dumps({"turns": []}),  # 4
        json.dumps({"messages": [{"role": "narrator", "content": "x"}]}),  # 5
        json.dumps({"messages": [user("a"), {"role": "assistant", "content": 7}]}),  # 6
        json.dumps({"messages": [user("only the user talks")]}),  # 7
        json.dumps({"messages": [user("a"), bot("   ")]}),  # 8
        good,  # 9
    ]
    path = write(tmp_path / "d.jsonl", "\n".join(lines))
    result = read_jsonl(path)
    assert [c.origin for c in result.conversations] == [f"{path}:1", f"{path}:9"]
    assert len(result.problems) == 6
    p3, p4, p5, p6, p7, p8 = result.problems
    assert p3.startswith(f"{path}:3: invalid JSON at column 2")
    assert p4 == f"{path}:4: missing 'messages' (or ShareGPT 'conversations')"
    assert p5.startswith(f"{path}:5: messages[0]: unknown role 'narrator'")
    assert p6 == f"{path}:6: messages[1]: content must be a string, got 7"
    assert p7 == f"{path}:7: no turns by the character"
    assert p8 == f"{path}:8: no turns by the character"


def test_jsonl_accepts_sharegpt_lines_and_json_arrays(tmp_path: Path) -> None:
    line = json.dumps({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Arr"}]})
    assert read_jsonl(write(tmp_path / "s.jsonl", line)).conversations[0].messages == [user("Hi"), bot("Arr")]
    path = write_json(tmp_path / "a.json", [{"messages": [user("Hi"), bot("Arr")]}, {"messages": "nope"}])
    result = read_jsonl(path)
    assert [c.messages for c in result.conversations] == [[user("Hi"), bot("Arr")]]
    assert result.problems == [f"{path}: [1]: 'messages' must be a list"]


def test_unreadable_files_raise(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing.jsonl: cannot read"):
        read_jsonl(tmp_path / "missing.jsonl")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"messages": []}\n{"x": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin.jsonl:2: not UTF-8"):
        read_jsonl(latin)
    broken = write(tmp_path / "broken.json", '[\n  {"messages": [}\n]')
    with pytest.raises(DataError, match=r"broken.json:2:\d+: invalid JSON"):
        read_jsonl(broken)


# --- ShareGPT --------------------------------------------------------------------------------------


def test_sharegpt_array_maps_speakers_and_reports_by_index(tmp_path: Path) -> None:
    records = [
        {
            "system": "You are Brine.",
            "conversations": [
                {"from": "human", "value": "Hi"},
                {"from": "GPT", "value": "Arr"},
                {"from": "user", "value": "More"},
                {"from": "bard", "value": "Aye"},
            ],
        },
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "narrator", "value": "..."}]},
        {"conversations": [{"from": "human", "value": None}]},
        {"conversations": [{"from": "system", "value": "S"}, {"from": "model", "value": "M"}]},
    ]
    path = write_json(tmp_path / "sg.json", records)
    result = read_sharegpt(path)
    assert [c.messages for c in result.conversations] == [
        [{"role": "system", "content": "You are Brine."}, user("Hi"), bot("Arr"), user("More"), bot("Aye")],
        [{"role": "system", "content": "S"}, bot("M")],
    ]
    assert [c.origin for c in result.conversations] == [f"{path}: [0]", f"{path}: [3]"]
    assert result.problems[0].startswith(f"{path}: [1]: conversations[1]: unknown speaker 'narrator'")
    assert result.problems[1] == f"{path}: [2]: conversations[0]: value must be a string, got null"


def test_sharegpt_jsonl_rejects_messages_records(tmp_path: Path) -> None:
    lines = [
        json.dumps({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}),
        json.dumps({"messages": [user("a"), bot("b")]}),
    ]
    path = write(tmp_path / "sg.jsonl", "\n".join(lines))
    result = read_sharegpt(path)
    assert [c.messages for c in result.conversations] == [[user("Hi"), bot("Yo")]]
    assert result.problems == [f"{path}:2: missing 'conversations' list"]


# --- Character cards -------------------------------------------------------------------------------

V2_CARD = {
    "spec": "chara_card_v2",
    "spec_version": "2.0",
    "data": {
        "name": "Brine",
        "description": "{{char}} is an old sailor who distrusts {{user}}.",
        "personality": "gruff, loyal",
        "scenario": "A tavern by the docks.",
        "first_mes": "*spits* What do ye want, {{user}}?",
        "alternate_greetings": ["Ahoy.", "  "],
        "mes_example": (
            "<START>\n{{user}}: Who are you?\n{{char}}: Name's {{char}}.\nBeen at sea forty years.\n"
            "<START>\n<USER>: Tell me a story.\n<BOT>: No.\n{{user}}: Please?\nBrine: Fine. Once...\n"
            "<START>\nSome header line\n{{user}}: Just me here."
        ),
        "system_prompt": "",
    },
}
DEFAULT_PROMPT = (
    "Brine is an old sailor who distrusts User.\n\nBrine's personality: gruff, loyal\n\n"
    "Scenario: A tavern by the docks."
)


def test_card_json_fields_prompt_greetings_and_examples(tmp_path: Path) -> None:
    path = write_json(tmp_path / "brine.json", V2_CARD)
    card = read_card(path)
    assert card.name == "Brine"
    assert card.system_prompt == DEFAULT_PROMPT
    assert card.greetings == ["*spits* What do ye want, {{user}}?", "Ahoy."]  # the bot fills in whom it greets
    assert len(card.examples) == 3
    result = card_conversations(card, path)
    assert [c.messages for c in result.conversations] == [
        [user("Who are you?"), bot("Name's Brine.\nBeen at sea forty years.")],
        [user("Tell me a story."), bot("No."), user("Please?"), bot("Fine. Once...")],
        [bot("*spits* What do ye want, User?")],
        [bot("Ahoy.")],
    ]
    assert [c.origin for c in result.conversations] == [
        f"{path}: mes_example[0]",
        f"{path}: mes_example[1]",
        f"{path}: greetings[0]",
        f"{path}: greetings[1]",
    ]
    assert result.problems == [
        f"{path}: mes_example[2]: text before the first speaker tag skipped: 'Some header line'",
        f"{path}: mes_example[2]: no turns by the character",
    ]


def test_card_system_prompt_replaces_the_global_prompt_and_keeps_the_definition(tmp_path: Path) -> None:
    """V2 spec: a card's system_prompt replaces the global prompt ({{original}}, empty in personabot) only."""
    card_json = json.loads(json.dumps(V2_CARD))
    for own in ("Stay in character as {{char}}.\n{{original}}", "Stay in character as {{char}}."):
        card_json["data"]["system_prompt"] = own
        card = read_card(write_json(tmp_path / "c.json", card_json))
        assert card.system_prompt == "Stay in character as Brine.\n\n" + DEFAULT_PROMPT


@pytest.mark.parametrize("keyword", ["chara", "ccv3"])
def test_card_png_round_trip(tmp_path: Path, keyword: str) -> None:
    card_json = dict(V2_CARD, spec="chara_card_v2" if keyword == "chara" else "chara_card_v3")
    path = tmp_path / "brine.png"
    write_card_png(card_json, path, keyword=keyword)
    with Image.open(path) as image:
        assert keyword in image.text
    card = read_card(path)
    assert (card.name, card.system_prompt) == ("Brine", DEFAULT_PROMPT)
    result = read_source(path)
    assert (len(result.conversations), result.system_prompt) == (4, DEFAULT_PROMPT)


def test_card_png_prefers_ccv3_and_reads_compressed_chunks(tmp_path: Path) -> None:
    def b64(card: dict) -> str:
        return base64.b64encode(json.dumps(card).encode()).decode()

    info = PngInfo()
    info.add_text("chara", b64({"name": "Old", "first_mes": "v2"}))
    info.add_text(
        "ccv3", b64({"spec": "chara_card_v3", "data": {"name": "New", "first_mes": "v3"}}), zip=True
    )
    path = tmp_path / "both.png"
    Image.new("RGB", (4, 4)).save(path, pnginfo=info)
    card = read_card(path)
    assert (card.name, card.greetings) == ("New", ["v3"])


def test_card_png_without_card_or_bad_base64(tmp_path: Path) -> None:
    plain = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(plain)
    with pytest.raises(DataError, match="plain.png: PNG holds no character card"):
        read_card(plain)
    info = PngInfo()
    info.add_itxt("chara", "%%% not base64 %%%")
    bad = tmp_path / "bad.png"
    Image.new("RGB", (4, 4)).save(bad, pnginfo=info)
    with pytest.raises(DataError, match="bad.png: 'chara' text chunk is not base64-encoded JSON"):
        read_card(bad)


def test_v1_flat_card(tmp_path: Path) -> None:
    v1 = {
        "name": "Hoot",
        "description": "An owl.",
        "personality": "",
        "scenario": "",
        "first_mes": "Hoo!",
        "mes_example": "<START>\r\n<USER>: Why?\r\nHoot: Etymology,\r\n{{user}}.",
    }
    path = write_json(tmp_path / "hoot.json", v1)
    card = read_card(path)
    assert card.system_prompt == "An owl."
    assert [c.messages for c in read_source(path).conversations] == [
        [user("Why?"), bot("Etymology,\nUser.")],
        [bot("Hoo!")],
    ]


def test_card_errors_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="card has no 'data.name'"):
        read_card(write_json(tmp_path / "a.json", {"spec": "chara_card_v2", "data": {"description": "x"}}))
    with pytest.raises(DataError, match="field 'data.description' must be a string"):
        read_card(
            write_json(
                tmp_path / "b.json", {"spec": "chara_card_v2", "data": {"name": "X", "description": 3}}
            )
        )


# --- Scripts ---------------------------------------------------------------------------------------

SCRIPT = """\
# The Salty Dog, act one
Stray text before anyone speaks.
BOB: Evening, Brine.
(Brine looks up)
Brine: Evening.
The tide's turning.

[thunder]
bob: Drink?
BRINE: Aye.
---
ALICE: Anyone here?
BOB: Just us.
BRINE: And me.
===
ALICE: A scene without him.
***
BRINE:
Bob: Hello?
"""


def test_script_scenes_continuations_and_prefixes(tmp_path: Path) -> None:
    path = write(tmp_path / "play.txt", SCRIPT)
    result = read_script(path, "brine")
    assert [c.messages for c in result.conversations] == [
        [user("Evening, Brine."), bot("Evening.\nThe tide's turning."), user("Drink?"), bot("Aye.")],
        [user("ALICE: Anyone here?\nBOB: Just us."), bot("And me.")],
    ]
    assert [c.origin for c in result.conversations] == [f"{path}:3", f"{path}:12"]
    assert result.problems == [
        f"{path}:2: text before the first speaker tag of the scene: 'Stray text before anyone speaks.'",
        f"{path}:18: no turns by the character",
    ]


def test_script_unknown_character_lists_speakers(tmp_path: Path) -> None:
    path = write(tmp_path / "play.txt", SCRIPT)
    with pytest.raises(DataError) as excinfo:
        read_script(path, "Captain")
    message = str(excinfo.value)
    assert message.startswith(f"{path}: character 'Captain' never speaks; speakers found: ")
    assert "BOB (4)" in message and "Brine (4)" in message and "ALICE (2)" in message


def test_script_ignores_urls_and_times_as_speakers(tmp_path: Path) -> None:
    path = write(tmp_path / "s.txt", "BRINE: Look at\nhttp://example.com\n10:30 sharp.\nSAM: Ok")
    assert read_script(path, "BRINE").conversations[0].messages == [
        bot("Look at\nhttp://example.com\n10:30 sharp."),
        user("Ok"),
    ]


# --- Discord exports -------------------------------------------------------------------------------


def discord_message(i: int, minute: int, author: dict, content: str, **extra: object) -> dict:
    return {
        "id": str(1000 + i),
        "type": "Default",
        "timestamp": f"2024-01-01T12:{minute:02d}:00.123+00:00",
        "content": content,
        "author": author,
        "attachments": [],
        "embeds": [],
        **extra,
    }


BRINE = {"id": "1", "name": "brine_bot", "nickname": "Brine", "isBot": True}
SAM = {"id": "2", "name": "sam99", "nickname": None, "isBot": False}
JO = {"id": "3", "name": "jo", "nickname": "Jojo", "isBot": False}


def discord_export(tmp_path: Path) -> Path:
    messages = [
        discord_message(0, 0, SAM, "hey <@1>", mentions=[BRINE]),
        discord_message(1, 1, BRINE, "Arr, <@2> and <@9>.", mentions=[SAM]),
        discord_message(2, 2, BRINE, "What now?"),
        discord_message(3, 3, JO, "", attachments=[{"url": "x.png"}]),  # attachment only: skipped
        discord_message(4, 4, JO, "pinned", type="ChannelPinnedMessage"),  # not chat: skipped
        discord_message(5, 10, JO, "later"),
        discord_message(6, 45, SAM, "anyone?"),  # 35 min gap: new conversation
        discord_message(7, 46, JO, "me"),  # ... without the character: dropped
        {"id": "x", "type": "Default", "content": "no author"},
        discord_message(9, 50, SAM, "bad time") | {"timestamp": "yesterday"},
    ]
    late = discord_message(10, 0, SAM, "ahoy?") | {"timestamp": "2024-01-01T14:00:00Z"}
    reply = discord_message(11, 0, BRINE, "Ahoy.", type="Reply") | {
        "timestamp": "2024-01-01T14:01:00.1234567Z"
    }
    return write_json(
        tmp_path / "export.json",
        {"guild": {"id": "g"}, "channel": {"id": "c"}, "messages": [*messages, late, reply]},
    )


@pytest.mark.parametrize("character", ["brine", "BRINE_BOT", "1"])
def test_discord_splits_at_gaps_and_matches_author(tmp_path: Path, character: str) -> None:
    path = discord_export(tmp_path)
    result = read_discord_export(path, character)
    assert [c.messages for c in result.conversations] == [
        [user("sam99: hey @Brine"), bot("Arr, @sam99 and <@9>.\nWhat now?"), user("Jojo: later")],
        [user("sam99: ahoy?"), bot("Ahoy.")],
    ]
    assert [c.origin for c in result.conversations] == [f"{path}: messages[0]", f"{path}: messages[10]"]
    assert result.problems == [
        f"{path}: messages[8]: missing 'author'",
        f"{path}: messages[9]: bad timestamp 'yesterday'",
    ]


def test_discord_gap_is_a_parameter(tmp_path: Path) -> None:
    result = read_discord_export(discord_export(tmp_path), "Brine", DiscordOptions(gap_minutes=5))
    assert [c.messages[-1] for c in result.conversations] == [
        bot("Arr, @sam99 and <@9>.\nWhat now?"),
        bot("Ahoy."),
    ]


def test_discord_unknown_character_lists_top_authors(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=r"character 'nobody' never speaks .*top authors: sam99 \(id 2\): 3, "
    ):
        read_discord_export(discord_export(tmp_path), "nobody")


# --- Dispatch and sniffing -------------------------------------------------------------------------


def test_format_sniffing(tmp_path: Path) -> None:
    assert infer_format(tmp_path / "x.jsonl") == "jsonl"
    assert infer_format(tmp_path / "x.PNG") == "card"
    assert infer_format(tmp_path / "x.txt") == "script"
    assert infer_format(write_json(tmp_path / "v2.json", V2_CARD)) == "card"
    assert infer_format(write_json(tmp_path / "v1.json", {"name": "X", "first_mes": "hi"})) == "card"
    assert infer_format(discord_export(tmp_path)) == "discord"
    assert infer_format(write_json(tmp_path / "sg.json", [{"conversations": []}])) == "sharegpt"
    assert infer_format(write_json(tmp_path / "m.json", [{"messages": []}])) == "jsonl"
    assert infer_format(write_json(tmp_path / "both.json", [{"messages": [], "conversations": []}])) == "sharegpt"
    with pytest.raises(DataError, match="cannot tell what kind of JSON"):
        infer_format(write_json(tmp_path / "odd.json", {"hello": 1}))
    with pytest.raises(DataError, match=r"extension '\.csv'; set format to one of: jsonl, sharegpt, card"):
        infer_format(tmp_path / "x.csv")


def test_read_source_dispatch_and_errors(tmp_path: Path) -> None:
    records = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Arr"}]}]
    assert read_source(write_json(tmp_path / "sg.json", records)).conversations[0].messages == [
        user("Hi"),
        bot("Arr"),
    ]
    script = write(tmp_path / "s.txt", "A: hi\nB: yo")
    assert read_source(script, character="B").conversations[0].messages == [user("hi"), bot("yo")]
    assert read_source(script, format="script", character="a").conversations[0].messages == [
        bot("hi"),
        user("yo"),
    ]
    with pytest.raises(DataError, match="s.txt: script files hold many speakers; set 'character'"):
        read_source(script)
    with pytest.raises(DataError, match="export.json: discord files hold many speakers; set 'character'"):
        read_source(discord_export(tmp_path))
    with pytest.raises(
        DataError, match="unknown format 'csv'; valid formats: jsonl, sharegpt, card, script, discord"
    ):
        read_source(script, format="csv")


SHAKESPEARE = Path(__file__).parent / "data" / "tinyshakespeare_excerpt.txt"


def test_script_verse_with_colons_makes_no_speakers() -> None:
    """tinyshakespeare: "NAME:" on its own line, and verse lines with a colon inside a speech."""
    result = read_script(SHAKESPEARE, "ROMEO")
    (conversation,) = result.conversations
    romeo = [m["content"] for m in conversation.messages if m["role"] == "assistant"]
    assert len(romeo) == 3
    assert romeo[0].startswith("He jests at scars") and romeo[0].endswith(
        "She speaks yet she says nothing: what of that?\nHer eye discourses; I will answer it.")
    assert romeo[1].startswith("She speaks:\nO, speak again, bright angel!")
    users = [m["content"] for m in conversation.messages if m["role"] == "user"]
    assert users[0].startswith("First Citizen: Before we proceed")
    assert "\nSecond Citizen: One word, good citizens." in users[0]  # a tag once, but it opens a speech
    assert "but they think we are too dear: the leanness that" in users[0]
    assert users[-2].startswith("JULIET: O Romeo, Romeo!") and users[-1].startswith("JULIET: 'Tis but")


def test_script_reports_suspect_tags_and_missing_scene_breaks() -> None:
    problems = read_script(SHAKESPEARE, "ROMEO").problems
    suspect = [p for p in problems if "not a new speaker" in p]
    assert suspect == [
        f"{SHAKESPEARE}:21: 'but they think we are too dear:' read as part of the speech, not a new speaker "
        "(a tag must be in capitals, open a paragraph, or be used on two or more lines)",
        f"{SHAKESPEARE}:38: 'She speaks yet she says nothing:' read as part of the speech, not a new speaker "
        "(a tag must be in capitals, open a paragraph, or be used on two or more lines)",
        f"{SHAKESPEARE}:45: 'She speaks:' read as part of the speech, not a new speaker "
        "(a tag must be in capitals, open a paragraph, or be used on two or more lines)",
    ]
    assert read_script(SHAKESPEARE, "ROMEO").notes == [(
        f"{SHAKESPEARE}: no scene breaks, so the whole file is one conversation; put a line of --- between "
        "scenes (or two blank lines) so that each scene trains on its own"
    )]


def test_script_blank_line_runs_split_scenes_when_there_are_no_breaks(tmp_path: Path) -> None:
    path = write(tmp_path / "s.txt", "SAM: Hi.\nBRINE: Aye.\n\n\nSAM: Again?\nBRINE: Aye.\n")
    result = read_script(path, "BRINE")
    assert [c.messages for c in result.conversations] == [[user("Hi."), bot("Aye.")], [user("Again?"), bot("Aye.")]]
    assert result.problems == [] and result.notes == []


OPENAI_FT = Path(__file__).parent / "data" / "openai_finetune.jsonl"


def test_openai_weight_zero_is_context_and_names_label_users() -> None:
    result = read_jsonl(OPENAI_FT)
    first, second = result.conversations
    assert first.messages[2] == bot("Paris") and first.context_turns == frozenset({2})
    assert second.messages == [
        user("sam: Who wrote Romeo and Juliet?\njo: Wasn't it Marlowe?"),
        bot("Oh, just some guy named William Shakespeare. Ever heard of him?"),
    ]
    assert second.context_turns == frozenset()


def test_openai_dpo_multimodal_and_tool_records_are_refused_whole() -> None:
    problems = read_jsonl(OPENAI_FT).problems
    assert problems == [
        f"{OPENAI_FT}:3: a preference (DPO) record ('preferred_output'); personabot trains on conversations: "
        "put the preferred answer in a 'messages' record",
        f"{OPENAI_FT}:4: messages[0]: content part of type 'image_url'; only text trains, so the record is skipped",
        f"{OPENAI_FT}:5: a tool-calling record ('tools'); tool calls cannot train a character, so the record "
        "is skipped",
        f"{OPENAI_FT}:6: no trained turns by the character (every assistant message has weight 0)",
        f"{OPENAI_FT}:7: messages[1]: weight must be 0 or 1, got 0.5",
    ]


def test_openai_tool_messages_without_a_tools_list_are_refused_too(tmp_path: Path) -> None:
    record = {"messages": [user("weather?"), {"role": "tool", "tool_call_id": "c1", "content": "21"}, bot("Warm.")]}
    path = write(tmp_path / "t.jsonl", json.dumps(record))
    assert read_jsonl(path).problems == [
        f"{path}:1: messages[1]: a tool call or result ('tool_call_id'); tool calls cannot train a character, "
        "so the record is skipped"
    ]
