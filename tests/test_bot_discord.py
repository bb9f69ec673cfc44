"""End to end: the real discord.py client against the local fake Discord, with FakeEngine behind it."""
from __future__ import annotations

import asyncio

import pytest
from fake_discord_harness import async_test, running
from fake_engine import FakeEngine, write_bundle

from finetune.cards.context import CardContext

from bot.app import StartupError
from bot.streaming import split_message


@async_test
async def test_mention_gets_a_streamed_reply(tmp_path):
    async with running(tmp_path) as h:
        h.engine.piece, h.engine.delay, h.engine.first_delay = 2, 0.01, 0.25
        message = h.fake.post(h.alice, h.general, f"{h.bots['Brine'].mention} tell me about the sea")
        reply = await h.reply_text(message, "[brine-v1] Alice: @Brine tell me about the sea")
        await h.settled()
        writes = [r for r in h.fake.requests if r.method in ("POST", "PATCH") and "/messages" in r.path]
        assert writes[0].method == "POST" and all(w.method == "PATCH" for w in writes[1:])
        assert len(writes) >= 3, "streamed: posted early, then edited"
        assert writes[0].body["allowed_mentions"] == {"parse": [], "replied_user": True}
        assert all(w.body["allowed_mentions"]["parse"] == [] for w in writes), "never pings everyone or roles"
        assert (h.bots["Brine"].id, h.general.id) in h.fake.typing, "typing indicator while thinking"
        assert reply["author"]["id"] == str(h.bots["Brine"].id)
        assert [s.adapter for s in h.engine.served] == ["Brine"], "Coral was not addressed"


@async_test
async def test_long_reply_continues_in_new_messages_split_on_boundaries(tmp_path):
    words = " ".join(f"word{i}" for i in range(900)) + "\n" + " ".join(f"tail{i}" for i in range(300))
    engine = FakeEngine(lambda manifest, messages: words, piece=250, delay=0.001)
    async with running(tmp_path, engine=engine) as h:
        message = h.fake.post(h.alice, h.general, f"{h.bots['Brine'].mention} talk a lot")
        await h.fake.wait_for(lambda: h.replies(message), 5)
        await h.settled()
        first = h.replies(message)[0]
        ours = [m for m in h.general.messages if int(m["id"]) >= int(first["id"])]
        assert [m["content"] for m in ours] == split_message(words)
        assert len(ours) == 6 and all(len(m["content"]) <= 2000 for m in ours)
        assert all("message_reference" not in m for m in ours[1:]), "continuations are plain messages"
        assert " ".join(m["content"] for m in ours).split() == words.split(), "no word cut or lost"
        assert ours[3]["content"].endswith("word899") and ours[4]["content"].startswith("tail0"), "cut at the line"


@async_test
async def test_who_answers_what(tmp_path):
    async with running(tmp_path, options={"Coral": {"channels": []}}) as h:
        den = h.fake.add_channel("coral-den")
        h.app.personas[1].channels.append(den.id)
        brine, coral = h.bots["Brine"], h.bots["Coral"]
        h.fake.post(h.alice, h.general, "nobody is addressed here")
        h.fake.post(coral, h.general, f"{brine.mention} a bot pinging a bot")
        mention = h.fake.post(h.alice, h.general, f"{brine.mention} hi")
        first = await h.reply_text(mention, "[brine-v1] Alice: @Brine hi")
        followup = h.fake.post(h.alice, h.general, "and a reply", reply_to=first)
        await h.reply_text(followup, "[brine-v1] Alice: and a reply")
        owned = h.fake.post(h.alice, den, "no mention needed in Coral's own channel")
        await h.fake.wait_for(lambda: any(m["author"]["id"] == str(coral.id) for m in den.messages))
        dm = h.fake.post(h.alice, h.fake.dm_channel(h.alice, coral), "psst")
        await h.fake.wait_for(lambda: len(h.fake.channels[int(dm["channel_id"])].messages) == 2)
        await h.settled()
        assert [(s.adapter, s.messages[-1]["content"].splitlines()[-1]) for s in h.engine.served] == [
            ("Brine", "Alice: @Brine hi"), ("Brine", "Alice: and a reply"),
            ("Coral", "Alice: no mention needed in Coral's own channel"), ("Coral", "Alice: psst"),
        ]
        assert h.replies(owned)[0]["author"]["id"] == str(coral.id)


@async_test
async def test_allow_and_block_lists(tmp_path):
    async with running(tmp_path) as h:
        crew = h.fake.add_role("crew")
        bob = h.fake.add_user("Bob", roles=[crew])
        h.app.personas[0].block.users.append(h.alice.id)
        h.app.personas[1].allow.roles.append(crew)
        for user in (h.alice, bob):
            h.fake.post(user, h.general, f"{h.bots['Brine'].mention} {h.bots['Coral'].mention} hey")
        await h.fake.wait_for(lambda: len(h.engine.served) == 2)
        await h.settled()
        speakers = sorted((s.adapter, s.messages[-1]["content"].splitlines()[-1].split(":")[0])
                          for s in h.engine.served)
        assert speakers == [("Brine", "Bob"), ("Coral", "Bob")]


@async_test
async def test_context_names_speakers_and_own_turns_are_assistant(tmp_path):
    async with running(tmp_path) as h:
        bob = h.fake.add_user("Bob")
        h.fake.post(h.alice, h.general, "the tide is high")
        ask = h.fake.post(bob, h.general, f"{h.bots['Brine'].mention} is it?")
        first = await h.reply_text(ask, "[brine-v1] Bob: @Brine is it?")
        again = h.fake.post(bob, h.general, "sure?", reply_to=first)
        await h.reply_text(again, "[brine-v1] Bob: sure?")
        assert h.engine.served[0].messages == [
            {"role": "user", "content": "Alice: the tide is high\nBob: @Brine is it?"}]
        assert h.engine.served[1].messages == [
            {"role": "user", "content": "Bob: @Brine is it?"},  # the reply chain: question, answer, follow-up
            {"role": "assistant", "content": "[brine-v1] Bob: @Brine is it?"},
            {"role": "user", "content": "Bob: sure?"},
        ]


@async_test
async def test_reset_forgets_earlier_messages(tmp_path):
    async with running(tmp_path) as h:
        h.fake.post(h.alice, h.general, "secret plans")
        reset = h.fake.command(h.bots["Brine"], h.alice, h.general, "reset")
        assert "reset" in (await reset.text()).lower()
        await asyncio.sleep(0.01)
        ask = h.fake.post(h.alice, h.general, f"{h.bots['Brine'].mention} what did I say?")
        await h.reply_text(ask, "[brine-v1] Alice: @Brine what did I say?")
        assert h.engine.served[0].messages == [{"role": "user", "content": "Alice: @Brine what did I say?"}]


@async_test
async def test_reset_opens_the_new_context_with_the_cards_greeting(tmp_path):
    """As a new chat does in SillyTavern: the persona posts one of its card's greetings ({{user}}: whoever
    ran /reset), which its next reply sees as its own first turn; group-only greetings join in group chat."""
    card = CardContext(greetings=["Ahoy, {{user}}!", "Who goes there, {{user}}?"], group_greetings=["Ahoy, all!"])
    bundles = {"Brine": write_bundle(tmp_path / "bundles" / "brine-card", "brine-card", card=card),
               "Coral": write_bundle(tmp_path / "bundles" / "coral-crew", "coral-crew",
                                     card=CardContext(group_greetings=["Hello, crew!"]))}
    async with running(tmp_path, bundles=bundles) as h:
        brine, coral = h.bots["Brine"], h.bots["Coral"]

        def said(bot, after: int) -> list[dict]:  # plain messages, not command answers (type 20)
            return [m for m in h.general.messages if m["author"]["id"] == str(bot.id) and m["type"] == 0
                    and int(m["id"]) > after]

        h.fake.post(h.alice, h.general, "secret plans")
        reset = h.fake.command(brine, h.alice, h.general, "reset")
        assert "reset" in (await reset.text()).lower() and not reset.ephemeral
        answered = int(h.fake.interaction_messages[reset.id][0]["id"])
        await h.fake.wait_for(lambda: said(brine, answered))
        greeting = said(brine, answered)[0]["content"]
        assert greeting in ("Ahoy, Alice!", "Who goes there, Alice?")
        ask = h.fake.post(h.alice, h.general, f"{brine.mention} who are you?")
        await h.reply_text(ask, "[brine-card] Alice: @Brine who are you?")
        assert h.engine.served[-1].messages == [{"role": "assistant", "content": greeting},
                                                {"role": "user", "content": "Alice: @Brine who are you?"}]
        # Coral's card greets only in group chat; named from another persona's bot, it is still Coral
        quiet = h.fake.command(brine, h.alice, h.general, "reset", persona="Coral")
        assert "no greeting" in await quiet.text()
        await h.settled()
        assert not said(coral, 0), "nothing posted"
        await h.fake.command(coral, h.owner, h.general, "persona settings", group=True).text()
        await h.fake.command(brine, h.alice, h.general, "reset", persona="Coral").text()
        await h.fake.wait_for(lambda: said(coral, 0))
        assert [m["content"] for m in said(coral, 0)] == ["Hello, crew!"]
        dm = h.fake.dm_channel(h.alice, brine)  # a DM: the bot's own persona greets there
        await h.fake.command(brine, h.alice, dm, "reset").text()
        await h.fake.wait_for(lambda: any(m["type"] == 0 for m in dm.messages))
        assert [m["content"] for m in dm.messages if m["type"] == 0][0] in ("Ahoy, Alice!", "Who goes there, Alice?")
        refused = h.fake.command(brine, h.alice, dm, "reset", persona="Coral")
        assert "cannot write in this DM" in await refused.text()


@async_test
async def test_reset_on_a_bot_hosting_several_personas_says_how_to_have_one_greet(tmp_path):
    card = CardContext(greetings=["Bubbles, {{user}}!"])
    bundles = {"Reef": write_bundle(tmp_path / "bundles" / "reef-card", "reef-card", card=card)}
    async with running(tmp_path, (), webhook=("Reef", "Kelp"), bundles=bundles) as h:
        host = h.bots["Reef"]
        answer = await h.fake.command(host, h.alice, h.general, "reset").text()
        assert "reset" in answer.lower() and "/reset persona:" in answer, "which persona greets is not guessed"
        await h.fake.command(host, h.alice, h.general, "reset", persona="Reef").text()
        await h.fake.wait_for(lambda: h.general.messages[-1]["content"] == "Bubbles, Alice!")
        assert h.general.messages[-1]["author"]["username"] == "Reef", "posted as the persona, by webhook"


@async_test
async def test_swap_hot_swaps_the_adapter_for_owners_only(tmp_path):
    async with running(tmp_path) as h:
        brine = h.bots["Brine"]
        h.bundle("brine-v2")
        denied = h.fake.command(brine, h.alice, h.general, "persona swap", adapter="brine-v2")
        assert "owners" in await denied.text() and denied.ephemeral
        bad = h.fake.command(brine, h.owner, h.general, "persona swap", adapter="nope")
        text = await bad.text()
        assert text.startswith("❌") and "nope" in text and "keeps serving" in text and bad.ephemeral
        first = h.fake.post(h.alice, h.general, f"{brine.mention} one")
        await h.reply_text(first, "[brine-v1] Alice: @Brine one")
        swap = h.fake.command(brine, h.owner, h.general, "persona swap", adapter="brine-v2")
        assert "now serves `brine-v2`" in await swap.text()
        second = h.fake.post(h.alice, h.general, f"{brine.mention} two")
        await h.reply_text(second, "[brine-v2] Alice: @Brine two")
        assert [s.bundle for s in h.engine.served] == ["brine-v1", "brine-v2"]
        listing = h.fake.command(h.bots["Coral"], h.alice, h.general, "persona list")
        text = await listing.text()
        assert "**Brine** (own account): `brine-v2`" in text and "**Coral**" in text
        reload = h.fake.command(brine, h.owner, h.general, "persona reload")
        assert "reloaded `brine-v2`" in await reload.text()


@async_test
async def test_webhook_personas_post_under_their_own_name(tmp_path):
    options = {"Reef": {"avatar": "https://example.com/reef.png"}}
    async with running(tmp_path, (), webhook=("Reef", "Kelp"), options=options) as h:
        ask = h.fake.post(h.alice, h.general, "hey @reef, how deep?")
        expected = "[reef-v1] Alice: hey @reef, how deep?"
        reply = await h.fake.wait_for(lambda: next((m for m in h.general.messages if m["content"] == expected), None))
        assert reply["author"]["username"] == "Reef" and h.fake.avatar_urls[reply["id"]].endswith("reef.png")
        assert reply["webhook_id"] and not h.replies(ask)
        follow = h.fake.post(h.alice, h.general, "deeper?", reply_to=reply)
        await h.fake.wait_for(lambda: any(m["content"] == "[reef-v1] Alice: deeper?" for m in h.general.messages))
        await h.settled()
        assert h.engine.served[-1].messages[-2:] == [
            {"role": "assistant", "content": "[reef-v1] Alice: hey @reef, how deep?"},
            {"role": "user", "content": "Alice: deeper?"},
        ]
        assert [s.adapter for s in h.engine.served] == ["Reef", "Reef"] and follow
        hooks = [r for r in h.fake.requests if "/webhooks/" in r.path and r.method == "POST"]
        assert all(r.body["username"] == "Reef" for r in hooks)
        assert len([r for r in h.fake.requests if r.path.endswith("/webhooks") and r.method == "POST"]) == 1


@async_test
async def test_a_429_is_honoured_and_the_reply_completes(tmp_path):
    async with running(tmp_path) as h:
        h.engine.delay = 0.01
        h.fake.rate_limit("PATCH", r"/channels/\d+/messages/\d+", retry_after=0.4)
        message = h.fake.post(h.alice, h.general, f"{h.bots['Brine'].mention} under pressure")
        await h.reply_text(message, "[brine-v1] Alice: @Brine under pressure")
        limited = h.fake.rate_limited[0]
        retried = next(r for r in h.fake.requests if r.method == "PATCH" and r.at > limited.at)
        assert retried.status == 200 and retried.at - limited.at >= 0.38


@async_test
async def test_gateway_disconnect_is_survived(tmp_path):
    async with running(tmp_path) as h:
        brine = h.bots["Brine"]
        session = h.fake.gateway.live[brine.id]
        await h.fake.disconnect(brine)
        missed = h.fake.post(h.alice, h.general, f"{brine.mention} while you were away")
        await h.fake.wait_for(lambda: session.resumes == 1)
        after = h.fake.post(h.alice, h.general, f"{brine.mention} welcome back")
        await h.reply_text(missed, "[brine-v1] Alice: @Brine while you were away")
        await h.reply_text(after, "[brine-v1] Alice: @Brine welcome back")


@async_test
async def test_slow_start_shows_a_placeholder_and_engine_errors_show_up(tmp_path):
    async with running(tmp_path, engine=FakeEngine(first_delay=0.6)) as h:
        message = h.fake.post(h.alice, h.general, f"{h.bots['Brine'].mention} slowly")
        placeholder = await h.fake.wait_for(lambda: h.replies(message), 0.55)
        assert placeholder[0]["content"] == "…"
        await h.reply_text(message, "[brine-v1] Alice: @Brine slowly")
        h.engine.first_delay, h.engine.fail = 0, "CUDA out of memory"
        broken = h.fake.post(h.alice, h.general, f"{h.bots['Brine'].mention} again")
        reply = await h.fake.wait_for(lambda: h.replies(broken))
        await h.settled()
        assert "could not finish this reply" in reply[0]["content"] and "CUDA" not in reply[0]["content"]


@async_test
async def test_startup_errors_name_the_persona_and_the_fix(tmp_path):
    with pytest.raises(StartupError, match=r"'Brine' \(BRINE_TOKEN\).*rejected the bot token"):
        async with running(tmp_path, ("Brine",), tokens={"Brine": "wrong"}):
            pass
    with pytest.raises(StartupError, match=r"'Coral' \(CORAL_TOKEN\).*Message Content intent"):
        async with running(tmp_path, ("Coral",), denied_intents=True):
            pass
