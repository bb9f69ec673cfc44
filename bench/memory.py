"""Long-term memory: is a fact said 200+ messages earlier recalled when it is asked about, and how often does the
prompt's start (the system message, where recalled memory goes) stay the same from one reply to the next?

A scripted channel: people chat (filler drawn from templates that reuse the facts' words in other senses, so
a word match alone is not enough), ten facts are planted, and each is asked about ``--gap`` messages later.
The channel is replayed through ``bot.memory`` as the bot runs it: every message is kept; the context window
holds ``--window`` messages and restarts at its newest half when full (``bot.history.window_start``); a reply
recalls only from messages that have left the window. Every message is treated as answered (a persona's own
channel), so every message is a prompt.

Measured:
1. recall rate: probes whose fact is in the memory block of the reply to the probe;
2. prefix stability: replies whose system block is byte-identical to the previous reply's while the window
   did not restart (so the engine's prefix cache keeps the whole previous prompt), sticky recall
   (``Memory.recall``) vs recalling afresh at every message (``Memory.search``);
3. the prefix cache's work left: characters of each prompt (memory block + window) after its common prefix
   with the previous prompt, summed, as a share of all prompt characters; "none" is the same channel with
   memory off, the floor set by the window's restarts; "tail" recalls afresh and places the block just
   before the newest turn instead of in the system message (an alternative placement, for comparison);
4. time per keep and per recall on this machine.

    python bench/memory.py                 # defaults: 1,500 messages, gap 200, window 20
    python bench/memory.py --gap 400 --messages 3000
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bot.memory import Memory, block  # noqa: E402
from bot.state import State  # noqa: E402

PEOPLE = ["Alice", "Bob", "Chen", "Dana", "Emeka"]
FACTS = [  # (fact, a question about it that uses the fact's own words)
    ("my sister is called Juniper, she's visiting next month", "what's my sister called again?"),
    ("I parked the van on Harbor Street behind the bakery", "where did I park the van?"),
    ("my cat's name is Pixel, she is a grey tabby", "what's my cat's name?"),
    ("the wifi password at the cabin is tangerine42", "what was the cabin wifi password?"),
    ("I'm allergic to peanuts, badly", "what am I allergic to?"),
    ("our dentist appointment moved to Thursday at 3", "when is the dentist appointment?"),
    ("my favourite band is The Cure", "which band is my favourite?"),
    ("I was born in Lisbon but grew up in Porto", "where was I born?"),
    ("the spare key is under the blue flowerpot", "where is the spare key?"),
    ("my boss is named Greta and she hates meetings", "what's my boss's name?"),
]
PARAPHRASED = [  # the same questions in other words: a word index cannot match most of these
    "do you remember my sibling's name?", "where's my car?", "what did I say my kitty is called?",
    "what's the internet login up at the cabin?", "which food should I avoid?", "when do I see the tooth doctor?",
    "what music do I love most?", "what's my home town?", "how do I get into the house if I'm locked out?",
    "who do I work for?",
]
FILLER = [
    "anyone watching the game tonight?", "lol that's so true", "I need more coffee", "brb, making lunch",
    "the weather is wild today", "did you see the new trailer?", "my {w} thing is a long story", "same here",
    "ugh, mondays", "that {w} joke got me", "does anyone know a good {w}?", "I'll check later",
    "we should plan something for the weekend", "haha no way", "the {w} down the road closed",
    "I read an article about {w}s yesterday", "my brother's {w} is driving me nuts", "sounds good to me",
    "can't believe it's already December", "the train was late again", "who's up for pizza?",
    "what's everyone doing later?", "I can never remember where I put things", "nice, congrats!",
]
FILLER_WORDS = ["cat", "band", "key", "van", "street", "password", "dentist", "sister", "boss", "name",
                "bakery", "wifi", "cabin", "appointment", "park", "flowerpot", "peanut", "meeting"]


@dataclass(frozen=True)
class Line:
    message_id: int
    author: str
    content: str
    fact: int | None = None  # index into FACTS of the fact this line states
    probe: int | None = None  # index into FACTS of the fact this line asks about


def channel(messages: int, gap: int, seed: int = 0, questions: list[str] | None = None) -> list[Line]:
    """The scripted channel: facts spread over the first part, each asked by its speaker ``gap`` later
    (in ``questions``' words, default the facts' own)."""
    rng = random.Random(seed)
    at_fact = {int((i + 1) * (messages - gap) / (len(FACTS) + 1)): i for i in range(len(FACTS))}
    speakers = {i: rng.choice(PEOPLE) for i in range(len(FACTS))}
    at_probe = {position + gap: fact for position, fact in at_fact.items()}
    lines = []
    for n in range(messages):
        if n in at_fact:
            fact = at_fact[n]
            lines.append(Line(1000 + n, speakers[fact], FACTS[fact][0], fact=fact))
        elif n in at_probe:
            fact = at_probe[n]
            question = questions[fact] if questions else FACTS[fact][1]
            lines.append(Line(1000 + n, speakers[fact], question, probe=fact))
        else:
            text = rng.choice(FILLER).format(w=rng.choice(FILLER_WORDS))
            lines.append(Line(1000 + n, rng.choice(PEOPLE), text))
    return lines


def replay(lines: list[Line], memory: Memory | None, *, window: int, sticky: bool = True,
           tail: bool = False) -> dict[str, float]:
    """Keep and answer every line as the bot would (``memory`` None: memory off); see the module docstring
    for what is counted."""
    start, previous, same, comparable, prompt, prefill, prompted = 0, None, 0, 0, "", 0, 0
    recalled, probes, keep_s, recall_s = 0, 0, 0.0, 0.0
    by_id = {line.message_id: line for line in lines}
    now = time.time()
    for n, line in enumerate(lines):
        began = time.perf_counter()
        if memory is not None:
            memory.keep(message_id=line.message_id, guild_id=1, channel_id=1, author_id=PEOPLE.index(line.author),
                        author_name=line.author, content=line.content, at=now - len(lines) + n)
        keep_s += time.perf_counter() - began
        restarted = n - start + 1 > window
        if restarted:
            start = n - window // 2 + 1
        began = time.perf_counter()
        floor = lines[start].message_id
        found = ([] if memory is None else memory.recall(1, line.content, window_start=floor) if sticky
                 else sorted(memory.search(1, line.content, before=floor), key=lambda m: m.message_id))
        recall_s += time.perf_counter() - began
        system = block(found, {})
        turns = [f"{m.author}: {m.content}" for m in lines[start:n + 1]]
        last, prompt = prompt, ("\n".join([*turns[:-1], system, turns[-1]]) if tail  # just before the newest turn
                                else system + "\x00" + "\n".join(turns))
        prefill += len(prompt) - len(os.path.commonprefix([last, prompt]))
        prompted += len(prompt)
        if previous is not None and not restarted:
            comparable += 1
            same += system == previous
        previous = system
        if line.probe is not None:
            probes += 1
            recalled += any(by_id[m.message_id].fact == line.probe for m in found)
    return {"recall": recalled / max(probes, 1), "probes": probes, "stable": same / max(comparable, 1),
            "prefill": prefill / prompted,
            "keep_ms": 1000 * keep_s / len(lines), "recall_ms": 1000 * recall_s / len(lines)}


def measure(messages: int, gap: int, window: int, budget: int, seed: int = 0) -> dict[str, dict[str, float]]:
    """Sticky and fresh recall on the facts' own words, sticky recall on paraphrased questions, fresh recall
    placed at the tail, and no memory."""
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, sticky, questions in (("sticky", True, None), ("fresh", False, None),
                                        ("paraphrased", True, PARAPHRASED), ("tail", False, None), ("none", True, None)):
            state = State(Path(folder) / f"{name}.db")
            memory = Memory(state, budget_chars=budget) if name != "none" else None
            results[name] = replay(channel(messages, gap, seed, questions), memory, window=window, sticky=sticky,
                                   tail=name == "tail")
            state.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=1500)
    parser.add_argument("--gap", type=int, default=200, help="messages between a fact and its question")
    parser.add_argument("--window", type=int, default=20, help="HISTORY_MESSAGES")
    parser.add_argument("--budget", type=int, default=1200, help="MEMORY_CHARS")
    parser.add_argument("--seeds", type=int, default=3, help="channels scripted with different seeds")
    args = parser.parse_args()
    for seed in range(args.seeds):
        results = measure(args.messages, args.gap, args.window, args.budget, seed)
        for name, r in results.items():
            print(f"seed {seed} {name:11} recall {r['recall']:.0%} of {r['probes']} probes; "
                  f"system block unchanged in {r['stable']:.0%} of replies within a window; "
                  f"prefilled {r['prefill']:.1%} of prompt characters; "
                  f"keep {r['keep_ms']:.3f} ms, recall {r['recall_ms']:.3f} ms per message")


if __name__ == "__main__":
    main()
