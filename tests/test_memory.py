"""Long-term memory: what is recalled, what stays stable in the prompt, what is bounded and what can be deleted."""
from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest

from bot.memory import Memory, Remembered, block, clean_note, note_prompt, terms
from bot.state import State

BENCH = Path(__file__).resolve().parents[1] / "bench" / "memory.py"


def bench():
    spec = importlib.util.spec_from_file_location("bench_memory", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_memory"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.fixture
def memory(tmp_path):
    state = State(tmp_path / "bot.db")
    yield Memory(state, budget_chars=400)
    state.close()


def keep(memory: Memory, message_id: int, content: str, *, author: str = "Alice", author_id: int = 1,
         channel_id: int = 1, guild_id: int | None = 9, at: float | None = None) -> None:
    memory.keep(message_id=message_id, guild_id=guild_id, channel_id=channel_id, author_id=author_id,
                author_name=author, content=content, at=at)


def test_search_words_skip_filler_and_the_personas_names():
    assert terms("@Brine hey, what's my cat's name again? 42", ignore=["Brine"]) == ["cat", "name"]


def test_facts_said_200_messages_earlier_are_recalled_in_the_scripted_channel(tmp_path):
    script = bench()
    state = State(tmp_path / "bot.db")
    result = script.replay(script.channel(600, gap=200), Memory(state), window=20)
    assert result["probes"] == 10 and result["recall"] == 1.0
    assert result["stable"] > 0.85, "chatter leaves the memory block as it was"


def test_only_messages_of_this_channel_that_left_the_window_and_follow_the_reset_are_searched(memory):
    for n in range(50, 60):
        keep(memory, n, f"unrelated chatter {n}")
    keep(memory, 10, "Pixel the cat is asleep")
    keep(memory, 20, "Pixel the cat is asleep", channel_id=2)
    keep(memory, 30, "Pixel the cat is asleep")
    keep(memory, 40, "Pixel the cat is asleep")
    found = memory.search(1, "where is Pixel the cat?", before=40, after=10)
    assert [m.message_id for m in found] == [30], "10 is before the reset, 20 elsewhere, 40 still in the window"


def test_recall_is_sticky_within_a_window_and_rebuilt_when_it_restarts(memory):
    keep(memory, 10, "my sister is called Juniper")
    keep(memory, 11, "the spare key is under the blue flowerpot")
    for n in range(12, 40):
        keep(memory, n, f"chatter number {n} about nothing much")
    first = memory.recall(1, "what's my sister called?", window_start=30)
    assert [m.message_id for m in first] == [10]
    assert memory.recall(1, "lol ok", window_start=30) == first, "recalling nothing new keeps the block"
    both = memory.recall(1, "where is the spare key?", window_start=30)
    assert [m.message_id for m in both] == [10, 11]
    assert memory.recall(1, "lol ok", window_start=35) == [], "a restarted window starts a new block"


def test_recall_stays_within_its_character_budget_dropping_the_oldest_recalled(memory):
    for n in range(10):
        keep(memory, 10 + n, f"fact{n} " + "words " * 40)
    for n in range(10):
        recalled = memory.recall(1, f"fact{n}?", window_start=100)
    assert sum(len(m.line()) + 1 for m in recalled) <= 400
    assert recalled[-1].message_id == 19 and 10 not in {m.message_id for m in recalled}


def test_retention_keeps_the_newest_rows_and_drops_old_ones(tmp_path):
    state = State(tmp_path / "bot.db")
    memory = Memory(state, max_rows=5, max_days=1)
    now = time.time()
    for n in range(8):
        keep(memory, 100 + n, f"message {n} about sailing", at=now)
    keep(memory, 50, "an ancient message about sailing", at=now - 3 * 86400)
    keep(memory, 60, "another channel about sailing", channel_id=2, at=now)
    assert memory.prune(1) == 4
    assert [m.message_id for m in memory.search(1, "sailing", before=1000, limit=10)] != []
    left = state.sql("SELECT message_id FROM messages ORDER BY message_id")
    assert [r[0] for r in left] == [60, 103, 104, 105, 106, 107]
    assert state.sql("SELECT count(*) FROM messages_fts WHERE messages_fts MATCH 'ancient'")[0][0] == 0


def test_forget_deletes_a_persons_messages_and_notes_and_their_recalled_lines(memory):
    keep(memory, 10, "my sister is called Juniper")
    keep(memory, 11, "Bob's sister is called Maple", author="Bob", author_id=2)
    memory.set_note(9, 1, "Brine", "has a sister, Juniper")
    assert len(memory.recall(1, "sister called?", window_start=50)) == 2
    count, notes, latest = memory.about(1)
    assert count == 1 and notes == {"Brine": "has a sister, Juniper"} and latest[0].content.endswith("Juniper")
    assert memory.forget_user(1) == 1
    assert memory.about(1) == (0, {}, [])
    assert [m.author_name for m in memory.recall(1, "lol", window_start=50)] == ["Bob"], "left the block too"
    assert memory.notes(9, "Brine", [1, 2]) == {}


def test_edits_and_deletions_on_discord_reach_the_index(memory):
    keep(memory, 10, "the password is tangerine")
    keep(memory, 10, "the password is tangerine")  # seen twice: still one index row
    fts = memory.state.sql("SELECT count(*) FROM messages_fts WHERE messages_fts MATCH 'tangerine'")
    assert fts[0][0] == 1
    assert [m.content for m in memory.recall(1, "password tangerine", window_start=50)] == ["the password is tangerine"]
    memory.revise(10, "the password is grapefruit")
    assert memory.search(1, "tangerine", before=50) == []
    assert [m.content for m in memory.search(1, "grapefruit", before=50)] == ["the password is grapefruit"]
    assert [m.content for m in memory.recall(1, "lol", window_start=50)] == ["the password is grapefruit"]
    memory.revise(99, "never kept")
    assert memory.state.sql("SELECT count(*) FROM messages")[0][0] == 1, "an edit of an unkept message keeps nothing"
    assert memory.forget_messages([10, 11]) == 1
    assert memory.search(1, "grapefruit", before=50) == [] and memory.recall(1, "lol", window_start=50) == []


def test_forget_guild_keeps_other_guilds_and_dms(memory):
    keep(memory, 10, "guild nine secret")
    keep(memory, 11, "guild eight secret", guild_id=8)
    keep(memory, 12, "dm secret", guild_id=None, channel_id=3)
    assert memory.forget_guild(9) == 1
    assert [m.message_id for m in memory.said_by(1)] == [11, 12]


def test_block_and_note_helpers():
    line = Remembered(1, "Alice", "my  cat\nis Pixel", 0.0)
    text = block([line], {"Alice": "likes cats"})
    assert "- Alice (1970-01-01): my cat is Pixel" in text and "- Alice: likes cats" in text
    assert block([], {}) == ""
    prompt = note_prompt("Alice", [line], "likes cats")
    assert prompt[0]["role"] == "user"
    assert "my cat is Pixel" in prompt[0]["content"] and "likes cats" in prompt[0]["content"]
    assert clean_note('\n  - "Has a cat named Pixel."\nMore text') == "Has a cat named Pixel."
