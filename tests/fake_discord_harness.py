"""The real bot, on FakeEngine, connected to the local fake Discord: the end-to-end test fixture."""
from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from discord_spec import SpecCheck
from fake_engine import FakeEngine, write_bundle

from bot.app import PersonaBot
from bot.engine.base import Engine
from bot.config import PersonaSpec, Settings
from bot.fake_discord import Channel, FakeDiscord, User

def async_test(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test in a fresh event loop (pytest fixtures still work: the signature is kept)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


# Fast cadence for tests: the same code paths as production, 20x quicker.
FAST = {"edit_interval": 0.05, "edits_per_second": 400.0, "placeholder_after": 0.3, "converse_cooldown": 0.02}


@dataclass
class Harness:
    fake: FakeDiscord
    app: PersonaBot
    engine: Any  # FakeEngine, or a real Engine
    bots: dict[str, User]
    general: Channel
    alice: User
    owner: User
    root: Path

    def replies(self, message: dict) -> list[dict]:
        """Messages that reply to ``message``, in order."""
        channel = self.fake.channels[int(message["channel_id"])]
        return [m for m in channel.messages if (m.get("message_reference") or {}).get("message_id") == message["id"]]

    async def reply_text(self, message: dict, expected: str, timeout: float = 5.0) -> dict:
        """Wait until the reply to ``message`` shows ``expected``; returns that reply."""
        return await self.fake.wait_for(
            lambda: next((r for r in self.replies(message) if r["content"] == expected), None), timeout
        )

    async def settled(self, timeout: float = 10.0) -> None:
        """Until no reply is queued or streaming anywhere."""
        async def idle() -> None:
            while not self.app.queues.idle or self.app.streams or getattr(self.engine, "active", 0):
                await asyncio.sleep(0.01)

        await asyncio.wait_for(idle(), timeout)

    async def restart(self, engine: Engine | None = None) -> None:
        """Stop the bot and start it again as a new process would: same settings, personas, tokens and state
        database, a fresh engine (default: a new FakeEngine), nothing kept in memory."""
        old = self.app
        await old.close()
        self.engine = engine or FakeEngine()
        self.app = PersonaBot(old.settings, old.personas, self.engine, tokens=old._tokens,
                              client_options=old._client_options)
        await self.app.start()

    def bundle(self, name: str) -> Path:
        return write_bundle(self.root / "bundles" / name, name)


@asynccontextmanager
async def running(
    root: Path, personas: tuple[str, ...] = ("Brine", "Coral"), *, webhook: tuple[str, ...] = (),
    engine: Engine | None = None, options: dict[str, dict[str, Any]] | None = None,
    tokens: dict[str, str] | None = None, denied_intents: bool = False, bundles: dict[str, Path] | None = None,
    **settings: Any,
) -> AsyncIterator[Harness]:
    """Start a fake Discord and the bot with ``personas`` (own accounts) and ``webhook`` personas.

    ``tokens`` overrides the tokens the bot logs in with; ``denied_intents`` leaves Message Content off;
    ``bundles`` gives real adapter bundles (default: FakeEngine placeholders named ``<persona>-v1``).
    """
    fake = await FakeDiscord().start()
    spec = SpecCheck()
    fake.reply_observers.append(spec)
    general = fake.add_channel("general")
    alice = fake.add_user("Alice")
    engine = engine or FakeEngine()
    specs, logins, bots = [], {}, {}
    for name in (*personas, *webhook):
        bundle = (bundles or {}).get(name) or write_bundle(root / "bundles" / f"{name.lower()}-v1",
                                                           f"{name.lower()}-v1")
        extra = (options or {}).get(name, {})
        if name in webhook:
            logins[name] = "tok-host"
            bots[name] = fake.bot_by_token("tok-host") or fake.add_bot("personabot", "tok-host",
                                                                      message_content=not denied_intents)
            specs.append(PersonaSpec(name=name, adapter=bundle, **extra))
        else:
            logins[name] = f"tok-{name}"
            bots[name] = fake.add_bot(name, logins[name], message_content=not denied_intents)
            specs.append(PersonaSpec(name=name, adapter=bundle, token_env=f"{name.upper()}_TOKEN", **extra))
    paths = {"state_db": root / "state.db", "adapters_dir": root / "bundles"}
    config = Settings(_env_file=None, **{**FAST, **paths, **settings})  # type: ignore[call-arg]
    try:
        with fake.patched():
            app = PersonaBot(config, specs, engine, tokens={**logins, **(tokens or {})},
                             client_options={"guild_ready_timeout": 0.02})
            harness = Harness(fake, app, engine, bots, general, alice, fake.owner, root)
            try:
                await app.start()
                yield harness
            finally:
                await harness.app.close()
    finally:
        await fake.close()
    spec.assert_clean()  # every REST reply the fake sent in this test is shaped as Discord documents it
