"""Under load: 200 messages in 20 channels at once, all answered in order, no 429s, heartbeat on time."""
from __future__ import annotations

import time

from fake_discord_harness import async_test, running


@async_test
async def test_200_messages_across_20_channels_all_answered_in_order(tmp_path):
    # one test user stands for the 20 channels' people: USER_QUEUE_LIMIT is for a real person's flood; 40
    # writes/s for the process keeps each bot's requests near its pacer's 40/s, where a pacer that let
    # bursts through drew a global 429 in every run (at the harness's 400/s, in 3 of 5 runs)
    async with running(tmp_path, edit_interval=0.08, edits_per_second=40.0, queue_limit=10,
                       user_queue_limit=200) as h:
        h.fake.limit_writes(5, 0.25)  # Discord-like bucket: our cadence must never trip it
        h.fake.gateway.heartbeat_interval = 0.1
        await h.fake.disconnect(h.bots["Brine"])  # reconnect so the short heartbeat interval applies
        await h.fake.wait_for(lambda: h.fake.gateway.live[h.bots["Brine"].id].pipe is not None)
        channels = [h.fake.add_channel(f"room-{i}") for i in range(20)]
        names = ("Brine", "Coral")
        started = time.monotonic()
        sent = [
            (channel, h.fake.post(h.alice, channel, f"{h.bots[names[k % 2]].mention} message {k}"))
            for k in range(10) for channel in channels
        ]

        def expected(k: int) -> str:
            name = names[k % 2]
            return f"[{name.lower()}-v1] Alice: @{name} message {k}"

        def all_answered() -> bool:
            return all(any(r["content"] == expected(i // 20) for r in h.replies(m)) for i, (_, m) in enumerate(sent))

        await h.fake.wait_for(all_answered, timeout=40)
        elapsed = time.monotonic() - started
        await h.settled()
        for channel in channels:
            asked = [m["id"] for m in channel.messages if m["author"]["id"] == str(h.alice.id)]
            answered = [m["message_reference"]["message_id"] for m in channel.messages if "message_reference" in m]
            assert answered == asked, f"#{channel.name}: every message answered once, in order"
        assert len(h.engine.served) == 200
        assert not h.fake.rate_limited, "our edit cadence never draws a 429"
        beats = h.fake.gateway.live[h.bots["Brine"].id].heartbeats
        gaps = [b - a for a, b in zip(beats, beats[1:])]
        assert len(beats) > 5 and max(gaps) < 0.5, f"heartbeat never blocked (max gap {max(gaps):.2f}s)"
        assert elapsed < 30


@async_test
async def test_a_burst_stays_under_the_global_limit(tmp_path):
    """At the default write budget, history from the gateway's cache and typing only while thinking keep a
    burst under Discord's 50 requests/s per bot (it drew 429s with a history GET and typing per message)."""
    async with running(tmp_path, ("Brine",), edits_per_second=20.0, user_queue_limit=40) as h:  # one user for all
        channels = [h.fake.add_channel(f"room-{i}") for i in range(8)]
        sent = [h.fake.post(h.alice, c, f"{h.bots['Brine'].mention} message {k}") for k in range(5) for c in channels]
        await h.fake.wait_for(lambda: all(h.replies(m) for m in sent), timeout=20)
        await h.settled(20)
        assert not h.fake.rate_limited, f"{len(h.fake.rate_limited)} requests drew a 429"
        assert h.app.backlog.reads == len(channels), "one history read per channel, the cache after that"


@async_test
async def test_two_personas_alternating_in_a_channel_read_its_history_once_each(tmp_path):
    """Each own-account persona has its own client, gateway session and message cache: one history read per
    persona per channel, however often they take turns (the second persona's read used to replace the
    first's, so almost every reply read the channel again)."""
    async with running(tmp_path) as h:
        brine, coral = h.bots["Brine"], h.bots["Coral"]
        for k in range(6):
            bot = (brine, coral)[k % 2]
            ask = h.fake.post(h.alice, h.general, f"{bot.mention} turn {k}")
            await h.fake.wait_for(lambda: h.replies(ask), timeout=10)
            await h.settled()
        assert h.app.backlog.reads == 2, "one read per persona's client"
        last = h.engine.served[-1].messages
        assert [m["content"].splitlines()[-1] for m in last if m["role"] == "user"][-1] == "Alice: @Coral turn 5"
        assert len(last) >= 5, "the cached history still carries the earlier turns"
