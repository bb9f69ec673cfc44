"""What a persona needs from Discord in a channel, and what the bot's role lacks of it.

Without these Discord answers 403 (50001 Missing Access, 50013 Missing Permissions) and a reply never
appears; checked up front, the bot can say what to grant instead.
"""
from __future__ import annotations

import discord

NEEDED = ("view_channel", "send_messages", "read_message_history")
WEBHOOK = "manage_webhooks"
FIX = "a server admin can grant them to the bot's role (Server Settings -> Roles) or in this channel's settings"


def needs(webhook: bool, thread: bool = False) -> tuple[str, ...]:
    send = "send_messages_in_threads" if thread else "send_messages"
    return (*(send if p == "send_messages" else p for p in NEEDED), *((WEBHOOK,) if webhook else ()))


def lacking(granted: discord.Permissions, webhook: bool, thread: bool = False) -> list[str]:
    """Names (as Discord's settings show them) of what ``granted`` lacks for a persona."""
    return [_label(p) for p in needs(webhook, thread) if not getattr(granted, p)]


def in_channel(channel: discord.abc.GuildChannel | discord.Thread, webhook: bool) -> list[str]:
    """What the bot lacks in ``channel`` for a persona (webhook mode posts in the parent of a thread)."""
    me = channel.guild.me
    thread = isinstance(channel, discord.Thread)
    granted = channel.permissions_for(me)
    if webhook and thread and channel.parent is not None:
        granted = channel.parent.permissions_for(me)
    return lacking(granted, webhook, thread and not webhook)


def _label(permission: str) -> str:
    return " ".join(word.capitalize() for word in permission.split("_"))
