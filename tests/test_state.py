"""The state database: created on first open, migrated once per version, everything kept across a reopen."""
from __future__ import annotations

import asyncio
import sqlite3

import pytest

from bot import state as state_module
from bot.state import LATEST, MIGRATIONS, ChannelSettings, ReplyRecord, State, StateError


def test_first_open_creates_the_latest_schema_in_wal_mode(tmp_path):
    state = State(tmp_path / "sub" / "bot.db")
    assert state.version == LATEST == len(MIGRATIONS)
    assert state.sql("PRAGMA journal_mode")[0][0] == "wal"
    state.close()
    again = State(tmp_path / "sub" / "bot.db")  # reopening applies nothing twice
    assert again.version == LATEST
    again.close()


def test_a_v1_database_upgrades_to_the_latest_keeping_its_rows(tmp_path, monkeypatch):
    path = tmp_path / "old.db"
    monkeypatch.setattr(state_module, "LATEST", 1)
    old = State(path)
    assert old.version == 1
    old.set_reset(7, 1000)
    old.keep_swap("Brine", "/bundles/brine-v2", by_user=1)
    old.close()
    assert "messages" not in {r[0] for r in sqlite3.connect(path).execute("SELECT name FROM sqlite_master")}
    monkeypatch.undo()
    new = State(path)
    assert new.version == LATEST
    assert new.floors() == ({7: 1000}, {}) and new.swaps() == {"Brine": "/bundles/brine-v2"}
    new.sql("INSERT INTO messages VALUES (1, 2, 7, 3, 'Alice', 'the tide is high', 0)")
    assert new.sql("SELECT rowid FROM messages_fts WHERE messages_fts MATCH 'tide'")[0][0] == 1
    new.close()


def test_a_failing_migration_leaves_the_database_at_the_previous_version(tmp_path, monkeypatch):
    monkeypatch.setattr(state_module, "MIGRATIONS", (*MIGRATIONS, "CREATE TABLE ok (x); CREATE TABLE ok (x);"))
    monkeypatch.setattr(state_module, "LATEST", LATEST + 1)
    with pytest.raises(sqlite3.OperationalError):
        State(tmp_path / "bot.db")
    monkeypatch.undo()
    state = State(tmp_path / "bot.db")
    assert state.version == LATEST and not state.sql("SELECT name FROM sqlite_master WHERE name = 'ok'")


def test_a_database_from_newer_code_is_refused(tmp_path):
    state = State(tmp_path / "bot.db")
    state.sql("UPDATE schema_version SET version = ?", (LATEST + 1,))
    state.close()
    with pytest.raises(StateError, match="newer than this code"):
        State(tmp_path / "bot.db")


def test_everything_survives_a_reopen(tmp_path):
    state = State(tmp_path / "bot.db")
    state.set_window(5, 900)
    state.set_reset(6, 1000)
    state.set_window(6, 1200)
    state.set_reset(6, 1500)  # a reset restarts the window too
    state.keep_swap("brine", "/b/v2", by_user=9)
    state.keep_swap("Brine", "/b/v3", by_user=9)  # persona names are case-insensitive
    session = state.start_session(5, ["Brine", "Coral"], "tides", 6, "Alice")
    state.session_spoke(session, 2)
    state.set_channel_settings(5, ChannelSettings(group_chat=True, temperature=0.3, max_new_tokens=80))
    state.set_guild_memory(42, False)
    state.close()
    state = State(tmp_path / "bot.db")
    assert state.floors() == ({6: 1500}, {5: 900})
    assert state.swaps() == {"Brine": "/b/v3"}
    interrupted = state.interrupt_sessions()
    assert [(s.id, s.spoken, s.status, s.reason) for s in interrupted] == [
        (session, 2, "interrupted", "the bot restarted")]
    assert state.interrupt_sessions() == [], "marked once"
    assert state.channel_settings() == {5: ChannelSettings(True, 0.3, 80)}
    assert state.memory_off_guilds() == {42}
    state.drop_swap("BRINE")
    assert state.swaps() == {}


def test_an_ended_session_is_not_reported_as_interrupted(tmp_path):
    state = State(tmp_path / "bot.db")
    done = state.start_session(5, ["Brine", "Coral"], "tides", 2, "Alice")
    state.end_session(done, "turn budget spent")
    assert state.interrupt_sessions() == []
    assert state.sessions(5)[0].status == "ended"


def test_calls_from_the_event_loop_run_on_the_state_thread(tmp_path):
    state = State(tmp_path / "bot.db")

    async def main() -> None:
        await asyncio.gather(*(state.run(state.set_window, channel, channel * 10) for channel in range(50)))
        assert (await state.run(state.floors))[1] == {c: c * 10 for c in range(50)}

    asyncio.run(main())


def test_an_unusable_path_names_the_setting(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(StateError, match="STATE_DB=.*cannot open"):
        State(tmp_path / "file" / "bot.db")


def test_each_channel_keeps_one_reply_with_buttons(tmp_path):
    state = State(tmp_path / "bot.db")
    first = ReplyRecord(100, 5, "Brine", 1, 99, ["take 1"])
    assert state.offer_reply(first) is None
    first.swipes.append("take 2")
    first.shown = 1
    state.update_reply(first)
    assert state.offer_reply(ReplyRecord(200, 6, "Coral", 1, 199, ["x"])) is None, "another channel"
    replaced = state.offer_reply(ReplyRecord(300, 5, "Coral", 2, 299, ["y"]))
    assert replaced == ReplyRecord(100, 5, "Brine", 1, 99, ["take 1", "take 2"], 1)
    assert state.reply_record(100) is None and state.reply_record(300).persona == "Coral"
