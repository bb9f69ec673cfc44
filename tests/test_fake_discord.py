"""The fake Discord holds Discord's rules: spec-shaped replies, permissions, rate limits, gateway requests."""
from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import discord
import pytest
from discord_spec import SpecCheck, SpecViolation
from discord_spec.validate import check
from fake_discord_harness import async_test, running

from bot.fake_discord import FakeDiscord
from bot.fake_discord import rest as fake_rest

P = discord.Permissions


@asynccontextmanager
async def bare() -> AsyncIterator[tuple[FakeDiscord, Any]]:
    """A fake with one bot (token ``tok``) and a raw REST caller: ``call(method, path, json=None)``."""
    fake = await FakeDiscord().start()
    fake.add_bot("bot", "tok")
    spec = SpecCheck()
    fake.reply_observers.append(spec)
    try:
        async with aiohttp.ClientSession(headers={"Authorization": "Bot tok"}) as session:
            async def call(method: str, path: str, body: Any = None) -> tuple[int, Any, Any]:
                async with session.request(method, fake.api_url + path, json=body) as response:
                    text = await response.text()
                    data = json.loads(text) if response.content_type == "application/json" else text
                    return response.status, data, response.headers

            yield fake, call
    finally:
        await fake.close()
    spec.assert_clean()


@async_test
async def test_rest_messages_carry_no_member_gateway_ones_carry_the_nickname():
    async with bare() as (fake, call):
        alice = fake.add_user("alice", nick="Captain Alice")
        channel = fake.add_channel("general")
        message = fake.post(alice, channel, "ahoy")
        status, history, _ = await call("GET", f"/channels/{channel.id}/messages")
        assert status == 200 and history[0]["author"]["username"] == "alice"
        assert "member" not in history[0] and "guild_id" not in history[0]
        event = fake.gateway_message(message, channel)
        assert event["guild_id"] == str(fake.guild_id) and event["member"]["nick"] == "Captain Alice"


@async_test
async def test_permissions_come_from_roles_and_overwrites_with_discords_error_codes():
    async with bare() as (fake, call):
        bot = fake.bot_by_token("tok")
        hidden, muted, quiet = fake.add_channel("hidden"), fake.add_channel("muted"), fake.add_channel("quiet")
        fake.overwrite(hidden, fake.guild_id, deny=P(view_channel=True).value)
        fake.overwrite(muted, fake.bot_role(bot).id, deny=P(send_messages=True).value)
        fake.overwrite(quiet, fake.guild_id, deny=P(read_message_history=True).value)
        fake.post(fake.owner, quiet, "before the bot could read")
        status, error, _ = await call("GET", f"/channels/{hidden.id}/messages")
        assert (status, error["code"]) == (403, 50001)
        status, error, _ = await call("POST", f"/channels/{muted.id}/messages", {"content": "hi"})
        assert (status, error["code"]) == (403, 50013)
        assert (await call("GET", f"/channels/{quiet.id}/messages"))[:2] == (200, [])
        fake.overwrite(muted, bot, allow=P(send_messages=True).value)  # a member overwrite beats the role's
        assert (await call("POST", f"/channels/{muted.id}/messages", {"content": "hi"}))[0] == 200
        fake.bot_role(bot).permissions = P(view_channel=True, send_messages=True).value
        status, error, _ = await call("POST", f"/channels/{muted.id}/webhooks", {"name": "hook"})
        assert (status, error["code"]) == (403, 50013), "webhooks need Manage Webhooks"
        fake.bot_role(bot).permissions = P(administrator=True).value
        assert (await call("GET", f"/channels/{hidden.id}/messages"))[0] == 200, "Administrator ignores overwrites"


@async_test
async def test_referenced_message_is_null_once_deleted_and_may_be_absent():
    async with bare() as (fake, call):
        channel = fake.add_channel("general")
        original = fake.post(fake.owner, channel, "first")
        answer = fake.post(fake.owner, channel, "second", reply_to=original)
        path = f"/channels/{channel.id}/messages/{answer['id']}"
        assert (await call("GET", path))[1]["referenced_message"]["content"] == "first"
        fake.omit_referenced = True
        assert "referenced_message" not in (await call("GET", path))[1]
        fake.omit_referenced = False
        fake.delete(original)
        assert (await call("GET", path))[1]["referenced_message"] is None


@async_test
async def test_buckets_send_headers_per_channel_and_the_global_limit_holds():
    async with bare() as (fake, call):
        one, two = fake.add_channel("one"), fake.add_channel("two")
        fake.limit_writes(2, 5.0)
        remaining = []
        for _ in range(2):
            status, _, headers = await call("POST", f"/channels/{one.id}/messages", {"content": "x"})
            remaining.append(headers["X-RateLimit-Remaining"])
        assert remaining == ["1", "0"] and headers["X-RateLimit-Limit"] == "2" and headers["X-RateLimit-Bucket"]
        status, body, headers = await call("PATCH", f"/channels/{one.id}/messages/{one.messages[0]['id']}",
                                           {"content": "y"})
        assert status == 429 and not body["global"] and headers["Via"] and headers["X-RateLimit-Scope"] == "user"
        assert (await call("POST", f"/channels/{two.id}/messages", {"content": "x"}))[0] == 200, "own bucket"
        fake.limits.global_per_second = 7  # 4 requests so far in this second
        statuses = [(await call("GET", f"/channels/{two.id}"))[0] for _ in range(4)]
        status, body, headers = await call("GET", f"/channels/{two.id}")
        assert statuses == [200, 200, 200, 429] and body["global"] and headers["X-RateLimit-Global"] == "true"
        assert fake.invalid_requests == len(fake.rate_limited) == 3


@async_test
async def test_a_cloudflare_429_is_html_without_via():
    async with bare() as (fake, call):
        fake.rate_limit("GET", r"/users/@me", cloudflare=True)
        status, body, headers = await call("GET", "/users/@me")
        assert status == 429 and "Via" not in headers and "1015" in body
        assert (await call("GET", "/users/@me"))[0] == 200


@async_test
async def test_an_interaction_answered_after_three_seconds_is_unknown(tmp_path, monkeypatch):
    monkeypatch.setattr(fake_rest, "INTERACTION_DEADLINE", 0.0)
    async with running(tmp_path, ("Brine",)) as h:
        late = h.fake.command(h.bots["Brine"], h.alice, h.general, "persona list")
        await h.fake.wait_for(lambda: any(r.path.endswith("/callback") for r in h.fake.requests))
        callback = next(r for r in h.fake.requests if r.path.endswith("/callback"))
        assert callback.status == 404 and not late.responses


@async_test
async def test_a_second_guild_and_a_thread_reach_the_bot(tmp_path):
    async with running(tmp_path, ("Brine",)) as h:
        brine = h.bots["Brine"]
        other = h.fake.add_guild("elsewhere")
        lounge = h.fake.add_channel("lounge", guild=other)
        bob = h.fake.add_user("Bob", guild=other)
        client = h.app.clients[0]
        asked = h.fake.post(bob, lounge, f"{brine.mention} hello from elsewhere")
        await h.reply_text(asked, "[brine-v1] Bob: @Brine hello from elsewhere")
        thread = h.fake.add_thread(h.general, "side quest")
        in_thread = h.fake.post(h.alice, thread, f"{brine.mention} in a thread")
        await h.reply_text(in_thread, "[brine-v1] Alice: @Brine in a thread")
        assert len(client.guilds) == 2


@async_test
async def test_heartbeat_requests_reconnect_and_invalid_session_are_survived(tmp_path):
    async with running(tmp_path, ("Brine",)) as h:
        brine, gateway = h.bots["Brine"], h.fake.gateway
        session = gateway.live[brine.id]
        beats = len(session.heartbeats)
        gateway.request_heartbeat(brine)
        await h.fake.wait_for(lambda: len(session.heartbeats) > beats, 2)
        gateway.request_reconnect(brine)
        await h.fake.wait_for(lambda: session.resumes == 1, 5)
        resumed = h.fake.post(h.alice, h.general, f"{brine.mention} after reconnect")
        await h.reply_text(resumed, "[brine-v1] Alice: @Brine after reconnect")
        gateway.invalidate_session(brine)
        await h.fake.wait_for(lambda: gateway.identifies[brine.id] == 2, 10)
        fresh = h.fake.post(h.alice, h.general, f"{brine.mention} after a new session")
        await h.reply_text(fresh, "[brine-v1] Alice: @Brine after a new session", timeout=10)


def test_the_spec_check_rejects_gateway_fields_in_a_rest_message():
    message = {"id": "1", "channel_id": "2", "type": 0, "content": "hi", "mentions": [], "mention_roles": [],
               "attachments": [], "embeds": [], "timestamp": "2026-01-01T00:00:00+00:00", "edited_timestamp": None,
               "flags": 0, "components": [], "pinned": False, "mention_everyone": False, "tts": False,
               "author": {"id": "3", "username": "a", "avatar": None, "discriminator": "0", "public_flags": 0,
                          "flags": 0, "global_name": None, "primary_guild": None}}
    body = json.dumps(message).encode()
    check("GET", "/channels/2/messages/1", 200, "application/json", body)
    with pytest.raises(SpecViolation, match="member"):
        check("GET", "/channels/2/messages/1", 200, "application/json",
              json.dumps({**message, "member": {"roles": []}}).encode())
    with pytest.raises(SpecViolation, match="not a route"):
        check("GET", "/guilds/1/audit-logs", 200, "application/json", b"{}")
    skipped = SpecCheck()
    skipped("GET", "/api/v10/users/@me", 429, "text/html", b"<html>")
    assert skipped.checked == 0 and not skipped.violations
