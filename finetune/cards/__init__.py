"""Character cards as SillyTavern and the V2/V3 specs read them: macros, nickname, prompt assembly,
greetings, depth prompt and post-history instructions, and the card's lorebook (``character_book``).

``macros`` and ``lorebook`` import nothing beyond the standard library, so the bot can use them to
serve a card's lorebook without loading any reader."""
