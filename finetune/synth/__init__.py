"""``finetune data synth``: training dialogue for a persona that has only a card or a description.

A teacher model plays the character from the persona's prompt, examples and lorebook (``teacher``); a
user simulator writes Discord-style openers and follow-ups (``users``); every reply passes the filters
or is sampled again (``filters``); ``run`` drives it in batches, resumable and reproducible from a seed,
and writes a JSONL source with provenance."""
