"""Where card JSON lives: a .json file, a PNG's ``ccv3``/``chara`` text chunk, or a CHARX zip's card.json."""
from __future__ import annotations

import base64
import binascii
import json
import zipfile
from pathlib import Path
from typing import Any

from finetune.conversation import DataError, load_json

_PNG_KEYWORDS = ("ccv3", "chara")  # V3 first: a card carrying both is a V3 card with a V2 fallback
CARD_SUFFIXES = (".json", ".png", ".charx")


def load_card_json(path: Path) -> tuple[Any, list[str]]:
    """The card's decoded JSON and the problems met on the way (e.g. a broken ccv3 chunk, chara used)."""
    suffix = path.suffix.lower()
    if suffix == ".png":
        return _png(path)
    if suffix == ".charx":
        return _charx(path), []
    return load_json(path), []


def _png(path: Path) -> tuple[Any, list[str]]:
    from PIL import Image  # only card files need Pillow

    try:
        with Image.open(path) as image:
            kind = image.format
            chunks = {key.lower(): value for key, value in image.text.items()} if kind == "PNG" else {}
    except (OSError, ValueError) as e:  # ValueError: Pillow's text-chunk size limits
        raise DataError(f"{path}: cannot read PNG: {e}") from e
    if kind != "PNG":
        raise DataError(f"{path}: not a PNG image (Pillow reads it as {kind})")
    present = [k for k in _PNG_KEYWORDS if k in chunks]
    if not present:
        raise DataError(f"{path}: PNG holds no character card (no 'ccv3' or 'chara' text chunk)")
    errors = []
    for keyword in present:
        try:
            card = _decode(chunks[keyword])
        except ValueError as e:
            errors.append(f"'{keyword}' text chunk is not base64-encoded JSON: {e}")
            continue
        problems = [f"{path}: {error}; using the '{keyword}' chunk instead" for error in errors]
        return card, problems
    raise DataError(f"{path}: {'; '.join(errors)}")


def _decode(chunk: str) -> Any:
    encoded = chunk.strip()
    try:
        return json.loads(base64.b64decode(encoded + "=" * (-len(encoded) % 4)).decode("utf-8"))
    except (binascii.Error, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(str(e)) from e


def _charx(path: Path) -> Any:
    """CHARX (V3 spec): a zip whose root holds card.json; the assets beside it are not for training."""
    try:
        with zipfile.ZipFile(path) as archive:
            try:
                data = archive.read("card.json")
            except KeyError:
                raise DataError(f"{path}: CHARX archive has no card.json at its root") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{path}: not a readable CHARX (zip) file: {e}") from e
    except RuntimeError as e:  # encrypted entries
        raise DataError(f"{path}: cannot read card.json from the CHARX archive: {e}") from e
    try:
        return json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: card.json in the CHARX archive is not UTF-8 JSON: {e}") from e
