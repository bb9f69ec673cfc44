"""The fake gateway: HELLO, IDENTIFY -> READY + GUILD_CREATE per guild, heartbeats, RESUME with replay, close
codes, and what Discord sends a live connection unasked: heartbeat requests (op 1), RECONNECT (op 7) and
INVALID_SESSION (op 9)."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import deque
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

from .model import MESSAGE_CONTENT_INTENT, User

ACK_DELAY = 0.05
"""Seconds before a heartbeat ACK, like a real network round trip."""

if TYPE_CHECKING:
    from .server import FakeDiscord



class Pipe:
    """One websocket connection; frames go out in order from a single sender task."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._task = asyncio.create_task(self._send())

    def put(self, frame: dict[str, Any]) -> None:
        self._queue.put_nowait(json.dumps(frame))

    async def _send(self) -> None:
        while not self.ws.closed:
            text = await self._queue.get()
            try:
                await self.ws.send_str(text)
            except (ConnectionError, RuntimeError):
                return

    def close(self) -> None:
        self._task.cancel()


class Session:
    """A bot's gateway session; it outlives its connection so a RESUME can replay what was missed."""

    def __init__(self, bot: User) -> None:
        self.id = uuid.uuid4().hex
        self.bot = bot
        self.seq = 0
        self.sent: deque[tuple[int, dict]] = deque(maxlen=5000)
        self.pipe: Pipe | None = None
        self.heartbeats: list[float] = []
        self.resumes = 0

    def dispatch(self, event: str, data: dict[str, Any]) -> None:
        self.seq += 1
        frame = {"op": 0, "t": event, "s": self.seq, "d": data}
        self.sent.append((self.seq, frame))
        if self.pipe is not None:
            self.pipe.put(frame)

    def replay(self, after: int) -> None:
        for seq, frame in self.sent:
            if seq > after and self.pipe is not None:
                self.pipe.put(frame)


class Gateway:
    """Speaks the gateway protocol (JSON text frames, no compression) to every connected bot."""

    def __init__(self, fake: FakeDiscord) -> None:
        self.fake = fake
        self.sessions: dict[str, Session] = {}
        self.live: dict[int, Session] = {}  # bot id -> its current session
        self.heartbeat_interval = 41.25
        self.identifies: dict[int, int] = {}  # bot id -> how many times it has IDENTIFYed (a new session)

    def dispatch(self, bot: User, event: str, data: dict[str, Any]) -> None:
        session = self.live.get(bot.id)
        if session is not None:
            session.dispatch(event, data)

    async def disconnect(self, bot: User, code: int = 1001) -> None:
        """Close the bot's socket from the server side, as Discord does now and then."""
        session = self.live.get(bot.id)
        if session is not None and session.pipe is not None:
            await session.pipe.ws.close(code=code)

    def _live_pipe(self, bot: User) -> Pipe:
        session = self.live.get(bot.id)
        if session is None or session.pipe is None:
            raise AssertionError(f"{bot.name} has no live gateway connection")
        return session.pipe

    def request_heartbeat(self, bot: User) -> None:
        """Op 1 from the server: the client must heartbeat at once."""
        self._live_pipe(bot).put({"op": 1, "d": None})

    def request_reconnect(self, bot: User) -> None:
        """Op 7: the client should reconnect and RESUME."""
        self._live_pipe(bot).put({"op": 7, "d": None})

    def invalidate_session(self, bot: User, *, resumable: bool = False) -> None:
        """Op 9: the session is gone (unless ``resumable``); the client must IDENTIFY anew."""
        session = self.live[bot.id]
        if not resumable:
            self.sessions.pop(session.id, None)
        self._live_pipe(bot).put({"op": 9, "d": resumable})

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        pipe = Pipe(ws)
        pipe.put({"op": 10, "d": {"heartbeat_interval": int(self.heartbeat_interval * 1000)}})
        session: Session | None = None
        try:
            async for msg in ws:
                if msg.type is not WSMsgType.TEXT:
                    continue
                frame = json.loads(msg.data)
                op, data = frame.get("op"), frame.get("d")
                if op == 1:
                    if session is not None:
                        session.heartbeats.append(time.monotonic())
                    # ACK after a network-like delay: discord.py records the send time only after the send
                    # returns, so an instant local ACK reads as "websocket is 41s behind"
                    asyncio.get_running_loop().call_later(ACK_DELAY, pipe.put, {"op": 11})
                elif op == 2:
                    session = await self._identify(ws, pipe, data)
                elif op == 6:
                    session = self._resume(pipe, data)
        finally:
            pipe.close()
            if session is not None and session.pipe is pipe:
                session.pipe = None
        return ws

    async def _identify(self, ws: web.WebSocketResponse, pipe: Pipe, data: dict[str, Any]) -> Session | None:
        bot = self.fake.bot_by_token(data.get("token", ""))
        if bot is None:
            await ws.close(code=4004, message=b"Authentication failed.")
            return None
        if data.get("intents", 0) & MESSAGE_CONTENT_INTENT and not bot.message_content:
            await ws.close(code=4014, message=b"Disallowed intent(s).")
            return None
        session = Session(bot)
        session.pipe = pipe
        self.identifies[bot.id] = self.identifies.get(bot.id, 0) + 1
        self.sessions[session.id] = session
        self.live[bot.id] = session
        session.dispatch("READY", self.fake.ready_payload(bot, session.id))
        for guild in self.fake.guilds.values():
            if bot.id in guild.members:
                session.dispatch("GUILD_CREATE", self.fake.guild_payload(guild))
        return session

    def _resume(self, pipe: Pipe, data: dict[str, Any]) -> Session | None:
        session = self.sessions.get(data.get("session_id", ""))
        if session is None or session.bot.token != data.get("token"):
            pipe.put({"op": 9, "d": False})
            return None
        session.pipe = pipe
        session.resumes += 1
        self.live[session.bot.id] = session
        session.replay(data.get("seq") or 0)
        session.dispatch("RESUMED", {})
        return session
