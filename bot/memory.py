"""Long-term memory: past messages stay searchable after they leave the context window, and short notes about
the people a persona talks to.

Messages live in the state database (``bot.state``, tables ``messages``/``messages_fts``/``notes``) and are
searched with SQLite FTS5, ranked by BM25. Recall is per channel: a guild's channels have their own
permissions, so a message from one must not surface in another where its readers may not see it.

Recalled messages go into the system message (``bot.prompt.assemble``'s context), the very start of the prompt,
so a block that changed on every message would throw away the engine's prefix cache every turn. The block is
therefore *sticky*: it is rebuilt only when the channel's context window restarts (which invalidates the cache
anyway), and between restarts a message only appends memories not already in it; chatter that recalls nothing
new leaves the prompt's start byte-for-byte the same. ``bench/memory.py`` measures both the recall rate and how
often the prompt's start stays the same.

Every method here is synchronous SQL or bookkeeping for the state thread (``State.run``).
"""
from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone

from .state import State

# Words too common to say what a message is about; searching for them ranks noise.
STOPWORDS = frozenset("""
a about above after again all also am an and any are as at be because been before being below between both but
by can could did do does doing down during each few for from further had has have having he her here hers herself
him himself his how i if in into is it its itself just me more most my myself no nor not now of off on once only
or other our ours out over own same she should so some such than that the their theirs them then there these they
this those through to too under until up very was we were what when where which while who whom why will with would
you your yours yourself yourselves yes yeah ok okay oh hey hi hello lol please thanks thank tell know remember said
say like get got one really think dont don't im i'm it's whats what's thats that's
""".split())
MAX_QUOTE = 300  # characters of one remembered message shown in the prompt


@dataclass(frozen=True)
class Remembered:
    message_id: int
    author_name: str
    content: str
    at: float

    def line(self) -> str:
        day = datetime.fromtimestamp(self.at, timezone.utc).strftime("%Y-%m-%d")
        text = " ".join(self.content.split())
        return f"- {self.author_name} ({day}): {text[:MAX_QUOTE]}"


def terms(text: str, ignore: Iterable[str] = ()) -> list[str]:
    """The words of ``text`` worth searching for, in order, once each."""
    skip = STOPWORDS | {word.lower() for name in ignore for word in re.findall(r"\w+", name)}
    words = [w for w in re.findall(r"\w+", text.lower()) if len(w) > 2 and w not in skip and not w.isdigit()]
    return list(dict.fromkeys(words))


class Memory:
    """What is kept about past messages and people, bounded by ``max_rows`` per channel and ``max_days``."""

    def __init__(self, state: State, *, budget_chars: int = 1200, max_rows: int = 20_000, max_days: float = 180.0,
                 hits: int = 3, coverage: float = 0.5) -> None:
        self.state = state
        self.coverage = coverage
        self.budget_chars = budget_chars
        self.max_rows = max_rows
        self.max_days = max_days
        self.hits = hits
        self._sticky: dict[int, tuple[int, list[Remembered]]] = {}
        """channel -> (the oldest message in its context window, memories recalled into the window so far)"""
        self._since_prune: dict[int, int] = {}

    # writing

    def keep(self, *, message_id: int, guild_id: int | None, channel_id: int, author_id: int, author_name: str,
             content: str, at: float | None = None) -> None:
        """Store one message; every 100 messages of a channel, drop what is over the retention bounds."""
        if not content.strip():
            return
        # an upsert, not INSERT OR REPLACE: REPLACE's implicit delete fires no trigger, leaving a stale index row
        self.state.sql("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (message_id) DO UPDATE SET "
                       "content = excluded.content, author_name = excluded.author_name",
                       (message_id, guild_id, channel_id, author_id, author_name, content, at or time.time()))
        count = self._since_prune[channel_id] = self._since_prune.get(channel_id, 0) + 1
        if count >= 100:
            self.prune(channel_id)

    def prune(self, channel_id: int, now: float | None = None) -> int:
        """Keep the newest ``max_rows`` messages of the channel that are younger than ``max_days``."""
        self._since_prune[channel_id] = 0
        cutoff = (now or time.time()) - self.max_days * 86400
        old = self.state.sql(
            "DELETE FROM messages WHERE channel_id = ? AND (at < ? OR message_id IN ("
            "  SELECT message_id FROM messages WHERE channel_id = ? ORDER BY message_id DESC LIMIT -1 OFFSET ?))"
            " RETURNING message_id", (channel_id, cutoff, channel_id, self.max_rows))
        return len(old)

    def revise(self, message_id: int, content: str) -> None:
        """The author edited a kept message: recall the words they stand by now (nothing if it was not kept)."""
        self.state.sql("UPDATE messages SET content = ? WHERE message_id = ?", (content, message_id))
        self._sticky = {c: (s, [Remembered(m.message_id, m.author_name, content, m.at) if m.message_id == message_id
                                else m for m in kept]) for c, (s, kept) in self._sticky.items()}

    def set_note(self, guild_id: int | None, user_id: int, persona: str, note: str) -> None:
        self.state.sql("INSERT OR REPLACE INTO notes VALUES (?, ?, ?, ?, ?)",
                       (guild_id or 0, user_id, persona, note.strip(), time.time()))

    # reading

    def search(self, channel_id: int, query: str, *, before: int, after: int = 0, ignore: Iterable[str] = (),
               limit: int | None = None) -> list[Remembered]:
        """The channel's messages strictly between ``after`` and ``before`` that are about what ``query`` is
        about, best (BM25) first.

        BM25 ranks any message sharing one word above nothing, so "my cat is a long story" would recall every
        past message with "story" in it. A hit must therefore contain the rarest query word that any candidate
        has, carry at least ``coverage`` of the query's weight (each word weighted by its inverse document
        frequency), and say more than the query itself (chatter repeated word for word recalls nothing).
        """
        words = terms(query, ignore)
        if not words:
            return []
        rows = self.state.sql(
            "SELECT m.message_id, m.author_name, m.content, m.at FROM messages_fts JOIN messages m "
            "ON m.message_id = messages_fts.rowid WHERE messages_fts MATCH ? AND m.channel_id = ? "
            "AND m.message_id < ? AND m.message_id > ? ORDER BY bm25(messages_fts) LIMIT ?",
            (" OR ".join(f'"{w}"' for w in words), channel_id, before, after, 4 * (limit or self.hits)))
        if not rows:
            return []
        ids = [r["message_id"] for r in rows]
        total = self.state.sql("SELECT count(*) FROM messages")[0][0]
        weight, found = {}, {}
        for word in words:
            count = self.state.sql("SELECT count(*) FROM messages_fts WHERE messages_fts MATCH ?", (f'"{word}"',))[0][0]
            if not count:  # a word no kept message has cannot pick among them: it would only dilute coverage
                continue
            weight[word] = math.log((total - count + 0.5) / (count + 0.5) + 1)
            found[word] = {r[0] for r in self.state.sql(
                f"SELECT rowid FROM messages_fts WHERE messages_fts MATCH ? AND rowid IN ({', '.join('?' * len(ids))})",
                (f'"{word}"', *ids))}
        present = [word for word in weight if found[word]]  # words the candidates (in range) have at all
        if not present:
            return []
        whole, rarest, same = sum(weight.values()), max(present, key=weight.__getitem__), _normal(query)
        hits = [Remembered(r["message_id"], r["author_name"], r["content"], r["at"]) for r in rows
                if r["message_id"] in found[rarest] and _normal(r["content"]) != same
                and sum(w for word, w in weight.items() if r["message_id"] in found[word]) >= self.coverage * whole]
        return hits[:limit or self.hits]

    def recall(self, channel_id: int, query: str, *, window_start: int, after: int = 0,
               ignore: Iterable[str] = ()) -> list[Remembered]:
        """Memories for a reply whose context begins at message ``window_start``: the sticky block (see the
        module docstring) plus what ``query`` finds that is new, oldest-recalled dropped beyond the budget."""
        start, kept = self._sticky.get(channel_id, (None, []))
        if start != window_start:
            kept = []
        known = {m.message_id for m in kept}
        new = [m for m in self.search(channel_id, query, before=window_start, after=after, ignore=ignore)
               if m.message_id not in known]
        if new:
            kept = [*kept, *new]
            while kept and sum(len(m.line()) + 1 for m in kept) > self.budget_chars:
                kept = kept[1:]
        self._sticky[channel_id] = (window_start, kept)
        return sorted(kept, key=lambda m: m.message_id)

    def notes(self, guild_id: int | None, persona: str, user_ids: Iterable[int]) -> dict[int, str]:
        ids = list(dict.fromkeys(user_ids))
        if not ids:
            return {}
        rows = self.state.sql(
            f"SELECT user_id, note FROM notes WHERE guild_id = ? AND persona = ? AND user_id IN "
            f"({', '.join('?' * len(ids))})", (guild_id or 0, persona, *ids))
        return {r["user_id"]: r["note"] for r in rows}

    def said_by(self, user_id: int, limit: int = 20) -> list[Remembered]:
        """``user_id``'s newest kept messages, oldest first."""
        rows = self.state.sql("SELECT message_id, author_name, content, at FROM messages WHERE author_id = ? "
                              "ORDER BY message_id DESC LIMIT ?", (user_id, limit))
        return [Remembered(r["message_id"], r["author_name"], r["content"], r["at"]) for r in rows][::-1]

    def about(self, user_id: int) -> tuple[int, dict[str, str], list[Remembered]]:
        """What is kept about ``user_id`` anywhere: (messages kept, persona -> note, the newest few)."""
        count = self.state.sql("SELECT count(*) FROM messages WHERE author_id = ?", (user_id,))[0][0]
        notes = {r["persona"]: r["note"] for r in self.state.sql("SELECT persona, note FROM notes WHERE user_id = ?",
                                                                 (user_id,))}
        return count, notes, self.said_by(user_id, 5)

    # deleting

    def forget_user(self, user_id: int) -> int:
        """Delete everything kept about ``user_id`` (their messages and notes about them), everywhere."""
        gone = {r[0] for r in self.state.sql("DELETE FROM messages WHERE author_id = ? RETURNING message_id",
                                             (user_id,))}
        self.state.sql("DELETE FROM notes WHERE user_id = ?", (user_id,))
        self._forget_recalled(gone)
        return len(gone)

    def forget_messages(self, message_ids: Iterable[int]) -> int:
        """Messages deleted on Discord are deleted here too."""
        ids = list(message_ids)
        if not ids:
            return 0
        gone = {r[0] for r in self.state.sql(
            f"DELETE FROM messages WHERE message_id IN ({', '.join('?' * len(ids))}) RETURNING message_id", tuple(ids))}
        self._forget_recalled(gone)
        return len(gone)

    def forget_guild(self, guild_id: int) -> int:
        """Delete every message and note kept from ``guild_id`` (memory turned off there)."""
        gone = {r[0] for r in self.state.sql("DELETE FROM messages WHERE guild_id = ? RETURNING message_id",
                                             (guild_id,))}
        self.state.sql("DELETE FROM notes WHERE guild_id = ?", (guild_id,))
        self._forget_recalled(gone)
        return len(gone)

    def _forget_recalled(self, gone: set[int]) -> None:
        """Deleted messages leave the sticky blocks too, so the next prompt cannot quote them."""
        self._sticky = {c: (s, [m for m in kept if m.message_id not in gone]) for c, (s, kept) in self._sticky.items()}


def _normal(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def block(memories: list[Remembered], notes: dict[str, str]) -> str:
    """The system-context block for recalled messages and notes (``name -> note``); empty when there are none."""
    parts = []
    if memories:
        parts.append("Earlier in this channel (older messages you may recall, quoted as they were said):\n"
                     + "\n".join(m.line() for m in memories))
    if notes:
        parts.append("Your notes about people here:\n" + "\n".join(f"- {n}: {t}" for n, t in sorted(notes.items())))
    return "\n\n".join(parts)


def note_prompt(name: str, said: list[Remembered], previous: str | None) -> list[dict[str, str]]:
    """The request for a one-line note about ``name`` (sent through ``engine.complete``, off the hot path)."""
    lines = "\n".join(f"- {' '.join(m.content.split())[:MAX_QUOTE]}" for m in said)
    known = f"\nYour note so far: {previous}" if previous else ""
    return [{"role": "user", "content": (
        f"(Out of character.) Here is what {name} said recently:\n{lines}{known}\n\nWrite one short line you "
        f"should remember about {name} (facts they told you, what they care about). Only the note, no preamble.")}]


def clean_note(text: str) -> str:
    """The first non-empty line of the engine's answer, at most 200 characters."""
    line = next((part.strip(" -*\"'") for part in text.splitlines() if part.strip()), "")
    return line[:200]
