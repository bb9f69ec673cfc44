"""Regenerate / continue buttons on the fake Discord: swipes, who may press, only the latest reply, restarts."""
from __future__ import annotations

import itertools

from fake_discord_harness import async_test, running
from fake_engine import FakeEngine

from bot.buttons import DENIED, STALE
from bot.fake_discord.components import components, press


def takes() -> FakeEngine:
    count = itertools.count(1)
    return FakeEngine(lambda manifest, messages: f"take {next(count)}")


def ids(h, message) -> list[str]:
    return [c["custom_id"] for c in components(h.fake, message) if not c.get("disabled")]


def button_writes(h, message) -> int:
    return sum(1 for r in h.fake.requests if r.path.endswith(f"/messages/{message['id']}")
               and isinstance(r.body, dict) and "components" in r.body)


async def pressed(h, message, action: str, user=None):
    """Press ``action`` on ``message`` as ``user`` (default Alice); wait for the answer and, if it was
    allowed, for the buttons to be written again (the bot's last step)."""
    before = button_writes(h, message)
    interaction = press(h.fake, h.bots["Brine"], user or h.alice, message, f"pb:{action}:{message['id']}")
    await h.fake.wait_for(lambda: interaction.responses)
    if not interaction.ephemeral:
        await h.fake.wait_for(lambda: button_writes(h, message) > before)
    await h.settled()
    return interaction


@async_test
async def test_regenerate_keeps_swipes_to_page_through_and_continue_extends(tmp_path):
    async with running(tmp_path, engine=takes()) as h:
        ask = h.fake.post(h.alice, h.general, f"{h.bots['Brine'].mention} tell me a story")
        reply = await h.reply_text(ask, "take 1")
        await h.fake.wait_for(lambda: ids(h, reply))
        assert ids(h, reply) == [f"pb:regen:{reply['id']}", f"pb:more:{reply['id']}"]

        await pressed(h, reply, "regen")
        await h.fake.wait_for(lambda: reply["content"] == "take 2")
        assert h.engine.served[1].messages == h.engine.served[0].messages, "the same prompt, sampled again"
        assert [c.get("label") for c in components(h.fake, reply)][1] == "2/2"
        assert ids(h, reply)[0] == f"pb:prev:{reply['id']}", "on the newest swipe only ◀ is live"

        await pressed(h, reply, "prev")
        await h.fake.wait_for(lambda: reply["content"] == "take 1")
        assert len(h.engine.served) == 2, "paging generates nothing"

        await pressed(h, reply, "more")
        await h.fake.wait_for(lambda: reply["content"] == "take 1 take 3")
        assert h.engine.served[2].messages[-1] == {"role": "assistant", "content": "take 1"}
        await pressed(h, reply, "next")
        await h.fake.wait_for(lambda: reply["content"] == "take 2")
        await pressed(h, reply, "prev")
        await h.fake.wait_for(lambda: reply["content"] == "take 1 take 3")  # the continued swipe stays so
        assert len([m for m in h.general.messages if m["author"]["id"] == str(h.bots["Brine"].id)]) == 1


@async_test
async def test_only_the_asker_and_admins_press_and_only_the_latest_reply_has_buttons(tmp_path):
    async with running(tmp_path, engine=takes()) as h:
        bob = h.fake.add_user("Bob")
        first = await h.reply_text(h.fake.post(h.alice, h.general, f"{h.bots['Brine'].mention} one"), "take 1")
        await h.fake.wait_for(lambda: ids(h, first))  # a button can be pressed once it is there
        denied = await pressed(h, first, "regen", bob)
        assert await denied.text() == DENIED and denied.ephemeral and len(h.engine.served) == 1
        await pressed(h, first, "regen", h.owner)
        await h.fake.wait_for(lambda: first["content"] == "take 2")

        second = await h.reply_text(h.fake.post(bob, h.general, f"{h.bots['Brine'].mention} two"), "take 3")
        await h.fake.wait_for(lambda: ids(h, second) and not components(h.fake, first))
        stale = await pressed(h, first, "regen")
        assert await stale.text() == STALE and len(h.engine.served) == 3

        await h.restart(takes())
        await pressed(h, second, "regen", bob)
        await h.fake.wait_for(lambda: second["content"] == "take 1")  # buttons work after a restart


@async_test
async def test_a_dm_reply_is_a_plain_message_with_buttons(tmp_path):
    async with running(tmp_path, engine=takes()) as h:
        dm = h.fake.dm_channel(h.alice, h.bots["Brine"])
        h.fake.post(h.alice, dm, "psst")
        await h.fake.wait_for(lambda: len(dm.messages) == 2 and dm.messages[1]["content"] == "take 1")
        reply = dm.messages[1]
        assert "message_reference" not in reply, "no quote-reply in a DM"
        await h.fake.wait_for(lambda: ids(h, reply))
        await pressed(h, reply, "regen")
        await h.fake.wait_for(lambda: reply["content"] == "take 2")


@async_test
async def test_buttons_arrive_through_a_cloudflare_429(tmp_path):
    """The buttons' edit goes through the same retries as the reply's own writes (discord.py does not retry
    a Cloudflare 429 at all)."""
    async with running(tmp_path, engine=FakeEngine(lambda manifest, messages: "take 1", piece=100)) as h:
        h.fake.rate_limit("PATCH", r"/channels/\d+/messages/\d+$", retry_after=0.05, cloudflare=True)
        ask = h.fake.post(h.alice, h.general, f"{h.bots['Brine'].mention} tell me a story")
        reply = await h.reply_text(ask, "take 1")
        await h.fake.wait_for(lambda: any(r.status == 429 for r in h.fake.requests), timeout=10)
        refused = [r for r in h.fake.requests if r.status == 429]
        assert len(refused) == 1 and "components" in refused[0].body, "the buttons' edit met the 429"
        await h.fake.wait_for(lambda: ids(h, reply), timeout=10)
