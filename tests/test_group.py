"""Group-chat loop control: decay, cap, cooldown, human reset, /stop."""
from __future__ import annotations

from bot.group import GroupChats, named


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_names_are_matched_as_words_in_any_case():
    assert named("what do you think, coral?", "Coral") and named("@Coral hi", "Coral")
    assert not named("the coralreef", "Coral") and not named("ok", "Coral")
    assert named("ask Sea Witch", "Sea Witch") and not named("sea", "Sea Witch")


def test_chance_decays_with_each_bot_reply_and_stops_at_the_cap():
    clock = Clock()
    group = GroupChats(cap=4, decay=0.5, cooldown=0, clock=clock, roll=lambda: 0.0)
    chances = []
    while group.chance(1):
        chances.append(group.chance(1))
        assert group.decide(1)
    assert chances == [1.0, 0.5, 0.25, 0.125], "four replies, each half as likely, then none"
    assert not group.decide(1)
    assert group.chance(2) == 1.0, "channels are separate"
    group.human(1)
    assert group.chance(1) == 1.0, "a human message starts over"


def test_an_unlucky_roll_declines_without_counting():
    group = GroupChats(decay=0.5, cooldown=0, clock=Clock(), roll=lambda: 0.7)
    assert group.decide(1)  # chance 1.0 beats any roll
    assert not group.decide(1) and group.loops[1].streak == 1, "0.7 >= 0.5: declined, streak unchanged"


def test_cooldown_spaces_bot_replies():
    clock = Clock()
    group = GroupChats(cooldown=5, clock=clock, roll=lambda: 0.0)
    assert group.decide(1)
    clock.now += 4.9
    assert not group.decide(1)
    clock.now += 0.2
    assert group.decide(1)


def test_stop_holds_until_a_human_writes():
    group = GroupChats(cooldown=0, clock=Clock(), roll=lambda: 0.0)
    group.stop(1)
    assert not group.decide(1)
    group.human(1)
    assert group.decide(1)
