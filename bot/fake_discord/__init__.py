"""A local fake Discord for `personabot simulate` and the end-to-end tests."""
from .model import Channel, Interaction, User
from .server import FakeDiscord, Request

__all__ = ["Channel", "FakeDiscord", "Interaction", "Request", "User"]
