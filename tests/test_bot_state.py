"""End to end on the fake Discord: memory beyond the context window, /memory, per-channel settings, group chat
with loop control, and a restart in the middle of a conversation that loses nothing the user was told."""
from __future__ import annotations

import asyncio
import logging

from fake_discord_harness import async_test, running
from fake_engine import FakeEngine, echo, write_bundle

from bot.state import State


def system(served) -> str:
    return served.messages[0]["content"] if served.messages[0]["role"] == "system" else ""


async def chatter(h, count: int) -> None:
    """``count`` messages nobody is asked to answer, then until the bot has kept them all."""
    bob = h.fake.add_user("Bob")
    for n in range(count):
        h.fake.post(bob if n % 2 else h.alice, h.general, f"filler message number {n} about the weather")
    await h.settled()


@async_test
async def test_a_fact_said_200_messages_earlier_is_recalled_into_the_prompt(tmp_path):
    async with running(tmp_path) as h:
        fact = h.fake.post(h.alice, h.general, "my cat's name is Pixel, she is a grey tabby")
        await chatter(h, 200)
        ask = h.fake.post(h.alice, h.general, f"{h.bots['Brine'].mention} what's my cat's name?")
        await h.fake.wait_for(lambda: h.replies(ask))
        await h.settled()
        served = h.engine.served[-1]
        assert "Pixel" not in "".join(m["content"] for m in served.messages[1:]), "the fact left the window"
        assert "- Alice (" in system(served) and "my cat's name is Pixel" in system(served)
        assert int(fact["id"]) < int(h.general.messages[-25]["id"])


@async_test
async def test_notes_about_a_person_are_written_off_the_reply_path_and_recalled(tmp_path):
    def script(manifest, messages):
        asked = messages[-1]["content"]
        return "Note: keeps a grey cat called Pixel.\nextra" if asked.startswith("(Out of character.)") else echo(
            manifest, messages)

    async with running(tmp_path, engine=FakeEngine(script), memory_notes_after=2) as h:
        h.fake.post(h.alice, h.general, "I have a cat, Pixel")
        h.fake.post(h.alice, h.general, "she is grey")
        await h.fake.wait_for(lambda: len(h.engine.served) == 1)
        await h.settled()
        await asyncio.sleep(0.1)
        (note_request,) = h.engine.served
        assert "I have a cat, Pixel" in note_request.messages[-1]["content"]
        assert note_request.sampling.max_new_tokens == 60
        ask = h.fake.post(h.alice, h.general, f"{h.bots['Brine'].mention} hello")
        await h.fake.wait_for(lambda: h.replies(ask))
        assert "- Alice: Note: keeps a grey cat called Pixel." in system(h.engine.served[-1])
        shown = await h.fake.command(h.bots["Brine"], h.alice, h.general, "memory show").text()
        assert "Brine's note: Note: keeps a grey cat called Pixel." in shown


@async_test
async def test_messages_edited_or_deleted_on_discord_are_recalled_as_they_stand(tmp_path):
    async with running(tmp_path) as h:
        edited = h.fake.post(h.alice, h.general, "the cabin wifi password is tangerine42")
        deleted = h.fake.post(h.alice, h.general, "my spare key hides under the blue flowerpot")
        await chatter(h, 30)
        h.fake.edit_message(edited, "the cabin wifi password is grapefruit7")
        h.fake.delete(deleted)
        await asyncio.sleep(0.2)
        await h.settled()
        ask = h.fake.post(h.alice, h.general, f"{h.bots['Brine'].mention} the cabin wifi password, and my spare key?")
        await h.fake.wait_for(lambda: h.replies(ask))
        recalled = system(h.engine.served[-1])
        assert "grapefruit7" in recalled and "tangerine42" not in recalled and "flowerpot" not in recalled


@async_test
async def test_memory_show_and_forget_and_a_guild_admin_turning_it_off(tmp_path):
    async with running(tmp_path) as h:
        h.fake.post(h.alice, h.general, "the spare key is under the blue flowerpot")
        await chatter(h, 30)
        show = h.fake.command(h.bots["Brine"], h.alice, h.general, "memory show")
        text = await show.text()
        assert show.ephemeral and "16 of your messages" in text and "/memory forget" in text
        forget = h.fake.command(h.bots["Brine"], h.alice, h.general, "memory forget")
        assert "Deleted 16 of your messages" in await forget.text()
        ask = h.fake.post(h.alice, h.general, f"{h.bots['Brine'].mention} where is the spare key?")
        await h.fake.wait_for(lambda: h.replies(ask))
        await h.settled()
        assert "flowerpot" not in system(h.engine.served[-1]), "forgotten means not recalled either"
        assert "Nothing is kept" not in await h.fake.command(h.bots["Brine"], h.alice, h.general,
                                                             "memory show").text(), "the question itself is new"

        denied = h.fake.command(h.bots["Brine"], h.alice, h.general, "memory guild", on=False)
        assert "Manage Server" in await denied.text()
        off = h.fake.command(h.bots["Brine"], h.owner, h.general, "memory guild", on=False)
        assert "Memory is off here" in await off.text()
        h.fake.post(h.alice, h.general, "this is not kept")
        await h.settled()
        assert "Nothing is kept about you" in await h.fake.command(h.bots["Brine"], h.alice, h.general,
                                                                  "memory show").text()


@async_test
async def test_channel_settings_set_temperature_and_reply_length_for_admins_only(tmp_path):
    async with running(tmp_path) as h:
        denied = h.fake.command(h.bots["Brine"], h.alice, h.general, "persona settings", temperature="0.3")
        assert "Manage Server" in await denied.text()
        bad = h.fake.command(h.bots["Brine"], h.owner, h.general, "persona settings", temperature="hot")
        assert "temperature: a number" in await bad.text()
        done = h.fake.command(h.bots["Brine"], h.owner, h.general, "persona settings", temperature="0.3", length=50)
        assert "temperature 0.3; reply length 50 tokens" in await done.text()
        other = h.fake.add_channel("other")
        for channel in (h.general, other):
            ask = h.fake.post(h.alice, channel, f"{h.bots['Brine'].mention} hi")
            await h.fake.wait_for(lambda: h.replies(ask))  # noqa: B023
        await h.settled()
        here, there = h.engine.served
        assert (here.sampling.temperature, here.sampling.max_new_tokens, here.sampling.top_p) == (0.3, 50, 0.9)
        assert there.sampling is None, "other channels keep the persona's own sampling"


def bot_replies(h) -> list[str]:
    names = {str(b.id): n for n, b in h.bots.items()}
    return [names[m["author"]["id"]] for m in h.general.messages if m["author"]["id"] in names and m["type"] in (0, 19)]


@async_test
async def test_group_chat_personas_answer_each_other_until_the_cap(tmp_path):
    async with running(tmp_path, group_cap=3, group_decay=1.0, group_cooldown=0) as h:
        first = h.fake.post(h.alice, h.general, f"{h.bots['Brine'].mention} say hi to Coral")
        await h.fake.wait_for(lambda: h.replies(first))
        await h.settled()
        await asyncio.sleep(0.2)
        assert bot_replies(h) == ["Brine"], "off by default: Coral is named but does not answer"

        on = h.fake.command(h.bots["Brine"], h.owner, h.general, "persona settings", group=True)
        assert "group chat on" in await on.text()
        again = h.fake.post(h.alice, h.general, f"{h.bots['Brine'].mention} say hi to Coral")
        await h.fake.wait_for(lambda: len(bot_replies(h)) == 5, 10)
        await h.settled()
        await asyncio.sleep(0.3)
        assert bot_replies(h) == ["Brine", "Brine", "Coral", "Brine", "Coral"], "the reply, then the cap of 3"
        assert h.replies(again)[0]["author"]["id"] == str(h.bots["Brine"].id)

        h.engine.delay = 0.05  # slow replies, so /stop lands before the cap would end it
        h.fake.post(h.alice, h.general, f"{h.bots['Coral'].mention} tell Brine a joke")  # a human resets it
        await h.fake.wait_for(lambda: len(bot_replies(h)) >= 6)
        stop = h.fake.command(h.bots["Brine"], h.alice, h.general, "stop")
        await stop.text()
        await h.settled()
        await asyncio.sleep(0.3)
        assert 6 <= len(bot_replies(h)) < 9, "/stop ended it before the cap"


@async_test
async def test_group_chat_stays_out_of_a_converse_session(tmp_path):
    async with running(tmp_path, group_decay=1.0, group_cooldown=0) as h:
        await h.fake.command(h.bots["Brine"], h.owner, h.general, "persona settings", group=True).text()
        start = h.fake.command(h.bots["Brine"], h.alice, h.general, "converse", persona_a="Brine",
                               persona_b="Coral", topic="Brine and Coral", turns=3)
        assert "Brine" in await start.text()
        session = h.app.sessions[h.general.id]
        await h.fake.wait_for(lambda: not session.active)
        await h.settled()
        await asyncio.sleep(0.3)
        assert bot_replies(h) == ["Brine", "Coral", "Brine"], "the session's turns only, though each names the other"


@async_test
async def test_a_restart_mid_conversation_loses_nothing_the_user_was_told(tmp_path):
    async with running(tmp_path) as h:
        brine, owner = h.bots["Brine"], h.owner
        h.fake.post(h.alice, h.general, "secret plans")
        assert "reset" in (await h.fake.command(brine, h.alice, h.general, "reset").text()).lower()
        kept = h.fake.command(brine, owner, h.general, "persona swap", adapter=h.bundle("brine-v2").name, keep=True)
        assert "also after a restart" in await kept.text()
        coral = h.fake.command(h.bots["Coral"], owner, h.general, "persona swap", adapter=h.bundle("coral-v2").name)
        assert "until the bot restarts" in await coral.text()
        settings = h.fake.command(brine, owner, h.general, "persona settings", temperature="0.3")
        assert "temperature 0.3" in await settings.text()
        h.engine.delay = 0.02
        h.fake.command(brine, h.alice, h.general, "converse", persona_a="Brine", persona_b="Coral", topic="tides",
                       turns=20)
        await h.fake.wait_for(lambda: len(h.engine.served) == 2)

        await h.restart()  # mid-conversation

        state = State(tmp_path / "state.db")
        (record,) = state.sessions(h.general.id)
        assert (record.status, record.reason, record.topic) == ("interrupted", "the bot restarted", "tides")
        assert 1 <= record.spoken < 20
        state.close()
        assert h.app.sessions == {}, "nothing runs on after the restart"
        note = h.general.messages[-1]
        assert note["content"].startswith("⏹️ The conversation about *tides* was cut off by a restart after ")
        assert note["author"]["id"] == str(brine.id)
        ask = h.fake.post(h.alice, h.general, f"{brine.mention} what were the secret plans?")
        await h.fake.wait_for(lambda: h.replies(ask))
        ask_coral = h.fake.post(h.alice, h.general, f"{h.bots['Coral'].mention} and you?")
        await h.fake.wait_for(lambda: h.replies(ask_coral))
        await h.settled()
        to_brine, to_coral = h.engine.served
        assert to_brine.bundle == "brine-v2", "the kept swap serves again"
        assert to_coral.bundle == "coral-v1", "the swap that was not kept is gone, as the owner was told"
        lines = [line for m in to_brine.messages for line in m["content"].splitlines()]
        assert "Alice: secret plans" not in lines and "secret plans" not in system(to_brine), "the reset holds"
        assert to_brine.sampling is not None and to_brine.sampling.temperature == 0.3, "the channel's settings hold"


@async_test
async def test_the_restart_notice_gets_through_a_cloudflare_429(tmp_path):
    """The notice goes through the retries every write gets (discord.py does not retry a Cloudflare 429)."""
    async with running(tmp_path) as h:
        h.engine.delay = 0.02
        h.fake.command(h.bots["Brine"], h.alice, h.general, "converse", persona_a="Brine", persona_b="Coral",
                       topic="tides", turns=20)
        await h.fake.wait_for(lambda: len(h.engine.served) == 2)
        h.fake.rate_limit("POST", r"/channels/\d+/messages$", retry_after=0.05, cloudflare=True)
        await h.restart()
        await h.fake.wait_for(lambda: h.general.messages[-1]["content"].startswith("⏹️ The conversation about"))
        assert any(r.status == 429 for r in h.fake.requests), "the notice met the 429"


@async_test
async def test_a_kept_swap_outside_adapters_dir_is_refused_at_start(tmp_path, caplog):
    """The state database may predate ADAPTERS_DIR's current setting or be edited by hand: a kept bundle
    loads again only through /persona swap's own check."""
    outside = write_bundle(tmp_path / "elsewhere" / "brine-evil", "brine-evil")
    async with running(tmp_path) as h:
        state = State(tmp_path / "state.db")
        state.keep_swap("Brine", str(outside), by_user=h.owner.id)
        state.keep_swap("Coral", str(h.bundle("coral-v2")), by_user=h.owner.id)  # inside: still served
        state.close()
        with caplog.at_level(logging.ERROR, logger="bot.app"):
            await h.restart()
        assert f"the kept swap to {outside} is refused" in caplog.text
        ask = h.fake.post(h.alice, h.general, f"{h.bots['Brine'].mention} who are you?")
        await h.fake.wait_for(lambda: h.replies(ask))
        ask_coral = h.fake.post(h.alice, h.general, f"{h.bots['Coral'].mention} and you?")
        await h.fake.wait_for(lambda: h.replies(ask_coral))
        await h.settled()
        assert [s.bundle for s in h.engine.served] == ["brine-v1", "coral-v2"]
