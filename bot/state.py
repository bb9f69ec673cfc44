"""What the bot must not forget across restarts, in one embedded SQLite file (``STATE_DB``).

Resets, context-window floors, persona swaps the owner asked to keep, /converse sessions, per-channel and
per-guild settings, each channel's reply with buttons and its swipes, and long-term memory (``bot.memory`` owns those tables' queries). The schema is versioned:
``MIGRATIONS[i]`` takes a database from version ``i`` to ``i + 1``, each applied once, in a transaction.

All SQL runs on one worker thread (``State.run``): sqlite3 connections must not be shared across threads
unsynchronised, and one writer is what SQLite serialises to anyway; the event loop only awaits. WAL mode lets
readers (a second process inspecting the file, a backup) proceed while the bot writes.
"""
from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

MIGRATIONS: tuple[str, ...] = (
    # 1: what PersonaBot kept in memory, and runtime choices
    """
    CREATE TABLE channel_state (
        channel_id INTEGER PRIMARY KEY,
        reset_after INTEGER,            -- snowflake: messages at or before it are no longer context
        window_floor INTEGER            -- snowflake: the newest message that has left the context window
    );
    CREATE TABLE swaps (
        persona TEXT PRIMARY KEY COLLATE NOCASE,
        bundle TEXT NOT NULL,
        by_user INTEGER NOT NULL,
        at REAL NOT NULL
    );
    CREATE TABLE sessions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        channel_id INTEGER NOT NULL,
        personas TEXT NOT NULL,         -- JSON list of persona names, in speaking order
        topic TEXT NOT NULL,
        turns INTEGER NOT NULL,
        spoken INTEGER NOT NULL DEFAULT 0,
        status TEXT NOT NULL,           -- running | ended | interrupted
        reason TEXT NOT NULL DEFAULT '',
        started_by TEXT NOT NULL,
        started_at REAL NOT NULL,
        ended_at REAL
    );
    CREATE TABLE channel_settings (
        channel_id INTEGER PRIMARY KEY,
        group_chat INTEGER NOT NULL DEFAULT 0,
        temperature REAL,
        max_new_tokens INTEGER
    );
    """,
    # 2: long-term memory (bot.memory): past messages searchable with FTS5, notes about people, a guild switch
    """
    CREATE TABLE messages (
        message_id INTEGER PRIMARY KEY,
        guild_id INTEGER,               -- NULL in DMs
        channel_id INTEGER NOT NULL,
        author_id INTEGER NOT NULL,
        author_name TEXT NOT NULL,
        content TEXT NOT NULL,
        at REAL NOT NULL
    );
    CREATE INDEX messages_channel ON messages (channel_id, message_id);
    CREATE INDEX messages_author ON messages (author_id);
    CREATE VIRTUAL TABLE messages_fts USING fts5(
        content, content='messages', content_rowid='message_id', tokenize='porter unicode61'
    );
    CREATE TRIGGER messages_ai AFTER INSERT ON messages BEGIN
        INSERT INTO messages_fts (rowid, content) VALUES (new.message_id, new.content);
    END;
    CREATE TRIGGER messages_ad AFTER DELETE ON messages BEGIN
        INSERT INTO messages_fts (messages_fts, rowid, content) VALUES ('delete', old.message_id, old.content);
    END;
    CREATE TRIGGER messages_au AFTER UPDATE OF content ON messages BEGIN
        INSERT INTO messages_fts (messages_fts, rowid, content) VALUES ('delete', old.message_id, old.content);
        INSERT INTO messages_fts (rowid, content) VALUES (new.message_id, new.content);
    END;
    CREATE TABLE notes (
        guild_id INTEGER NOT NULL,      -- 0 for DMs
        user_id INTEGER NOT NULL,
        persona TEXT NOT NULL,
        note TEXT NOT NULL,
        at REAL NOT NULL,
        PRIMARY KEY (guild_id, user_id, persona)
    );
    CREATE TABLE guild_settings (
        guild_id INTEGER PRIMARY KEY,
        memory INTEGER NOT NULL DEFAULT 1
    );
    """,
    # 3: the latest reply of each channel that carries regenerate/continue buttons (bot.buttons), and its swipes
    """
    CREATE TABLE replies (
        message_id INTEGER PRIMARY KEY, -- the reply's message, which carries the buttons
        channel_id INTEGER NOT NULL UNIQUE,
        persona TEXT NOT NULL,
        asked_by INTEGER NOT NULL,      -- who may press them (besides admins)
        source_id INTEGER NOT NULL,     -- the message it answers
        swipes TEXT NOT NULL,           -- JSON list of every text generated for it, oldest first
        shown INTEGER NOT NULL          -- the swipe on screen
    );
    """,
)
LATEST = len(MIGRATIONS)


class StateError(RuntimeError):
    """The state database cannot be opened or is newer than this code."""


@dataclass(frozen=True)
class ChannelSettings:
    """What ``/persona settings`` sets for one channel; ``None`` means the persona's own default."""

    group_chat: bool = False
    temperature: float | None = None
    max_new_tokens: int | None = None


@dataclass
class ReplyRecord:
    """A reply with buttons: what was generated for it, and which text is on screen."""

    message_id: int
    channel_id: int
    persona: str
    asked_by: int
    source_id: int
    swipes: list[str]
    shown: int = 0


@dataclass(frozen=True)
class SessionRecord:
    id: int
    channel_id: int
    personas: list[str]
    topic: str
    turns: int
    spoken: int
    status: str
    reason: str


class State:
    """The bot's SQLite database: created (and migrated) on open; every method is synchronous and short, and
    the bot calls them through ``await state.run(method, ...)`` so the event loop never blocks on disk."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            if str(path) != ":memory:":
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise StateError(f"STATE_DB={path}: cannot open the state database: {exc} (check the path)") from exc
        self._lock = threading.Lock()  # tests and startup call methods directly, the bot through run()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="state")
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at each checkpoint, no fsync per write
        self.db.execute("PRAGMA foreign_keys=ON")
        self.migrate()

    # plumbing

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` (a method of this object) on the state thread."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    def close(self) -> None:
        self._worker.shutdown(wait=True)
        with self._lock:
            self.db.close()

    def sql(self, query: str, params: tuple | dict = ()) -> list[sqlite3.Row]:
        """One statement, committed at once (autocommit)."""
        with self._lock:
            return self.db.execute(query, params).fetchall()

    def transaction(self, statements: list[tuple[str, tuple]]) -> None:
        """Several statements, all or none."""
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for query, params in statements:
                    self.db.execute(query, params)
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    @property
    def version(self) -> int:
        rows = self.sql("SELECT name FROM sqlite_master WHERE type='table' AND name='schema_version'")
        return self.sql("SELECT version FROM schema_version")[0]["version"] if rows else 0

    def migrate(self) -> None:
        """Apply the migrations this database has not had, each in its own transaction."""
        self.sql("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        if not self.sql("SELECT version FROM schema_version"):
            self.sql("INSERT INTO schema_version VALUES (0)")
        current = self.version
        if current > LATEST:
            raise StateError(f"STATE_DB={self.path}: schema version {current} is newer than this code knows "
                             f"({LATEST}); upgrade personabot or point STATE_DB at another file")
        for version in range(current, LATEST):
            with self._lock:
                self.db.execute("BEGIN IMMEDIATE")
                try:
                    for statement in _statements(MIGRATIONS[version]):
                        self.db.execute(statement)
                    self.db.execute("UPDATE schema_version SET version = ?", (version + 1,))
                except BaseException:
                    self.db.execute("ROLLBACK")
                    raise
                self.db.execute("COMMIT")

    # resets and context windows

    def floors(self) -> tuple[dict[int, int], dict[int, int]]:
        """(channel -> reset marker, channel -> window floor), as PersonaBot keeps them in memory."""
        rows = self.sql("SELECT channel_id, reset_after, window_floor FROM channel_state")
        return ({r["channel_id"]: r["reset_after"] for r in rows if r["reset_after"] is not None},
                {r["channel_id"]: r["window_floor"] for r in rows if r["window_floor"] is not None})

    def set_reset(self, channel_id: int, marker: int) -> None:
        """A reset also restarts the channel's context window."""
        self.sql("INSERT INTO channel_state (channel_id, reset_after, window_floor) VALUES (?, ?, NULL) "
                 "ON CONFLICT (channel_id) DO UPDATE SET reset_after = excluded.reset_after, window_floor = NULL",
                 (channel_id, marker))

    def set_window(self, channel_id: int, floor: int) -> None:
        self.sql("INSERT INTO channel_state (channel_id, window_floor) VALUES (?, ?) "
                 "ON CONFLICT (channel_id) DO UPDATE SET window_floor = excluded.window_floor", (channel_id, floor))

    # persona swaps kept across restarts

    def swaps(self) -> dict[str, str]:
        return {r["persona"]: r["bundle"] for r in self.sql("SELECT persona, bundle FROM swaps")}

    def keep_swap(self, persona: str, bundle: str, by_user: int) -> None:
        self.sql("INSERT OR REPLACE INTO swaps VALUES (?, ?, ?, ?)", (persona, bundle, by_user, time.time()))

    def drop_swap(self, persona: str) -> None:
        self.sql("DELETE FROM swaps WHERE persona = ?", (persona,))

    # /converse sessions

    def start_session(self, channel_id: int, personas: list[str], topic: str, turns: int, started_by: str) -> int:
        rows = self.sql(
            "INSERT INTO sessions (channel_id, personas, topic, turns, status, started_by, started_at) "
            "VALUES (?, ?, ?, ?, 'running', ?, ?) RETURNING id",
            (channel_id, json.dumps(personas), topic, turns, started_by, time.time()))
        return int(rows[0]["id"])

    def session_spoke(self, session_id: int, spoken: int) -> None:
        self.sql("UPDATE sessions SET spoken = ? WHERE id = ?", (spoken, session_id))

    def end_session(self, session_id: int, reason: str, status: str = "ended") -> None:
        self.sql("UPDATE sessions SET status = ?, reason = ?, ended_at = ? WHERE id = ? AND status = 'running'",
                 (status, reason, time.time(), session_id))

    def interrupt_sessions(self) -> list[SessionRecord]:
        """At startup: sessions still 'running' were cut off by the last shutdown or crash; mark and return
        them (so the bot can say so)."""
        rows = self.sql("UPDATE sessions SET status = 'interrupted', reason = 'the bot restarted', ended_at = ? "
                        "WHERE status = 'running' RETURNING *", (time.time(),))
        return [_session(r) for r in rows]

    def sessions(self, channel_id: int) -> list[SessionRecord]:
        rows = self.sql("SELECT * FROM sessions WHERE channel_id = ? ORDER BY id", (channel_id,))
        return [_session(r) for r in rows]

    # per-channel and per-guild settings

    def channel_settings(self) -> dict[int, ChannelSettings]:
        return {r["channel_id"]: ChannelSettings(bool(r["group_chat"]), r["temperature"], r["max_new_tokens"])
                for r in self.sql("SELECT * FROM channel_settings")}

    def set_channel_settings(self, channel_id: int, settings: ChannelSettings) -> None:
        self.sql("INSERT OR REPLACE INTO channel_settings VALUES (?, ?, ?, ?)",
                 (channel_id, int(settings.group_chat), settings.temperature, settings.max_new_tokens))

    # replies with buttons (one per channel: the latest)

    def offer_reply(self, record: ReplyRecord) -> ReplyRecord | None:
        """Make ``record`` its channel's reply with buttons; returns the one it replaces (to strip its buttons)."""
        rows = self.sql("SELECT * FROM replies WHERE channel_id = ? AND message_id != ?",
                        (record.channel_id, record.message_id))
        self.transaction([
            ("DELETE FROM replies WHERE channel_id = ?", (record.channel_id,)),
            ("INSERT INTO replies VALUES (?, ?, ?, ?, ?, ?, ?)", (
                record.message_id, record.channel_id, record.persona, record.asked_by, record.source_id,
                json.dumps(record.swipes), record.shown)),
        ])
        return _reply(rows[0]) if rows else None

    def reply_record(self, message_id: int) -> ReplyRecord | None:
        rows = self.sql("SELECT * FROM replies WHERE message_id = ?", (message_id,))
        return _reply(rows[0]) if rows else None

    def update_reply(self, record: ReplyRecord) -> None:
        self.sql("UPDATE replies SET swipes = ?, shown = ? WHERE message_id = ?",
                 (json.dumps(record.swipes), record.shown, record.message_id))

    def memory_off_guilds(self) -> set[int]:
        return {r["guild_id"] for r in self.sql("SELECT guild_id FROM guild_settings WHERE memory = 0")}

    def set_guild_memory(self, guild_id: int, on: bool) -> None:
        self.sql("INSERT OR REPLACE INTO guild_settings VALUES (?, ?)", (guild_id, int(on)))


def _statements(script: str) -> list[str]:
    """A migration's statements, one at a time inside the migration's transaction (``executescript`` would
    commit on its own); ``sqlite3.complete_statement`` keeps trigger bodies whole."""
    statements, current = [], ""
    for piece in script.split(";"):
        current += piece + ";"
        if sqlite3.complete_statement(current):
            if current.strip(" \n;"):
                statements.append(current.strip())
            current = ""
    return statements


def _reply(row: sqlite3.Row) -> ReplyRecord:
    return ReplyRecord(row["message_id"], row["channel_id"], row["persona"], row["asked_by"], row["source_id"],
                       json.loads(row["swipes"]), row["shown"])


def _session(row: sqlite3.Row) -> SessionRecord:
    return SessionRecord(row["id"], row["channel_id"], json.loads(row["personas"]), row["topic"], row["turns"],
                         row["spoken"], row["status"], row["reason"])
