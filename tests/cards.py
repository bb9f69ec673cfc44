"""Test helper: character-card PNGs written the way SillyTavern writes them."""
from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo


def write_card_png(card_json: dict[str, Any], image_path_out: str | Path, keyword: str = "chara") -> None:
    """Write a small PNG carrying ``card_json`` as base64 JSON in a tEXt chunk named ``keyword``."""
    info = PngInfo()
    encoded = base64.b64encode(json.dumps(card_json, ensure_ascii=False).encode())
    info.add_text(keyword, encoded.decode("ascii"))
    Image.new("RGB", (64, 64), (70, 110, 140)).save(image_path_out, "PNG", pnginfo=info)
