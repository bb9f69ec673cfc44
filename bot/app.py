"""The running bot: personas, their Discord clients, one shared engine, and who answers what."""
from __future__ import annotations

import asyncio
import logging
import random
import re
from collections import OrderedDict, defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import discord

from finetune.bundle import BundleError, Manifest, Sampling

from . import buttons, permissions
from .backlog import Backlog
from .bundles import hide_paths, resolve_bundle
from .client import BotClient
from .commands import by_admin, register
from .config import ConfigError, PersonaSpec, Settings, persona_token
from .converse import ConverseSession
from .delivery import DeliveryError, persist
from .engine.base import Engine, EngineError
from .errors import CommandError
from .group import GroupChats, named
from .history import CHAT_TYPES, Speakers, clean_name, to_messages, window_start
from .memory import Memory, block, clean_note, note_prompt
from .prompt import assemble
from .queues import ChannelQueues
from .state import ChannelSettings, ReplyRecord, SessionRecord, State, StateError
from .streaming import EditLimiter, ReplyStream, ReplyTarget
from .voices import BotVoice, Voice, WebhookVoice, Webhooks

log = logging.getLogger(__name__)
TOPIC_CHARS = 300
CATCH_UP_CHANNELS, CATCH_UP_MESSAGES = 50, 50
"""After a new gateway session: how many recently active channels are read, how far."""
LAG_WAIT = 5.0
"""Seconds a message waits for a persona's client that has not yet heard of its channel to see it too."""
_HOST_PATH = re.compile(r"(?<![\w.<:/~])~?/(?:[^\s/`'\"]+/)+[^\s/`'\",:;)]*")
"""An absolute (or ~) path of two segments or more: ``/srv/bots/x``, not ``/persona``."""


class StartupError(RuntimeError):
    """The bot cannot start; the message names the persona and what to fix."""


class PersonaBot:
    """All personas in one process: clients grouped by token, replies queued per channel."""

    def __init__(
        self, settings: Settings, personas: list[PersonaSpec], engine: Engine | Callable[[], Engine], *,
        tokens: dict[str, str] | None = None, client_options: dict[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        self.personas = personas
        self._engine = engine
        self.limiter = EditLimiter(settings.edit_interval, settings.edits_per_second)
        self.queues = ChannelQueues()
        self.backlog = Backlog()
        self.sessions: dict[int, ConverseSession] = {}
        try:
            self.state = State(settings.state_db)
        except StateError as exc:
            raise StartupError(str(exc)) from exc
        self.memory = Memory(self.state, budget_chars=settings.memory_chars, max_rows=settings.memory_max_messages,
                             max_days=settings.memory_max_days)
        # read on every message, so kept in memory too; every change is written through to the state database
        self.resets, self.windows = self.state.floors()
        """channel id -> reset marker; channel id -> the newest message that has left its context window"""
        self.channel_settings: dict[int, ChannelSettings] = self.state.channel_settings()
        self.memory_off: set[int] = self.state.memory_off_guilds()
        self.group = GroupChats(settings.group_cap, settings.group_decay, settings.group_cooldown)
        self._rng = random.Random()  # which greeting opens a chat
        self._offers: dict[int, asyncio.Lock] = defaultdict(asyncio.Lock)
        """channel id -> held while buttons move to the channel's newest reply"""
        self._said: dict[tuple[int, int], int] = defaultdict(int)
        """(guild or 0, user) -> their messages kept since the last note about them"""
        self.streams: dict[int, set[ReplyStream]] = defaultdict(set)
        self.clients: list[BotClient] = []
        self.voices: list[Voice] = []
        self._tokens = tokens or {p.name: persona_token(p, settings) for p in personas}
        self._client_options = client_options or {}
        self._tasks: set[asyncio.Task] = set()
        self._seen: set[int] = set()
        self._seen_order: deque[int] = deque(maxlen=10_000)
        self._webhooks: list[Webhooks] = []  # of the clients that post as webhook personas
        self._last_seen: OrderedDict[int, int] = OrderedDict()  # channel -> its newest message seen
        self._sessions_started: set[BotClient] = set()  # clients past their first gateway session
        self._starters: dict[int, int] = {}  # channel -> who started its conversation
        self._busy: set[int] = set()  # channels told that their queue is full, until it drains
        self._asking: defaultdict[int, int] = defaultdict(int)  # user id -> their replies waiting or running
        self._told_users: set[int] = set()  # users told that they have too many waiting, until theirs drain
        self._told: dict[tuple[str, int], list[str]] = {}  # (persona, channel) -> the permissions it was told lack
        self._awaited: dict[tuple[int, BotClient], asyncio.Event] = {}  # (message, lagging client) -> seen by it
        self._build_clients()

    def _build_clients(self) -> None:
        """One client per distinct token; a token persona is that client's user, the rest post by webhook."""
        by_token: dict[str, list[PersonaSpec]] = defaultdict(list)
        for persona in self.personas:
            by_token[self._tokens[persona.name]].append(persona)
        for token, personas in by_token.items():
            owners = [p for p in personas if not p.webhook]
            if len(owners) > 1:
                names = " and ".join(f"'{p.name}' ({p.token_env})" for p in owners)
                raise ConfigError(f"personas {names} use the same bot token; give each its own, or use webhook mode")
            voices: list[Voice] = []  # this client's personas, filled once the client they speak through exists
            client = BotClient(
                token, self._label(personas), on_message=self.on_message, on_edit=self._revise,
                on_delete=self._forget, on_button=self.press, on_new_session=self._catch_up,
                add_commands=partial(register, app=self, voices=voices),
                command_guilds=self.settings.command_guilds, **self._client_options,
            )
            webhooks = Webhooks(client)
            if any(p.webhook for p in personas):
                self._webhooks.append(webhooks)
            voices += [BotVoice(p, client) if not p.webhook else WebhookVoice(p, client, webhooks) for p in personas]
            self.clients.append(client)
            self.voices += voices

    @staticmethod
    def _label(personas: list[PersonaSpec]) -> str:
        """How errors name a client: its personas and the variable its token came from."""
        owner = next((p for p in personas if not p.webhook), None)
        var = owner.token_env if owner else "DISCORD_TOKEN"
        return f"persona {', '.join(repr(p.name) for p in personas)} ({var})"

    @property
    def engine(self) -> Engine:
        if not isinstance(self._engine, Engine):
            raise RuntimeError("the engine is created by start()")
        return self._engine

    # lifecycle

    async def start(self) -> None:
        """Log in every client, create the engine if given a factory (tokens are checked before the slow model
        load), load every adapter, connect; errors name the persona and the fix."""
        await asyncio.gather(*(self._login(c) for c in self.clients))
        if not isinstance(self._engine, Engine):
            try:
                self._engine = await asyncio.to_thread(self._engine)
            except Exception as exc:  # whatever the backend raises (bad model, missing package): name the engine
                raise StartupError(f"cannot start the engine: {exc}") from exc
        for persona in self.personas:
            try:
                await self.engine.load_adapter(persona.name, persona.adapter)
            except (EngineError, BundleError, OSError) as exc:
                raise StartupError(f"persona '{persona.name}': cannot load adapter {persona.adapter}: {exc}") from exc
        interrupted = await self._restore()
        for client in self.clients:
            client.connection = asyncio.create_task(client.connect(), name=f"gateway {client.label}")
        await asyncio.gather(*(self._until_ready(c) for c in self.clients))
        await asyncio.gather(*(w.discover() for w in self._webhooks))
        for voice in self.voices:
            for guild in voice.client.guilds:
                if missing := permissions.lacking(guild.me.guild_permissions, voice.persona.webhook):
                    log.warning("persona %s in server %r (%s): the bot's role lacks %s; %s", voice.name,
                                guild.name, guild.id, ", ".join(missing), permissions.FIX)
        log.info("ready: %s", ", ".join(v.name for v in self.voices))
        for record in interrupted:
            await self._say_interrupted(record)

    async def _restore(self) -> list[SessionRecord]:
        """What the last run was told to keep: swaps the owner asked to keep serve again (a bundle that is no
        longer inside ADAPTERS_DIR, or no longer loads, is logged and the personas file's serves);
        conversations cut off by the shutdown are marked interrupted, and returned so the channels can be
        told once connected."""
        for name, bundle in (await self.state.run(self.state.swaps)).items():
            voice = self.voice(name)
            if voice is None:
                continue
            try:
                await self.engine.load_adapter(voice.name, self._kept_bundle(Path(bundle)))
            except CommandError as exc:
                log.error("persona %s: the kept swap to %s is refused (%s); serving %s", voice.name, bundle, exc,
                          voice.persona.adapter)
            except (EngineError, BundleError, OSError) as exc:
                log.error("persona %s: the kept swap to %s no longer loads (%s); serving %s", voice.name, bundle,
                          exc, voice.persona.adapter)
        interrupted = await self.state.run(self.state.interrupt_sessions)
        for record in interrupted:
            log.warning("conversation %d in channel %s (%s) was interrupted by the restart after %d of %d turns",
                        record.id, record.channel_id, " and ".join(record.personas), record.spoken, record.turns)
        return interrupted

    def _kept_bundle(self, path: Path) -> Path:
        """A kept swap's bundle, checked as /persona swap checks a name: the database may be older than
        ADAPTERS_DIR's current setting, or have been written by hand."""
        root = self.settings.adapters_dir.expanduser().resolve()
        if not path.is_absolute() or not path.is_relative_to(root):
            raise CommandError(f"not inside ADAPTERS_DIR {root}")
        return resolve_bundle(root, path.relative_to(root).as_posix())

    async def _say_interrupted(self, record: SessionRecord) -> None:
        """Tell the channel a conversation it was promised did not finish (people saw it stop mid-way)."""
        voice = self.voice(record.personas[0]) if record.personas else None
        channel = voice.client.get_channel(record.channel_id) if voice is not None else None
        if channel is None:
            return
        text = (f"⏹️ The conversation about *{record.topic}* was cut off by a restart after {record.spoken} of "
                f"{record.turns} turns; `/converse` starts a new one.")
        try:
            await persist(lambda: channel.send(text), f"the restart notice in channel {record.channel_id}",  # type: ignore[union-attr]
                          self.settings.delivery_deadline)
        except (discord.HTTPException, DeliveryError) as exc:
            log.warning("cannot tell channel %s about the interrupted conversation: %s", record.channel_id, exc)

    async def _login(self, client: BotClient) -> None:
        try:
            await client.login(client.login_token)
        except discord.LoginFailure as exc:
            raise StartupError(
                f"{client.label}: Discord rejected the bot token (401); copy it again from the Developer Portal "
                "(Bot -> Reset Token)"
            ) from exc
        except (discord.HTTPException, aiohttp.ClientError, OSError) as exc:
            raise StartupError(f"{client.label}: cannot log in to Discord: {exc}") from exc

    async def _until_ready(self, client: BotClient) -> None:
        assert client.connection is not None
        ready = asyncio.create_task(client.wait_until_ready())
        await asyncio.wait({client.connection, ready}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            self._raise_connection_error(client)

    @staticmethod
    def _raise_connection_error(client: BotClient) -> None:
        task = client.connection
        exc = task.exception() if task is not None and not task.cancelled() else None
        if isinstance(exc, discord.PrivilegedIntentsRequired):
            raise StartupError(
                f"{client.label}: the Message Content intent is not enabled; turn it on in the Developer Portal "
                "(your application -> Bot -> Privileged Gateway Intents -> Message Content Intent)"
            ) from exc
        raise StartupError(f"{client.label}: the Discord connection ended: {exc!r}") from exc

    async def run(self) -> None:
        """Start, then serve until a client's connection ends for good."""
        await self.start()
        await asyncio.wait({c.connection for c in self.clients if c.connection}, return_when=asyncio.FIRST_COMPLETED)
        for client in self.clients:
            if client.connection is not None and client.connection.done():
                self._raise_connection_error(client)

    async def close(self) -> None:
        for session in self.sessions.values():
            session.stop("shutting down")
        await self.queues.close()
        for task in self._tasks:  # before the clients close: work on a closed HTTP session only fails
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(c.close() for c in self.clients), return_exceptions=True)
        connections = [c.connection for c in self.clients if c.connection]
        for task in connections:
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)
        if isinstance(self._engine, Engine):
            await self._engine.close()
        await asyncio.to_thread(self.state.close)

    # who answers what

    def on_message(self, client: BotClient, message: discord.Message) -> None:
        """Queue a reply from every persona that should answer ``message``; keep it for memory; let group chat
        see it.

        Every client sees every guild message; only its first sighting counts, and the decision covers all
        personas at once. Each client delivers a channel's messages in order, so first sightings are in
        channel order too: the per-channel queue then answers in that order, once.
        """
        if (seen := self._awaited.get((message.id, client))) is not None:
            seen.set()
        if not self._first_sighting(message.id):
            return
        channel_id = message.channel.id
        self._last_seen[channel_id] = max(message.id, self._last_seen.get(channel_id, 0))
        self._last_seen.move_to_end(channel_id)
        while len(self._last_seen) > CATCH_UP_CHANNELS:
            self._last_seen.popitem(last=False)
        self._remember(message)
        if self.settings_for(channel_id).group_chat:
            session = self.sessions.get(channel_id)
            if _human(message):
                self.group.human(channel_id)
            elif (message.type in CHAT_TYPES and any(v.owns(message) for v in self.voices)
                  and not (session is not None and session.active)):  # not command answers, nor /converse turns
                self.queues.submit(channel_id, partial(self._group_turn, message))
        ref = message.reference
        unresolved = ref is not None and ref.message_id is not None and ref.resolved is None and _human(message)
        if unresolved:
            ref.resolved = ref.cached_message  # Discord may leave referenced_message out
            unresolved = ref.resolved is None
        lagging = self._lagging(client, message)
        if unresolved or lagging:  # decide in the channel's turn, so replies keep their order
            for other in lagging:
                self._awaited[(message.id, other)] = asyncio.Event()
            self.queues.submit(channel_id, partial(self._answer_later, client, message, lagging))
            return
        for voice in self._route(client, message):
            self._queue(voice, message)

    def _lagging(self, client: BotClient, message: discord.Message) -> list[BotClient]:
        """The other clients in ``message``'s server that have not heard of its channel yet, though a persona
        of theirs may be asked (each client reads its own gateway, and one may be behind another)."""
        if message.guild is None or not _human(message):
            return []
        places = _places(message.channel)
        return list({v.client: None for v in self.voices if v.client is not client
                     and v.client.get_channel(message.channel.id) is None
                     and v.client.get_guild(message.guild.id) is not None
                     and (v.addressed(message) or places & set(v.persona.channels))})

    def _queue(self, voice: Voice, message: discord.Message) -> None:
        """Queue ``voice``'s answer, unless the channel already has ``QUEUE_LIMIT`` waiting or its author
        ``USER_QUEUE_LIMIT``: then the message is skipped, and the channel (or the person) is told so once until
        that drains, so one person's flood never holds up everyone else's replies."""
        channel_id, user = message.channel.id, message.author.id
        if self._asking[user] >= self.settings.user_queue_limit:
            log.warning("user %s: %d replies waiting; skipping message %s", user, self._asking[user], message.id)
            self._say_once(self._told_users, user, voice, channel_id,
                           f"⏳ {message.author.display_name}, {self._asking[user]} of your messages are still "
                           "waiting for an answer, so I am skipping your new ones until those are answered.")
            return
        waiting = self.queues.depth(channel_id)
        if waiting < self.settings.queue_limit:
            if not waiting:
                self._busy.discard(channel_id)
            self._asking[user] += 1
            self.queues.submit(channel_id, partial(self.answer, voice, message)).add_done_callback(
                lambda _: self._answered(user))
            return
        log.warning("channel %s: %d replies waiting; skipping message %s", channel_id, waiting, message.id)
        self._say_once(self._busy, channel_id, voice, channel_id,
                       f"⏳ Busy: {waiting} messages here are waiting for an answer, so I am skipping new ones for "
                       "a moment. Ask again once these are answered.")

    def _say_once(self, told: set[int], key: int, voice: Voice, channel_id: int, note: str) -> None:
        """Post ``note`` in the channel unless ``key`` is in ``told`` already (whoever clears it there says
        when the note may come again)."""
        if key in told or (channel := voice.client.get_channel(channel_id)) is None:
            return
        told.add(key)
        self._background(persist(lambda: channel.send(note), f"a note in channel {channel_id}",
                                 self.settings.delivery_deadline))

    def _answered(self, user: int) -> None:
        self._asking[user] -= 1
        if self._asking[user] <= 0:
            del self._asking[user]
            self._told_users.discard(user)

    async def _catch_up(self, client: BotClient) -> None:
        """After a new gateway session (the old one was invalidated), read what was said in the channels
        recently seen since their last message, and answer it as if it had arrived: nothing said during the
        gap goes unanswered. The first session of a client has nothing to catch up on."""
        if client not in self._sessions_started:
            self._sessions_started.add(client)
            return
        for channel_id, last in list(self._last_seen.items()):
            channel = client.get_channel(channel_id)
            if channel is None or not isinstance(channel, discord.abc.Messageable):
                continue
            where = f"catching up in channel {channel_id}"
            try:
                missed = await persist(lambda: _history_after(channel, last), where, self.settings.delivery_deadline)
            except discord.HTTPException as exc:
                log.warning("%s: %s", where, exc)
                continue
            for message in missed:
                self.on_message(client, message)

    def _route(self, client: BotClient, message: discord.Message) -> list[Voice]:
        """The personas that answer ``message``; a human writing stops the channel's conversation."""
        wanted = [v for v in self.voices if self.wants(v, message, client)]
        session = self.sessions.get(message.channel.id)
        if session is not None and session.active and _human(message):
            if not wanted:  # a human interrupting a conversation always gets an answer
                wanted = [session.next_speaker]
            session.stop("interrupted")
            self.stop_replies(message.channel.id, session)  # its turn only: other replies here are not part of it
        return wanted

    async def _answer_later(self, client: BotClient, message: discord.Message, lagging: list[BotClient]) -> None:
        """Fetch the message ``message`` replies to if Discord sent only its id, and wait (up to LAG_WAIT) for
        the ``lagging`` clients to see ``message`` too; then answer as usual."""
        ref = message.reference
        where = f"message {message.id} in channel {message.channel.id}"
        if ref is not None and ref.message_id is not None and ref.resolved is None:
            try:
                ref.resolved = await persist(lambda: message.channel.fetch_message(ref.message_id),
                                             f"the message replied to by {where}", self.settings.delivery_deadline)
            except discord.HTTPException as exc:  # deleted or hidden: it is a plain message then
                log.info("the message replied to by %s: %s", where, exc)
        try:
            await asyncio.wait_for(asyncio.gather(*(self._awaited[(message.id, c)].wait() for c in lagging)), LAG_WAIT)
        except asyncio.TimeoutError:
            log.info("%s: not every client saw it within %s s; answering with those that did", where, LAG_WAIT)
        finally:
            for other in lagging:
                del self._awaited[(message.id, other)]
        for voice in self._route(client, message):
            try:
                await self.answer(voice, message)
            except Exception:
                log.exception("%s: %s failed to answer", where, voice.name)

    def _first_sighting(self, message_id: int) -> bool:
        if message_id in self._seen:
            return False
        if len(self._seen_order) == self._seen_order.maxlen:
            self._seen.discard(self._seen_order[0])
        self._seen.add(message_id)
        self._seen_order.append(message_id)
        return True

    def wants(self, voice: Voice, message: discord.Message, client: BotClient) -> bool:
        """Answer humans who mention or reply to the persona, DM it, or write in its own channels."""
        if not _human(message) or message.type not in (discord.MessageType.default, discord.MessageType.reply):
            return False
        if message.guild is None:  # DMs carry no roles: a role allow list refuses them, a user one still matches
            return voice.can_dm and voice.client is client and _permits(voice, message.author, message.channel)
        if voice.client.get_channel(message.channel.id) is None or not _permits(voice, message.author, message.channel):
            return False
        return voice.addressed(message) or bool(_places(message.channel) & set(voice.persona.channels))

    async def answer(self, voice: Voice, message: discord.Message) -> str:
        """``voice`` replies to ``message`` (which may have come through another persona's client)."""
        prompt = await self._prompt(voice, message)
        if prompt is None:
            return ""
        turns, context = prompt
        if message.guild is None:  # a DM: plain messages, no quote-reply
            channel, reply_to = message.channel, None
        else:
            channel, reply_to = voice.client.get_channel(message.channel.id), message
        stream = await self._streamed(voice, channel, turns, reply_to=reply_to, context=context)  # type: ignore[arg-type]
        if self.settings.reply_buttons and isinstance(voice, BotVoice) and len(stream.message_ids) == 1:
            self._background(self._offer(voice, channel, stream, message))  # type: ignore[arg-type]
        return stream.text

    async def _prompt(self, voice: Voice, message: discord.Message) -> tuple[list[dict[str, str]], list[str]] | None:
        """The conversation turns and the system context for ``voice``'s reply to ``message``; None when the
        bot lacks what ``voice`` needs in the channel (said there, see ``_allowed_here``)."""
        channel_id, limit, chars = message.channel.id, self.settings.history_messages, self.settings.history_chars
        if message.guild is not None and not await self._allowed_here(voice, voice.client.get_channel(channel_id)):
            return None
        reset = self.resets.get(channel_id)
        if message.reference is None:  # channel history: a window whose start moves in jumps (see window_start)
            floor = max(reset or 0, self.windows.get(channel_id, 0)) or None
            history = await self._gather(voice, message, limit + 1, floor)  # one more than fits: the window is full
            speakers = self.speakers(voice).learn(history)
            start = window_start(history, speakers, max_messages=limit, max_chars=chars)
            if start and history[start - 1].id != self.windows.get(channel_id):
                self.windows[channel_id] = history[start - 1].id
                self._background(self.state.run(self.state.set_window, channel_id, history[start - 1].id))
            history = history[start:]
        else:
            history = await self._gather(voice, message, limit, reset)
            speakers = self.speakers(voice).learn(history)
        turns = to_messages(history, speakers, max_messages=limit, max_chars=chars)
        return turns, [await self._recall(voice, message, history)]

    async def _allowed_here(self, voice: Voice, channel: Any) -> bool:
        """Whether the bot holds what ``voice`` needs in ``channel``; if not, says what is missing, in the log
        and (where it may still write) in the channel, once until that changes."""
        missing = permissions.in_channel(channel, voice.persona.webhook)
        key = (voice.name, channel.id)
        if not missing:
            self._told.pop(key, None)
            return True
        if self._told.get(key) != missing:
            self._told[key] = missing
            note = f"⚠️ **{voice.name}** cannot answer here: the bot lacks {', '.join(missing)}; {permissions.FIX}."
            log.warning("channel %s: %s", channel.id, note)
            granted = channel.permissions_for(channel.guild.me)
            if granted.view_channel and (granted.send_messages_in_threads if isinstance(channel, discord.Thread)
                                         else granted.send_messages):
                await persist(lambda: channel.send(note), f"a note in channel {channel.id}",
                              self.settings.delivery_deadline)
        return False

    async def _gather(self, voice: Voice, message: discord.Message, limit: int,
                      after: int | None) -> list[discord.Message]:
        where = f"history for a reply in channel {message.channel.id}"
        return await persist(lambda: self.backlog.history(voice.client, message, limit, after), where,
                             self.settings.delivery_deadline)

    def speakers(self, voice: Voice | None) -> Speakers:
        """How ``voice``'s prompt names who said what: its own messages, the other personas, everyone else."""
        return Speakers(
            owns=voice.owns if voice is not None else lambda message: False,
            persona_of=lambda message: next((v.name for v in self.voices if v is not voice and v.owns(message)), None),
            personas=frozenset(v.name.casefold() for v in self.voices),
        )

    async def reply(
        self, voice: Voice, channel: discord.abc.Messageable, turns: list[dict[str, str]],
        reply_to: discord.Message | None = None, context: list[str] | None = None,
        session: ConverseSession | None = None,
    ) -> str:
        """Stream ``voice``'s reply to the conversation ``turns`` into ``channel`` (as ``session``'s turn when
        given); returns its text."""
        return (await self._streamed(voice, channel, turns, reply_to=reply_to, context=context,
                                     session=session)).text

    async def _streamed(
        self, voice: Voice, channel: discord.abc.Messageable, turns: list[dict[str, str]], *,
        reply_to: discord.Message | None = None, context: list[str] | None = None,
        target: ReplyTarget | None = None, prefix: str = "", session: ConverseSession | None = None,
    ) -> ReplyStream:
        """Every reply (channel messages, /converse turns, regenerated and continued replies) reaches the
        engine through ``prompt.assemble`` here, with the channel's sampling settings. ``target`` overrides
        where it is written, ``prefix`` is text the reply starts with (a continued reply's); a ``session``'s
        turns are tracked as its own, so a human interrupting it stops only them."""
        try:
            card = self.engine.manifest(voice.persona.name).card
        except EngineError:  # not loaded: the stream below reports it as for any reply
            card = None
        messages = assemble(turns, context or (), card=card)
        sampling = self.sampling(voice, channel.id)  # type: ignore[attr-defined]
        pieces = self.engine.stream(voice.persona.name, messages, sampling)
        return await self._write(voice, channel, _prefixed(prefix, pieces) if prefix else pieces,
                                 reply_to=reply_to, target=target, session=session)

    async def _write(
        self, voice: Voice, channel: discord.abc.Messageable, pieces: AsyncIterator[str], *,
        reply_to: discord.Message | None = None, target: ReplyTarget | None = None,
        session: ConverseSession | None = None,
    ) -> ReplyStream:
        """Write ``pieces`` as ``voice`` the way every reply is written (streamed edits, the write budget,
        split at Discord's length), tracked so that /stop and a session's end reach it."""
        channel_id = channel.id  # type: ignore[attr-defined]
        stream = ReplyStream(
            target or await voice.reply_target(channel, reply_to), self.limiter, channel_id,
            placeholder_after=self.settings.placeholder_after, timeout=self.settings.generation_timeout,
            deadline=self.settings.delivery_deadline, guild_id=_guild_id(channel),
        )
        self.streams[channel_id].add(stream)
        owned = session.streams if session is not None else set()
        owned.add(stream)
        try:
            await stream.run(pieces)
            return stream
        finally:
            owned.discard(stream)
            self.streams[channel_id].discard(stream)
            if not self.streams[channel_id]:
                del self.streams[channel_id]

    # commands

    def voice(self, name: str) -> Voice | None:
        return next((v for v in self.voices if v.name.lower() == name.strip().lower()), None)

    async def swap(self, voice: Voice, adapter: str, keep: bool = False, by_user: int = 0) -> Manifest:
        """Serve the bundle named ``adapter`` inside ADAPTERS_DIR for ``voice``; on any error (a CommandError
        that names no host path) the old adapter keeps serving. ``keep``: serve it after a restart too
        (written before this returns, so what the owner is told is what a restart does); without it a restart
        serves the personas file's bundle again."""
        path = resolve_bundle(self.settings.adapters_dir, adapter)
        try:
            manifest = await self.engine.load_adapter(voice.name, path)
        except (EngineError, BundleError) as exc:
            log.warning("persona %s: cannot load %s: %s", voice.name, path, exc)
            raise CommandError(self.public(str(exc))) from exc
        if keep:
            await self.state.run(self.state.keep_swap, voice.name, str(path), by_user)
        else:
            await self.state.run(self.state.drop_swap, voice.name)
        log.info("persona %s now serves %s (%s)%s", voice.name, manifest.name, path, ", kept" if keep else "")
        return manifest

    async def reload(self, voice: Voice) -> Manifest:
        """Re-read ``voice``'s bundle from disk; on any error the loaded adapter keeps serving."""
        try:
            return await self.engine.reload_adapter(voice.name)
        except (EngineError, BundleError) as exc:
            log.warning("persona %s: cannot reload: %s", voice.name, exc)
            raise CommandError(self.public(str(exc))) from exc

    def public(self, text: str) -> str:
        """``text`` fit to show in Discord: ADAPTERS_DIR and the personas' bundle folders by name, any other
        host path hidden."""
        known = [(self.settings.adapters_dir.expanduser().resolve(), "ADAPTERS_DIR"),
                 *((Path(p.adapter).resolve(), f"{p.name}'s bundle") for p in self.personas)]
        return _HOST_PATH.sub("<path>", hide_paths(text, *known))

    def stop_replies(self, channel_id: int, session: ConverseSession | None = None) -> int:
        """Stop the replies streaming in the channel (only ``session``'s turns when it is given)."""
        streams = [s for s in self.streams.get(channel_id, ()) if session is None or s in session.streams]
        for stream in streams:
            stream.stop()
        return len(streams)

    def stop(self, channel_id: int) -> bool:
        """/stop: end the conversation and any reply streaming in this channel."""
        session = self.sessions.get(channel_id)
        stopped = session is not None and session.active
        if session is not None:
            session.stop("stopped by /stop")
        self.group.stop(channel_id)
        return bool(self.stop_replies(channel_id)) or stopped

    async def reset(self, channel_id: int) -> None:
        """/reset: messages up to now are no longer context in this channel (nor recalled from memory);
        written to the state database before the command answers."""
        marker = discord.utils.time_snowflake(discord.utils.utcnow(), high=True)
        await self.state.run(self.state.set_reset, channel_id, marker)
        self.resets[channel_id] = marker
        self.windows.pop(channel_id, None)

    def greeting(self, voice: Voice, channel: discord.abc.Messageable, user: discord.abc.User) -> str | None:
        """What ``voice`` opens a fresh context with after /reset: one of its card's greetings, for ``user``
        (group-only ones too where group chat is on); None when it has none, or may not talk here."""
        try:
            card = self.engine.manifest(voice.persona.name).card
        except EngineError:
            return None
        if card is None or not _permits(voice, user, channel) or (_guild_id(channel) is None and not voice.can_dm):
            return None
        name = clean_name(getattr(user, "display_name", user.name)) or clean_name(user.name) or "there"
        group = self.settings_for(channel.id).group_chat  # type: ignore[attr-defined]
        return card.greeting(name, group, self._rng)

    async def greet(self, voice: Voice, channel: discord.abc.Messageable, text: str) -> None:
        """Post a ``greeting`` as ``voice``, in turn with the replies the channel is writing."""
        async def post() -> None:
            in_dm = _guild_id(channel) is None  # the DM of the bot the command ran on, which is voice's
            where = channel if in_dm else voice.client.get_channel(channel.id)  # type: ignore[attr-defined]
            if where is not None and (in_dm or await self._allowed_here(voice, where)):
                await self._write(voice, where, _once(text))

        await self.queues.submit(channel.id, post)  # type: ignore[attr-defined]

    def converse(
        self, channel: discord.abc.Messageable, names: list[str], topic: str, turns: int | None,
        user: discord.abc.User,
    ) -> ConverseSession:
        """/converse: start a bot-to-bot conversation in ``channel``; at most one runs per channel."""
        if len(topic) > TOPIC_CHARS:  # it is quoted in the announcement, which must fit one message
            raise CommandError(f"the topic is {len(topic)} characters long; keep it under {TOPIC_CHARS}")
        voices = []
        for name in names:
            voice = self.voice(name)
            if voice is None:
                raise CommandError(f"no persona named '{name}' ({', '.join(v.name for v in self.voices)})")
            if voice in voices:
                raise CommandError("pick different personas")
            if voice.client.get_channel(channel.id) is None:  # type: ignore[attr-defined]
                raise CommandError(f"{voice.name} cannot see this channel")
            if not _permits(voice, user, channel):
                raise CommandError(f"{voice.name} may not talk here, or with you")
            voices.append(voice)
        current = self.sessions.get(channel.id)  # type: ignore[attr-defined]
        if current is not None and current.active:
            raise CommandError("a conversation is already running here; /stop it first")
        mine = sum(1 for c, starter in self._starters.items() if starter == user.id and c in self.sessions)
        if mine >= self.settings.converse_per_user:
            raise CommandError(f"you already run {mine} conversation{'s' * (mine > 1)} (at most "
                               f"{self.settings.converse_per_user} at once); /stop one first")
        session = ConverseSession(
            channel.id, voices, topic, min(turns or self.settings.converse_turns, self.settings.converse_max_turns),  # type: ignore[attr-defined]
            cooldown=self.settings.converse_cooldown,
            started_by=self.speakers(None).human(getattr(user, "display_name", user.name), user.name),
        )
        self.sessions[session.channel_id] = session
        self._starters[session.channel_id] = user.id
        record = self.state.start_session(session.channel_id, [v.name for v in voices], topic, session.turns,
                                          session.started_by)  # one short insert, before the command answers
        task = asyncio.create_task(self._converse(session, record), name=f"converse-{session.channel_id}")
        task.add_done_callback(partial(self._ended, session))
        self._tasks.add(task)
        return session

    def _ended(self, session: ConverseSession, task: asyncio.Task) -> None:
        """A finished conversation is forgotten: memory does not grow with uptime."""
        self._tasks.discard(task)
        if self.sessions.get(session.channel_id) is session:
            del self.sessions[session.channel_id]
            self._starters.pop(session.channel_id, None)

    async def _converse(self, session: ConverseSession, record: int) -> None:
        """Run the session, keeping its progress in the state database; a shutdown mid-way leaves it
        'running' there, which the next start reports as interrupted."""
        async def speak(voice: Voice, turns: list[dict[str, str]]) -> str:
            text = await self._turn(session, voice, turns)
            await self.state.run(self.state.session_spoke, record, len(session.transcript) + 1)
            return text

        await session.run(speak)
        if session.reason != "shutting down":
            await self.state.run(self.state.end_session, record, session.reason)

    async def _turn(self, session: ConverseSession, voice: Voice, turns: list[dict[str, str]]) -> str:
        """One conversation turn, queued behind whatever the channel is already answering."""
        async def turn() -> str:
            if not session.active:
                return ""
            channel = voice.client.get_channel(session.channel_id)
            return await self.reply(voice, channel, turns, session=session)  # type: ignore[arg-type]

        return await self.queues.submit(session.channel_id, turn)

    # per-channel settings, memory, group chat

    def settings_for(self, channel_id: int) -> ChannelSettings:
        return self.channel_settings.get(channel_id, ChannelSettings())

    async def set_channel_settings(self, channel_id: int, settings: ChannelSettings) -> None:
        """/persona settings: written before the command answers."""
        await self.state.run(self.state.set_channel_settings, channel_id, settings)
        self.channel_settings[channel_id] = settings

    def sampling(self, voice: Voice, channel_id: int) -> Sampling | None:
        """The persona's sampling with the channel's temperature and reply length; None: the persona's own."""
        chosen = self.settings_for(channel_id)
        update = {k: v for k, v in (("temperature", chosen.temperature), ("max_new_tokens", chosen.max_new_tokens))
                  if v is not None}
        return self.engine.manifest(voice.name).sampling.model_copy(update=update) if update else None

    def remembers(self, guild_id: int | None) -> bool:
        return self.settings.memory and (guild_id is None or guild_id not in self.memory_off)

    async def set_guild_memory(self, guild_id: int, on: bool) -> int:
        """A guild admin turns memory on or off there; off also deletes what was kept (returns how many)."""
        await self.state.run(self.state.set_guild_memory, guild_id, on)
        (self.memory_off.discard if on else self.memory_off.add)(guild_id)
        return 0 if on else await self.state.run(self.memory.forget_guild, guild_id)

    def _remember(self, message: discord.Message) -> None:
        """Keep a person's chat message for recall (off the hot path); every MEMORY_NOTES_AFTER of a person's
        messages, ask a persona that answers here for a note about them."""
        guild_id = message.guild.id if message.guild else None
        if not _human(message) or message.type not in CHAT_TYPES or not self.remembers(guild_id):
            return
        self._background(self.state.run(partial(
            self.memory.keep, message_id=message.id, guild_id=guild_id, channel_id=message.channel.id,
            author_id=message.author.id, author_name=message.author.display_name, content=message.clean_content,
            at=message.created_at.timestamp())))
        every = self.settings.memory_notes_after
        key = (guild_id or 0, message.author.id)
        self._said[key] += 1
        if every and self._said[key] >= every:
            self._said[key] = 0
            voice = next((v for v in self.voices if self.wants(v, message, v.client)), None) or next(
                (v for v in self.voices if v.client.get_channel(message.channel.id) is not None), None)
            if voice is not None:
                self._background(self._note(voice, guild_id, message.author))

    def _revise(self, message: discord.Message) -> None:
        """A person edited a message: memory keeps its new words (every client reports it; the write is
        idempotent, and the personas' own streaming edits never reach the database)."""
        if _human(message) and message.type in CHAT_TYPES and message.clean_content.strip():
            self._background(self.state.run(self.memory.revise, message.id, message.clean_content))

    def _forget(self, message_ids: set[int]) -> None:
        """Messages deleted on Discord leave memory too."""
        self._background(self.state.run(self.memory.forget_messages, message_ids))

    async def _note(self, voice: Voice, guild_id: int | None, user: discord.abc.User) -> None:
        """Ask the engine for a one-line note about ``user`` from what they said; a failure only logs."""
        try:
            said = await self.state.run(self.memory.said_by, user.id)
            previous = (await self.state.run(self.memory.notes, guild_id, voice.name, [user.id])).get(user.id)
            sampling = Sampling(temperature=0.3, max_new_tokens=60)
            text = await self.engine.complete(voice.name, note_prompt(user.display_name, said, previous), sampling)
            if note := clean_note(text):
                await self.state.run(self.memory.set_note, guild_id, user.id, voice.name, note)
        except (EngineError, OSError) as exc:
            log.warning("note about user %s by %s failed: %s", user.id, voice.name, exc)

    async def _recall(self, voice: Voice, message: discord.Message, history: list[discord.Message]) -> str:
        """The memory block for a reply whose context is ``history``: messages that have left it (after the
        channel's reset) matching ``message``, and the notes about the people in it."""
        guild_id = message.guild.id if message.guild else None
        if not self.remembers(guild_id) or not self.settings.memory_chars:
            return ""
        channel_id = message.channel.id
        names = [v.name for v in self.voices]
        memories = await self.state.run(partial(
            self.memory.recall, channel_id, message.clean_content, window_start=history[0].id,
            after=self.resets.get(channel_id, 0), ignore=names))
        people = {m.author.id: m.author.display_name for m in history if _human(m)}
        notes = await self.state.run(self.memory.notes, guild_id, voice.name, list(people))
        return block(memories, {people[user]: note for user, note in notes.items()})

    async def _group_turn(self, message: discord.Message) -> None:
        """A persona's message in a group-chat channel, once it is final (the queue runs this after the reply
        being streamed): the persona it names or replies to may answer, if the loop control allows."""
        try:
            final = await message.channel.fetch_message(message.id)
        except discord.HTTPException:
            return
        candidates = [v for v in self.voices if not v.owns(final) and (v.addressed(final) or named(
            final.clean_content, v.name)) and v.client.get_channel(final.channel.id) is not None]
        if candidates and self.group.decide(final.channel.id):
            await self.answer(candidates[0], final)

    # regenerate / continue buttons (bot.buttons)

    async def _offer(self, voice: Voice, channel: discord.abc.Messageable, stream: ReplyStream,
                     message: discord.Message) -> None:
        """Put the buttons on this reply, and take them off the channel's previous one. Off the channel's
        queue, so the next reply need not wait for these writes; one channel's offers run in order."""
        record = ReplyRecord(stream.message_ids[0], message.channel.id, voice.name, message.author.id, message.id,
                             [stream.text])
        write = partial(self.limiter.acquire, record.channel_id, _guild_id(channel))
        deadline = self.settings.delivery_deadline
        async with self._offers[record.channel_id]:
            previous = await self.state.run(self.state.offer_reply, record)
            try:
                await buttons.show(channel, record, write, deadline)
            except (discord.HTTPException, DeliveryError) as exc:
                log.warning("cannot add buttons to message %s: %s", record.message_id, exc)
            owner = self.voice(previous.persona) if previous is not None else None
            if previous is not None and owner is not None:
                await buttons.strip(owner.client.get_channel(previous.channel_id) or channel, previous, write,
                                    deadline)

    async def press(self, client: BotClient, interaction: discord.Interaction) -> None:
        """A button on a reply: page its swipes, or regenerate or continue it (the asker and admins only)."""
        action, message_id = buttons.parse(str((interaction.data or {}).get("custom_id", ""))) or ("", 0)
        record = await self.state.run(self.state.reply_record, message_id)
        voice = self.voice(record.persona) if record is not None else None
        channel = interaction.channel
        if record is None or voice is None or voice.client is not client or channel is None:
            await interaction.response.send_message(buttons.STALE, ephemeral=True)
            return
        if interaction.user.id != record.asked_by and not await by_admin(interaction, self.settings.owner_ids):
            await interaction.response.send_message(buttons.DENIED, ephemeral=True)
            return
        await interaction.response.defer()
        if action in ("prev", "next"):
            record.shown = max(0, min(len(record.swipes) - 1, record.shown + (1 if action == "next" else -1)))
        elif action in ("regen", "more"):
            await self.queues.submit(record.channel_id, partial(self._rewrite, voice, channel, record, action))
        await self.state.run(self.state.update_reply, record)
        write = partial(self.limiter.acquire, record.channel_id, _guild_id(channel))
        try:
            await buttons.show(channel, record, write, self.settings.delivery_deadline)  # type: ignore[arg-type]
        except (discord.HTTPException, DeliveryError) as exc:
            log.warning("cannot show swipe %d of message %s: %s", record.shown + 1, record.message_id, exc)

    async def _rewrite(self, voice: Voice, channel: discord.abc.Messageable, record: ReplyRecord, action: str) -> None:
        """Regenerate (a new swipe, shown) or continue (the shown swipe, extended) in the reply's message."""
        try:
            source = await channel.fetch_message(record.source_id)
        except discord.HTTPException:
            log.info("the message reply %s answered is gone; nothing to regenerate", record.message_id)
            return
        prompt = await self._prompt(voice, source)
        if prompt is None:
            return
        turns, context = prompt
        shown, prefix = record.swipes[record.shown], ""
        if action == "more":
            turns, prefix = [*turns, {"role": "assistant", "content": shown}], shown.rstrip() + " "
        target = buttons.Rewrite(await voice.reply_target(channel, None), [record.message_id])
        stream = await self._streamed(voice, channel, turns, context=context, target=target, prefix=prefix)
        if action == "regen":
            record.swipes.append(stream.text)
            record.shown = len(record.swipes) - 1
        else:
            record.swipes[record.shown] = stream.text

    def _background(self, work: Awaitable[Any]) -> None:
        """Work nobody waits for (memory writes, notes): tracked so close() cancels it instead of leaving it
        running against a closed state database."""
        task = asyncio.ensure_future(work)
        task.add_done_callback(self._finished)
        self._tasks.add(task)

    def _finished(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("background work %s failed", task.get_coro(), exc_info=task.exception())


async def _once(text: str) -> AsyncIterator[str]:
    yield text


async def _prefixed(prefix: str, pieces: AsyncIterator[str]) -> AsyncIterator[str]:
    yield prefix
    async for piece in pieces:
        yield piece


async def _history_after(channel: discord.abc.Messageable, after: int) -> list[discord.Message]:
    return [m async for m in channel.history(limit=CATCH_UP_MESSAGES, after=discord.Object(after), oldest_first=True)]


def _guild_id(channel: object) -> int | None:
    """The guild a channel belongs to (None in DMs): the unit the write budget is shared fairly between."""
    guild = getattr(channel, "guild", None)
    return guild.id if guild is not None else None


def _places(channel: object) -> set[int]:
    """A channel, and for a thread its parent too: what allow/block and owned-channel lists match."""
    return {channel.id, getattr(channel, "parent_id", None) or channel.id}  # type: ignore[attr-defined]


def _permits(voice: Voice, user: discord.abc.User, channel: object) -> bool:
    roles = {role.id for role in getattr(user, "roles", ())}
    return voice.persona.permits(user.id, roles, _places(channel))


def _human(message: discord.Message) -> bool:
    return not message.author.bot and message.webhook_id is None
