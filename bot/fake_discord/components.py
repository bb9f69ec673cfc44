"""Message components for the fake Discord: a user presses a button on a bot's message.

Discord sends the bot an INTERACTION_CREATE of type 3 (MESSAGE_COMPONENT) carrying the button's
``custom_id`` and the message it sits on; the bot must answer the interaction (a deferred update, type 6,
or a message) and may then edit the message. The interaction is recorded like a slash command's, so
``Interaction.text()`` shows an ephemeral answer.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .model import Interaction, User

if TYPE_CHECKING:
    from .server import FakeDiscord

BUTTON = 2  # component type
MESSAGE_COMPONENT = 3  # interaction type


def components(fake: FakeDiscord, message: dict) -> list[dict]:
    """The components the bot last set on ``message`` (from its recorded create/edit requests that succeeded:
    the fake's message payloads do not carry them), flattened out of their action rows."""
    found: list[dict] = []
    for request in fake.requests:
        if (request.method in ("POST", "PATCH") and request.status < 400 and isinstance(request.body, dict)
                and "components" in request.body):
            if request.path.endswith(f"/messages/{message['id']}"):
                found = [c for row in request.body["components"] for c in row.get("components", [])]
    return found


def press(fake: FakeDiscord, bot: User, user: User, message: dict, custom_id: str) -> Interaction:
    """``user`` presses the button ``custom_id`` on ``message``, which ``bot`` sent."""
    channel = fake.channels[int(message["channel_id"])]
    return fake.interact(bot, user, channel, MESSAGE_COMPONENT, {"custom_id": custom_id, "component_type": BUTTON},
                         message=message)
