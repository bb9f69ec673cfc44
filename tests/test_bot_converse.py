"""Bot-to-bot conversations through the fake Discord: turns, budget, /stop, human priority, no ping-pong."""
from __future__ import annotations

import asyncio

from fake_discord_harness import async_test, running


def spoken(h, channel) -> list[str]:
    """Who wrote each persona message in ``channel`` (own-account or webhook), in order."""
    names = {str(b.id): n for n, b in h.bots.items()}
    return [names.get(m["author"]["id"], m["author"]["username"]) for m in channel.messages
            if m["author"].get("bot") and m["type"] in (0, 19)]


@async_test
async def test_conversation_takes_turns_and_stops_at_its_budget(tmp_path):
    async with running(tmp_path) as h:
        start = h.fake.command(h.bots["Brine"], h.alice, h.general, "converse",
                               persona_a="Brine", persona_b="coral", topic="the tides", turns=4)
        assert "for 4 turns" in await start.text() and not start.ephemeral
        session = h.app.sessions[h.general.id]
        await h.fake.wait_for(lambda: not session.active)
        await h.settled()
        assert session.reason == "turn budget spent"
        assert spoken(h, h.general) == ["Brine", "Coral", "Brine", "Coral"]
        assert [s.adapter for s in h.engine.served] == ["Brine", "Coral", "Brine", "Coral"]
        coral_first = h.engine.served[1].messages
        assert coral_first == [{"role": "user", "content": "Alice: Let's talk about the tides.\n"
                                "Brine: [brine-v1] Alice: Let's talk about the tides."}]
        assert h.engine.served[2].messages[1]["role"] == "assistant", "Brine's own line is its assistant turn"
        await asyncio.sleep(0.1)
        assert len(h.engine.served) == 4, "bots do not answer each other outside the session"


@async_test
async def test_stop_ends_a_conversation_mid_turn(tmp_path):
    async with running(tmp_path) as h:
        h.engine.delay = 0.02
        h.fake.command(h.bots["Coral"], h.alice, h.general, "converse", persona_a="Coral", persona_b="Brine",
                       topic="storms", turns=20)
        await h.fake.wait_for(lambda: len(h.engine.served) == 2)
        session = h.app.sessions[h.general.id]
        stop = h.fake.command(h.bots["Coral"], h.alice, h.general, "stop")
        assert "Stopped" in await stop.text()
        assert session.reason == "stopped by /stop"
        await h.settled()
        await asyncio.sleep(0.1)
        assert len(h.engine.served) == 2 and h.engine.active == 0
        assert spoken(h, h.general) == ["Coral", "Brine"], "the interrupted turn keeps what it had written"
        idle = h.fake.command(h.bots["Coral"], h.alice, h.general, "stop")
        assert "Nothing is running" in await idle.text() and idle.ephemeral


@async_test
async def test_a_human_message_interrupts_and_is_answered(tmp_path):
    async with running(tmp_path) as h:
        h.engine.delay = 0.01
        h.fake.command(h.bots["Brine"], h.alice, h.general, "converse", persona_a="Brine", persona_b="Coral",
                       topic="fish", turns=20)
        await h.fake.wait_for(lambda: len(h.engine.served) == 3)
        session = h.app.sessions[h.general.id]
        speaker = session.next_speaker.name
        interjection = h.fake.post(h.alice, h.general, "wait, what about whales?")
        answer = await h.fake.wait_for(lambda: h.replies(interjection))
        await h.settled()
        assert not session.active and session.reason == "interrupted"
        assert answer[0]["author"]["id"] == str(h.bots[speaker].id), "the persona due to speak answers"
        assert len(h.replies(interjection)) == 1, "answered once, though both bots saw it"
        assert len(h.engine.served) == 4


@async_test
async def test_webhook_personas_converse_under_their_own_names(tmp_path):
    async with running(tmp_path, (), webhook=("Reef", "Kelp")) as h:
        host = h.bots["Reef"]
        start = h.fake.command(host, h.alice, h.general, "converse", persona_a="Reef", persona_b="Kelp",
                               topic="currents", turns=3)
        await start.text()
        session = h.app.sessions[h.general.id]
        await h.fake.wait_for(lambda: not session.active)
        await h.settled()
        assert spoken(h, h.general) == ["Reef", "Kelp", "Reef"]
        bad = h.fake.command(host, h.alice, h.general, "converse", persona_a="Reef", persona_b="Nobody", topic="x")
        assert "no persona named 'Nobody' (Reef, Kelp)" in await bad.text() and bad.ephemeral
